"""The engine's decode steps write each layer's new state over the batch's own (``RetNetCache.update_in_place``):
no answer changes, and no state held elsewhere (a prefix entry, a session, a preempted or joining row, a draft
state) is ever the one written."""

import asyncio
import json

import pytest
import torch

import retnet.kernels
from retnet.model import modeling_retnet
from tests.serve.conftest import serve_app

pytestmark = pytest.mark.anyio

GREEDY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}
# The micro model's greedy continuation of this loops, which the n-gram drafts follow (taken and refused).
REPEATS = "The retention mechanism replaces attention with a decaying recurrence. " * 3
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def held_storages(engine) -> set[int]:
    """The storages of every state the engine holds outside its batch."""
    caches = [entry.cache for entry in engine.prefix_cache.entries.values()]
    caches += [session.cache for session in engine.sessions.sessions.values() if session.cache is not None]
    caches += [cache for _, cache in (*engine.preempted, *engine.joining) if cache is not None]
    caches += [seq.draft_state.cache for seq in engine.running if seq.draft_state is not None]
    return {state.untyped_storage().data_ptr() for cache in caches for state in cache.states if state is not None}


def watch_in_place_writes(monkeypatch, engine) -> tuple[list[int], list[str]]:
    """Counts the in-place recurrent steps, and records any whose state another holder shares."""
    calls, shared = [0], []
    inner = retnet.kernels.recurrent_retention

    def recurrent_retention(*args, update_state_inplace=False, **kwargs):
        if update_state_inplace:
            calls[0] += 1
            state = kwargs["initial_state"]
            if state.untyped_storage().data_ptr() in held_storages(engine):
                shared.append(f"step {calls[0]}: a state held outside the batch")
        return inner(*args, update_state_inplace=update_state_inplace, **kwargs)

    monkeypatch.setattr(retnet.kernels, "recurrent_retention", recurrent_retention)
    return calls, shared


async def completion(client, body: dict) -> list[list[int]]:
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return [choice["token_ids"] for choice in sorted(r.json()["choices"], key=lambda c: c["index"])]


async def answers(client) -> dict:
    """A first wave (prompts that share a prefix, n > 1 from one prefill, a beam search beside them), then a wave
    that starts from the states the first left in the prefix cache, and a session's two turns."""
    out = {}
    first = {
        "loop": {"prompt": REPEATS, "max_tokens": 24, **GREEDY},
        "shared": {"prompt": REPEATS + "The state", "max_tokens": 12, **GREEDY},
        "seeded": {"prompt": REPEATS, "max_tokens": 16, "n": 3, "temperature": 0.8, "seed": 7,
                   "ignore_eos": True, "return_token_ids": True},
        "beams": {"prompt": "def add(a, b):", "max_tokens": 5, "n": 3, "use_beam_search": True, **GREEDY},
        "other": {"prompt": "Hello world! How", "max_tokens": 16, **GREEDY},
    }
    out.update(zip(first, await asyncio.gather(*(completion(client, body) for body in first.values()))))
    engine = client.app.state.engine
    # Their states as the prefix cache holds them now: decoding on from them below must leave them as they are.
    # (a snapshot of the entries first: the engine's thread may still be adding the last request's as its answer comes)
    kept = {key: [state.clone() for state in entry.cache.states]
            for key, entry in list(engine.prefix_cache.entries.items())}
    assert kept
    then = {
        "continued": {"prompt": REPEATS + "The state of", "max_tokens": 16, **GREEDY},
        "again": {"prompt": REPEATS, "max_tokens": 20, "n": 2, **GREEDY},
    }
    out.update(zip(then, await asyncio.gather(*(completion(client, body) for body in then.values()))))
    session = {"max_tokens": 10, "session_id": "s-in-place", **GREEDY}
    out["turn1"] = await completion(client, {**session, "prompt": REPEATS})
    out["turn2"] = await completion(client, {**session, "prompt": " The retention"})
    entries = dict(engine.prefix_cache.entries)  # a snapshot, as above
    changed = [key for key, states in kept.items() if key in entries
               and not all(torch.equal(a, b) for a, b in zip(states, entries[key].cache.states))]
    assert not changed, f"{len(changed)} prefix-cache entries changed by the decoding that continued from them"
    return out


async def test_in_place_decode_changes_no_answer_and_writes_no_held_state(model_dir, monkeypatch):
    settings = dict(speculative_config=json.dumps(SPEC), max_running=4)
    async with serve_app(model_dir, **settings) as client:
        engine = client.app.state.engine
        calls, shared = watch_in_place_writes(monkeypatch, engine)
        in_place = await answers(client)
        assert engine.metrics.spec_accepted_tokens._value.get() > 0  # speculative steps between the decode steps
    assert calls[0] > 0  # the decode steps did update their states in place
    assert not shared, shared
    monkeypatch.setattr(modeling_retnet, "_inplace_state_allowed", lambda *args: False)  # today's new tensors
    async with serve_app(model_dir, **settings) as client:
        calls, _ = watch_in_place_writes(monkeypatch, client.app.state.engine)
        allocated = await answers(client)
    assert calls[0] == 0
    assert in_place == allocated
    assert len(in_place["seeded"]) == 3 and len(set(map(tuple, in_place["seeded"]))) > 1
    assert len(in_place["beams"]) == 3
