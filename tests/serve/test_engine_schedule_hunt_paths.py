"""The scheduler's limits as the settings state them, found by a differential fuzz of random concurrent schedules
against each request alone: --prefill-token-budget bounds the prompt tokens run between two decode steps."""

import pytest

from retnet.serve.sampling import SamplingParams
from tests.serve.test_priority import GREEDY, Outputs, alone, engine_with, run_out, step

pytestmark = pytest.mark.anyio


def prefilled(engine) -> float:
    return engine.metrics.registry.get_sample_value("retnet_prefill_tokens_total") or 0.0


async def test_a_step_prefills_no_more_than_the_budget_even_below_one_piece(model_dir):
    # --prefill-chunk-tokens 512 (the default) under a budget of 10: a whole piece, 100 tokens, ran between two
    # decode steps, stalling the running streams as if no budget were set.
    engine = engine_with(model_dir, prefill_token_budget=10, prefix_cache_entries=0)
    long, short = list(range(5, 105)), [7, 8, 9, 10, 11, 12]
    params = SamplingParams(max_tokens=3, **GREEDY)
    outputs = Outputs(long=engine.submit([long], params))
    await step(engine, outputs)
    assert prefilled(engine) == 10
    # Two prompts in one round share the budget: the second's piece is cut to what the first left.
    outputs.add("short", engine.submit([short], params))
    await step(engine, outputs)
    assert prefilled(engine) == 20
    await run_out(engine, outputs)
    assert prefilled(engine) == len(long) + len(short)
    for name, prompt in (("long", long), ("short", short)):
        assert (outputs.tokens[name, 0], outputs.text[name, 0]) == (await alone(model_dir, prompt, params))[0]
