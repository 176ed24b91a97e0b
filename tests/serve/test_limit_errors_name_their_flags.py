"""A request refused by a server setting's limit names the flag an operator would change."""

import pytest

pytestmark = pytest.mark.anyio


async def test_limits_name_their_flags(open_app):
    async with open_app(max_sessions=0, max_tokens_limit=8, max_prompt_tokens=4) as client:
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "session_id": "a"})
        assert r.status_code == 400 and "(--max-sessions 0)" in r.json()["error"]["message"], r.text
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 9})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == "max_tokens must be <= 8 (--max-tokens-limit); got 9", r.text
        chat = {"messages": [{"role": "user", "content": "a longer message than four tokens"}], "max_tokens": 2}
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("the templated messages have "), r.text
        r = await client.post("/v1/completions", json={"prompt": [5, 6, 7, 8, 9], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("the prompt has 5 tokens"), r.text
