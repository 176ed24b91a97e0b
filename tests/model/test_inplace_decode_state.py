"""``RetNetCache.update_in_place``: a decode loop that owns its cache's states (the server's batch) has each
one-token recurrent step write the new states over the old ones, with the same outputs; everywhere else (the
default, a snapshot kept for assisted decoding, training) a state someone holds is never written."""

import pytest
import torch

from retnet.model import RetNetCache
from tests.model.conftest import make_model


def decode(model, cache, token, steps):
    """``steps`` greedy one-token steps from ``cache``: the logits of each."""
    logits = []
    for _ in range(steps):
        out = model(token, cache=cache, use_cache=True, retention_mode="recurrent")
        logits.append(out.logits)
        token = out.logits[:, -1:].argmax(-1)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("grad_mode", [torch.inference_mode, torch.no_grad])
def test_the_owner_s_steps_write_in_place_and_give_the_same_outputs(backend, grad_mode, monkeypatch):
    monkeypatch.setenv("RETNET_KERNELS", backend)
    model = make_model()
    with grad_mode():
        prefilled = model(torch.randint(2, 101, (3, 6)), use_cache=True).cache
        token = torch.randint(2, 101, (3, 1))
        allocated, owned = prefilled.clone(), prefilled.clone()
        owned.update_in_place = True
        buffers = list(owned.states)
        expected = decode(model, allocated, token, 4)
        assert torch.equal(decode(model, owned, token, 4), expected)
    assert all(a is b for a, b in zip(owned.states, buffers))  # the same tensors, written over
    assert all(torch.equal(a, b) for a, b in zip(owned.states, allocated.states))


def test_a_state_anyone_else_holds_is_never_written():
    model = make_model()
    with torch.inference_mode():
        cache = model(torch.randint(2, 101, (2, 5)), use_cache=True).cache
        token = torch.randint(2, 101, (2, 1))
        # The default, as every copy of a cache starts: a user's cache (and generate's) keeps today's semantics.
        copies = [cache.clone(), cache.select(slice(0, 2)), RetNetCache.concat([cache]), *cache.split(),
                  RetNetCache.zeros(model.config, 1)]
        assert not any(copy.update_in_place for copy in copies)
        held = list(cache.states)
        kept = [state.clone() for state in held]
        decode(model, cache, token, 2)
        assert all(torch.equal(a, b) for a, b in zip(held, kept))

        # Assisted decoding's snapshot shares the cache's tensors (record_snapshot, crop): no step writes them.
        recording = model(torch.randint(2, 101, (2, 5)), use_cache=True).cache
        recording.update_in_place = True
        recording.activate_past_recording(2)
        model(torch.randint(2, 101, (2, 3)), cache=recording, use_cache=True)
        recording.crop(-2)
        snapshot = list(recording.snapshot.states)
        kept = [state.clone() for state in snapshot]
        assert any(a is b for a, b in zip(recording.states, snapshot))
        decode(model, recording, token, 3)
        assert all(torch.equal(a, b) for a, b in zip(snapshot, kept))


def test_where_a_write_in_place_is_not_allowed_the_step_silently_allocates():
    model = make_model()
    with torch.inference_mode():  # inference tensors: not writable outside inference_mode
        cache = model(torch.randint(2, 101, (2, 5)), use_cache=True).cache
    cache.update_in_place = True
    held = list(cache.states)
    with torch.no_grad():
        out = model(torch.randint(2, 101, (2, 1)), cache=cache, use_cache=True, retention_mode="recurrent")
    assert all(a is not b for a, b in zip(out.cache.states, held))
    # With gradients (a fine-tuning step through a cache): the states stay in the graph, never written.
    model.train()
    cache = model(torch.randint(2, 101, (2, 5)), use_cache=True).cache
    cache.update_in_place = True
    held = list(cache.states)
    out = model(torch.randint(2, 101, (2, 1)), cache=cache, use_cache=True, retention_mode="recurrent")
    out.logits.sum().backward()
    assert all(a is not b for a, b in zip(out.cache.states, held))
