"""Concurrency and client misbehaviour, hunted paths: first turns on new sessions that never save a state (refused
with 429, cancelled, failed) evict no other session; they counted against --max-sessions while under way, and an
overload wiped the idle sessions of others."""

from __future__ import annotations

import asyncio

import pytest
import torch

from .conftest import decoding_held

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0.0}


def _state():
    from retnet.model import RetNetCache

    cache = RetNetCache(1)
    cache.states, cache.offsets = [torch.zeros(1, 1, 2, 2)], torch.zeros(1, dtype=torch.long)
    return cache


def test_first_turns_that_save_no_state_evict_no_session():
    from retnet.serve.state_cache import SessionStore

    store = SessionStore(max_sessions=2, max_bytes=1 << 20, ttl_s=60)
    for sid, token in (("a", 1), ("b", 2)):
        store.acquire(sid)
        store.release(sid, _state(), [token], tokens=2)
    store.acquire("c")  # two first turns under way: busy, no state yet
    store.acquire("d")
    assert len(store) == 2  # (the retnet_sessions gauge: the sessions holding a state, not the turns under way)
    store.release("c")  # refused, cancelled or failed: nothing saved
    assert sorted(store.sessions) == ["a", "b", "d"]
    store.release("d")
    assert sorted(store.sessions) == ["a", "b"]
    assert store.acquire("a").pending == [1]
    store.release("a")
    # A first turn that saves its state counts: the session idle longest ("b") makes room for it.
    store.acquire("e")
    store.release("e", _state(), [3], tokens=2)
    assert sorted(store.sessions) == ["a", "e"]


async def test_an_overload_of_new_sessions_keeps_the_idle_ones(open_app, monkeypatch):
    async with open_app(max_sessions=2, max_running=1, max_queue=1) as c:
        engine = c.app.state.engine
        for sid in ("a", "b"):
            r = await c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "session_id": sid, **GREEDY})
            assert r.status_code == 200, r.text
        long = {"prompt": "x", "max_tokens": 8, "ignore_eos": True, **GREEDY}
        with decoding_held(engine, monkeypatch):
            running = asyncio.create_task(c.post("/v1/completions", json={**long, "session_id": "c"}))
            queued = asyncio.create_task(c.post("/v1/completions", json={**long, "session_id": "d"}))
            while engine.in_system < 2:
                await asyncio.sleep(0.01)
            refused = await c.post("/v1/completions", json={**long, "session_id": "e"})
            assert refused.status_code == 429, refused.text
            # Neither "c" nor "d" holds a state yet, and "e" never will: "a" and "b" were evicted for them.
            assert {"a", "b"} <= set(engine.sessions.sessions)
        assert (await running).status_code == 200 and (await queued).status_code == 200
