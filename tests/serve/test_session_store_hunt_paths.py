"""Sessions on disk (``--session-dir``), hunted paths: a foreign file whose safetensors header is JSON nested too
deep to parse is refused as any foreign file is (409, kept), and neither aborts the sweep nor fails with a 500."""

from __future__ import annotations

import os
import struct
import time

import pytest

from .conftest import serve_app

pytestmark = pytest.mark.anyio


async def test_a_deeply_nested_header_is_a_foreign_file_not_a_crash(model_dir, tmp_path):
    head = b"[" * 5000 + b"]" * 5000  # valid JSON, deeper than the parser's recursion limit
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head)
    expired = time.time() - 7200
    os.utime(path, (expired, expired))
    async with serve_app(model_dir, session_dir=str(tmp_path), session_ttl_s=3600) as client:
        metrics = (await client.get("/metrics")).text
        assert "retnet_session_sweep_failures_total 0.0" in metrics  # the startup sweep went through
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "session_id": "x"})
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "session_corrupt" and r.json()["error"]["param"] == "session_id"
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "session_id": "y"})
        assert r.status_code == 200, r.text
    assert path.read_bytes()[8:] == head  # not ours: kept, whatever its age
