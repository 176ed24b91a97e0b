"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: the ids are exactly those the generation routes run for
the same prompt or messages, a prompt over the server's limit is counted rather than refused, and every bad
request is a 4xx OpenAI error body."""

import threading

import pytest

from tests.serve.conftest import serve_app
from tests.serve.test_bos_tokenizer import BOS
from tests.serve.test_bos_tokenizer import model_dir as bos_model_dir  # noqa: F401 (a fixture: its BOS model)

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPTS = ["Hello world", "def add(a, b):\n    return a + b\n", "Unicode: café, 東京 🙂", " leading space", ""]
CONVERSATIONS = {
    "one turn": {"messages": [{"role": "user", "content": "Hi"}]},
    "system, name and parts": {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]},
    ]},
    "no generation prompt": {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": False},
    "continued answer": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}],
                         "add_generation_prompt": False, "continue_final_message": True},
    "special tokens": {"messages": [{"role": "user", "content": "Hi"}], "add_special_tokens": True},
}


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


async def tokenize(client, **body) -> dict:
    r = await client.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def run_ids(client, path: str, **body) -> tuple[list[int], int]:
    """The prompt ids a generation route ran, and its usage's prompt_tokens."""
    r = await client.post(path, json={**body, "max_tokens": 1, "return_token_ids": True, **GREEDY})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["prompt_token_ids"], r.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("add_special_tokens", [None, True, False])
async def test_completion_form_counts_what_completions_runs(client, add_special_tokens):
    extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    card = (await client.get("/v1/models")).json()["data"][0]
    for prompt in PROMPTS[:-1]:  # "" is no prompt to this tokenizer (it adds no BOS): completions refuses it
        body = await tokenize(client, model="micro", prompt=prompt, **extra)
        ids, counted = await run_ids(client, "/v1/completions", prompt=prompt, **extra)
        assert body == {"count": len(ids), "max_model_len": card["max_model_len"], "tokens": ids, "token_strs": None}
        assert counted == len(ids)
    assert (await tokenize(client, prompt=""))["count"] == 0


@pytest.mark.parametrize("name", list(CONVERSATIONS))
async def test_chat_form_counts_what_chat_completions_runs(client, name):
    conversation = CONVERSATIONS[name]
    body = await tokenize(client, **conversation)
    ids, counted = await run_ids(client, "/v1/chat/completions", **conversation)
    assert body["tokens"] == ids and body["count"] == counted == len(ids)
    assert body["token_strs"] is None


async def test_chat_form_follows_the_template_and_its_variables(client):
    tokenizer = client.app.state.serving.tokenizer
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
                               "{% if style %}<{{ style }}>{% endif %}")
    conversation = {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"style": "terse"}}
    body = await tokenize(client, **conversation)
    assert tokenizer.decode(body["tokens"]) == "[hi]<terse>"
    assert body["tokens"] == (await run_ids(client, "/v1/chat/completions", **conversation))[0]


async def test_token_strs_are_the_tokenizers_pieces(client):
    tokenizer = client.app.state.serving.tokenizer
    body = await tokenize(client, prompt="Hello world, café", return_token_strs=True)
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    assert len(body["token_strs"]) == body["count"] > 1
    chat = await tokenize(client, messages=[{"role": "user", "content": "Hi"}], return_token_strs=True)
    assert chat["token_strs"] == tokenizer.convert_ids_to_tokens(chat["tokens"])


async def test_a_prompt_over_the_limit_is_counted_not_refused(open_app):
    async with open_app(max_prompt_tokens=8, max_tokens_limit=4) as client:
        prompt = "The retention mechanism replaces attention with a decaying recurrence."
        body = await tokenize(client, prompt=prompt)
        assert body["count"] > 8 and body["max_model_len"] == 12
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        messages = [{"role": "user", "content": prompt}]
        assert (await tokenize(client, messages=messages))["count"] > 8
        r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


async def test_a_large_prompt_is_encoded_off_the_event_loop(client):
    serving = client.app.state.serving
    threads, encode = [], serving._encode

    def recording(*args):
        threads.append(threading.current_thread())
        return encode(*args)

    serving._encode = recording
    prompt = "Hello world! " * 6000  # over OFF_LOOP_PROMPT_SIZE characters
    body = await tokenize(client, prompt=prompt)
    assert body["count"] == len(serving.tokenizer.encode(prompt))
    assert threads and threads[0] is not threading.main_thread()
    assert serving.tokenizing_off_loop == 0


async def test_a_body_over_the_limit_is_still_refused(open_app):
    async with open_app(max_body_bytes=2048) as client:
        r = await client.post("/tokenize", json={"prompt": "x" * 4096})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
        r = await client.post("/detokenize", json={"tokens": [1] * 2048})
        assert r.status_code == 413, r.text


async def test_detokenize_round_trips_tokenize(client):
    for prompt in PROMPTS:
        ids = (await tokenize(client, prompt=prompt))["tokens"]
        r = await client.post("/detokenize", json={"model": "micro", "tokens": ids})
        assert r.status_code == 200 and r.json() == {"prompt": prompt}, r.text
    # Special tokens are shown, as the server echoes a prompt sent as ids.
    eos = client.app.state.serving.tokenizer.eos_token
    ids = (await tokenize(client, prompt="Hi" + eos))["tokens"]
    assert (await client.post("/detokenize", json={"tokens": ids})).json() == {"prompt": "Hi" + eos}


async def test_add_special_tokens_adds_the_bos_of_a_tokenizer_that_has_one(bos_model_dir):  # noqa: F811
    async with serve_app(bos_model_dir) as client:
        tokenizer = client.app.state.serving.tokenizer
        bos = tokenizer.convert_tokens_to_ids(BOS)
        plain = tokenizer.encode("Hello", add_special_tokens=False)
        with_bos = (await tokenize(client, prompt="Hello"))["tokens"]
        assert with_bos == [bos, *plain] == (await run_ids(client, "/v1/completions", prompt="Hello"))[0]
        assert (await tokenize(client, prompt="Hello", add_special_tokens=False))["tokens"] == plain
        messages = [{"role": "user", "content": "Hi"}]
        chat = (await tokenize(client, messages=messages))["tokens"]
        assert chat[0] != bos and chat == (await run_ids(client, "/v1/chat/completions", messages=messages))[0]
        assert (await tokenize(client, messages=messages, add_special_tokens=True))["tokens"] == [bos, *chat]
        r = await client.post("/detokenize", json={"tokens": with_bos})
        assert r.json() == {"prompt": BOS + "Hello"}


BAD_REQUESTS = [
    # (route, body, status, param, code)
    ("/tokenize", {}, 400, "prompt", "missing"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", "string_type"),
    ("/tokenize", {"prompt": ["a", "b"]}, 400, "prompt", "string_type"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": "maybe"}, 400, "add_special_tokens", "bool_parsing"),
    ("/tokenize", {"prompt": "hi", "return_token_strs": [1]}, 400, "return_token_strs", "bool_type"),
    ("/tokenize", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/tokenize", {"messages": []}, 400, "messages", "too_short"),
    ("/tokenize", {"messages": "hi"}, 400, "messages", "list_type"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "literal_error"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}, 400, "prompt", None),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True}, 400,
     "continue_final_message", None),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 'x' }}"}, 400,
     "chat_template", "unsupported_parameter"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tools", "unsupported_parameter"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0].type", "unsupported_content_type"),
    ("/tokenize", [1, 2], 400, None, "invalid_request"),
    ("/detokenize", {}, 400, "tokens", "missing"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens", "list_type"),
    ("/detokenize", {"tokens": [1.5]}, 400, "tokens[0]", "int_from_float"),
    ("/detokenize", {"tokens": [True]}, 400, "tokens[0]", "value_error"),
    ("/detokenize", {"tokens": [1, -1]}, 400, "tokens", "invalid_token_id"),
    ("/detokenize", {"tokens": [10**30]}, 400, "tokens", "invalid_token_id"),
    ("/detokenize", {"tokens": [1], "model": "gpt-4"}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize(("route", "body", "status", "param", "code"), BAD_REQUESTS)
async def test_bad_requests_get_openai_errors(client, route, body, status, param, code):
    r = await client.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error
    assert error["message"]
    assert (await tokenize(client, prompt="still fine"))["count"] > 0


async def test_out_of_vocabulary_ids_and_bad_bodies(client):
    vocab = client.app.state.engine.vocab_size
    r = await client.post("/detokenize", json={"tokens": [vocab]})
    assert r.status_code == 400 and str(vocab) in r.json()["error"]["message"]
    assert (await client.post("/detokenize", json={"tokens": [vocab - 1]})).status_code == 200
    assert (await client.post("/detokenize", json={"tokens": []})).json() == {"prompt": ""}
    # A lone surrogate is no text to encode; a form body is no JSON; nulls are the defaults.
    r = await client.post("/tokenize", content=b'{"prompt": "a\\ud800"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_unicode", r.text
    r = await client.post("/tokenize", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    r = await client.post("/tokenize", data={"prompt": "hi"})
    assert r.status_code == 415, r.text
    body = await tokenize(client, prompt="hi", model=None, messages=None, return_token_strs=None, user="u1")
    assert body["tokens"] == (await tokenize(client, prompt="hi"))["tokens"] and body["token_strs"] is None


async def test_api_keys_guard_both_routes(open_app):
    async with open_app(api_keys=["k1"]) as client:
        for route, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
            r = await client.post(route, json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
            # An invalid body tells a client without a key nothing: 401 first, as on /v1.
            r = await client.post(route, json={"prompt": 5, "tokens": "x"})
            assert r.status_code == 401, r.text
            r = await client.post(route, json=body, headers={"Authorization": "Bearer k1"})
            assert r.status_code == 200, r.text


async def test_both_routes_are_counted_in_metrics(client):
    await client.post("/tokenize", json={"prompt": "hi"})
    await client.post("/detokenize", json={"tokens": [-1]})
    text = (await client.get("/metrics")).text
    assert 'route="/tokenize",status="200"' in text and 'route="/detokenize",status="400"' in text
