"""Small serving leftovers: ``GET /v1/models/`` is the model list (it was the first card: the id route took "" as an
id); ``DELETE /v1/sessions/{id}`` of a session past --session-ttl-s not yet cleaned up is 404, as for an unknown id
(it was 200), in memory and on disk; with --api-keys a keyless request to any /v1 path is 401 before routing (an
unknown path, another method or a trailing slash answered 404, 405 or 307: the routes told to a client without
the key)."""

from __future__ import annotations

import os
import time

import pytest

from .conftest import serve_app

pytestmark = pytest.mark.anyio
KEY = {"Authorization": "Bearer k"}


async def test_keyless_requests_to_any_v1_path_are_401_before_routing(model_dir):
    async with serve_app(model_dir, api_keys=["k"]) as client:
        for method, path in [("GET", "/v1/nope"), ("POST", "/v1/nope"), ("DELETE", "/v1/models"),
                             ("GET", "/v1/completions"), ("POST", "/v1/completions/"), ("GET", "/v1/models/")]:
            r = await client.request(method, path)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = await client.post("/v1/messages/nope", headers={"x-api-key": "wrong"})
        assert r.status_code == 401 and r.json()["type"] == "error"  # Anthropic's body on its routes, as ever
        # With the key, the router's answers as before; outside /v1 and vLLM's keyed routes, no key is asked
        assert (await client.get("/v1/nope", headers=KEY)).status_code == 404
        assert (await client.get("/v1/completions", headers=KEY)).status_code == 405
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/nope")).status_code == 404


async def test_models_with_a_trailing_slash_is_the_list(model_dir):
    async with serve_app(model_dir, api_keys=["k"]) as client:
        listed = await client.get("/v1/models", headers=KEY)
        slashed = await client.get("/v1/models/", headers=KEY)
        assert slashed.status_code == 200 and listed.status_code == 200
        assert slashed.json() == listed.json() and slashed.json()["object"] == "list"
        assert (await client.get("/v1/models/micro", headers=KEY)).json()["object"] == "model"


async def test_deleting_a_session_past_its_ttl_in_memory_is_404(model_dir):
    async with serve_app(model_dir) as client:
        engine = client.app.state.engine
        engine._free_idle_states = lambda: None  # the scheduler's expiry, each second, not come yet
        for name in ("old", "live"):
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "session_id": name})
            assert r.status_code == 200, r.text
        engine.sessions.sessions["old"].last_used -= engine.sessions.ttl_s + 1
        r = await client.delete("/v1/sessions/old")
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "session_not_found"
        r = await client.delete("/v1/sessions/live")
        assert r.status_code == 200 and r.json()["deleted"] is True


async def test_deleting_a_session_file_past_its_ttl_not_swept_yet_is_404(model_dir, tmp_path):
    async with serve_app(model_dir, session_dir=str(tmp_path), session_ttl_s=3600) as client:
        engine = client.app.state.engine
        files = engine.sessions.files
        for name in ("old", "live"):
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "session_id": name})
            assert r.status_code == 200, r.text
        assert files.flush(20)
        engine.sessions.delete("old")  # its copy in memory expired; the file waits for the next sweep
        old = files.path("old")
        expired = time.time() - 7200
        os.utime(old, (expired, expired))
        r = await client.delete("/v1/sessions/old")
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "session_not_found"
        assert not old.exists()  # removed all the same
        engine.sessions.delete("live")  # on disk only, within its TTL: still a session
        r = await client.delete("/v1/sessions/live")
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert not files.path("live").exists()
