"""/v1/completions and /v1/chat/completions against vLLM's semantics, where a hunt found them apart."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "Hello"}]}


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


@pytest.fixture
async def client(open_app):
    async with open_app() as c:
        yield c


async def test_a_stream_with_return_token_ids_carries_the_prompt_ids_once_per_choice(client):
    """vLLM's: a streamed choice's first chunk carries its prompt's ids (a completion's in the choice, a chat's in
    the chunk), as a whole response's choices do; an RL client streaming needs them to rebuild the sequence."""
    req = {"prompt": ["Hello world", "for i"], "n": 2, "max_tokens": 3, "return_token_ids": True, **GREEDY}
    whole = (await client.post("/v1/completions", json=req)).json()["choices"]
    r = await client.post("/v1/completions", json={**req, "stream": True})
    assert r.status_code == 200, r.text
    carried: dict[int, list] = {}
    for event in sse_events(r.text):
        for choice in event["choices"]:
            if "prompt_token_ids" in choice:
                assert choice["index"] not in carried  # only on the choice's first chunk
                carried[choice["index"]] = choice["prompt_token_ids"]
    assert carried == {c["index"]: c["prompt_token_ids"] for c in whole}
    assert carried[0] != carried[2]

    chat = {**CHAT, "n": 2, "max_tokens": 2, "return_token_ids": True, **GREEDY}
    expected = (await client.post("/v1/chat/completions", json=chat)).json()["choices"][0]["prompt_token_ids"]
    events = sse_events((await client.post("/v1/chat/completions", json={**chat, "stream": True})).text)
    opening = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("role") == "assistant"]
    assert [e["choices"][0]["index"] for e in opening] == [0, 1]
    assert all(e["prompt_token_ids"] == expected for e in opening)
    assert not any("prompt_token_ids" in e for e in events if e not in opening)
    # Without return_token_ids nothing changes.
    events = sse_events((await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2,
                                                                         "stream": True})).text)
    assert not any("prompt_token_ids" in e or "token_ids" in str(e["choices"]) for e in events)
