"""vLLM's ``prompt_logprobs`` (each prompt token's logprob, rank and top-k, checked against a direct fp32 forward
of the model) and ``skip_special_tokens: false`` (special tokens' text kept, streamed or not), against an
in-process app."""

import json

import httpx
import pytest
import torch

from retnet.model import RetNetForCausalLM
from tests.serve.conftest import save_micro_model, serve_app
from tests.serve.test_sentencepiece import sentencepiece_tokenizer

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def model(model_dir):
    return RetNetForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """``[T, V]``: the model's next-token logprobs after each of ``ids``, one full forward in fp32."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def check_prompt_logprobs(entries: list, ids: list[int], lp: torch.Tensor, k: int, first_null: bool = True) -> None:
    """``entries`` (vLLM's prompt_logprobs as JSON) score ``ids``; ``lp[t]`` is the distribution ``ids[t]`` was
    drawn from (row -1: the one before the first token, when a history precedes it)."""
    assert len(entries) == len(ids)
    if first_null:
        assert entries[0] is None
    for t, entry in enumerate(entries):
        if t == 0 and first_null:
            continue
        row = lp[t - 1] if first_null else lp[t]
        own = entry[str(ids[t])]
        assert own["logprob"] == pytest.approx(row[ids[t]].item(), abs=1e-4)
        assert own["rank"] == int((row > row[ids[t]]).sum()) + 1
        assert isinstance(own["decoded_token"], str)
        values, top = row.topk(k)
        for rank, (value, token) in enumerate(zip(values.tolist(), top.tolist()), 1):
            assert entry[str(token)]["logprob"] == pytest.approx(value, abs=1e-4)
            assert entry[str(token)]["rank"] == rank
        assert len(entry) == k + (ids[t] not in top.tolist())


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def sample(client, name: str) -> float:
    return client.app.state.engine.metrics.registry.get_sample_value(name)


# -- prompt_logprobs ---------------------------------------------------------------------------------------------
async def test_prompt_logprobs_are_the_models_log_softmax_on_each_choice(client, model):
    prompts = [PROMPT, "Hello world! How are you"]
    before = sample(client, "retnet_prefill_tokens_total")
    r = await client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 3, "n": 2, "prompt_logprobs": 3,
                                                   "return_token_ids": True, **GREEDY})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    for choice in choices:
        ids = choice["prompt_token_ids"]
        check_prompt_logprobs(choice["prompt_logprobs"], ids, log_softmax(model, ids), 3)
        assert "logprobs" in choice and choice["logprobs"] is None  # prompt_logprobs asks for no others
    # n choices share their prompt's scores, computed once: each prompt is prefilled once.
    assert choices[0]["prompt_logprobs"] == choices[1]["prompt_logprobs"] != choices[2]["prompt_logprobs"]
    lengths = [len(choices[0]["prompt_token_ids"]), len(choices[2]["prompt_token_ids"])]
    assert sample(client, "retnet_prefill_tokens_total") - before == sum(lengths)
    # Not asked: no field (OpenAI's shape).
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert "prompt_logprobs" not in r.json()["choices"][0]


async def test_chat_prompt_logprobs_are_the_responses(client, model):
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}],
            "max_tokens": 2, "n": 2, "prompt_logprobs": 0, "return_token_ids": True, **GREEDY}
    # The system prompt's state is cached (the chat's history) by a request that does not score the prompt ...
    r = await client.post("/v1/chat/completions", json={**body, "prompt_logprobs": None})
    assert "prompt_logprobs" not in r.json()
    r = await client.post("/v1/chat/completions", json={**body, "max_tokens": 1, "prompt_logprobs": None})
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    # ... and one that does runs it whole.
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    ids = data["choices"][0]["prompt_token_ids"]
    # vLLM's place for a chat's prompt ids is the response's, beside choices (as its stream's role chunk has them)
    assert data["prompt_token_ids"] == ids == data["choices"][1]["prompt_token_ids"]
    check_prompt_logprobs(data["prompt_logprobs"], ids, log_softmax(model, ids), 0)
    assert all(len(entry) == 1 for entry in data["prompt_logprobs"][1:])  # k = 0: the prompt token's own
    assert "prompt_logprobs" not in data["choices"][0]


async def test_a_cached_prompt_is_scored_whole(client, model):
    body = {"prompt": PROMPT, "max_tokens": 2, **GREEDY}
    await client.post("/v1/completions", json=body)
    cached = await client.post("/v1/completions", json=body)
    assert cached.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the prompt's state is cached
    r = await client.post("/v1/completions", json={**body, "prompt_logprobs": 2, "return_token_ids": True})
    choice = r.json()["choices"][0]
    ids = choice["prompt_token_ids"]
    check_prompt_logprobs(choice["prompt_logprobs"], ids, log_softmax(model, ids), 2)
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert choice["text"] == cached.json()["choices"][0]["text"]


async def test_prompt_logprobs_in_a_session_score_the_turn_after_its_history(client, model):
    first = (await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "session_id": "s",
                                                        "return_token_ids": True, **GREEDY})).json()["choices"][0]
    r = await client.post("/v1/completions", json={"prompt": "\nclass Stack:", "max_tokens": 2, "session_id": "s",
                                                   "prompt_logprobs": 2, "return_token_ids": True, **GREEDY})
    second = r.json()["choices"][0]
    history = first["prompt_token_ids"] + first["token_ids"]
    ids = second["prompt_token_ids"]
    # As the echo's: the turn's first token has a logprob, after the session's last token.
    lp = log_softmax(model, history + ids)[len(history) - 1 :]
    check_prompt_logprobs(second["prompt_logprobs"], ids, lp, 2, first_null=False)


async def test_prompt_logprobs_across_prefill_pieces_and_rounds(open_app, model):
    # The piece before a piece predicts its first token; the budget splits the prompt over rounds.
    async with open_app(prefill_chunk_tokens=3, prefill_token_budget=4) as client:
        r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 2,
                                                       "return_token_ids": True, **GREEDY})
    choice = r.json()["choices"][0]
    ids = choice["prompt_token_ids"]
    assert len(ids) > 6
    check_prompt_logprobs(choice["prompt_logprobs"], ids, log_softmax(model, ids), 2)


async def test_prompt_logprobs_through_the_real_server(server, model):
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 1,
                                                       "return_token_ids": True, **GREEDY})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = choice["prompt_token_ids"]
    check_prompt_logprobs(choice["prompt_logprobs"], ids, log_softmax(model, ids), 1)  # token ids as string keys


async def test_prompt_logprobs_cover_the_tokens_truncate_prompt_tokens_runs(client, model):
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "truncate_prompt_tokens": 5,
                                                   "prompt_logprobs": 1, "return_token_ids": True, **GREEDY})
    choice = r.json()["choices"][0]
    ids = choice["prompt_token_ids"]
    assert len(ids) == 5 == r.json()["usage"]["prompt_tokens"]
    check_prompt_logprobs(choice["prompt_logprobs"], ids, log_softmax(model, ids), 1)


async def test_prompt_logprobs_beside_echo_logprobs_keep_their_own_k(client, model):
    body = {"prompt": PROMPT, "max_tokens": 2, "echo": True, "logprobs": 1, "return_token_ids": True, **GREEDY}
    plain = (await client.post("/v1/completions", json=body)).json()["choices"][0]
    both = (await client.post("/v1/completions", json={**body, "prompt_logprobs": 4})).json()["choices"][0]
    assert both["logprobs"] == plain["logprobs"]  # the echo's top_logprobs: 1 alternative (+ the token)
    ids = both["prompt_token_ids"]
    check_prompt_logprobs(both["prompt_logprobs"], ids, log_softmax(model, ids), 4)
    # echo with max_tokens 0 scores the prompt alone, prompt_logprobs too.
    only = (await client.post("/v1/completions", json={**body, "max_tokens": 0, "prompt_logprobs": 0})).json()
    check_prompt_logprobs(only["choices"][0]["prompt_logprobs"], ids, log_softmax(model, ids), 0)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_prompt_logprobs_are_checked(client, path):
    base = ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    base = {**base, "max_tokens": 2}
    for bad in (21, -1, True, 1.5, "x", [1]):
        r = await client.post(path, json={**base, "prompt_logprobs": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", (bad, r.text)
    for stream_k in (0, 2):  # no chunk carries them (vLLM refuses k > 0 with stream; 0 it takes, sending nothing)
        r = await client.post(path, json={**base, "prompt_logprobs": stream_k, "stream": True})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "prompt_logprobs" and "stream" in r.json()["error"]["message"]
    r = await client.post(path, json={**base, "prompt_logprobs": 20})
    assert r.status_code == 200, r.text


async def test_max_logprobs_bounds_every_logprobs_field(client, open_app):
    """--max-logprobs (vLLM's, 20 by default: OpenAI's top_logprobs limit) bounds logprobs, top_logprobs and
    prompt_logprobs alike."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = await client.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 20})
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20
    async with open_app(max_logprobs=3) as small:
        for path, body, param in (("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logprobs": 4}, "logprobs"),
                                  ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 4},
                                   "top_logprobs"),
                                  ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "prompt_logprobs": 4},
                                   "prompt_logprobs"),
                                  ("/v1/chat/completions", {**chat, "prompt_logprobs": 4}, "prompt_logprobs")):
            r = await small.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "must be <= 3" in r.json()["error"]["message"]
        ok = await small.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "prompt_logprobs": 3})
        assert ok.status_code == 200, ok.text


# -- skip_special_tokens ---------------------------------------------------------------------------------------
def eos_of(client) -> int:
    (eos,) = client.app.state.engine.eos_ids
    return eos


def streamed(events: list, chat: bool = False) -> tuple[str, list[int]]:
    text, ids = "", []
    for event in events:
        for choice in event["choices"]:
            text += (choice["delta"].get("content") or "") if chat else choice["text"]
            ids += choice.get("token_ids") or []
    return text, ids


async def test_skip_special_tokens_false_keeps_their_text_streamed_or_not(client):
    tokenizer = client.app.state.engine.tokenizer
    eos = eos_of(client)
    other = tokenizer.encode(" a", add_special_tokens=False)[0]
    # Sampled from EOS and one other token: special tokens among plain text, split however the seed falls.
    body = {"prompt": "Hello", "max_tokens": 12, "ignore_eos": True, "allowed_token_ids": [eos, other], "seed": 3,
            "return_token_ids": True, "skip_special_tokens": False, "logprobs": 0}
    r = await client.post("/v1/completions", json=body)
    choice = r.json()["choices"][0]
    ids = choice["token_ids"]
    assert eos in ids and other in ids
    assert choice["text"] == tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|endoftext|>" in choice["text"]
    # text_offset indexes the text: the special tokens take their characters.
    lp = choice["logprobs"]
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        assert choice["text"][offset - len("Hello") :].startswith(token)
    text, stream_ids = streamed(sse_events((await client.post("/v1/completions", json={**body, "stream": True})).text))
    assert (text, stream_ids) == (choice["text"], ids)
    # The default leaves them out, as before.
    skipped = (await client.post("/v1/completions", json={**body, "skip_special_tokens": True})).json()["choices"][0]
    assert skipped["token_ids"] == ids and skipped["text"] == tokenizer.decode(ids, skip_special_tokens=True)


async def test_skip_special_tokens_false_on_chat_and_with_stop_strings(client):
    eos = eos_of(client)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logit_bias": {str(eos): 100},
            "skip_special_tokens": False, **GREEDY}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.json()["choices"][0]["message"]["content"] == "<|endoftext|>" * 3
    text, _ = streamed(sse_events((await client.post("/v1/chat/completions", json={**body, "stream": True})).text),
                       chat=True)
    assert text == "<|endoftext|>" * 3
    # A stop string is looked for in that text.
    r = await client.post("/v1/chat/completions", json={**body, "stop": ["|><|"]})
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "<|endoftext" and choice["finish_reason"] == "stop"
    # An EOS that ends the choice (no ignore_eos) is a stop token: its text is left out, as vLLM's detokenizer does.
    r = await client.post("/v1/chat/completions", json={**body, "ignore_eos": False})
    assert r.json()["choices"][0]["message"]["content"] == "" and r.json()["choices"][0]["finish_reason"] == "stop"
    r = await client.post("/v1/chat/completions", json={**body, "ignore_eos": False, "include_stop_str_in_output": True})
    assert r.json()["choices"][0]["message"]["content"] == "<|endoftext|>"


async def test_skip_special_tokens_and_spaces_between_them_must_be_booleans(client):
    for field in ("skip_special_tokens", "spaces_between_special_tokens"):
        for bad in ("maybe", [True], 2):
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, bad, r.text)
        for fine in (True, False, None):
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: fine})
            assert r.status_code == 200, (field, fine, r.text)


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory):
    """A micro model with Llama 2's SentencePiece-style tokenizer (``<s>`` before a text, ``▁`` a space)."""
    path = tmp_path_factory.mktemp("retnet-llama2")
    return save_micro_model(path, sentencepiece_tokenizer("llama2"))


async def test_skip_special_tokens_false_keeps_the_space_after_a_special_token(llama2_dir):
    # A SentencePiece decoder drops the space of a text's first token; shown, a special token is text before it:
    # decode([<s>, ▁are]) is "<s> are", and the labels (what each token adds where it stands) follow.
    async with serve_app(llama2_dir) as client:
        tokenizer = client.app.state.engine.tokenizer
        bos, eos, are = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("▁are")
        body = {"prompt": [bos], "max_tokens": 10, "ignore_eos": True, "allowed_token_ids": [bos, eos, are],
                "logit_bias": {str(bos): -8}, "temperature": 2, "seed": 5, "logprobs": 0, "return_token_ids": True}
        for skip in (False, True):
            r = await client.post("/v1/completions", json={**body, "skip_special_tokens": skip})
            choice = r.json()["choices"][0]
            ids, text = choice["token_ids"], choice["text"]
            assert ids[0] == are and eos in ids[1:] and are in ids[ids.index(eos) :]  # after <s>, and after </s>
            # The completion's text is what it adds to the prompt's: " are" after a "<s>" shown, "are" otherwise.
            assert text == tokenizer.decode([bos, *ids], skip_special_tokens=skip)[len("<s>") if not skip else 0 :]
            assert text.startswith(" are" if not skip else "are")
            start = len("<s>")  # the echo-less offsets count the prompt's text (a token-id prompt's, shown)
            for token, offset, token_id in zip(choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"], ids):
                if skip and token_id in (bos, eos):
                    continue  # not in the text: no characters
                assert text[offset - start :].startswith(token), (skip, token, offset, text)
            events = sse_events((await client.post("/v1/completions", json={**body, "skip_special_tokens": skip,
                                                                             "stream": True})).text)
            assert streamed(events) == (text, ids)
