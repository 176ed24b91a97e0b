"""A bug of ours while the Anthropic Messages or Responses stream is built: the headers are sent, so the stream ends
as each API ends one on a server error (Anthropic's ``error`` event; OpenAI's ``error`` then ``response.failed``),
not with a connection cut mid-body, and the request is cancelled."""

import asyncio
import json

import pytest
from openai.types.responses import ResponseErrorEvent, ResponseFailedEvent

from retnet.serve import messages, responses

pytestmark = pytest.mark.anyio

ASK = [{"role": "user", "content": "hi"}]
# Long enough that the request is still generating when the fault comes: only a cancel ends it early.
LONG = 4000
BODIES = {
    "/v1/messages": {"model": "micro", "max_tokens": LONG, "messages": ASK, "ignore_eos": True},
    "/v1/responses": {"model": "micro", "max_output_tokens": LONG, "input": "hi", "ignore_eos": True},
}


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


def named_events(text: str) -> list[dict]:
    """The stream's ``event: <type>`` / ``data: {json}`` pairs, each event's name its data's type."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"], block
        events.append(event)
    return events


async def metric(client, name: str) -> float:
    lines = (await client.get("/metrics")).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + " "))


def fault_in_chat_chunks(serving, monkeypatch):
    """The chat chunks the route reads raise after a few (the request still generating)."""
    chunks = serving.chat_chunks

    async def failing(*args, **kwargs):
        sent = 0
        async for chunk in chunks(*args, **kwargs):
            if sent == 3:
                raise RuntimeError("a bug")
            sent += 1
            yield chunk

    monkeypatch.setattr(serving, "chat_chunks", failing)


def fault_in_route_events(path, monkeypatch):
    """The route's own event building raises when the first text comes."""
    def failing(*args, **kwargs):
        raise RuntimeError("a bug")

    if path == "/v1/messages":
        monkeypatch.setattr(messages, "_text_block", failing)
    else:
        monkeypatch.setattr(responses, "_message_item", failing)


@pytest.mark.parametrize("where", ["chat_chunks", "route_events"])
@pytest.mark.parametrize("path", list(BODIES))
async def test_a_bug_mid_stream_ends_it_with_the_apis_error_events_and_cancels_the_request(client, path, where,
                                                                                           monkeypatch):
    serving, engine = client.app.state.serving, client.app.state.engine
    if where == "chat_chunks":
        fault_in_chat_chunks(serving, monkeypatch)
    else:
        fault_in_route_events(path, monkeypatch)
    before = await metric(client, "retnet_generation_tokens_total")
    r = await asyncio.wait_for(client.post(path, json={**BODIES[path], "stream": True}), 60)
    assert r.status_code == 200
    events = named_events(r.text)
    kinds = [event["type"] for event in events]
    if path == "/v1/messages":
        assert kinds[:2] == ["message_start", "ping"] and kinds[-1] == "error", kinds
        assert "message_stop" not in kinds and "message_delta" not in kinds
        # Anthropic's error event, as a whole answer's 500 is (an api_error)
        assert events[-1] == {"type": "error", "error": {"type": "api_error",
                                                         "message": "internal error (RuntimeError)"}}
    else:
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-2:] == ["error", "response.failed"]
        assert [event["sequence_number"] for event in events] == list(range(len(events)))
        error, failed = ResponseErrorEvent.model_validate(events[-2]), ResponseFailedEvent.model_validate(events[-1])
        assert (error.code, error.message) == ("internal_error", "internal error (RuntimeError)")
        assert failed.response.status == "failed" and failed.response.error is not None
        assert (failed.response.error.code, failed.response.error.message) == ("server_error", error.message)
        assert "response.completed" not in kinds and "response.incomplete" not in kinds
    for _ in range(600):  # the cancelled request leaves at the scheduler's next iteration
        if not engine.in_system:
            break
        await asyncio.sleep(0.1)
    assert not engine.in_system
    assert await metric(client, "retnet_generation_tokens_total") - before < LONG
    monkeypatch.undo()  # the fault gone, the server answers the next request
    short = {**BODIES[path], "max_tokens" if path == "/v1/messages" else "max_output_tokens": 2}
    after = await asyncio.wait_for(client.post(path, json=short), 60)
    assert after.status_code == 200, after.text
    assert after.json()["type" if path == "/v1/messages" else "status"] in ("message", "incomplete")
