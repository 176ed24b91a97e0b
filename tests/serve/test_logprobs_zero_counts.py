"""A logprobs count of 0 that asks for nothing is taken as vLLM takes it: chat's ``top_logprobs: 0`` without
``logprobs: true`` (vLLM's default); ``prompt_logprobs: 0`` still asks for each prompt token's own logprob, which a
stream cannot carry, and is refused with it, saying so."""

import pytest

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0, "ignore_eos": True}


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


async def test_top_logprobs_zero_without_logprobs_asks_nothing(client):
    for extra in ({}, {"logprobs": False}, {"logprobs": None}):
        r = await client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 0, **extra})
        assert r.status_code == 200, (extra, r.text)
        assert r.json()["choices"][0]["logprobs"] is None, r.text
        events = await client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 0, "stream": True, **extra})
        assert events.status_code == 200 and '"error"' not in events.text, events.text
    # With logprobs: each token's logprob and no alternatives.
    r = await client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 0, "logprobs": True})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and all(entry["top_logprobs"] == [] for entry in content), content
    # A count above 0 asks for alternatives, which need logprobs: true.
    r = await client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_streamed_prompt_logprobs_zero_says_what_it_asks(client, path):
    body = {**CHAT, "stream": True, "prompt_logprobs": 0}
    if "chat" not in path:
        body = {**{k: v for k, v in body.items() if k != "messages"}, "prompt": "hi"}
    r = await client.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
    message = r.json()["error"]["message"]
    assert "stream" in message and "0 asks for each prompt token's own" in message and "got 0" in message, message
