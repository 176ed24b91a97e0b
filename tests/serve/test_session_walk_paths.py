"""README walkthrough of *Sessions on disk*: what a refused session file's 409 says."""

from __future__ import annotations

import pytest

from .conftest import serve_app

pytestmark = pytest.mark.anyio


async def test_a_file_of_another_chat_template_names_it_in_a_sentence_that_agrees(model_dir, tmp_path):
    sessions = tmp_path / "sessions"
    body = {"prompt": "def add(a, b):", "session_id": "s", "max_tokens": 2, "temperature": 0}
    async with serve_app(model_dir, session_dir=str(sessions)) as client:
        assert (await client.post("/v1/completions", json=body)).status_code == 200
    async with serve_app(model_dir, session_dir=str(sessions), chat_template="{{ messages }}") as client:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_model_changed", r.text
        # It read "its chat template differ from this server's --model".
        assert "its chat template differs from this server's --model" in r.json()["error"]["message"], r.text
