"""The scheduler's scheduling and accounting, driven one iteration at a time (no thread): concurrent requests give
what each gives alone, cancellation frees what it held, and the gauges read 0 once nothing is in flight."""

import asyncio
import random

import pytest
import torch

from retnet.serve.sampling import SamplingParams
from retnet.serve.sequence import EngineFailure
from tests.serve.test_priority import Outputs, engine_with, run_out, step

pytestmark = pytest.mark.anyio


def ids(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 380) for _ in range(length)]


def metric(engine, name: str) -> float:
    return engine.metrics.registry.get_sample_value(name)


MIXED = [
    ("greedy", [ids(1, 5)], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), 1),
    ("seeded", [ids(2, 9)], SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True), 2),
    ("one", [ids(3, 4)], SamplingParams(max_tokens=1, temperature=0.0), 1),
    ("long", [ids(4, 40)], SamplingParams(max_tokens=5, temperature=0.8, seed=3, top_k=20, ignore_eos=True), 2),
    ("stop", [ids(5, 7)], SamplingParams(max_tokens=16, temperature=0.0, stop=["e"], ignore_eos=True), 1),
    ("two", [ids(6, 3), ids(6, 14)], SamplingParams(max_tokens=6, temperature=1.0, seed=1, min_tokens=2,
                                                    presence_penalty=1.0), 2),
]
SMALL = dict(prefill_chunk_tokens=5, prefill_token_budget=9, max_running=3)


async def test_a_mixed_burst_gives_each_request_its_output_alone_and_the_counters_what_was_served(model_dir):
    alone = {}
    for name, prompts, params, n in MIXED:
        engine = engine_with(model_dir, **SMALL)
        outputs = Outputs(x=engine.submit(prompts, params, n=n))
        await run_out(engine, outputs)
        alone[name] = {i: (outputs.tokens["x", i], outputs.text["x", i]) for i in range(len(prompts) * n)}
    engine = engine_with(model_dir, **SMALL)
    outputs = Outputs()
    for i, (name, prompts, params, n) in enumerate(reversed(MIXED)):
        outputs.add(name, engine.submit(prompts, params, n=n))
        if i % 2:
            await step(engine, outputs)  # arrivals between steps, some mid-prefill of the others
    await run_out(engine, outputs)
    for name, *_ in MIXED:
        assert {i: (outputs.tokens[k], outputs.text[k]) for k in outputs.tokens if k[0] == name
                for i in [k[1]]} == alone[name], name
    assert metric(engine, "retnet_generation_tokens_total") == sum(map(len, outputs.tokens.values()))
    assert metric(engine, "retnet_prompt_tokens_total") == sum(len(p) for _, ps, _, _ in MIXED for p in ps)
    assert engine.in_system == 0
    for gauge in ("retnet_running_sequences", "retnet_queue_depth", "retnet_prefilling_sequences"):
        assert metric(engine, gauge) == 0, gauge


@pytest.mark.parametrize("where", ["waiting", "prefilling", "running"])
async def test_a_cancel_frees_its_slot_and_state_and_leaves_the_others_unchanged(model_dir, where):
    other = (ids(1, 6), SamplingParams(max_tokens=14, temperature=0.9, seed=3, ignore_eos=True))
    engine = engine_with(model_dir, prefill_chunk_tokens=4, prefill_token_budget=4, max_running=2)
    expected = Outputs(x=engine.submit([other[0]], other[1], n=2))
    await run_out(engine, expected)
    engine = engine_with(model_dir, prefill_chunk_tokens=4, prefill_token_budget=4,
                         max_running=2 if where == "waiting" else 3)
    outputs = Outputs(other=engine.submit([other[0]], other[1], n=2))
    await step(engine, outputs, 2)
    victim = engine.submit([ids(2, 3 if where == "running" else 30)], SamplingParams(max_tokens=30, temperature=0.0),
                           session_id="s")
    outputs.add("victim", victim)
    await step(engine, outputs, 3 if where == "running" else 1)
    held = {"waiting": [g.handle for g in engine.waiting], "prefilling": [g.handle for g in engine.prefilling],
            "running": [s.group.handle for s in engine.running]}
    assert victim in held[where]
    victim.cancel()
    await run_out(engine, outputs)
    assert ("victim", 0, "abort") in outputs.finished
    assert [outputs.tokens["other", i] for i in range(2)] == [expected.tokens["x", i] for i in range(2)]
    assert engine.in_system == 0 and engine.batch is None and "s" not in engine.sessions.sessions
    assert metric(engine, "retnet_sequences_cancelled_total") == 1


async def test_a_burst_of_one_prompt_is_prefilled_together_when_its_state_cannot_be_cached(model_dir):
    # Each repeat waited for the one before it to cache the prompt's state, which a budget too small for an entry
    # never keeps: 4 prompts took 4 forwards one after another instead of one packed forward.
    engine = engine_with(model_dir, prefix_cache_bytes=1000)
    prompt, params = ids(1, 20), SamplingParams(max_tokens=2, temperature=0.0)
    outputs = Outputs()
    for i in range(4):
        outputs.add(str(i), engine.submit([prompt], params))
    await step(engine, outputs)
    assert metric(engine, "retnet_prefill_batch_prompts_count") == 1
    assert metric(engine, "retnet_prefill_tokens_total") == 4 * len(prompt)
    await run_out(engine, outputs)
    assert len({tuple(t) for t in outputs.tokens.values()}) == 1 and len(engine.prefix_cache) == 0


async def test_an_engine_that_dies_mid_prefill_leaves_no_gauge_up(model_dir, monkeypatch):
    engine = engine_with(model_dir, prefill_chunk_tokens=4, prefill_token_budget=4)
    handles = [engine.submit([ids(1, 3)], SamplingParams(max_tokens=20, temperature=0.0)),
               engine.submit([ids(2, 40)], SamplingParams(max_tokens=20, temperature=0.0), n=2)]
    with torch.inference_mode():
        engine._iteration()
        engine._iteration()
    assert metric(engine, "retnet_prefilling_sequences") == 2

    def fail(*args, **kwargs):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(engine.model, "forward", fail)
    engine._run()  # loads (the model is given), then fails every request as a dead engine does
    assert engine.dead is not None and engine.in_system == 0
    await asyncio.sleep(0)
    for handle in handles:
        items = [handle.queue.get_nowait() for _ in range(handle.queue.qsize())]
        assert isinstance(items[-1], EngineFailure) and items[-1].status == 503
    for gauge in ("retnet_running_sequences", "retnet_queue_depth", "retnet_prefilling_sequences"):
        assert metric(engine, gauge) == 0, gauge


async def test_the_prefix_cache_keeps_to_its_bytes_counts_its_evictions_and_changes_no_output(model_dir):
    entry = engine_with(model_dir).prefix_entry_bytes
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = [ids(seed, 12) for seed in range(4)]
    cold = engine_with(model_dir, prefix_cache_entries=0)
    expected = Outputs(**{str(i): cold.submit([p], params) for i, p in enumerate(prompts)})
    await run_out(cold, expected)
    # Room for two prompts' entries (each with its logits), no answer entries: each new prompt evicts the oldest.
    engine = engine_with(model_dir, prefix_cache_bytes=2 * entry + entry // 2, prefix_cache_answers=False)
    outputs = Outputs()
    for round_ in range(2):
        for i, prompt in enumerate(prompts):
            outputs.add(f"{round_}.{i}", engine.submit([prompt], params))
            await run_out(engine, outputs)
            assert engine.prefix_cache.nbytes <= engine.settings.prefix_cache_bytes
            assert metric(engine, "retnet_prefix_cache_bytes") == engine.prefix_cache.nbytes
    assert len(engine.prefix_cache) == 2
    assert metric(engine, "retnet_prefix_cache_evictions_total") == 2 * len(prompts) - 2
    assert metric(engine, "retnet_prefix_cache_hits_total") == 0  # each was evicted before its repeat
    # A repeat while still cached starts from its state, and gives what a cold run gives.
    outputs.add("repeat", engine.submit([prompts[-1]], params))
    await run_out(engine, outputs)
    assert metric(engine, "retnet_prefix_cache_hits_total") == 1
    for round_ in range(2):
        for i in range(len(prompts)):
            assert outputs.tokens[f"{round_}.{i}", 0] == expected.tokens[str(i), 0]
    assert outputs.tokens["repeat", 0] == expected.tokens[str(len(prompts) - 1), 0]
