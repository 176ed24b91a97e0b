"""Serving paths a bug hunt found answered wrongly (or stalling the server); every test failed before its fix."""

from __future__ import annotations

import json
import threading

import pytest

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


def _recording_encode(monkeypatch, client) -> list[threading.Thread]:
    """The threads the server's tokenizer encodes on from now on."""
    tokenizer = client.app.state.serving.tokenizer
    encode, threads = tokenizer.encode, []

    def recording_encode(*args, **kwargs):
        threads.append(threading.current_thread())
        return encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", recording_encode)
    return threads


@pytest.mark.parametrize(("path", "body"), [
    # 1,000 empty messages (30,000 fit in a megabyte body: rendered and encoded on the event loop, every running
    # stream stalled ~3 s on the 2-core machine): only their texts were counted, 0 characters.
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}] * 1000, "max_tokens": 1}),
    ("/tokenize", {"messages": [{"role": "user", "content": ""}] * 1000}),
    # Text the template gets outside the messages' contents: a reasoning, a call's arguments, the tools.
    ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "reasoning_content": "r" * 70_000},
        {"role": "user", "content": "Hi"}], "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": '{"a": "%s"}' % ("x" * 70_000)}}]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"}], "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "tool_choice": "none",
                              "tools": [{"type": "function", "function": {"name": "f", "description": "d" * 70_000}}]}),
])
async def test_a_conversation_large_in_what_its_template_renders_is_encoded_off_the_event_loop(
        client, monkeypatch, path, body):
    threads = _recording_encode(monkeypatch, client)
    r = await client.post(path, json=body)
    assert r.status_code in (200, 400), r.text
    assert threads and all(t is not threading.main_thread() for t in threads), threads
    # A short conversation is still encoded on the loop (a burst of them reaches the engine together).
    threads.clear()
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}] * 4,
                                                         "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert threads and all(t is threading.main_thread() for t in threads), threads


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 6, "n": 2, "seed": 1, "logprobs": 3, "echo": True,
                         "prompt_logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "n": 2, "seed": 1,
                              "logprobs": True, "top_logprobs": 3, "prompt_logprobs": 2}),
])
async def test_a_large_answer_is_built_off_the_event_loop_and_is_the_same_answer(client, monkeypatch, path, body):
    # n=8 choices of 4096 tokens with 20 alternatives each (the default limits) made a 20-45 MB answer whose logprob
    # entries and JSON were built on the event loop when it ended: every running stream stalled ~3 s. Such an answer
    # is built on a worker thread (here "large" is lowered to this one), written in pieces, byte for byte the same.
    from retnet.serve import logprobs as logprobs_module
    from retnet.serve import serving as serving_module

    threads = []
    for name in ("add_completion_logprobs", "chat_logprob"):
        function = getattr(logprobs_module, name)

        def recording(*args, _function=function, **kwargs):
            threads.append(threading.current_thread())
            return _function(*args, **kwargs)

        monkeypatch.setattr(serving_module, name, recording)
    # Pieces small enough that prompt_logprobs' dicts, keyed by token ids (numbers), are taken apart too.
    small, large = await _on_the_loop_then_off_it(client, path, body, threads, monkeypatch, piece=4)
    assert large.headers["content-type"] == small.headers["content-type"] == "application/json"
    # The same bytes but for the id, the time and the prefix cache's hit (the second request's prompt is cached).
    assert _with_fields_of(small, large, ("id", "created", "usage")) == small.text


async def _on_the_loop_then_off_it(client, path, body, threads, monkeypatch, piece: int):
    """(small, large): ``body``'s answer built on the event loop (``threads`` records where), then with every answer
    "large", built off it in pieces of ``piece`` values."""
    from retnet.serve import serving as serving_module

    small = await client.post(path, json=body)
    assert small.status_code == 200, small.text
    assert threads and all(t is threading.main_thread() for t in threads)
    threads.clear()
    monkeypatch.setattr(serving_module, "OFF_LOOP_ANSWER_SIZE", 10, raising=False)
    monkeypatch.setattr(serving_module, "_JSON_PIECE", piece, raising=False)
    large = await client.post(path, json=body)
    assert large.status_code == 200, large.text
    assert threads and all(t is not threading.main_thread() for t in threads), threads
    return small, large


def _with_fields_of(small, large, fields) -> str:
    """``large``'s body with ``small``'s values of ``fields`` (what differs between two answers to one request)."""
    text = large.text
    for name in fields:
        text = text.replace(json.dumps({name: large.json()[name]}, separators=(",", ":"))[1:-1],
                            json.dumps({name: small.json()[name]}, separators=(",", ":"))[1:-1])
    return text


@pytest.mark.parametrize("path", ["/v1/embeddings", "/pooling"])
async def test_large_embeddings_are_written_off_the_event_loop_and_are_the_same_json(open_app, monkeypatch, path):
    # 1024 embeddings of 2048 floats are 40 MB of JSON: json.dumps took 4 s on the event loop, every other request
    # (/health's probe too) waiting. Such an answer is written on a worker thread in pieces (here "large" is lowered).
    from retnet.serve.classify import EmbeddingResponse, PoolingResponse

    threads = []
    for cls in (EmbeddingResponse, PoolingResponse):
        def recording(self, *args, _dump=cls.model_dump, **kwargs):
            threads.append(threading.current_thread())
            return _dump(self, *args, **kwargs)

        monkeypatch.setattr(cls, "model_dump", recording)
    body = {"input": ["Hello world", "def add(a, b):"]}
    async with open_app(convert="embed") as client:
        small, large = await _on_the_loop_then_off_it(client, path, body, threads, monkeypatch, piece=16)
    assert large.headers["content-type"] == "application/json"
    assert {**large.json(), "id": None, "created": None} == {**small.json(), "id": None, "created": None}
    text = _with_fields_of(small, large, ("id", "created"))
    assert text == small.text
