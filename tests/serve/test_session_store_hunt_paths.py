"""Sessions on disk (``--session-dir``), hunted paths: a foreign file whose safetensors header is JSON nested too
deep to parse is refused as any foreign file is (409, kept), and neither aborts the sweep nor fails with a 500;
and in memory, an idle server expires the sessions past their TTL."""

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


def test_an_idle_server_frees_the_sessions_past_their_ttl(model_dir):
    # Sessions expired only when a session was acquired or released: a server left idle held every expired session's
    # state (on the model's device) and counted it in retnet_sessions until the next session request came. The
    # scheduler expires them while it waits for work; the one a request holds stays.
    import torch

    from .test_units import standalone_engine

    engine = standalone_engine(model_dir)
    store = engine.sessions
    state = engine.model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True, return_dict=True).cache
    for name in ("old", "held"):
        store.acquire(name)
        store.release(name, state.clone(), [8], tokens=4)
    store.acquire("held")  # a request on it, running as long as it needs
    for session in store.sessions.values():
        session.last_used -= store.ttl_s + 1
    engine.metrics.sessions.set(len(store))

    def one_wait(timeout=None):  # the scheduler's idle wait, once: then it is told to stop
        engine.stopping = True

    engine.cond.wait = one_wait
    assert engine._iteration() is False
    assert list(store.sessions) == ["held"]
    assert engine.metrics.registry.get_sample_value("retnet_sessions") == 1
