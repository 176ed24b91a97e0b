"""Differential checks of the sampler and the logprobs against an independent float64 reference written from
README's rules (logit_bias, then repetition over prompt + output and presence/frequency over the output, the masks,
temperature, then min_p, top_k and top_p over what those kept, renormalised), and of the server's logprobs and
greedy tokens against a direct forward of the same model. Every draw is seeded: the statistical bounds are many
standard deviations wide and the outcome is the same on every run."""

import math
import random

import pytest
import torch

from retnet.serve import sampling
from retnet.serve.sampling import RowSampler, SamplingParams, prompt_logprobs, sample_step
from tests.serve.conftest import serve_app

DRAWS = 3000


@pytest.fixture(params=[None, (1, 3)], ids=["candidates", "few-candidates"])
def candidates(request, monkeypatch):
    """The sampler's truncation candidates as shipped, and 1 then 3 (taken from twice as many tokens): the
    vocabularies here (5 to 40 tokens) then take each path, the first candidates, the second and the full sort for
    the rows that keep more."""
    if request.param is not None:
        monkeypatch.setattr(sampling, "TRUNCATION_CANDIDATES", request.param)
        monkeypatch.setattr(sampling, "CANDIDATES_SHARE", 2)


def reference_probs(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
                    masked: set[int]) -> tuple[torch.Tensor, bool]:
    """The next token's distribution, ``[V]`` float64, and whether a cut is ambiguous: a top_k cut between tokens
    of equal probability, a min_p or top_p bound within float32's rounding of a token, where the sampler may keep
    either side. The distribution then keeps every token such a cut could keep (a superset of the support)."""
    x = logits.double().clone()
    for token, bias in (params.logit_bias or {}).items():
        x[token] += bias
    if params.repetition_penalty != 1.0:
        for token in set(prompt) | set(output):
            x[token] = x[token] / params.repetition_penalty if x[token] > 0 else x[token] * params.repetition_penalty
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=len(x)).double()
    x -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).double()
    x[list(masked)] = -math.inf
    if params.greedy:
        return torch.nn.functional.one_hot(x.argmax(), len(x)).double(), False
    probs = (x / params.temperature).softmax(-1)
    bound = params.min_p * probs.max()
    ambiguous = bool(((probs - bound).abs() < 1e-6 * probs.max()).any()) and params.min_p > 0
    keep = probs >= bound - 1e-6 * probs.max()
    if 0 < params.top_k < int(keep.sum()):
        ranked = probs[keep].sort(descending=True).values
        ambiguous |= bool(ranked[params.top_k - 1] - ranked[params.top_k] < 1e-9)
        keep &= probs >= ranked[params.top_k - 1] - 1e-9
    if params.top_p < 1.0:
        kept = probs * keep / (probs * keep).sum()
        before = 0.0
        for rank, token in enumerate(kept.argsort(descending=True).tolist()):
            if rank and kept[token] > 0 and abs(before - params.top_p) < 1e-6:
                ambiguous = True
            keep[token] &= rank == 0 or before < params.top_p + 1e-6
            before += kept[token].item()
    return probs * keep / (probs * keep).sum(), ambiguous


def draw(logits: torch.Tensor, params: SamplingParams, prompt=(), output=(), ban=None, blocked=None,
         draws: int = DRAWS) -> torch.Tensor:
    """How often each token is sampled in ``draws`` seeded rows of one batch (rows are independent)."""
    rows = []
    # Row i's generator is seeded with i, as the server seeds a request's choices (seed + choice index).
    seeded = SamplingParams(**{**{f: getattr(params, f) for f in SamplingParams.__slots__}, "seed": 0})
    for seed in range(draws):
        row = RowSampler(seeded, list(prompt), logits.shape[-1], seed_offset=seed, ban_ids=ban, blocked=blocked)
        for token in output:
            row.record(token)
        rows.append(row)
    tokens = sample_step(logits.expand(draws, -1).contiguous(), rows).tokens
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1]).double()


def assert_matches(counts: torch.Tensor, reference: tuple[torch.Tensor, bool], where: str) -> None:
    """No token outside the reference's support and, unless a cut is ambiguous (see :func:`reference_probs`),
    every token's frequency within 6 standard deviations of its probability."""
    probs, ambiguous = reference
    assert not (counts[probs == 0] > 0).any(), (where, counts.tolist(), probs.tolist())
    if ambiguous:
        return
    n = counts.sum().item()
    for token, (count, p) in enumerate(zip(counts.tolist(), probs.tolist())):
        assert abs(count - n * p) < 6 * math.sqrt(n * p * (1 - p)) + 1, (where, token, counts.tolist(), probs.tolist())


def test_truncation_order_and_cumulative_cuts_match_the_reference(candidates):
    logits = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625]).log()
    cases = [
        # top_p exactly at a cumulative boundary: the mass before the third token is 0.75, not below it.
        dict(top_p=0.75), dict(top_p=0.7500001), dict(top_p=0.5), dict(top_p=0.0),
        # min_p first, relative to the top token: 0.25 keeps three; top_p then measures them renormalised
        # (0.5 / 0.875 = 0.571 before the third: 0.6 keeps it, though over the whole vocabulary it would not).
        dict(min_p=0.25, top_p=0.6), dict(min_p=0.25, top_p=0.55),
        # top_k then top_p over the two kept: 0.5 / 0.75 = 0.667 > 0.6, so the second goes.
        dict(top_k=2, top_p=0.6), dict(top_k=2, top_p=0.7), dict(top_k=7), dict(min_p=1.0),
        dict(temperature=0.5, top_p=0.9), dict(temperature=2.0, min_p=0.5), dict(temperature=1e-6, top_k=3),
    ]
    for case in cases:
        params = SamplingParams(**case)
        assert_matches(draw(logits, params), reference_probs(logits, params, [], [], set()), str(case))


def test_penalties_count_the_prompt_for_repetition_and_the_output_for_presence_and_frequency():
    logits = torch.tensor([1.0, 0.5, -0.5, 0.2, 0.0])
    prompt, output = [0, 2], [1, 1, 1, 3]
    for case in (dict(repetition_penalty=1.8), dict(frequency_penalty=0.6), dict(presence_penalty=0.9),
                 dict(frequency_penalty=-0.4, presence_penalty=1.2, repetition_penalty=0.7, logit_bias={2: 1.5})):
        params = SamplingParams(**case)
        counts = draw(logits, params, prompt, output)
        assert_matches(counts, reference_probs(logits, params, prompt, output, set()), str(case))


def test_top_p_exactly_at_a_cumulative_boundary_drops_the_token_after_it(candidates):
    # Equal logits give exactly 0.25 each in float32: the mass before the third token is exactly 0.5, which is
    # not below top_p 0.5 (README: a token stays while the mass before it is below top_p), so two tokens stay.
    logits = torch.zeros(4)
    for top_p, kept in ((0.5, 2), (0.5000001, 3), (0.75, 3), (0.25, 1), (0.2500001, 2)):
        counts = draw(logits, SamplingParams(top_p=top_p), draws=600)
        assert int((counts > 0).sum()) == kept, (top_p, counts.tolist())
        assert counts[counts > 0].min() > 600 / kept - 6 * math.sqrt(600 / kept), (top_p, counts.tolist())


def test_ties_at_a_top_k_cut_keep_every_tied_token_and_greedy_takes_the_lowest_id(candidates):
    # vLLM's top-k drops only the logits below the k-th: tokens 0 and 3 tie with the third, and both stay
    logits = torch.tensor([0.2, 0.3, 0.3, 0.2]).log()
    counts = draw(logits, SamplingParams(top_k=3))
    assert (counts > 0).all(), counts.tolist()
    assert sample_step(logits[None], [RowSampler(SamplingParams(temperature=0.0), [], 4)]).tokens == [1]


def test_random_settings_with_penalties_bias_and_masks_sample_as_the_reference(candidates):
    rng = random.Random(0)
    for trial in range(30):
        vocab = rng.choice([5, 12, 40])
        logits = torch.randn(vocab, generator=torch.Generator().manual_seed(trial)) * rng.choice([0.5, 2.0])
        if trial % 4 == 0:
            logits = logits.round(decimals=1)  # ties
        params = SamplingParams(
            temperature=rng.choice([1e-6, 0.4, 1.0, 2.0]), top_p=rng.choice([1.0, 0.9, 0.4, 1e-6]),
            top_k=rng.choice([-1, 0, 1, 3, vocab + 5]), min_p=rng.choice([0.0, 0.05, 0.3, 1.0]),
            repetition_penalty=rng.choice([1.0, 1.4, 0.6]), presence_penalty=rng.choice([0.0, 1.5, -1.0]),
            frequency_penalty=rng.choice([0.0, 0.5, -0.5]),
            logit_bias={rng.randrange(vocab): rng.choice([-100.0, -3.0, 3.0, 100.0]) for _ in range(rng.randrange(3))})
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(5))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(4))]
        blocked = ban = None
        masked: set[int] = set()
        if rng.random() < 0.4:
            blocked = torch.zeros(vocab, dtype=torch.bool)
            blocked[rng.sample(range(vocab), rng.randrange(1, vocab))] = True
            masked |= set(blocked.nonzero().flatten().tolist())
        stop_ids = {rng.randrange(vocab) for _ in range(2)}
        if rng.random() < 0.4 and len(masked | stop_ids) < vocab:
            params.min_tokens = len(output) + 1  # the stop ids stay banned at this step
            ban = torch.tensor(sorted(stop_ids))
            masked |= stop_ids
        probs = reference_probs(logits, params, prompt, output, masked)
        counts = draw(logits, params, prompt, output, ban, blocked, draws=1200)
        assert_matches(counts, probs, f"trial {trial}: {params}")


def test_step_logprobs_are_the_raw_log_softmax_sorted_with_the_chosen_token():
    rng = random.Random(1)
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(1))
    logits[2, 7] = logits[2, 8] = logits[2].max() + 1  # a tie at the top
    rows = [RowSampler(SamplingParams(temperature=rng.choice([0.0, 1.0]), logprobs=k, seed=k, top_k=rng.choice([-1, 2]),
                                      logit_bias={3: 50.0}, repetition_penalty=1.5), [3, 4], 30)
            for k in (0, 1, 3, 5, 30, 2)]
    sample = sample_step(logits, rows)
    expected = logits.double().log_softmax(-1)
    for i, row in enumerate(rows):
        token = sample.tokens[i]
        if row.params.greedy:
            assert token == 3  # the bias wins, but the logprobs stay the model's own
        assert sample.logprobs[i] == pytest.approx(expected[i, token].item(), abs=1e-4)
        top = sample.top[i]
        assert len(top) == row.params.logprobs
        values = [value for _, value in top]
        assert values == sorted(values, reverse=True)
        for alt, value in top:
            assert value == pytest.approx(expected[i, alt].item(), abs=1e-4)
        if top:
            left = [expected[i, t].item() for t in range(30) if t not in {alt for alt, _ in top}]
            assert max(left, default=-math.inf) <= values[-1] + 1e-6


def test_prompt_logprob_ranks_count_the_tokens_strictly_more_likely():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 5.0]])
    scores = prompt_logprobs(logits, [2, 0], 2)
    expected = logits.double().log_softmax(-1)
    assert [rank for _, rank, _ in scores] == [1, 2]
    assert scores[0][0] == pytest.approx(expected[0, 2].item(), abs=1e-6)
    (first, first_value), (second, second_value) = scores[1][2]
    assert first == 3 and second in (0, 1, 2)
    assert (first_value, second_value) == pytest.approx((expected[1, 3].item(), expected[1, 0].item()), abs=1e-6)


@pytest.mark.anyio
async def test_server_logprobs_ranks_and_greedy_tokens_equal_a_direct_forward(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    vocab = model.config.vocab_size

    def reference(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)

    rng = random.Random(2)
    async with serve_app(model_dir) as client:
        for _ in range(10):
            ids = [rng.randrange(vocab) for _ in range(rng.randrange(2, 12))]
            k, prompt_k = rng.randrange(0, 6), rng.randrange(0, 5)
            body = {"prompt": ids, "max_tokens": 4, "temperature": 0.0, "logprobs": k, "ignore_eos": True,
                    "return_token_ids": True, "return_tokens_as_token_ids": True, "prompt_logprobs": prompt_k,
                    "echo": rng.random() < 0.5}
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            tokens, logprobs = choice["token_ids"], choice["logprobs"]
            expected = reference(ids + tokens)
            shift = len(ids) if body["echo"] else 0
            for t in range(1, len(ids) if body["echo"] else 0):
                assert logprobs["token_logprobs"][t] == pytest.approx(expected[t - 1, ids[t]].item(), abs=1e-4)
            for j, token in enumerate(tokens):
                row = expected[len(ids) - 1 + j]
                assert token == int(row.argmax())
                assert logprobs["token_logprobs"][shift + j] == pytest.approx(row[token].item(), abs=1e-4)
                values, alts = row.topk(k)
                want = {f"token_id:{a}": v for a, v in zip(alts.tolist(), values.tolist())}
                want.setdefault(f"token_id:{token}", row[token].item())
                assert logprobs["top_logprobs"][shift + j] == pytest.approx(want, abs=1e-4)
            assert choice["prompt_logprobs"][0] is None
            for t in range(1, len(ids)):
                row, entry = expected[t - 1], choice["prompt_logprobs"][t]
                own = entry[str(ids[t])]
                assert own["logprob"] == pytest.approx(row[ids[t]].item(), abs=1e-4)
                assert own["rank"] == int((row > row[ids[t]]).sum()) + 1
                values, alts = row.topk(prompt_k)
                assert set(entry) == {str(ids[t]), *map(str, alts.tolist())}
                for rank, (alt, value) in enumerate(zip(alts.tolist(), values.tolist()), 1):
                    assert entry[str(alt)]["logprob"] == pytest.approx(value, abs=1e-4)
                    assert alt == ids[t] or entry[str(alt)]["rank"] == rank

        body = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4, "temperature": 0.0,
                "logprobs": True, "top_logprobs": 5, "ignore_eos": True, "return_token_ids": True}
        answer = (await client.post("/v1/chat/completions", json=body)).json()
        prompt, tokens = answer["choices"][0]["prompt_token_ids"], answer["choices"][0]["token_ids"]
        expected = reference(prompt + tokens)
        for j, (token, entry) in enumerate(zip(tokens, answer["choices"][0]["logprobs"]["content"])):
            row = expected[len(prompt) - 1 + j]
            assert token == int(row.argmax())
            assert entry["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
            assert [alt["logprob"] for alt in entry["top_logprobs"]] == pytest.approx(row.topk(5).values.tolist(),
                                                                                      abs=1e-4)


@pytest.mark.anyio
async def test_extreme_settings_answer_with_finite_logprobs(model_dir):
    rng = random.Random(3)
    async with serve_app(model_dir) as client:
        for _ in range(24):
            body = {"prompt": "hello world " * rng.randrange(1, 3), "max_tokens": 3, "logprobs": 2,
                    "seed": rng.randrange(-2**63, 2**63), "temperature": rng.choice([0.0, 1e-6, 1e-5, 2.0]),
                    "top_p": rng.choice([0.0, 1e-9, 1.0]), "top_k": rng.choice([-1, 1, 10**30]),
                    "min_p": rng.choice([0.0, 1.0]), "repetition_penalty": rng.choice([1.0, 5e-324, 10.0]),
                    "presence_penalty": rng.choice([-2.0, 2.0]), "frequency_penalty": rng.choice([-2.0, 2.0]),
                    "logit_bias": {str(t): rng.choice([-100, 100]) for t in rng.sample(range(384), 200)},
                    "min_tokens": rng.randrange(3)}
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, (response.text, body)
            logprobs = response.json()["choices"][0]["logprobs"]
            assert all(math.isfinite(v) for v in logprobs["token_logprobs"])
            assert all(math.isfinite(v) for top in logprobs["top_logprobs"] for v in top.values())
