"""Exact ties at the GRPO sampler's cuts, as bf16 logits give them, against transformers' warpers in generate's order
(temperature, TopK, TopP, MinP): TopKLogitsWarper keeps every token whose score equals the k-th largest. Which of
equal tokens TopPLogitsWarper keeps at its boundary is the order its unstable sort happens to give them, so the
distributions are compared as their probabilities sorted: each tie group with as many tokens kept, and the mass."""

import pytest
import torch
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from retnet.train.grpo_sampling import _distribution, _pick


def transformers_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       min_p: float | None = None) -> torch.Tensor:
    scores = TemperatureLogitsWarper(temperature)(None, logits.float().clone())
    for warper in ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else []) \
            + ([MinPLogitsWarper(min_p)] if min_p else []):
        scores = warper(None, scores)
    return scores.softmax(-1)


def ours(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         min_p: float | None = None) -> torch.Tensor:
    probs, order = _distribution(logits, temperature, top_p, top_k, min_p)
    return torch.zeros_like(probs).scatter(-1, order, probs / probs.sum(-1, keepdim=True))


SETTINGS = [dict(top_k=1), dict(top_k=2), dict(top_k=3), dict(top_k=5), dict(top_k=2, top_p=0.9),
            dict(top_k=3, top_p=0.5), dict(top_k=3, min_p=0.3), dict(top_k=2, temperature=0.5), dict(top_p=0.5),
            dict(top_p=0.75), dict(top_p=0.9, min_p=0.3), dict(min_p=0.3)]


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_cuts_keep_ties_as_transformers_warpers(settings):
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [1.0, 1.0, 0.0, 0.0, 0.0, -2.0, -2.0, -2.0]])
    generator = torch.Generator().manual_seed(0)
    bf16 = ((torch.randn(4, 512, generator=generator) * 4).bfloat16().float() * 2).round() / 2  # tie groups
    for rows in (logits, bf16):
        got, expected = ours(rows, **settings), transformers_probs(rows, **settings)
        torch.testing.assert_close(got.sort(-1).values, expected.sort(-1).values, rtol=1e-5, atol=1e-7)
        assert torch.equal((got > 0).sum(-1), (expected > 0).sum(-1)), settings


def test_top_k_two_over_three_tied_draws_all_three():
    """[2, 1, 1, 1, 0, ...] at top_k 2: the three 1s tie with the second, so each is drawn a third of the rest."""
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0]])
    u = (torch.arange(3000, dtype=torch.float32) + 0.5) / 3000
    counts = torch.bincount(_pick(logits.expand(len(u), -1), u, 1.0, 1.0, top_k=2), minlength=8)
    assert counts[4:].sum() == 0 and (counts[1:4] > 0).all(), counts.tolist()
    share = torch.e / (torch.e + 3)  # e^2 : 3·e^1
    assert abs(counts[0].item() / len(u) - share) < 0.01, counts.tolist()
