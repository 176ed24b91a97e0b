"""Exact ties at the truncation cuts, as bf16 logits give them: the sampler's kept tokens against a re-implementation
of vLLM's (V1) rules on the same float32 logits: min_p (``probs < min_p · max`` dropped), then top_k (every logit below
the k-th largest dropped: the tokens tied with it stay), then top_p over the ascending sort's softmax (a token goes
while the cumulative sum up to it is ``<= 1 - top_p``; the largest always stays). Which of equal tokens a top_p cut
keeps is the order vLLM's unstable sort happens to give them, so the kept tokens are compared as the multiset of
their logits: each tie group as many times as it is kept."""

import pytest
import torch

from retnet.serve import sampling
from retnet.serve.sampling import SamplingParams


@pytest.fixture(params=[None, (1, 3)], ids=["candidates", "few-candidates"])
def candidates(request, monkeypatch):
    """As shipped, and 1 then 3 candidates taken from twice as many tokens, so that a tie group straddles each
    level's last candidate and the row must go on to the next level or the full sort."""
    if request.param is not None:
        monkeypatch.setattr(sampling, "TRUNCATION_CANDIDATES", request.param)
        monkeypatch.setattr(sampling, "CANDIDATES_SHARE", 2)


def vllm_kept(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """``[V]`` bool: the tokens vLLM's min_p processor then its top-k/top-p (sorted) leave finite."""
    x = (logits.float() / temperature)[None]
    if min_p > 0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    ascending, where = x.sort(-1)
    if 0 < top_k < x.shape[-1]:
        ascending = ascending.masked_fill(ascending < ascending[:, -top_k, None], float("-inf"))
    if top_p < 1.0:
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - torch.tensor([top_p])[:, None]
        drop[:, -1] = False
        ascending = ascending.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter(-1, where, ascending)[0].isfinite()


def sampler_kept(logits: torch.Tensor, params: SamplingParams, monkeypatch) -> torch.Tensor:
    """``[V]`` bool: the tokens the sampler's truncating path keeps. Row r of V copies, given r as its draw, is made
    to take its r-th kept token (its last past them; the kept ones are those of non-zero probability, in whatever
    order the sampler draws over): the drawn ids are exactly the kept ones, whatever level settles the row."""
    def rank_of_row(kept: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        nonzero_first = (kept > 0).int().sort(dim=-1, descending=True, stable=True).indices
        nth = torch.minimum(draws.long(), (kept > 0).sum(-1) - 1)
        return nonzero_first.gather(-1, nth[:, None]).squeeze(-1)

    monkeypatch.setattr(sampling, "inverse_cdf", rank_of_row)
    vocab = len(logits)
    probs = (logits.float() / params.temperature).softmax(-1)
    picks = torch.empty(vocab, dtype=torch.long)
    whole = sampling._sample_truncated(probs.expand(vocab, -1).contiguous(), list(range(vocab)), [params] * vocab,
                                       torch.arange(vocab, dtype=torch.float64), picks)
    assert whole == []
    return torch.zeros(vocab, dtype=torch.bool).index_fill(0, picks.unique(), True)


def assert_same_cut(monkeypatch, logits: torch.Tensor, **settings) -> None:
    params = SamplingParams(**settings)
    assert params.truncates(len(logits))
    expected = vllm_kept(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    got = sampler_kept(logits, params, monkeypatch)
    assert sorted(logits[got].tolist()) == sorted(logits[expected].tolist()), (settings, got.nonzero().flatten(),
                                                                               expected.nonzero().flatten())


def test_top_k_keeps_every_token_tied_with_the_kth_as_vllm(candidates, monkeypatch):
    tied = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0])
    flat = torch.zeros(8)
    pairs = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, -2.0, -2.0, -2.0])
    for logits in (tied, flat, pairs):
        for settings in (dict(top_k=1), dict(top_k=2), dict(top_k=3), dict(top_k=5), dict(top_k=2, top_p=0.9),
                         dict(top_k=3, top_p=0.5), dict(top_k=3, min_p=0.3), dict(top_k=2, temperature=0.5),
                         dict(top_p=0.5), dict(top_p=0.75), dict(top_p=0.9, min_p=0.3), dict(min_p=0.3)):
            assert_same_cut(monkeypatch, logits, **settings)
    # the sampler's own statement of the rule: top_k 2 over [2, 1, 1, 1, ...] keeps all three 1s
    kept = sampler_kept(tied, SamplingParams(top_k=2), monkeypatch)
    assert kept.tolist() == [True, True, True, True, False, False, False, False]


def test_bf16_logits_tie_at_the_cuts_as_vllm(candidates, monkeypatch):
    """bf16-rounded logits over a vocabulary large enough for each candidates level: groups of equal logits cross
    the k-th place and the candidates' last."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(640, generator=generator) * 2).bfloat16().float()
    logits = (logits * 2).round() / 2  # coarser still: tie groups of tens of tokens
    for settings in (dict(top_k=10), dict(top_k=40), dict(top_k=70, top_p=0.8), dict(top_k=20, min_p=0.2),
                     dict(top_k=40, temperature=0.7), dict(top_p=0.3), dict(top_k=5, top_p=0.95)):
        assert_same_cut(monkeypatch, logits, **settings)


def test_a_row_with_fewer_likely_tokens_than_top_k_settles_on_its_candidates():
    # 3 tokens allowed (a grammar, allowed_token_ids, or a low temperature's underflow), top_k 20, 8 candidates:
    # the k-th probability is 0, and every 0 counted as tied with it, so the row never settled on its candidates
    # and took a sort of the whole vocabulary at every step. (Never drawn, the zeros change no sample.)
    sorted_probs = torch.tensor([[0.5, 0.3, 0.2, 0, 0, 0, 0, 0]])
    keep, settled = sampling._kept(sorted_probs, [SamplingParams(top_k=20)], vocab=1000)
    assert keep[0].tolist() == [True, True, True] + [False] * 5 and settled.tolist() == [True]


def test_a_seeded_draw_takes_the_same_token_whatever_the_order_of_nearly_equal_ones():
    # Two nearly equal tokens (5 and 9) in either order, as a batch's float noise may leave them: the same draw, far
    # from any cut, takes the same token (drawn in token-id order; in probability order it took 5 in one, 9 in the
    # other).
    base = torch.full((12,), 0.01)
    first, second = base.clone(), base.clone()
    first[5], first[9] = 0.4 + 1e-6, 0.4
    second[5], second[9] = 0.4, 0.4 + 1e-6
    probs = torch.stack([first, second])
    params = [SamplingParams(top_k=3)] * 2
    for draw in (0.05, 0.3, 0.6, 0.9):
        picks = torch.empty(2, dtype=torch.long)
        sampling._sample_truncated(probs, [0, 1], params, torch.tensor([draw, draw], dtype=torch.float64), picks)
        assert picks[0] == picks[1], (draw, picks)


def test_a_draw_rounding_to_the_total_takes_no_zero_probability_token():
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]])
    for draw in (0.0, 0.5, 1 - 2**-53, 1.0):  # (1.0: past every draw's range, the clamp's case)
        picks = sampling.inverse_cdf(probs, torch.tensor([draw, draw], dtype=torch.float64))
        assert (probs.gather(-1, picks[:, None]) > 0).all(), (draw, picks)
