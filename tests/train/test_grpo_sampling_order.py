"""The GRPO sampler maps a uniform onto the kept tokens in token-id order, as the server's seeded draw does: tokens
of nearly equal probability trade places in probability order with the float noise of another batch shape, and a
uniform far from any boundary between two tokens took the other token."""

import pytest
import torch

from retnet.train.grpo_sampling import _pick

# tokens 2, 5 and 6 nearly equal, the others far below; each row orders the three otherwise by probability
LOW = [-3.0, -2.5, 0.0, -4.0, -3.5, 0.0, 0.0, -5.0]
NOISE = ({2: 1e-6, 6: -1e-6}, {2: -1e-6, 5: 1e-6}, {5: -1e-6, 6: 1e-6})


def noisy_rows() -> torch.Tensor:
    rows = torch.tensor([LOW] * len(NOISE))
    for row, shifts in enumerate(NOISE):
        for token, shift in shifts.items():
            rows[row, token] += shift
    assert len({tuple(row.argsort(descending=True)[:3].tolist()) for row in rows}) == len(NOISE)
    return rows


@pytest.mark.parametrize("cut", [dict(top_k=3), dict(top_p=0.9), dict(min_p=0.5), dict(top_k=4, top_p=0.95), {}],
                         ids=str)
def test_a_uniform_draws_the_same_token_whatever_order_noise_gives_equal_tokens(cut):
    rows = noisy_rows()
    u = (torch.arange(40, dtype=torch.float32) + 0.5) / 40  # none within 1e-5 of a boundary between two tokens
    top_p = cut.pop("top_p", 1.0)
    picks = torch.stack([_pick(row.expand(len(u), -1), u, 1.0, top_p, **cut) for row in rows])
    assert (picks == picks[0]).all(), picks.tolist()
    if cut.get("top_k") == 3 or cut.get("min_p"):  # the three kept, a third each, in id order
        assert picks[0].tolist() == [2] * 13 + [5] * 14 + [6] * 13


def test_a_uniform_at_the_top_of_the_cdf_draws_a_kept_token():
    """Past the last kept token come the cut ones (probability 0): a uniform next to 1 still draws a kept one."""
    logits = torch.tensor([[0.0, 5.0, 5.0, -1.0, -2.0]])
    u = torch.tensor([0.0, 1 - 2**-24, 1 - 2**-53], dtype=torch.float64)
    assert _pick(logits.expand(3, -1), u, 1.0, 1.0, top_k=2).tolist() == [1, 2, 2]
