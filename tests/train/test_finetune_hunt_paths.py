"""Fine-tuning methods' math and semantics checked against independent hand computations (GRPO's advantages and
their metrics, ...)."""

from __future__ import annotations

import torch

from retnet.train.grpo import advantages, batch_std


def test_frac_reward_zero_std_counts_equal_groups_under_batch_scaling_too():
    """``frac_reward_zero_std`` is the share of completions whose group's rewards are all equal (no signal). Under
    ``scale_rewards=batch`` it was whether the whole batch's std is 0: a batch of one all-equal group and one
    varied group logged 0."""
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0])
    spread = batch_std(rewards, 8.0, rewards.double().sum().item(), torch.device("cpu"))
    for scale in ("group", "batch", "none"):
        got, _, zero = advantages(rewards, 4, scale, spread if scale == "batch" else None)
        assert zero.tolist() == [True] * 4 + [False] * 4, scale
        assert not got[:4].any(), scale  # the equal group: no signal, whatever the scaling
    _, std, _ = advantages(rewards, 4, "batch", spread)
    assert torch.equal(std, torch.full((8,), spread, dtype=torch.float32))  # reward_std: the std divided by
