"""A tokenizer that adds a BOS (Llama's post-processor template): ``text_offset`` indexes the returned text
exactly (an echoed prompt's BOS the client never wrote, special tokens left out of a completion's text), and
vLLM's ``add_special_tokens`` decides whether a prompt gets the BOS."""

import json

import pytest
from tokenizers import processors

from retnet.tokenization import train_byte_level_bpe, wrap_tokenizer
from tests.serve.conftest import save_micro_model

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}
BOS = "<s>"
EXTRA = "<|extra|>"


CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "Hello world! How are you today? I am fine, thank you.\n",
    "Unicode: café, naïve, 東京, emoji 🙂 and more.\n",
] * 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Overrides conftest's for this module (``open_app`` serves it): a micro model whose tokenizer puts
    ``<s>`` before every prompt it encodes, as Llama's post-processor template does."""
    path = tmp_path_factory.mktemp("retnet-bos")
    backend = train_byte_level_bpe(CORPUS, vocab_size=320, min_frequency=1).backend_tokenizer
    # EXTRA: special to the tokenizer (decoding skips it), though transformers names it no special token, as
    # Llama 3's reserved and header tokens.
    backend.add_special_tokens([BOS, EXTRA])
    bos = backend.token_to_id(BOS)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]),
    ])
    tokenizer = wrap_tokenizer(backend)
    tokenizer.bos_token = BOS
    assert tokenizer.encode("Hi")[0] == bos
    return save_micro_model(path, tokenizer)


def sse_choice(text: str) -> dict:
    """The one choice of a streamed completion, its chunks joined."""
    joined = {"text": "", "logprobs": {"tokens": [], "text_offset": []}}
    for line in text.splitlines():
        if not line.startswith("data: {"):
            continue
        for choice in json.loads(line[len("data: "):])["choices"]:
            joined["text"] += choice["text"]
            for key in ("tokens", "text_offset"):
                joined["logprobs"][key] += (choice["logprobs"] or {}).get(key, [])
    return joined


def check_offsets(choice: dict, skipped: tuple[str, ...] = ()) -> None:
    """Every token whose text is whole characters (not ``bytes:``) and not in ``skipped`` starts where its
    offset points; offsets never decrease nor pass the end."""
    text, lp = choice["text"], choice["logprobs"]
    offsets = lp["text_offset"]
    assert len(offsets) == len(lp["tokens"])
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)
    for token, offset in zip(lp["tokens"], offsets):
        if not token.startswith("bytes:") and token not in skipped:
            assert text[offset:].startswith(token), (token, offset, text)


async def test_echo_offsets_skip_the_bos_the_tokenizer_adds(open_app):
    prompt = "Hello world, 中 café"
    async with open_app() as client:
        req = {"prompt": prompt, "max_tokens": 6, "echo": True, "logprobs": 1, **GREEDY}
        whole = (await client.post("/v1/completions", json=req)).json()["choices"][0]
        streamed = sse_choice((await client.post("/v1/completions", json={**req, "stream": True})).text)
        for choice in (whole, streamed):
            assert choice["text"].startswith(prompt)
            assert choice["logprobs"]["tokens"][0] == BOS and choice["logprobs"]["text_offset"][:2] == [0, 0]
            check_offsets(choice, skipped=(BOS,))
        assert streamed["logprobs"]["text_offset"] == whole["logprobs"]["text_offset"]

        # A prompt of token ids is echoed decoded, its BOS included: then the BOS has its characters.
        ids = (await client.post("/v1/completions", json={**req, "return_token_ids": True})).json()
        ids = ids["choices"][0]["prompt_token_ids"]
        by_ids = (await client.post("/v1/completions", json={**req, "prompt": ids})).json()["choices"][0]
        assert by_ids["text"].startswith(BOS + prompt)
        assert by_ids["logprobs"]["text_offset"][1] == len(BOS)
        check_offsets(by_ids)


@pytest.mark.parametrize("special", ["<|endoftext|>", EXTRA])
async def test_special_tokens_left_out_of_the_text_take_no_characters(open_app, special):
    # ignore_eos lets EOS be generated and run on; a special token that is not EOS runs on anyway. Their text
    # is not in the completion, so it must not move the offsets of the tokens after them.
    async with open_app() as client:
        token = client.app.state.serving.tokenizer.convert_tokens_to_ids(special)
        prompt = "Hello world"
        req = {"prompt": prompt, "max_tokens": 4, "logprobs": 0, "logit_bias": {str(token): 100}, **GREEDY}
        for stream in (False, True):
            r = await client.post("/v1/completions", json={**req, "stream": stream})
            choice = sse_choice(r.text) if stream else r.json()["choices"][0]
            assert choice["text"] == "" and choice["logprobs"]["tokens"] == [special] * 4
            assert choice["logprobs"]["text_offset"] == [len(prompt)] * 4


async def test_add_special_tokens_decides_whether_the_prompt_gets_the_bos(open_app):
    # vLLM's defaults: a completion's prompt gets the tokenizer's special tokens, a chat's templated text not
    # (its template writes what it needs). Either was fixed, whatever the request said.
    async with open_app() as client:
        tokenizer = client.app.state.serving.tokenizer
        bos = tokenizer.convert_tokens_to_ids(BOS)

        async def prompt_ids(path: str, **extra) -> list[int]:
            body = {"prompt": "Hello"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
            r = await client.post(path, json={**body, "max_tokens": 1, "return_token_ids": True, **GREEDY, **extra})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["prompt_token_ids"]

        plain = tokenizer.encode("Hello", add_special_tokens=False)
        assert await prompt_ids("/v1/completions") == [bos, *plain]
        assert await prompt_ids("/v1/completions", add_special_tokens=False) == plain
        chat = await prompt_ids("/v1/chat/completions")
        assert chat[0] != bos
        assert await prompt_ids("/v1/chat/completions", add_special_tokens=True) == [bos, *chat]


async def test_an_empty_prompt_is_its_bos_when_the_tokenizer_adds_one(open_app):
    # vLLM's rule: what must not be empty is the prompt's tokens. "" was refused before it was encoded, though
    # here it is [BOS]: generation from the start of a text, as OpenAI's own empty prompt means.
    async with open_app() as client:
        bos = client.app.state.serving.tokenizer.convert_tokens_to_ids(BOS)
        req = {"prompt": "", "max_tokens": 2, "return_token_ids": True, "echo": True, "logprobs": 0, **GREEDY}
        r = await client.post("/v1/completions", json=req)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["prompt_token_ids"] == [bos] and choice["logprobs"]["text_offset"][:2] == [0, 0]
        r = await client.post("/v1/completions", json={**req, "add_special_tokens": False})
        assert r.status_code == 400 and r.json()["error"]["code"] == "empty_prompt", r.text


async def test_a_session_continuation_gets_no_bos_in_the_middle(open_app):
    # The continuation's text follows the session's history in one token stream: the BOS that opens a text
    # is the first turn's alone. It went before every turn, mid-history, which the model never saw in training.
    async with open_app() as client:
        tokenizer = client.app.state.serving.tokenizer
        bos = tokenizer.convert_tokens_to_ids(BOS)
        req = {"max_tokens": 4, "session_id": "bos-s", "return_token_ids": True, **GREEDY}
        first = (await client.post("/v1/completions", json={**req, "prompt": "Hello"})).json()["choices"][0]
        assert first["prompt_token_ids"][0] == bos
        second = (await client.post("/v1/completions", json={**req, "prompt": " world"})).json()["choices"][0]
        assert second["prompt_token_ids"] == tokenizer.encode(" world", add_special_tokens=False)
        history = first["prompt_token_ids"] + first["token_ids"] + second["prompt_token_ids"]
        assert history.count(bos) == 1
        whole = (await client.post("/v1/completions", json={**req, "prompt": history, "session_id": None})).json()
        assert whole["choices"][0]["token_ids"] == second["token_ids"]
        # Asked for explicitly, the tokenizer's special tokens are still added.
        third = (await client.post("/v1/completions", json={**req, "prompt": " ok", "add_special_tokens": True})).json()
        assert third["choices"][0]["prompt_token_ids"][0] == bos


@pytest.mark.parametrize("per_turn", [False, True])
async def test_a_session_chat_turn_drops_the_bos_its_template_opens_with(open_app, per_turn):
    # A template that opens the conversation with {{ bos_token }} (Llama 3's, Mistral's) would put one before
    # every turn of a session; one that writes it before every turn (Llama 2's) means it there, and keeps it.
    async with open_app() as client:
        tokenizer = client.app.state.serving.tokenizer
        bos = tokenizer.convert_tokens_to_ids(BOS)
        template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        template = template.replace("<|", "{{ bos_token }}<|", 1) if per_turn else "{{ bos_token }}" + template
        tokenizer.chat_template = template + "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        req = {"max_tokens": 3, "session_id": f"bos-chat-{per_turn}", "return_token_ids": True, **GREEDY}
        first = (await client.post("/v1/chat/completions", json={
            **req, "messages": [{"role": "user", "content": "Hi"}]})).json()["choices"][0]
        assert first["prompt_token_ids"][0] == bos
        second = (await client.post("/v1/chat/completions", json={
            **req, "messages": [{"role": "user", "content": "How are you?"}]})).json()["choices"][0]
        # First the newline the template closes a message with: the first answer, cut by max_tokens, has none.
        text = "\n" + (BOS if per_turn else "") + "<|user|>\nHow are you?\n<|assistant|>\n"
        expected = tokenizer.encode(text, add_special_tokens=False)
        assert second["prompt_token_ids"] == expected


async def test_a_sessions_bos_follows_the_template_each_turn_is_rendered_with(open_app):
    # A tokenizer's named templates may differ: its "tool_use" one writes a BOS before every turn, its default only
    # before the conversation. Whether a continuing turn keeps the BOS is the template's own, not the first one probed.
    async with open_app() as client:
        tokenizer = client.app.state.serving.tokenizer
        bos = tokenizer.convert_tokens_to_ids(BOS)
        turns = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        prompt = "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        tokenizer.chat_template = {"default": "{{ bos_token }}" + turns + prompt,
                                   "tool_use": turns.replace("<|", "{{ bos_token }}<|", 1) + prompt}
        tools = [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}]
        req = {"max_tokens": 2, "session_id": "bos-named", "return_token_ids": True, **GREEDY}

        async def turn(content: str, **extra) -> list[int]:
            response = await client.post("/v1/chat/completions", json={
                **req, "messages": [{"role": "user", "content": content}], **extra})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["prompt_token_ids"]

        await turn("Hi")
        with_tools = await turn("Look", tools=tools, tool_choice="none")
        assert with_tools == tokenizer.encode(f"\n{BOS}<|user|>\nLook\n<|assistant|>\n", add_special_tokens=False)
        assert bos in with_tools
        plain = await turn("Thanks")
        assert plain == tokenizer.encode("\n<|user|>\nThanks\n<|assistant|>\n", add_special_tokens=False)
