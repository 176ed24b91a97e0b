"""The scheduler's state handling, driven one iteration at a time (no thread): what a sequence keeps alive,
what it starts from, and what it frees."""

import asyncio
import gc
import weakref

import pytest
import torch

from retnet.serve.sampling import SamplingParams
from retnet.serve.sequence import EngineFailure
from tests.serve.conftest import watch_state_copies
from tests.serve.test_units import cancel_late, standalone_engine

pytestmark = pytest.mark.anyio

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def drain(handle) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    while not handle.queue.empty():
        item = handle.queue.get_nowait()
        assert not isinstance(item, EngineFailure), item.message
        for out in item:
            tokens.setdefault(out.index, []).extend(out.token_ids)
    return tokens


async def test_a_running_sequence_does_not_keep_its_prefill_state_alive(model_dir):
    # Once a prompt's state has joined the batch, the batch holds the only copy it needs: the group's own
    # prefill state (for a packed burst, a view that keeps the whole packed forward's state alive) must go,
    # or every running sequence costs its state twice.
    engine = standalone_engine(model_dir)
    refs = []
    spawn = engine._spawn

    def spawn_and_watch(group):
        refs.extend(weakref.ref(state) for state in group.cache.states)
        spawn(group)

    engine._spawn = spawn_and_watch
    with engine.cond:  # a burst: packed into one prefill forward
        engine.submit([[5, 6, 7, 8, 9]], GREEDY, n=2)
        engine.submit([[10, 11, 12, 13, 14, 15]], GREEDY)
    with torch.inference_mode():
        engine._iteration()
        engine._iteration()
    assert len(engine.running) == 3 and all(s.finish_reason is None for s in engine.running)
    assert len(refs) == 2 * engine.config.num_hidden_layers
    gc.collect()
    assert all(ref() is None for ref in refs)


async def test_rows_leaving_the_batch_never_copy_the_whole_batch(model_dir, monkeypatch):
    # A sequence that ends (and saves its session) or leaves the batch must cost a copy of ITS row, not of
    # every row's state: at 64 running sequences a whole-batch copy is 64 states more, at the busiest moment.
    copied = watch_state_copies(monkeypatch)  # rows copied by each clone / select
    engine = standalone_engine(model_dir)
    short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    with engine.cond:
        engine.submit([[5, 6, 7, 8, 9]], GREEDY, n=3)
        session = engine.submit([[20, 21, 22, 23]], short, session_id="s")
        leaving = engine.submit([[30, 31, 32, 33]], short)
    with torch.inference_mode():
        while engine.running or engine.joining or engine.prefilling or engine.waiting:
            engine._iteration()
    assert engine.in_system == 0 and engine.sessions.sessions["s"].cache.batch_size == 1
    assert copied and max(copied) == 1, copied
    await asyncio.sleep(0)  # the outputs were queued with call_soon_threadsafe
    assert len(drain(session)[0]) == 3 and len(drain(leaving)[0]) == 3


async def test_a_session_changes_only_with_a_finished_response_wherever_a_cancel_lands(model_dir):
    # The event loop cancels while the scheduler runs: at every point the cancel can land, each choice ends
    # once, either finished ("length": the whole response generated, the session saved) or "abort" (the
    # session left exactly as it was, never half updated); and the request hears which, so a non-streaming
    # one whose client left can answer by what the engine did.
    def run():
        with torch.inference_mode():
            while engine.waiting or engine.prefilling or engine.joining or engine.running:
                engine._iteration()

    engine = standalone_engine(model_dir)
    outcomes = set()
    for max_tokens in (1, 3):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for cancel_at in range(1, 12):
            engine.submit([[5, 6, 7, 8]], params, session_id="s")
            run()
            saved = engine.sessions.sessions["s"]
            before = (saved.cache, list(saved.pending), saved.tokens)
            handle = engine.submit([[9, 10, 11]], params, session_id="s")
            cancel_late(handle, cancel_at)
            run()
            await asyncio.sleep(0)
            ends = []
            while not handle.queue.empty():
                ends += [out.finish_reason for out in handle.queue.get_nowait() if out.finish_reason]
            assert len(ends) == 1 and ends[0] in ("length", "abort"), (max_tokens, cancel_at, ends)
            session = engine.sessions.sessions["s"]
            after = (session.cache, session.pending, session.tokens)
            if ends[0] == "abort":
                assert after == before, (max_tokens, cancel_at)
            else:
                assert session.cache is not before[0] and session.tokens == before[2] + 3 + max_tokens
            assert engine.in_system == 0 and not session.busy
            outcomes.add(ends[0])
            assert engine.sessions.delete("s")
    assert outcomes == {"length", "abort"}  # the sweep reached both sides


@pytest.mark.parametrize("speculative", [False, True])
async def test_a_request_that_raises_fails_alone_and_the_engine_goes_on(model_dir, speculative):
    # Something of one request's own raising in the scheduler (its decoder, its grammar ...), when its first token
    # is sampled or at a later step (a decode step, or a speculative one), must fail that request alone (a 500),
    # not kill the engine and every request.
    engine = standalone_engine(model_dir)
    if speculative:
        engine.settings = engine.settings.model_copy(update={"speculative_config": {
            "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1}})
        engine.speculative = engine.settings.speculative
    at_spawn = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    later = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    decoder = engine._decoder

    def failing_decoder(params):
        decode = decoder(params)
        calls = [0]

        def maybe_raise(ids):
            calls[0] += 1
            if params is at_spawn or (params is later and calls[0] > 4):  # past its 2 choices' first tokens
                raise RuntimeError("this request's decoder broke")
            return decode(ids)

        return maybe_raise

    def run():
        with torch.inference_mode():
            while engine.waiting or engine.prefilling or engine.joining or engine.running:
                engine._iteration()

    alone = engine.submit([[5, 6, 7, 8, 9]], GREEDY, n=2)
    run()
    await asyncio.sleep(0)
    expected = drain(alone)
    engine._decoder = failing_decoder
    good = engine.submit([[5, 6, 7, 8, 9]], GREEDY, n=2)
    broken = [engine.submit([[10, 11, 12]], at_spawn), engine.submit([[13, 14, 13, 14, 13, 14, 13]], later, n=2)]
    run()
    await asyncio.sleep(0)
    assert drain(good) == expected and engine.dead is None and engine.in_system == 0
    for handle in broken:
        failures = []
        while not handle.queue.empty():
            item = handle.queue.get_nowait()
            failures += [item] if isinstance(item, EngineFailure) else []
        assert len(failures) == 1 and failures[0].status == 500, failures
    assert not speculative or engine.metrics.spec_drafts._value.get() > 0
    engine._decoder = decoder
    after = engine.submit([[5, 6, 7, 8, 9]], GREEDY, n=2)
    run()
    await asyncio.sleep(0)
    assert drain(after) == expected and engine.in_system == 0
