"""TRL GRPOConfig settings taken as TRL takes them: the legacy boolean ``scale_rewards`` and ``loss_type="bnpo"``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retnet.train.config import ConfigError, GrpoConfig, build_config
from retnet.train.grpo import SUMS, Totals, grpo_loss, pack

from .test_grpo import prompts_data, toy  # noqa: F401  (the toy prompts and micro base: a fixture)

GOOD = {"data": {"format": "prompts", "dataset": "p.jsonl"}, "model": {"init_from": "b"},
        "grpo": {"reward_funcs": ["retnet.train.rewards:exact_match"], "num_generations": 4},
        "train": {"global_batch_size": 16, "micro_batch_size": 8}}


def grpo_section(**grpo) -> dict:
    return {**GOOD, "grpo": {**GOOD["grpo"], **grpo}}


@pytest.mark.parametrize(("value", "scale"), [(True, "group"), (False, "none"), ("true", "group"),
                                              ("False", "none"), ("batch", "batch")])
def test_trls_boolean_scale_rewards_are_its_strings(value, scale):
    """TRL >= 0.22: True is "group" (the std of each prompt's completions), False "none"; from TOML (a boolean)
    and the command line (its text) alike, and saved as the string (a resume compares those)."""
    assert GrpoConfig(scale_rewards=value).scale_rewards == scale
    job = build_config(grpo_section(scale_rewards=value))
    assert job.grpo.scale_rewards == scale and job.to_dict()["grpo"]["scale_rewards"] == scale


def test_scale_rewards_from_the_command_line(tmp_path):
    from retnet.train.config import load_config

    path = tmp_path / "grpo.toml"
    path.write_text('[data]\nformat = "prompts"\ndataset = "p.jsonl"\n[model]\ninit_from = "b"\n'
                    '[grpo]\nreward_funcs = ["retnet.train.rewards:exact_match"]\nnum_generations = 4\n'
                    'scale_rewards = false\n[train]\nglobal_batch_size = 16\nmicro_batch_size = 8\n')
    assert load_config(str(path), []).grpo.scale_rewards == "none"
    assert load_config(str(path), ["--grpo.scale_rewards=true"]).grpo.scale_rewards == "group"


def test_other_scale_rewards_are_refused_naming_the_values():
    with pytest.raises(ConfigError, match=r"grpo.scale_rewards must be one of \('group', 'batch', 'none'\) "
                                          r"\(or TRL's booleans: true = 'group', false = 'none'\); got 'rank'"):
        build_config(grpo_section(scale_rewards="rank"))


def test_the_bnpo_loss_is_the_micro_batchs_token_mean():
    """TRL's bnpo: each micro-batch's token mean (over its completions' tokens), averaged over the micro-batches
    of every rank (TRL divides by the accumulation, DDP averages the ranks). The share returned here is that mean
    over the global batch's micro-batches (8 completions in micro-batches of 3 ... here: 8 / 3), which
    GrpoData.loss scales back by the accumulation count and the world size."""
    advantage = torch.tensor([0.5, -1.0, 2.0])
    batch = pack([np.array([1]), np.array([2]), np.array([3])], [np.array([4, 5]), np.array([6, 7, 8]),
                                                                 np.array([9])], advantage)
    logps = torch.tensor([-1.2, -1.9, -0.7, -1.5, -2.0, -0.3], requires_grad=True)
    cfg = GrpoConfig(loss_type="bnpo")
    loss, _ = grpo_loss(logps, batch, cfg, Totals(sequences=9, tokens=20))
    loss.backward()
    per_token = -torch.tensor([0.5, 0.5, -1.0, -1.0, -1.0, 2.0])  # ratio 1
    micro_batches = 9 / 3
    assert loss.item() == pytest.approx(per_token.mean().item() / micro_batches, rel=1e-6)
    torch.testing.assert_close(logps.grad, per_token / 6 / micro_batches)


def test_bnpo_is_a_loss_type_and_unknown_ones_name_the_supported():
    assert build_config(grpo_section(loss_type="bnpo")).grpo.loss_type == "bnpo"
    with pytest.raises(ConfigError, match=r"grpo.loss_type must be one of \('dapo', 'grpo', 'dr_grpo', 'bnpo'\); "
                                          r"got 'gspo'"):
        build_config(grpo_section(loss_type="gspo"))


# ----------------------------------------------------------------------------------------------------------
# mask_truncated_completions
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_truncated_completions_are_masked_out_of_the_loss(loss_type):
    """TRL's mask_truncated_completions: a completion that reached max_completion_length without a stop token
    (here the second) has its tokens' completion mask zeroed: no loss, no gradient, no KL; dapo's global token
    count (Totals.tokens, the generation's) and bnpo's micro-batch count leave them out; grpo still counts the
    sequence (its mean is 0), dr_grpo its place (TRL's denominators)."""
    advantage = torch.tensor([0.5, -1.0, 2.0])
    prompts = [np.array([1]), np.array([2]), np.array([3])]
    completions = [np.array([4, 5]), np.array([6, 7, 8]), np.array([9])]
    batch = pack(prompts, completions, advantage, active=torch.tensor([True, False, True]))
    reference = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0, -0.1])
    batch = batch._replace(reference=reference)
    logps = torch.tensor([-1.2, -1.9, -0.7, -1.5, -2.0, -0.3], requires_grad=True)
    cfg = GrpoConfig(loss_type=loss_type, beta=0.2, max_completion_length=4, mask_truncated_completions=True)
    loss, kl = grpo_loss(logps, batch, cfg, Totals(sequences=9, tokens=17))
    loss.backward()
    keep = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    delta = reference - logps.detach()
    per_kl = torch.exp(delta) - delta - 1
    per_token = (-torch.tensor([0.5, 0.5, -1.0, -1.0, -1.0, 2.0]) + 0.2 * per_kl) * keep
    weights = {"dapo": torch.full((6,), 1 / 17), "dr_grpo": torch.full((6,), 1 / (9 * 4)),
               "grpo": torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1.0]) / 9,
               "bnpo": torch.full((6,), 1 / 3 * 3 / 9)}[loss_type]
    assert loss.item() == pytest.approx((per_token * weights).sum().item(), rel=1e-5)
    assert logps.grad[2:5].eq(0).all() and logps.grad[[0, 1, 5]].ne(0).all()
    assert kl.item() == pytest.approx((per_kl * keep).sum().item(), rel=1e-6)
    # every completion active (the default): the loss of pack without the argument, bit for bit
    unmasked = GrpoConfig(loss_type=loss_type, beta=0.2, max_completion_length=4)
    plain = pack(prompts, completions, advantage)._replace(reference=reference)
    assert plain.active.all()
    assert torch.equal(grpo_loss(logps, plain, unmasked, Totals(9, 17))[0],
                       grpo_loss(logps, plain._replace(active=torch.ones(3, dtype=torch.bool)), unmasked,
                                 Totals(9, 17))[0])


def test_a_completion_is_truncated_when_it_has_no_stop_token():
    from retnet.train.grpo import finished

    completions = [np.array([4, 0]), np.array([6, 7, 8]), np.array([9, 5])]
    assert finished(completions, [0, 5]).tolist() == [True, False, True]
    assert finished(completions, [0]).tolist() == [True, False, False]


def test_mask_truncated_completions_is_a_grpo_setting():
    assert build_config(grpo_section(mask_truncated_completions=True)).grpo.mask_truncated_completions
    with pytest.raises(ConfigError, match=r"grpo\.mask_truncated_completions is set but data\.format is 'text'"):
        build_config({"grpo": {"mask_truncated_completions": True}})


def test_a_generation_masks_its_truncated_completions(toy, monkeypatch):  # noqa: F811
    """Through GrpoData: the generation's micro-batches mark the completions without a stop token inactive, the
    loss's token count (Totals.tokens) and the logged "tokens" leave them out, their advantages are computed with
    the others' (TRL masks the loss only), and the loss is the masked formula's."""
    from types import SimpleNamespace

    from retnet.model import RetNetForCausalLM
    from retnet.train import grpo

    data = prompts_data(toy)
    eos = data.tokenizer.eos_token_id
    # every other completion stops (EOS), the others reach the length: 3 and 4 tokens
    completions = [np.array([5, 6, eos]) if i % 2 == 0 else np.array([5, 6, 7, 8]) for i in range(16)]

    def sampled(model, prompts, noise, **kwargs):
        n = len(noise)
        return completions[:n], [i % 2 == 1 for i in range(n)]

    monkeypatch.setattr(grpo, "sample", sampled)
    model = RetNetForCausalLM.from_pretrained(toy / "base").train()
    cfg = build_config(grpo_section(reward_funcs=["toy_rewards:a_share"], max_completion_length=4,
                                    mask_truncated_completions=True, loss_type="dapo")).grpo
    trainer = SimpleNamespace(cfg=SimpleNamespace(grpo=cfg, train=SimpleNamespace(steps=1)),
                              device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False),
                              raw_model=model, peft_model=None, fsdp=False, tp_mesh=None)
    data.start(trainer)
    batches = data.micro_batches(2)
    active = torch.cat([b.active for b in batches])
    assert active.tolist() == [i % 2 == 0 for i in range(16)]
    assert data._totals == Totals(16, 8 * 3)
    assert data._step[SUMS.index("tokens")].item() == 8 * 3 and data._step[SUMS.index("length")].item() == 56
    loss = sum(data.loss(model, b) / 2 for b in batches)
    expected = sum(grpo_loss(grpo.token_logps(model, b), b, cfg, Totals(16, 24))[0] for b in batches)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# top_k, min_p
# ----------------------------------------------------------------------------------------------------------
def test_top_k_and_min_p_cut_the_sampled_distribution_as_trls_generate_does():
    """TRL's GRPOConfig top_k and min_p, in transformers' order (temperature, top_k, top_p on what top_k kept,
    min_p against the most likely token): a uniform's inverse CDF over what is kept, renormalized."""
    from retnet.train.grpo_sampling import _pick

    probs = torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]])
    logits = probs.log()
    u = torch.linspace(0, 0.999, 200)
    rows = logits.expand(len(u), -1)

    def picked(**cut) -> set[int]:
        return set(_pick(rows, u, 1.0, cut.pop("top_p", 1.0), **cut).tolist())

    assert picked() == {0, 1, 2, 3, 4}
    assert picked(top_k=2) == {0, 1}
    # top_p on the top-3's renormalized mass (0.4, 0.3, 0.2) / 0.9: 0.75 is reached by the first two (0.44 + 0.33),
    # where the whole distribution's mass before the third, 0.7, is below it
    assert picked(top_k=3, top_p=0.75) == {0, 1}
    assert picked(top_p=0.75) == {0, 1, 2}
    assert picked(min_p=0.45) == {0, 1, 2}  # >= 0.45 × 0.4
    assert picked(min_p=0.8) == {0}
    # the share of each kept token is its renormalized probability
    counts = torch.bincount(_pick(rows, u, 1.0, 1.0, top_k=2), minlength=5)[:2].float() / len(u)
    torch.testing.assert_close(counts, torch.tensor([0.4, 0.3]) / 0.7, atol=0.01, rtol=0)
    # off (the defaults): the picks of the sampler without them, bit for bit
    noisy = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    draws = torch.rand(64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_pick(noisy, draws, 0.7, 0.9), _pick(noisy, draws, 0.7, 0.9, top_k=0, min_p=None))


def test_top_k_and_min_p_are_grpo_settings():
    job = build_config(grpo_section(top_k=20, min_p=0.05))
    assert (job.grpo.top_k, job.grpo.min_p) == (20, 0.05)
    for value, message in (({"top_k": -1}, r"grpo\.top_k must be >= 0 \(0: off\); got -1"),
                           ({"min_p": 1.5}, r"grpo\.min_p must be in \[0, 1\] \(None or 0: off\); got 1\.5")):
        with pytest.raises(ConfigError, match=message):
            build_config(grpo_section(**value))


# ----------------------------------------------------------------------------------------------------------
# importance_sampling_level (GSPO), delta (two-sided clipping)
# ----------------------------------------------------------------------------------------------------------
def gspo_batch(old: torch.Tensor | None = None):
    advantage = torch.tensor([0.5, -1.0, 2.0])
    batch = pack([np.array([1]), np.array([2]), np.array([3])], [np.array([4, 5]), np.array([6, 7, 8]),
                                                                 np.array([9])], advantage)
    return batch if old is None else batch._replace(old=old)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_sequence_level_importance_sampling_is_gspos(loss_type):
    """TRL's importance_sampling_level="sequence" (GSPO): one ratio per completion, exp of its tokens' mean log
    ratio, clipped and applied to each of its tokens. On policy (no old log-probs) the value is the token level's;
    each token's gradient is its completion's weights' mean (the ratio is every token's)."""
    logps = torch.tensor([-1.2, -1.9, -0.7, -1.5, -2.0, -0.3], requires_grad=True)
    a = torch.tensor([0.5, 0.5, -1.0, -1.0, -1.0, 2.0])
    weights = {"dapo": torch.full((6,), 1 / 20), "grpo": torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1.0]) / 8}
    cfg = GrpoConfig(loss_type=loss_type, importance_sampling_level="sequence")
    loss, _ = grpo_loss(logps, gspo_batch(), cfg, Totals(8, 20))
    loss.backward()
    sequence = torch.tensor([0, 0, 1, 1, 1, 2])
    mean_weight = torch.zeros(3).index_add(0, sequence, weights[loss_type]) / torch.tensor([2.0, 3.0, 1.0])
    assert loss.item() == pytest.approx((-a * weights[loss_type]).sum().item(), rel=1e-6)
    torch.testing.assert_close(logps.grad, -a * mean_weight[sequence])
    if loss_type == "grpo":  # each sequence's weights sum to 1 / 8: its tokens share -A / 8 equally
        torch.testing.assert_close(logps.grad, -a / torch.tensor([2.0, 2.0, 3.0, 3.0, 3.0, 1.0]) / 8)
    # off policy: the sequence's ratio is the geometric mean of its tokens', clipped as a whole
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0, -0.1])
    ratio = torch.exp(torch.tensor([((-1.2 + 1.0) + (-1.9 + 2.0)) / 2] * 2 + [((-0.7 + 0.5) + 0 + 1.0) / 3] * 3
                                   + [-0.3 + 0.1]))
    expected = -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a)
    got, _ = grpo_loss(logps.detach(), gspo_batch(old), cfg, Totals(8, 20))
    assert got.item() == pytest.approx((expected * weights[loss_type]).sum().item(), rel=1e-5)


def test_delta_caps_the_unclipped_ratio():
    """TRL's delta (INTELLECT-2's two-sided clipping): the unclipped term's ratio is capped at delta, which bounds
    a negative advantage's loss (the clip leaves ρ·A there) and takes its gradient away."""
    old = torch.zeros(6)
    ratio = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 1.0])  # the negative advantage's second completion, ρ 2
    logps = ratio.log().requires_grad_(True)
    a = torch.tensor([0.5, 0.5, -1.0, -1.0, -1.0, 2.0])
    free, _ = grpo_loss(logps, gspo_batch(old), GrpoConfig(), Totals(8, 20))
    capped, _ = grpo_loss(logps, gspo_batch(old), GrpoConfig(delta=1.5), Totals(8, 20))
    base = -(ratio * a)
    assert free.item() == pytest.approx(base.sum().item() / 20, rel=1e-6)
    assert capped.item() == pytest.approx((base.sum().item() - 2.0 + 1.5) / 20, rel=1e-6)
    capped.backward()
    assert logps.grad[2].item() == 0.0 and logps.grad[3].item() != 0.0


@pytest.mark.parametrize(("grpo", "message"), [
    ({"importance_sampling_level": "sentence"},
     r"grpo\.importance_sampling_level must be one of \('token', 'sequence'\); got 'sentence'"),
    ({"delta": 1.0}, r"grpo\.delta must be > 1 .*; got 1\.0"),
])
def test_bad_importance_settings_are_refused_by_name(grpo, message):
    with pytest.raises(ConfigError, match=message):
        build_config(grpo_section(**grpo))
