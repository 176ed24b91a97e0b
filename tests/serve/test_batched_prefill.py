"""Batched prefill: prompts that arrive together are prefilled as one packed forward per round, and every
request gets what it gets alone (greedy tokens, seeded samples, prompt logprobs, session continuations)."""

import asyncio
import random

import pytest

from retnet.serve.sampling import SamplingParams
from retnet.serve.sequence import EngineFailure

pytestmark = pytest.mark.anyio

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 300) for _ in range(length)]


async def collect(handle) -> tuple[list[list[int]], list | None]:
    """Every choice's tokens, and the prompt logprobs if the request asked for them."""
    tokens: dict[int, list[int]] = {}
    finished, prompt_lp = set(), None
    while len(finished) < handle.num_choices:
        item = await asyncio.wait_for(handle.queue.get(), timeout=120)
        assert not isinstance(item, EngineFailure), item.message
        for out in item:
            tokens.setdefault(out.index, []).extend(out.token_ids)
            prompt_lp = out.prompt_logprobs or prompt_lp
            if out.finish_reason is not None:
                finished.add(out.index)
    return [tokens[i] for i in sorted(tokens)], prompt_lp


async def burst(engine, requests: list[dict]) -> list:
    """Submit every request before the scheduler looks at the queue (it waits on ``cond``), then collect."""
    with engine.cond:
        handles = [engine.submit(**r) for r in requests]
    return [await collect(h) for h in handles]


async def one_at_a_time(engine, requests: list[dict]) -> list:
    return [await collect(engine.submit(**r)) for r in requests]


def sample(engine, name: str) -> float:
    return engine.metrics.registry.get_sample_value(name)


def forwards(engine) -> tuple[float, float]:
    """(prefill forwards run, prompt pieces they carried) so far."""
    return sample(engine, "retnet_prefill_batch_prompts_count"), sample(engine, "retnet_prefill_batch_prompts_sum")


async def test_a_burst_is_prefilled_in_one_forward_and_gives_what_each_request_gets_alone(open_app):
    requests = [dict(prompts=[prompt(n, seed=n)], params=GREEDY) for n in (3, 11, 7, 20, 5, 14)]
    requests += [dict(prompts=[prompt(9, seed=1)], params=SEEDED, n=2),
                 dict(prompts=[prompt(6, seed=2), prompt(13, seed=3)], params=GREEDY)]
    async with open_app(prefix_cache_entries=0) as client:
        engine = client.app.state.engine
        before = forwards(engine)
        together = await burst(engine, requests)
        after = forwards(engine)
        alone = await one_at_a_time(engine, requests)
    groups = 9  # eight requests, one of them with two prompts
    assert after[1] - before[1] == groups
    assert after[0] - before[0] == 1  # the whole burst fits one round of the token budget
    assert together == alone
    assert len(together[6][0]) == 2 and together[6][0][0] != together[6][0][1]  # n=2: two samples


async def test_long_prompts_in_pieces_over_several_rounds_and_iterations(open_app):
    requests = [dict(prompts=[prompt(n, seed=n)], params=GREEDY) for n in (41, 5, 23, 9, 30)]
    async with open_app(prefix_cache_entries=0, prefill_chunk_tokens=8, prefill_token_budget=20) as client:
        engine = client.app.state.engine
        before = forwards(engine)
        together = await burst(engine, requests)
        after = forwards(engine)
    pieces = sum(-(-n // 8) for n in (41, 5, 23, 9, 30))
    # ceil(n / 8) pieces each, and one more: a piece is cut to what the budget leaves, the 9 tokens run as 4, 4, 1
    assert after[1] - before[1] == pieces + 1
    assert after[0] - before[0] < pieces
    async with open_app(prefix_cache_entries=0) as client:  # one piece per prompt, one prompt at a time
        alone = await one_at_a_time(client.app.state.engine, requests)
    assert together == alone


async def test_prompt_logprobs_run_alone_and_the_rest_packed(open_app):
    echo = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    requests = [dict(prompts=[prompt(12, seed=7)], params=GREEDY), dict(prompts=[prompt(10, seed=8)], params=echo),
                dict(prompts=[prompt(15, seed=9)], params=GREEDY)]
    async with open_app(prefix_cache_entries=0) as client:
        engine = client.app.state.engine
        before = forwards(engine)
        together = await burst(engine, requests)
        after = forwards(engine)
        alone = await one_at_a_time(engine, requests)
    assert (after[0] - before[0], after[1] - before[1]) == (2, 3)  # the echo alone, the other two packed
    assert together[0] == alone[0] and together[2] == alone[2]
    (tokens, lp), (alone_tokens, alone_lp) = together[1], alone[1]
    assert tokens == alone_tokens and len(lp) == 10
    assert [(e.token_id, e.logprob, e.top) for e in lp] == [(e.token_id, e.logprob, e.top) for e in alone_lp]


async def test_a_burst_sharing_a_prefix_computes_it_once(open_app):
    system = prompt(24, seed=5)
    users = [prompt(n, seed=50 + n) for n in (3, 6, 4)]
    requests = [dict(prompts=[system + user], params=GREEDY, prefix_hints=[len(system)]) for user in users]
    requests.append(dict(prompts=[system + users[0]], params=GREEDY))  # a repeat: nothing left to compute
    async with open_app() as client:
        engine = client.app.state.engine
        hits = sample(engine, "retnet_prefix_cache_hits_total")
        prefilled = sample(engine, "retnet_prefill_tokens_total")
        together = await burst(engine, requests)
        # The first prompt caches the shared part; the others wait a round and start from its state.
        assert sample(engine, "retnet_prefix_cache_hits_total") - hits == 3
        assert sample(engine, "retnet_prefill_tokens_total") - prefilled == len(system) + sum(map(len, users))
    async with open_app(prefix_cache_entries=0) as client:
        cold = await one_at_a_time(client.app.state.engine, requests)
    assert together == cold


async def test_a_session_continues_inside_a_packed_burst(open_app):
    first, second = prompt(7, seed=21), prompt(5, seed=22)
    async with open_app(prefix_cache_entries=0) as client:
        engine = client.app.state.engine
        (turn,), _ = await collect(engine.submit([first], GREEDY, session_id="s-1"))
        others = [dict(prompts=[prompt(n, seed=30 + n)], params=GREEDY) for n in (9, 4, 12)]
        before = forwards(engine)
        results = await burst(engine, [others[0], dict(prompts=[second], params=GREEDY, session_id="s-1"),
                                       *others[1:]])
        assert forwards(engine)[0] - before[0] == 1
        (continued,), _ = results[1]
        (whole,), _ = await collect(engine.submit([first + turn + second], GREEDY))
    assert continued == whole
