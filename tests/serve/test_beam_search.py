"""vLLM's beam search (``use_beam_search``, ``length_penalty``) and OpenAI's ``best_of`` (retnet.serve.beam_search),
against an in-process app on the micro model."""

import asyncio
import json

import pytest
import torch

from retnet.serve.sequence import SeqOutput

pytestmark = pytest.mark.anyio

PROMPT = "def add(a, b):"
GREEDY = {"temperature": 0, "ignore_eos": True}
BEAMS = {"use_beam_search": True, "return_token_ids": True}


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


async def metric(client, name: str) -> float:
    return client.app.state.engine.metrics.registry.get_sample_value(name)


def hf_beams(client, ids: list[int], width: int, tokens: int) -> list[list[int]]:
    """transformers' beam search of the served model: its ``width`` sequences, best first."""
    model = client.app.state.engine.model
    out = model.generate(torch.tensor([ids]), num_beams=width, do_sample=False, max_new_tokens=tokens,
                         num_return_sequences=width, early_stopping=False)
    return [row[len(ids):].tolist() for row in out]


def sse_choices(text: str, chat: bool = False) -> dict[int, str]:
    texts: dict[int, str] = {}
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        for choice in json.loads(event)["choices"]:
            piece = (choice["delta"].get("content") or "") if chat else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + piece
    return texts


async def test_beam_search_is_transformers_beam_search_one_token_a_beam_a_step(client):
    """The n beams are model.generate(num_beams=n)'s, in its order; a step prefills one token a beam (the prefix
    cache holds each beam's parent), never the beam again; usage counts the prompt once and the beams returned;
    streamed, the same texts arrive at the end."""
    engine = client.app.state.engine
    ids = engine.tokenizer.encode(PROMPT)
    width, tokens = 3, 5
    before = await metric(client, "retnet_prefill_tokens_total")
    body = {"prompt": PROMPT, "max_tokens": tokens, "n": width, "logprobs": 2, **BEAMS}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    prefilled = await metric(client, "retnet_prefill_tokens_total") - before
    assert prefilled == len(ids) + (tokens - 1) * width
    choices = r.json()["choices"]
    assert [c["token_ids"] for c in choices] == hf_beams(client, ids, width, tokens)
    assert [c["index"] for c in choices] == list(range(width))
    assert all(c["finish_reason"] == "length" for c in choices)
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in choices]
    assert sums == sorted(sums, reverse=True) and sums[0] > sums[-1] + 0.1
    for c in choices:
        assert c["text"] == engine.tokenizer.decode(c["token_ids"])
        assert all(len(top) == 2 for top in c["logprobs"]["top_logprobs"])  # the request's 2, not the search's 6
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    assert r.json()["usage"]["completion_tokens"] == width * tokens
    streamed = await client.post("/v1/completions", json={**body, "stream": True})
    assert sse_choices(streamed.text) == {c["index"]: c["text"] for c in choices}


async def test_beam_search_on_chat(client):
    engine = client.app.state.engine
    messages = [{"role": "user", "content": "Hello world"}]
    ids = (await client.post("/tokenize", json={"messages": messages})).json()["tokens"]
    body = {"messages": messages, "max_tokens": 4, "n": 2, "logprobs": True, "top_logprobs": 1, **BEAMS}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["token_ids"] for c in choices] == hf_beams(client, ids, 2, 4)
    for c in choices:
        assert c["message"]["content"] == engine.tokenizer.decode(c["token_ids"])
        assert [len(entry["top_logprobs"]) for entry in c["logprobs"]["content"]] == [1] * 4
    streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
    assert sse_choices(streamed.text, chat=True) == {c["index"]: c["message"]["content"] for c in choices}


async def test_length_penalty_ranks_by_the_formula(client):
    """With an EOS the model is likely to write (its first greedy token, made an EOS here), beams end at different
    lengths: each response is ranked by cum_logprob / (prompt + generated tokens, EOS not counted) ** length_penalty,
    and the penalty changes the order."""
    engine = client.app.state.engine
    prompt = "Hello world"
    first = (await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "return_token_ids": True,
                                                        **GREEDY})).json()["choices"][0]["token_ids"][0]
    engine.eos_ids = {first}
    prompt_tokens = len(engine.tokenizer.encode(prompt))
    orders = {}
    for penalty in (0.0, 1.0, 3.0):
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "n": 3, "logprobs": 0,
                                                       "length_penalty": penalty, **BEAMS})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        scores = []
        for c in choices:
            ended = c["finish_reason"] == "stop"
            assert ended == (c["token_ids"][-1] == first) and (c["stop_reason"] == first if ended else True)
            length = prompt_tokens + len(c["token_ids"]) - ended
            scores.append(sum(c["logprobs"]["token_logprobs"]) / length ** penalty)
        assert scores == sorted(scores, reverse=True), (penalty, scores)
        orders[penalty] = [c["token_ids"] for c in choices]
    assert orders[0.0] != orders[3.0] and any(len(ids) < 6 for ids in orders[0.0])


async def test_beam_search_of_one_beam_is_greedy_and_other_requests_run_beside(client):
    """n=1 is greedy when no EOS competes (vLLM runs a beam of one); a request running beside a beam search gets
    what it gets alone."""
    greedy = {"prompt": "for i in", "max_tokens": 8, "return_token_ids": True, **GREEDY}
    alone = (await client.post("/v1/completions", json=greedy)).json()["choices"][0]["token_ids"]
    one = await client.post("/v1/completions", json={"prompt": "for i in", "max_tokens": 8, **BEAMS})
    assert one.json()["choices"][0]["token_ids"] == alone
    beams = {"prompt": PROMPT, "max_tokens": 8, "n": 4, **BEAMS}
    beams_alone = (await client.post("/v1/completions", json=beams)).json()["choices"]
    both = await asyncio.gather(client.post("/v1/completions", json=beams),
                                client.post("/v1/completions", json=greedy))
    assert [r.status_code for r in both] == [200, 200]
    assert both[0].json()["choices"] == beams_alone
    assert both[1].json()["choices"][0]["token_ids"] == alone


async def test_a_cancelled_beam_search_ends_every_choice_and_frees_its_slots(client):
    serving, engine = client.app.state.serving, client.app.state.engine
    from retnet.serve.protocol import CompletionRequest

    request = CompletionRequest(prompt=PROMPT, n=2, max_tokens=50, use_beam_search=True)
    params = serving.checks.params(request, request.max_tokens, None)
    handle = serving._beam_search([engine.tokenizer.encode(PROMPT)], params, request)
    await asyncio.sleep(0.05)
    handle.cancel()
    outputs = await asyncio.wait_for(handle.queue.get(), 30)
    assert [(o.index, o.finish_reason) for o in outputs] == [(0, "abort"), (1, "abort")]
    assert all(isinstance(o, SeqOutput) for o in outputs)
    for _ in range(200):
        if engine.in_system == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.in_system == 0
    # its steps' prefix cache entries are freed at the cache's next use, not left to the LRU
    r = await client.post("/v1/completions", json={"prompt": "for i in", "max_tokens": 1, **GREEDY})
    assert r.status_code == 200, r.text
    assert all(entry.searches is None for entry in engine.prefix_cache.entries.values())


async def test_the_logprobs_asked_for_change_no_beam(client):
    """A beam's candidates are its 2n likeliest tokens, as vLLM's: with logprobs asking for more, an EOS ranked
    past 2n ended a beam (and, short, it ranked first), so that asking for logprobs changed the answer."""
    engine = client.app.state.engine
    prompt, width = "Hello world", 2
    first = (await client.post("/v1/completions", json={
        "prompt": prompt, "max_tokens": 1, "logprobs": 20, "return_tokens_as_token_ids": True, **GREEDY})).json()
    ranked = list(first["choices"][0]["logprobs"]["top_logprobs"][0])
    engine.eos_ids = {int(ranked[2 * width + 2].removeprefix("token_id:"))}  # the 7th likeliest first token
    answers = []
    for extra in ({}, {"logprobs": 20}, {"logprobs": 0}):
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "n": width, **extra,
                                                       **BEAMS})
        assert r.status_code == 200, r.text
        answers.append([(c["token_ids"], c["finish_reason"]) for c in r.json()["choices"]])
    assert answers[0] == answers[1] == answers[2]
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                        "max_tokens": 4, "n": width, "logprobs": True,
                                                        "top_logprobs": 20, **BEAMS})
    assert r.status_code == 200, r.text
    assert all(len(entry["top_logprobs"]) == 20 for c in r.json()["choices"] for entry in c["logprobs"]["content"])


async def test_best_of_returns_the_n_candidates_of_highest_mean_logprob(client):
    """best_of candidates are the n=best_of request's of the same seed; the n returned are those of the highest
    mean logprob per token, in that order; usage bills every candidate. With echo, logprobs and a stop string too."""
    for extra in ({}, {"echo": True, "logprobs": 1, "stop": "e"}):
        base = {"prompt": PROMPT, "max_tokens": 6, "seed": 11, "temperature": 1.0, "return_token_ids": True, **extra}
        candidates = (await client.post("/v1/completions", json={**base, "n": 4, "logprobs": extra.get("logprobs", 0)}
                                        )).json()
        r = await client.post("/v1/completions", json={**base, "n": 2, "best_of": 4})
        assert r.status_code == 200, r.text
        answer = r.json()

        def mean(choice):
            values = choice["logprobs"]["token_logprobs"][-len(choice["token_ids"]):]
            return sum(values) / len(values)

        ranked = sorted(candidates["choices"], key=lambda c: -mean(c))[:2]
        assert [c["token_ids"] for c in answer["choices"]] == [c["token_ids"] for c in ranked]
        assert [c["text"] for c in answer["choices"]] == [c["text"] for c in ranked]
        assert [c["index"] for c in answer["choices"]] == [0, 1]
        assert (answer["choices"][0]["logprobs"] is None) == ("logprobs" not in extra)
        assert answer["usage"]["completion_tokens"] == candidates["usage"]["completion_tokens"] > sum(
            len(c["token_ids"]) for c in answer["choices"])


async def test_chat_best_of_returns_the_n_candidates_of_highest_mean_logprob(client):
    """Chat's best_of (vLLM's; LangChain's VLLMChatOpenAI sends it) runs as the completion's: the n of the best_of
    candidates (the n=best_of request's of the same seed) with the highest mean logprob per token, best first, usage
    billing them all; ignored, it returned one ordinary sample. Streamed only when best_of is n."""
    base = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "seed": 11, "temperature": 1.0,
            "ignore_eos": True, "return_token_ids": True}
    candidates = (await client.post("/v1/chat/completions", json={**base, "n": 4, "logprobs": True})).json()

    def mean(choice):
        values = [entry["logprob"] for entry in choice["logprobs"]["content"]]
        return sum(values) / len(values)

    ranked = sorted(candidates["choices"], key=lambda c: -mean(c))[:2]
    for extra in ({}, {"logprobs": True}):
        r = await client.post("/v1/chat/completions", json={**base, **extra, "n": 2, "best_of": 4})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert [c["token_ids"] for c in answer["choices"]] == [c["token_ids"] for c in ranked]
        assert [c["message"]["content"] for c in answer["choices"]] == [c["message"]["content"] for c in ranked]
        assert [c["index"] for c in answer["choices"]] == [0, 1]
        assert [c["logprobs"] is None for c in answer["choices"]] == [not extra] * 2
        assert answer["usage"]["completion_tokens"] == candidates["usage"]["completion_tokens"] == 4 * 6
    r = await client.post("/v1/chat/completions", json={**base, "n": 2, "best_of": 2, "stream": True})
    assert r.status_code == 200 and len(sse_choices(r.text, chat=True)) == 2, r.text
    for body in ({"best_of": 3, "stream": True}, {"n": 2, "best_of": 1}, {"best_of": 9}):
        r = await client.post("/v1/chat/completions", json={**base, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", (body, r.text)


@pytest.mark.parametrize(("body", "param"), [
    ({"best_of": 3, "stream": True}, "best_of"),
    ({"n": 2, "best_of": 1}, "best_of"),
    ({"best_of": 9}, "best_of"),  # past --max-n (8)
    ({"length_penalty": 0.5}, "length_penalty"),
    ({"length_penalty": True}, "length_penalty"),
    ({"use_beam_search": True, "length_penalty": "inf"}, "length_penalty"),
    ({"use_beam_search": "yes"}, "use_beam_search"),
    ({"use_beam_search": 1}, "use_beam_search"),
    ({"use_beam_search": True, "top_p": 0.5}, "top_p"),
    ({"use_beam_search": True, "stop": ["x"]}, "stop"),
    ({"use_beam_search": True, "repetition_penalty": 1.2}, "repetition_penalty"),
    ({"use_beam_search": True, "response_format": {"type": "json_object"}}, "response_format"),
    ({"use_beam_search": True, "n": 2, "best_of": 3}, "best_of"),
    ({"use_beam_search": True, "max_tokens": 0, "echo": True}, "max_tokens"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
async def test_bad_values_are_refused_by_name(client, body, param):
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


async def test_chat_tool_grammar_is_refused_with_beams_and_no_ops_pass(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = await client.post("/v1/chat/completions", json={**base, "use_beam_search": True, "tools": tools,
                                                        "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
    # What changes nothing passes: temperature (not used by the search), top_k 0, length_penalty 1.
    r = await client.post("/v1/chat/completions", json={**base, "use_beam_search": True, "temperature": 0.7,
                                                        "top_k": 0, "length_penalty": 1, "n": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text


async def test_a_beam_search_keeps_its_last_two_steps_in_the_prefix_cache_and_other_prompts_theirs(client, monkeypatch):
    """A search's steps' states are freed two steps on (a step starts from the one before it): kept, one 30-token
    search left n states a step and pushed every other prompt's entry out of the LRU (64 entries). Once it has
    ended, its last two steps' go too: kept, ten searches of 3 beams filled the LRU with 60 dead states."""
    engine = client.app.state.engine
    # the scheduler's idle free of ended searches (each second; test_beam_search_accounting.py) not come yet: it
    # could empty the ended search's entries before they are read below
    monkeypatch.setattr(engine, "_free_idle_states", lambda: None)
    other = {"prompt": "for i in range(10): print(i)", "max_tokens": 1, **GREEDY}
    await client.post("/v1/completions", json=other)
    again = (await client.post("/v1/completions", json=other)).json()
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    width, tokens = 3, 30
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": tokens, "n": width, **BEAMS})
    assert r.status_code == 200, r.text
    tagged = [entry for entry in engine.prefix_cache.entries.values() if entry.searches is not None]
    steps = {step for entry in tagged for step in entry.searches.values()}
    assert 0 < len(tagged) <= 2 * width and steps == {tokens - 2, tokens - 1}
    after = (await client.post("/v1/completions", json=other)).json()
    assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    assert all(entry.searches is None for entry in engine.prefix_cache.entries.values())
    assert engine.prefix_cache.nbytes == sum(entry.nbytes for entry in engine.prefix_cache.entries.values())


async def test_more_beams_than_tokens_is_refused_by_name(client):
    bound = client.app.state.engine.token_bound
    client.app.state.serving.settings.max_n = bound + 1  # (the limits would refuse it first otherwise)
    client.app.state.serving.settings.max_running = bound + 1
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "n": bound + 1, **BEAMS})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "n" and f"<= {bound}" in r.json()["error"]["message"]


def test_the_prefix_cache_frees_a_searchs_steps_two_back_and_nothing_else():
    from retnet.model import RetNetCache
    from retnet.serve.state_cache import PrefixCache

    class Config:
        num_hidden_layers, num_attention_heads, head_dim, value_head_dim = 1, 1, 2, 2

    cache, prefix = RetNetCache.zeros(Config, 1), PrefixCache(64, 1 << 30)
    prefix.insert((1, 2), cache, None)  # an ordinary prompt's
    for step in (1, 2, 3):
        for beam in (7, 8):
            prefix.insert((1, 2, *[beam] * step), cache, None, tag=(5, step))
    prefix.insert((1, 2, 9), cache, None, tag=(6, 1))  # another search's
    prefix.insert((1, 2, 9, 9, 9, 9), cache, None, tag=(6, 9))  # ... frees its own step 1 only
    assert sorted(prefix.entries) == sorted([(1, 2), (1, 2, 7, 7), (1, 2, 8, 8), (1, 2, 7, 7, 7), (1, 2, 8, 8, 8),
                                             (1, 2, 9, 9, 9, 9)])
    assert prefix.nbytes == sum(entry.nbytes for entry in prefix.entries.values())
    # an ordinary request's prefill of a beam's very tokens makes the entry its own: no longer freed with the search
    prefix.insert((1, 2, 7, 7, 7), cache, None)
    for beam in (7, 8):
        prefix.insert((1, 2, *[beam] * 5), cache, None, tag=(5, 5))
    assert (1, 2, 7, 7, 7) in prefix.entries and (1, 2, 8, 8, 8) not in prefix.entries
    # a search ended: its entries go at the next lookup (or insert), another search's and the ordinary ones stay
    prefix.end_search(5)
    assert prefix.lookup((3,)) is None
    assert sorted(prefix.entries) == sorted([(1, 2), (1, 2, 7, 7, 7), (1, 2, 9, 9, 9, 9)])
    assert prefix.nbytes == sum(entry.nbytes for entry in prefix.entries.values())
    # two searches of one prompt make the same entries: each holds them, freed neither by the other's later steps
    # nor by its end
    prefix.insert((4, 1), cache, None, tag=(10, 1))
    prefix.insert((4, 1), cache, None, tag=(11, 1))
    prefix.insert((4, 1, 1, 1), cache, None, tag=(10, 3))
    prefix.end_search(10)
    assert prefix.lookup((4, 1, 5)) is prefix.entries[(4, 1)] and prefix.entries[(4, 1)].searches == {11: 1}


async def test_a_step_refused_by_a_full_server_waits_for_places(client, monkeypatch):
    """A search is admitted on its first step and holds no places between steps, which other requests may take: a
    later step found the server full and the client got a 429 after the search had run. It now waits."""
    from retnet.serve.sequence import QueueFull

    engine = client.app.state.engine
    body = {"prompt": PROMPT, "max_tokens": 4, "n": 2, "return_token_ids": True, **BEAMS}
    alone = (await client.post("/v1/completions", json=body)).json()["choices"]
    submit, refused = engine.submit, []

    def full_twice(prompts, params, *args, **kwargs):
        if params.prefix_cache_tag is not None and len(refused) < 2:  # a later step's
            refused.append(params.prefix_cache_tag)
            raise QueueFull("6 sequences in the server; the limit is 8")
        return submit(prompts, params, *args, **kwargs)

    monkeypatch.setattr(engine, "submit", full_twice)
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == alone and len(refused) == 2
