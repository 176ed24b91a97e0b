"""``--session-dir``: something other than a regular file where a session's file goes (a directory, a FIFO) is a
409 ``session_not_a_file`` naming ``session_id``, never read, swept nor removed, and the other sessions are served.
A directory answered 503 "retry later" forever (and its DELETE 500 "retry the DELETE"); a FIFO's open waited for a
writer forever: the request hung, holding its session busy, and one past the TTL hung the startup sweep, and with it
the server's start."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import anyio
import pytest

from .conftest import serve_app

pytestmark = pytest.mark.anyio


def completion(session_id: str) -> dict:
    return {"prompt": "hi", "max_tokens": 2, "session_id": session_id}


def release_fifo_readers(path) -> None:
    """Give a reader blocked opening the FIFO ``path`` its end of file (the code before the fix blocked there: a
    worker thread left waiting would hold the test process at its exit)."""
    with contextlib.suppress(OSError):  # ENXIO: no reader waits
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


async def test_a_directory_or_a_fifo_where_a_session_file_goes_is_a_409_conflict(model_dir, tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    (tmp_path / "d.safetensors" / "kept").write_text("mine")
    os.mkfifo(tmp_path / "f.safetensors")
    try:
        async with serve_app(model_dir, session_dir=str(tmp_path), session_ttl_s=3600) as client:
            for session_id, kind in (("d", "a directory"), ("f", "a FIFO")):
                with anyio.fail_after(30):  # (the FIFO's read waited forever)
                    r = await client.post("/v1/completions", json=completion(session_id))
                assert r.status_code == 409, r.text
                error = r.json()["error"]
                assert (error["code"], error["param"]) == ("session_not_a_file", "session_id"), error
                assert f"session {session_id!r}" in error["message"] and kind in error["message"], error
            for session_id in ("d", "f"):  # retried, it would fail the same way: no 500 "retry"; nor removed
                r = await client.delete(f"/v1/sessions/{session_id}")
                assert r.status_code == 409 and r.json()["error"]["code"] == "session_not_a_file", r.text
            r = await client.post("/v1/completions", json=completion("other"))
            assert r.status_code == 200, r.text
            metrics = (await client.get("/metrics")).text
            assert 'retnet_session_load_failures_total{reason="session_not_a_file"} 2.0' in metrics
    finally:
        release_fifo_readers(tmp_path / "f.safetensors")
    assert (tmp_path / "d.safetensors" / "kept").read_text() == "mine"
    assert (tmp_path / "f.safetensors").exists()


def test_an_expired_fifo_does_not_hold_the_startup_sweep(tmp_path):
    from retnet.serve.metrics import ServeMetrics
    from retnet.serve.session_store import SessionFiles

    os.mkfifo(tmp_path / "old.safetensors")
    expired = time.time() - 7200
    os.utime(tmp_path / "old.safetensors", (expired, expired))
    files = SessionFiles(tmp_path, {}, 3600, ServeMetrics(), (1, 4, 16, 16), 2, lambda slot: None, 384)
    # (on a thread: the startup's sweep runs in the app's lifespan, on the event loop, which waited forever)
    sweep = threading.Thread(target=files.start, daemon=True)
    sweep.start()
    sweep.join(30)
    alive = sweep.is_alive()
    release_fifo_readers(tmp_path / "old.safetensors")
    files.close()
    assert not alive, "the sweep waited on the FIFO"
    assert (tmp_path / "old.safetensors").exists()  # not a session file: kept


async def test_a_truncated_file_is_409_corrupt_and_the_others_are_served(model_dir, tmp_path):
    # The README's statement, checked: not a 500, the file kept, a DELETE starting the session anew.
    (tmp_path / "t.safetensors").write_bytes(b"\x10\x00")
    async with serve_app(model_dir, session_dir=str(tmp_path)) as client:
        r = await client.post("/v1/completions", json=completion("t"))
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_corrupt", r.text
        assert (tmp_path / "t.safetensors").read_bytes() == b"\x10\x00"
        r = await client.post("/v1/completions", json=completion("other"))
        assert r.status_code == 200, r.text
        assert (await client.delete("/v1/sessions/t")).status_code == 200
        r = await client.post("/v1/completions", json=completion("t"))
        assert r.status_code == 200, r.text
