"""Sessions' leftovers: a session's fingerprint covers --chat-template-content-format when it is chosen (a session
saved under one form was continued under the other, its history rendered in the first), and keeps the fingerprint of
sessions saved before the setting under its default; ``DELETE /v1/sessions/a%2Fb`` (an id with "/") and
``DELETE /v1/sessions/`` are the 400 invalid_session_id the README gives for a bad id (they were the router's generic
404, param null), newlines anywhere too, still counted under the route's label."""

from __future__ import annotations

import shutil

import pytest

from .conftest import serve_app

pytestmark = pytest.mark.anyio


async def test_the_fingerprint_covers_a_chosen_content_format_only(model_dir, tmp_path):
    from retnet.model import RetNetConfig
    from retnet.serve.session_store import model_fingerprint

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    config = RetNetConfig.from_pretrained(model)
    base = model_fingerprint(model, config)
    assert model_fingerprint(model, config, content_format="auto") == base  # sessions saved before it continue
    string = model_fingerprint(model, config, content_format="string")
    openai = model_fingerprint(model, config, content_format="openai")
    for other in (string, openai):
        assert sorted(part for part in base if other[part] != base[part]) == ["chat_template"]
    assert string["chat_template"] != openai["chat_template"]
    sessions = tmp_path / "sessions"
    async with serve_app(model_dir, session_dir=str(sessions), chat_template_content_format="openai") as client:
        r = await client.post("/v1/completions", json={"prompt": "x", "session_id": "s", "max_tokens": 2})
        assert r.status_code == 200, r.text
    async with serve_app(model_dir, session_dir=str(sessions), chat_template_content_format="string") as client:
        r = await client.post("/v1/completions", json={"prompt": "y", "session_id": "s", "max_tokens": 2})
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_model_changed", r.text
        assert "chat template" in r.json()["error"]["message"]


async def test_deleting_an_id_with_a_slash_or_none_is_invalid_session_id(model_dir):
    async with serve_app(model_dir) as client:
        await client.post("/v1/completions", json={"prompt": "x", "session_id": "abc", "max_tokens": 2})
        # newlines as well: a route of ".*" and "$" took "abc%0A" as "abc" (and "a%0A/b" matched no route)
        bad = ("a%2Fb", "a/b", "", "abc%0A", "a%0A/b", "%0A%0A")
        for session_id in bad:
            r = await client.delete(f"/v1/sessions/{session_id}")
            assert r.status_code == 400, (session_id, r.text)
            assert r.json()["error"]["param"] == "session_id" and r.json()["error"]["code"] == "invalid_session_id"
        assert (await client.delete("/v1/sessions/abc")).status_code == 200  # none of them was this one
        assert (await client.delete("/v1/sessions/nobody")).status_code == 404
        text = (await client.get("/metrics")).text
        assert f'retnet_requests_total{{route="/v1/sessions/{{session_id}}",status="400"}} {len(bad)}.0' in text
        assert 'retnet_requests_total{route="/v1/sessions/{session_id}",status="200"} 1.0' in text
        assert 'retnet_requests_total{route="/v1/sessions/{session_id}",status="404"} 1.0' in text
        assert 'route="other"' not in text
        assert "/v1/sessions/{session_id}" in (await client.get("/openapi.json")).json()["paths"]
