"""vLLM's ``cache_salt`` (the prefix cache shared only between requests of one salt, as cached_tokens shows) and
``request_id`` / ``X-Request-Id`` (the response's id, streamed or not), against an in-process app."""

import json

import pytest
import torch

from retnet.model import RetNetCache
from retnet.serve.state_cache import PrefixCache
from tests.serve.conftest import serve_app

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPT = "The retention mechanism replaces attention with a decaying recurrence. " * 2
SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers about Python code. " * 3}


@pytest.fixture(scope="module")
async def client(model_dir):
    async with serve_app(model_dir) as c:
        yield c


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


async def complete(client, prompt: str, **extra) -> dict:
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, **GREEDY, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_salted_entry_is_found_only_under_its_salt():
    cache = PrefixCache(8, 1 << 30)
    state = RetNetCache(1)
    cache.insert([1, 2, 3], state, torch.zeros(4))
    cache.insert([1, 2], state, torch.zeros(4), salt="a")
    cache.insert([1, 2, 3, 4], state, torch.zeros(4), adapter=2, salt="a")
    assert cache.lookup([1, 2, 3, 9]).tokens == (1, 2, 3) and cache.lookup([1, 2, 3, 9]).salt is None
    assert cache.lookup([1, 2, 3, 9], salt="a").tokens == (1, 2)
    assert cache.lookup([1, 2, 3], salt="b") is None
    assert cache.lookup([1, 2, 3, 4, 5], adapter=2) is None
    assert cache.lookup([1, 2, 3, 4, 5], adapter=2, salt="a").tokens == (1, 2, 3, 4)


async def test_a_salted_completion_hits_only_its_own_salts_prefixes(client):
    prompt = PROMPT + "(completions)"
    plain = await complete(client, prompt)
    assert cached(plain) == 0
    # Made by an unsalted request, the prompt's state is no hit for a salted one (it was: a full hit)
    first_a = await complete(client, prompt, cache_salt="tenant-a")
    assert cached(first_a) == 0
    again_a = await complete(client, prompt, cache_salt="tenant-a")
    assert cached(again_a) == again_a["usage"]["prompt_tokens"]
    assert cached(await complete(client, prompt, cache_salt="tenant-b")) == 0
    # The unsalted space keeps its own entry; a longer prompt starts from it, not from a salt's
    again = await complete(client, prompt)
    assert cached(again) == again["usage"]["prompt_tokens"]
    longer = await complete(client, prompt + " more", cache_salt="tenant-a")
    assert 0 < cached(longer) < longer["usage"]["prompt_tokens"]
    assert cached(await complete(client, prompt + " more", cache_salt="tenant-c")) == 0
    # The salt changes what is reused, never the answer
    texts = {b["choices"][0]["text"] for b in (plain, first_a, again_a, again)}
    assert len(texts) == 1


async def test_a_salted_chat_and_its_system_prompt(client):
    def body(question: str, **extra) -> dict:
        return {"messages": [SYSTEM, {"role": "user", "content": question}], "max_tokens": 2, **GREEDY, **extra}

    r = await client.post("/v1/chat/completions", json=body("def add(a, b)"))
    assert r.status_code == 200, r.text
    salted = (await client.post("/v1/chat/completions", json=body("class Stack", cache_salt="s1"))).json()
    assert cached(salted) == 0  # the system prompt's state is the unsalted requests'
    other = (await client.post("/v1/chat/completions", json=body("for i in range(3)", cache_salt="s1"))).json()
    assert cached(other) > 20  # the salt's own system prompt state
    stream = await client.post("/v1/chat/completions", json=body("print(1)", cache_salt="s2", stream=True,
                                                                  stream_options={"include_usage": True}))
    assert cached(sse_events(stream.text)[-1]) == 0


async def test_beam_search_best_of_and_sessions_run_salted(client):
    prompt = PROMPT + "(beams)"
    beams = await complete(client, prompt, n=2, use_beam_search=True, max_tokens=3, cache_salt="b1")
    assert len(beams["choices"]) == 2 and cached(beams) == 0
    again = await complete(client, prompt, n=2, use_beam_search=True, max_tokens=3, cache_salt="b1")
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in beams["choices"]]
    assert cached(again) > 0
    assert cached(await complete(client, prompt, n=2, use_beam_search=True, max_tokens=3)) == 0
    best = await complete(client, prompt + "(best)", n=1, best_of=2, cache_salt="b2", temperature=1.0, seed=3)
    assert len(best["choices"]) == 1 and cached(best) == 0
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "session_id": "salted-session",
                                                   "cache_salt": "b3", **GREEDY})
    assert r.status_code == 200 and cached(r.json()) == 0, r.text
    r = await client.post("/v1/completions", json={"prompt": " next", "max_tokens": 2, "session_id": "salted-session",
                                                   "cache_salt": "b3", **GREEDY})
    assert r.status_code == 200 and r.json()["session_id"] == "salted-session", r.text


@pytest.mark.parametrize("salt", ["", 7, ["a"]])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_salt_must_be_a_non_empty_string(client, path, salt):
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    r = await client.post(path, json={**body, "max_tokens": 1, "cache_salt": salt})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "cache_salt"


async def test_the_responses_and_messages_routes_pass_the_salt(client):
    body = {"input": PROMPT + "(responses)", "max_output_tokens": 2, "temperature": 0}
    first = await client.post("/v1/responses", json=body)
    assert first.status_code == 200, first.text
    salted = await client.post("/v1/responses", json={**body, "cache_salt": "r1"})
    assert salted.status_code == 200, salted.text  # was refused as no parameter of the route
    assert salted.json()["usage"]["input_tokens_details"]["cached_tokens"] == 0
    messages = {"model": "micro", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    for extra in ({"cache_salt": "m1"}, {"request_id": "m2"}):
        r = await client.post("/v1/messages", json={**messages, **extra})
        assert r.status_code == 200, (extra, r.text)


@pytest.mark.parametrize("path, prefix", [("/v1/completions", "cmpl"), ("/v1/chat/completions", "chatcmpl")])
async def test_request_id_names_the_response(client, path, prefix):
    body = {"prompt": "hi"} if prefix == "cmpl" else {"messages": [{"role": "user", "content": "hi"}]}
    body = {**body, "max_tokens": 3, **GREEDY}
    r = await client.post(path, json={**body, "request_id": "req-42"})
    assert r.status_code == 200 and r.json()["id"] == f"{prefix}-req-42", r.text
    assert "x-request-id" not in r.headers
    # vLLM's: the header wins over the body's field; sent back only with --enable-request-id-headers (below)
    r = await client.post(path, json={**body, "request_id": "req-42"}, headers={"X-Request-Id": "hdr-7"})
    assert r.json()["id"] == f"{prefix}-hdr-7" and "x-request-id" not in r.headers
    r = await client.post(path, json={**body, "n": 2, "stream": True, "stream_options": {"include_usage": True},
                                      "request_id": "req-s"})
    events = sse_events(r.text)
    assert len(events) > 2 and {e["id"] for e in events} == {f"{prefix}-req-s"}
    r = await client.post(path, json={**body, "stream": True}, headers={"X-Request-Id": "hdr-s"})
    assert {e["id"] for e in sse_events(r.text)} == {f"{prefix}-hdr-s"} and "x-request-id" not in r.headers
    # Neither (or an empty one): the server's own, a new one each time
    ids = {(await client.post(path, json={**body, **extra})).json()["id"] for extra in ({}, {"request_id": ""})}
    assert len(ids) == 2 and all(i.startswith(f"{prefix}-") and len(i) > len(prefix) + 8 for i in ids)
    # Bounded, the body's and the header's: every streamed chunk repeats it (a 900 KB id streamed 13 MB for 20 tokens)
    r = await client.post(path, json={**body, "stream": True, "request_id": "r" * 257})
    assert r.status_code == 400 and r.json()["error"]["param"] == "request_id", r.text
    r = await client.post(path, json={**body, "stream": True}, headers={"X-Request-Id": "h" * 257})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id", r.text
    r = await client.post(path, json={**body, "request_id": "r" * 256})
    assert r.json()["id"] == f"{prefix}-{'r' * 256}"


async def test_request_id_headers_answer_every_response_errors_included(model_dir):
    """vLLM's --enable-request-id-headers: every answer carries X-Request-Id, the request's else a new one; a 401,
    a 400, a 404 and a 500 too (a completion's or chat's alone echoed a sent one, and without the option)."""
    import httpx

    async with serve_app(model_dir, enable_request_id_headers=True, api_keys=["k"]) as client:
        key = {"Authorization": "Bearer k"}
        body = {"prompt": "hi", "max_tokens": 2, **GREEDY}
        r = await client.post("/v1/completions", json=body, headers={**key, "X-Request-Id": "hdr-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "hdr-1", r.text
        r = await client.post("/v1/completions", json={**body, "stream": True}, headers={**key, "X-Request-Id": "s"})
        assert r.headers["x-request-id"] == "s" and sse_events(r.text)
        for method, path, headers, status in [("POST", "/v1/completions", {}, 401),
                                              ("POST", "/v1/completions", {**key, "Content-Type": "text/plain"}, 415),
                                              ("GET", "/no/such/route", key, 404), ("GET", "/health", {}, 200)]:
            r = await client.request(method, path, json=body, headers={**headers, "X-Request-Id": f"e-{status}"})
            assert r.status_code == status and r.headers["x-request-id"] == f"e-{status}", (path, status, r.text)
        r = await client.post("/v1/completions", json={**body, "max_tokens": -1}, headers=key)
        assert r.status_code == 400 and len(r.headers["x-request-id"]) == 32, r.headers  # a new one: uuid4's hex
        second = await client.get("/health")
        assert second.headers["x-request-id"] != r.headers["x-request-id"]
        serving = client.app.state.serving

        async def broken(request, raw):
            raise RuntimeError("a bug")

        serving.chat = broken  # (the route calls the serving's chat: an instance attribute wins)
        transport = httpx.ASGITransport(app=client.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as plain:
            r = await plain.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                                 headers={**key, "X-Request-Id": "e-500"})
        del serving.chat
        assert r.status_code == 500 and r.headers["x-request-id"] == "e-500", r.text


async def test_a_responses_request_id_is_the_responses_id(client):
    """vLLM's ResponsesRequest.request_id (its default resp_<uuid>) is the Response's id: was a 400 (no parameter
    of the route)."""
    body = {"model": "micro", "input": "hi", "max_output_tokens": 2, "temperature": 0}
    r = await client.post("/v1/responses", json={**body, "request_id": "resp_mine"})
    assert r.status_code == 200 and r.json()["id"] == "resp_mine", r.text
    stored = await client.get("/v1/responses/resp_mine")
    assert stored.status_code == 200 and stored.json()["id"] == "resp_mine"
    r = await client.post("/v1/responses", json={**body, "request_id": "gw-7", "previous_response_id": "resp_mine"})
    assert r.status_code == 200 and r.json()["id"] == "gw-7" and r.json()["previous_response_id"] == "resp_mine"
    r = await client.post("/v1/responses", json={**body, "request_id": "s-1", "stream": True})
    events = [json.loads(line[len("data: "):]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert {e["response"]["id"] for e in events if "response" in e} == {"s-1"}
    ids = {(await client.post("/v1/responses", json={**body, **extra})).json()["id"] for extra in
           ({}, {"request_id": ""}, {"request_id": None})}
    assert len(ids) == 3 and all(i.startswith("resp_") for i in ids)
    r = await client.post("/v1/responses", json={**body, "request_id": "r" * 257})
    assert r.status_code == 400 and r.json()["error"]["param"] == "request_id", r.text
