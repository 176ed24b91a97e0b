"""The SSE streams' wire format as line-reading clients take it (httpx's iter_lines, which retnet.serve.demo uses,
splits with str.splitlines()): every line is an ``event:`` or a whole ``data:`` event."""

import asyncio
import json

import pytest

from retnet.serve import messages
from retnet.serve.streaming import sse

pytestmark = pytest.mark.anyio

# Line breaks to str.splitlines() (NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR) that JSON writes raw.
BREAKERS = "a\x85b\u2028c\u2029d"


def read_lines(text: str) -> list:
    """The stream's data, read line by line as str.splitlines() splits it."""
    data = []
    for line in text.splitlines():
        assert not line or line.startswith(("data: ", "event: ")), repr(line)
        if line.startswith("data: ") and line != "data: [DONE]":
            data.append(json.loads(line[len("data: "):]))
    return data


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


async def test_a_streamed_text_with_unicode_line_breaks_keeps_each_event_on_one_line(client):
    body = {"model": "micro", "prompt": BREAKERS, "max_tokens": 1, "echo": True, "stream": True}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert "".join(e["choices"][0]["text"] for e in read_lines(r.text)).startswith(BREAKERS)
    messages_ = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": BREAKERS}]
    body = {"model": "micro", "messages": messages_, "max_tokens": 1, "echo": True, "stream": True,
            "add_generation_prompt": False, "continue_final_message": True}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    text = "".join(c["delta"].get("content") or "" for e in read_lines(r.text) for c in e["choices"])
    assert text.startswith(BREAKERS)


def test_named_events_escape_unicode_line_breaks_too():
    # the Anthropic Messages and Responses streams write their events with sse() as well
    event = messages._event("content_block_delta", index=0, delta={"type": "text_delta", "text": BREAKERS})
    assert read_lines(event) == [{"type": "content_block_delta", "index": 0,
                                  "delta": {"type": "text_delta", "text": BREAKERS}}]
    assert event.startswith("event: content_block_delta\ndata: ")
    assert read_lines(sse({"text": BREAKERS}, "response.output_text.delta")) == [{"text": BREAKERS}]
    assert sse("[DONE]") == "data: [DONE]\n\n"


async def metric(client, name: str) -> float:
    lines = (await client.get("/metrics")).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + " "))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_bug_mid_stream_is_an_error_event_then_done_and_cancels_the_request(client, path, monkeypatch):
    # As a whole answer gets a 500: the headers are sent, so the stream says it in OpenAI's error event (vLLM's),
    # where the connection was cut mid-body; the request's choices still running are cancelled.
    serving = client.app.state.serving
    counts = serving._usage_counts

    def failing(handle, completion):
        if completion >= 2:
            raise RuntimeError("a bug")
        return counts(handle, completion)

    monkeypatch.setattr(serving, "_usage_counts", failing)
    before = await metric(client, "retnet_generation_tokens_total")
    body = {"model": "micro", "max_tokens": 4000, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    r = await client.post(path, json=body)
    assert r.status_code == 200
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "internal_error" and error["type"] == "server_error" and "RuntimeError" in error["message"]
    engine = client.app.state.engine
    for _ in range(600):  # the cancelled choice leaves at the scheduler's next iteration
        if not engine.in_system:
            break
        await asyncio.sleep(0.1)
    assert not engine.in_system
    assert await metric(client, "retnet_generation_tokens_total") - before < 4000
