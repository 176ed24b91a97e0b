"""TRL GRPOConfig settings taken as TRL takes them: the legacy boolean ``scale_rewards``, ``loss_type`` "bnpo",
"cispo", "sapo" and "luspo", ``mask_truncated_completions``, the sampler's ``top_k``, ``min_p`` and
``repetition_penalty`` (against transformers' logits processors), ``generation_kwargs``, GSPO and ``delta``."""

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
    with pytest.raises(ConfigError, match=r"grpo.loss_type must be one of \('dapo', 'grpo', 'dr_grpo', 'bnpo', "
                                          r"'cispo', 'sapo', 'luspo'\); got 'gspo'"):
        build_config(grpo_section(loss_type="gspo"))


# ----------------------------------------------------------------------------------------------------------
# mask_truncated_completions
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_truncated_completions_are_masked_out_of_the_loss(loss_type):
    """TRL's mask_truncated_completions: a completion that reached max_completion_length without a stop token
    (here the second) has its tokens' completion mask zeroed: no loss, no gradient, no KL; bnpo's micro-batch
    count leaves them out (dapo's global one is the generation's Totals.tokens: every token, TRL's
    num_items_in_batch, counted before the masking); grpo still counts the
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
    logged "tokens" leave them out while the loss's token count (Totals.tokens) holds every completion token (TRL
    counts num_items_in_batch before masking), their advantages are computed with
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
                              raw_model=model, peft_model=None, fsdp=False, tp_mesh=None, cp_size=1)
    data.start(trainer)
    batches = data.micro_batches(2)
    active = torch.cat([b.active for b in batches])
    assert active.tolist() == [i % 2 == 0 for i in range(16)]
    assert data._totals == Totals(16, 56)
    assert data._step[SUMS.index("tokens")].item() == 8 * 3 and data._step[SUMS.index("length")].item() == 56
    loss = sum(data.loss(model, b) / 2 for b in batches)
    expected = sum(grpo_loss(grpo.token_logps(model, b), b, cfg, Totals(16, 56))[0] for b in batches)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_weighted_rewards_past_float32_stop_the_run_naming_the_weights(toy, monkeypatch):  # noqa: F811
    """Each source's reward finite, their weighted sum past float32's range: every advantage of the batch would be
    NaN (the loss too), so the generation stops naming the completion, its rewards and the weights."""
    from types import SimpleNamespace

    from retnet.model import RetNetForCausalLM
    from retnet.train import grpo

    data = prompts_data(toy)
    monkeypatch.setattr(grpo, "sample", lambda model, prompts, noise, **kwargs: (
        [np.array([5, 6, data.tokenizer.eos_token_id])] * len(noise), [False] * len(noise)))
    model = RetNetForCausalLM.from_pretrained(toy / "base").train()
    cfg = build_config(grpo_section(reward_funcs=["toy_rewards:a_share"], max_completion_length=4)).grpo
    trainer = SimpleNamespace(cfg=SimpleNamespace(grpo=cfg, train=SimpleNamespace(steps=1)),
                              device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False),
                              raw_model=model, peft_model=None, fsdp=False, tp_mesh=None, cp_size=1)
    data.start(trainer)
    data.sources.weights = torch.tensor([1.0, 1.0])
    monkeypatch.setattr(data, "_score", lambda split, rows, completions: torch.full((len(completions), 2), 3e38))
    with pytest.raises(RuntimeError, match=r"weighted rewards of completion 0 are not finite in float32: rewards "
                                           r"\[3\.\d+e\+38, 3\.\d+e\+38\] × grpo.reward_weights \[1\.0, 1\.0\]"):
        data.micro_batches(2)


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


# ----------------------------------------------------------------------------------------------------------
# loss_type cispo, sapo, luspo
# ----------------------------------------------------------------------------------------------------------
COMPLETIONS = [np.array([4, 5]), np.array([6, 7, 8]), np.array([9])]
ADVANTAGES = torch.tensor([0.5, -1.0, 2.0])
# each completion token's (row, column) in TRL's padded [B, T] layout
ROWS, COLUMNS = torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([0, 1, 0, 1, 2, 0])


def trls_loss(logps: torch.Tensor, old: torch.Tensor, active: torch.Tensor, cfg: GrpoConfig,
              reference: torch.Tensor | None = None) -> torch.Tensor:
    """TRL's GRPOTrainer._compute_loss for cispo, sapo and luspo, one process without accumulation, on the padded
    [B, T] layout it computes in (the pad positions hold another value than any token's, masked out)."""
    def padded(values: torch.Tensor) -> torch.Tensor:
        return torch.full((3, 3), -7.0).index_put((ROWS, COLUMNS), values)

    per_token_logps, old_per_token_logps = padded(logps), padded(old)
    mask = padded(torch.ones(6)).ne(-7.0).float() * active.float()[:, None]
    advantages = ADVANTAGES[:, None]
    log_ratio = per_token_logps - old_per_token_logps
    if cfg.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    if cfg.loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=epsilon_high).detach() * advantages * per_token_logps
    elif cfg.loss_type == "sapo":
        temperatures = torch.where(advantages > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        per_token_loss = -(torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures) * advantages
    else:
        coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon, 1 + epsilon_high)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if reference is not None:
        ref = padded(reference)
        per_token_loss = per_token_loss + cfg.beta * (torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1)
    if cfg.loss_type == "sapo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if cfg.loss_type == "cispo":
        return (per_token_loss * mask).sum() / mask.sum()  # num_items_in_batch: the batch's unmasked tokens
    return (per_token_loss * mask.sum(1, keepdim=True)).mean()  # luspo


@pytest.mark.parametrize("active", [[True, True, True], [True, False, True]])
@pytest.mark.parametrize(("loss_type", "settings"), [
    ("cispo", {"epsilon_high": 1.05}), ("cispo", {}), ("cispo", {"importance_sampling_level": "sequence"}),
    ("cispo", {"epsilon_high": 5.0, "beta": 0.1}), ("sapo", {}), ("sapo", {"importance_sampling_level": "sequence"}),
    ("sapo", {"sapo_temperature_pos": 2.0, "sapo_temperature_neg": 0.5, "beta": 0.1}),
    ("luspo", {"importance_sampling_level": "sequence"}),
    ("luspo", {"importance_sampling_level": "sequence", "epsilon_high": 0.28}),
])
def test_the_new_loss_types_are_trls_formulas(loss_type, settings, active):
    """cispo (MiniMax-M1: the ratio capped at epsilon_high, detached, weighting -A·logp; dapo's normalization),
    sapo (the soft gate σ(τ(ρ − 1))·4/τ with τ by the advantage's sign; grpo's), luspo (GSPO's clipped
    sequence term times the completion's length, the mean over completions): value and gradient equal to TRL's
    code on its padded layout, off policy, with truncated completions masked or not, and the KL term."""
    active = torch.tensor(active)
    batch = pack([np.array([1]), np.array([2]), np.array([3])], COMPLETIONS, ADVANTAGES, active)
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0, -0.1])  # ratios e^-0.2, e^0.1, e^-0.2, 1, e, e^-0.2
    reference = torch.tensor([-1.1, -1.7, -0.6, -1.4, -2.5, -0.2]) if settings.get("beta") else None
    if reference is not None:
        batch = batch._replace(reference=reference)
    cfg = GrpoConfig(loss_type=loss_type, mask_truncated_completions=True, **settings)
    logps = torch.tensor([-1.2, -1.9, -0.7, -1.5, -2.0, -0.3], requires_grad=True)
    tokens = float(sum(len(c) for c, a in zip(COMPLETIONS, active) if a))
    ours, _ = grpo_loss(logps, batch._replace(old=old), cfg, Totals(sequences=3, tokens=tokens))
    ours.backward()
    grad, logps.grad = logps.grad.clone(), None
    trls = trls_loss(logps, old, active, cfg, reference)
    trls.backward()
    assert ours.item() == pytest.approx(trls.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(grad, logps.grad, rtol=1e-6, atol=1e-7)


def test_cispo_and_sapo_on_policy_by_hand():
    """At a generation's first step (ratio 1): cispo's weight is min(1, epsilon_high), so TRL's default cap (None:
    epsilon, 0.2) scales the REINFORCE gradient by 0.2 and 5 (its recommended cap) leaves it; sapo's value is
    -2A/τ and its gradient -A per token (σ'(0)·4 = 1), as the clipped loss's."""
    batch = pack([np.array([1]), np.array([2]), np.array([3])], COMPLETIONS, ADVANTAGES)
    a = ADVANTAGES[batch.sequence]
    logps = torch.tensor([-1.2, -1.9, -0.7, -1.5, -2.0, -0.3], requires_grad=True)
    for cap, weight in ((None, 0.2), (5.0, 1.0)):
        loss, _ = grpo_loss(logps, batch, GrpoConfig(loss_type="cispo", epsilon_high=cap), Totals(3, 6))
        assert loss.item() == pytest.approx((-weight * a * logps.detach()).sum().item() / 6, rel=1e-6)
        (grad,) = torch.autograd.grad(loss, logps)
        torch.testing.assert_close(grad, -weight * a / 6)
    loss, _ = grpo_loss(logps, batch, GrpoConfig(loss_type="sapo"), Totals(3, 6))
    tau = torch.where(a > 0, 1.0, 1.05)
    per_sequence = torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1.0]) / 3
    assert loss.item() == pytest.approx((-2 / tau * a * per_sequence).sum().item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, -a * per_sequence)


def test_cispo_counts_the_ratios_above_its_cap_and_sapo_none():
    """TRL's metrics: cispo's cispo_clip_ratio (ratio above epsilon_high with a positive advantage; a ratio of 1
    is above a cap below 1), logged in place of the clip ratios; sapo logs neither."""
    from retnet.train.grpo import clipped_tokens

    batch = pack([np.array([1]), np.array([2]), np.array([3])], COMPLETIONS, ADVANTAGES)
    logps = torch.tensor([-1.2, -1.9, -0.7, -1.5, -2.0, -0.3])
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0, -0.1])  # only the second token (A 0.5) is above 1.05
    assert clipped_tokens(logps, batch._replace(old=old), GrpoConfig(loss_type="cispo", epsilon_high=1.05)
                          ).tolist() == [0.0, 1.0, 1.0]
    assert clipped_tokens(logps, batch, GrpoConfig(loss_type="cispo")).tolist() == [0.0, 3.0, 3.0]  # cap 0.2
    assert clipped_tokens(logps, batch._replace(old=old), GrpoConfig(loss_type="sapo")).tolist() == [0.0] * 3


@pytest.mark.parametrize(("grpo", "message"), [
    ({"loss_type": "vespo"}, r"grpo\.loss_type must be one of .*'luspo'\) \(TRL's 'vespo' is not supported yet\); "
                             r"got 'vespo'"),
    ({"loss_type": "luspo"}, r"grpo\.importance_sampling_level must be 'sequence' with grpo\.loss_type 'luspo'"),
    ({"loss_type": "luspo", "importance_sampling_level": "sequence", "beta": 0.1},
     r"grpo\.beta must be 0 with grpo\.loss_type 'luspo'.*; got 0\.1"),
    ({"loss_type": "cispo", "delta": 2.0}, r"grpo\.delta caps the clipped surrogate's unclipped ratio, which "
                                           r"grpo\.loss_type 'cispo' has not"),
    ({"loss_type": "sapo", "epsilon_high": 0.28}, r"grpo\.epsilon_high sets the clip, which grpo\.loss_type 'sapo' "
                                                  r"replaces with its soft gate"),
    ({"loss_type": "sapo", "sapo_temperature_pos": 0.0}, r"grpo\.sapo_temperature_pos must be > 0 .*; got 0\.0"),
    ({"sapo_temperature_neg": 2.0}, r"grpo\.sapo_temperature_neg is set but grpo\.loss_type is 'dapo'"),
    ({"repetition_penalty": 0}, r"grpo\.repetition_penalty must be > 0 \(1: off.*; got 0\.0"),
    ({"generation_kwargs": {"num_beams": 4, "top_k": 5}},
     r"grpo\.generation_kwargs has keys this sampler does not implement: \['num_beams'\]"),
    ({"generation_kwargs": {"top_k": -1}}, r"grpo\.generation_kwargs\.top_k must be >= 0 \(0: off\); got -1"),
    ({"generation_kwargs": {"top_p": 0}}, r"grpo\.generation_kwargs\.top_p must be in \(0, 1\]; got 0"),
    ({"generation_kwargs": {"repetition_penalty": "high"}},
     r"grpo\.generation_kwargs\.repetition_penalty must be a number; got 'high'"),
    ({"generation_kwargs": {"max_new_tokens": 0}}, r"grpo\.generation_kwargs\.max_new_tokens must be an integer >= 1"),
    ({"generation_kwargs": {"do_sample": False}}, r"grpo\.generation_kwargs\.do_sample must be true"),
    ({"generation_kwargs": {"temperature": 0.7}},
     r"grpo\.generation_kwargs\.temperature must equal grpo\.temperature \(1\), which the loss's log-probs"),
])
def test_bad_loss_and_sampling_settings_are_refused_by_name(grpo, message):
    with pytest.raises(ConfigError, match=message):
        build_config(grpo_section(**grpo))


def test_the_new_settings_need_prompts():
    for grpo in ({"repetition_penalty": 1.2}, {"generation_kwargs": {"top_k": 5}}, {"loss_type": "cispo"}):
        with pytest.raises(ConfigError, match=rf"grpo\.{next(iter(grpo))} is set but data\.format is 'text'"):
            build_config({"grpo": grpo})


# ----------------------------------------------------------------------------------------------------------
# repetition_penalty, generation_kwargs
# ----------------------------------------------------------------------------------------------------------
def transformers_distribution(logits: torch.Tensor, input_ids: torch.Tensor, penalty: float = 1.0,
                              temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                              min_p: float | None = None) -> torch.Tensor:
    """``[R, V]``: what transformers' generate samples from with TRL's GenerationConfig (do_sample): its
    processors in its order over ``input_ids`` (the prompt and the completion so far), then the softmax."""
    from transformers import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)]
    processors += [TopKLogitsWarper(top_k)] if top_k else []
    processors += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    processors += [MinPLogitsWarper(min_p)] if min_p else []
    scores = logits.clone()
    for processor in processors:
        scores = processor(input_ids, scores)
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("settings", [
    {"penalty": 1.3}, {"penalty": 0.7}, {"penalty": 1.5, "temperature": 0.7, "top_k": 20},
    {"penalty": 1.2, "temperature": 1.3, "top_p": 0.9, "min_p": 0.05},
])
def test_the_repetition_penalty_is_transformers_processor(settings):
    """The sampler's distribution (renormalized) equals transformers' RepetitionPenaltyLogitsProcessor then its
    warpers on the same logits and ids (a token repeated in them penalized once), and the penalized logits are
    the processor's bit for bit."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from retnet.train.grpo_sampling import _distribution, penalize

    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 64, generator=generator)
    input_ids = torch.randint(0, 64, (4, 12), generator=generator)
    input_ids[:, -1] = input_ids[:, 0]  # a repeated token
    seen = torch.zeros(4, 64, dtype=torch.bool).scatter(1, input_ids, True)
    penalty = settings["penalty"]
    assert torch.equal(penalize(logits, seen, penalty), RepetitionPenaltyLogitsProcessor(penalty)(input_ids,
                                                                                                 logits.clone()))
    probs, order = _distribution(logits, settings.get("temperature", 1.0), settings.get("top_p", 1.0),
                                 settings.get("top_k", 0), settings.get("min_p"), penalty, seen)
    ours = torch.zeros_like(probs).scatter(1, order, probs / probs.sum(dim=-1, keepdim=True))
    expected = transformers_distribution(logits, input_ids, **settings)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ours, transformers_distribution(logits, input_ids, **{**settings, "penalty": 1.0}))


def test_the_sampler_penalizes_each_rows_prompt_and_completion_so_far(toy):  # noqa: F811
    """Each drawn token is the one the inverse CDF picks at its uniform from transformers' penalized logits of
    that row's prompt and completion so far (a full forward); a group alone or beside another draws the same (no
    batch padding counts), and the penalty changes the completions."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from retnet.model import RetNetForCausalLM
    from retnet.train.grpo_sampling import _pick, sample, uniforms

    from .test_grpo import tokenizer_of

    model, eos = RetNetForCausalLM.from_pretrained(toy / "base").eval(), tokenizer_of(toy).eos_token_id
    prompts = [np.array([5, 6, 7, 8, 5]), np.array([9, 10])]
    noise = torch.cat([uniforms((4, 2, position), 3, 10) for position in (0, 1)])
    got, _ = sample(model, prompts, noise, eos=eos, temperature=0.9, repetition_penalty=1.8)
    alone, _ = sample(model, prompts[1:], noise[3:], eos=eos, temperature=0.9, repetition_penalty=1.8)
    assert all(np.array_equal(a, b) for a, b in zip(got[3:], alone, strict=True))
    plain, _ = sample(model, prompts, noise, eos=eos, temperature=0.9)
    assert any(not np.array_equal(a, b) for a, b in zip(got, plain))
    processor = RepetitionPenaltyLogitsProcessor(1.8)
    for row, completion in enumerate(got):
        prompt = prompts[row // 3]
        full = torch.from_numpy(np.concatenate([prompt, completion]))[None]
        with torch.no_grad():  # one forward: position len(prompt) - 1 + step predicts the step's token
            every = model(input_ids=full).logits[0].float()
        for step, token in enumerate(completion):
            ids, logits = full[:, :len(prompt) + step], every[len(prompt) - 1 + step][None]
            assert _pick(processor(ids, logits), noise[row, step:step + 1], 0.9, 1.0).item() == token


def test_generation_kwargs_override_the_sampling_fields_as_trls_update():
    """TRL updates its GenerationConfig's arguments with generation_kwargs: their keys win over the fields (the
    field's value stays what the config shows); max_new_tokens is the sampled length, do_sample true is what
    GRPO does anyway; from a TOML table, the command line's JSON and its dotted keys."""
    from retnet.train.config import load_config

    cfg = GrpoConfig(top_k=5, repetition_penalty=1.1, max_completion_length=16,
                     generation_kwargs={"top_k": 7, "repetition_penalty": 1, "max_new_tokens": 4, "do_sample": True})
    assert cfg.sampling == {"temperature": 1.0, "top_p": 1.0, "top_k": 7, "min_p": None, "repetition_penalty": 1.0,
                            "max_new_tokens": 4}
    assert (cfg.top_k, cfg.repetition_penalty) == (5, 1.1)
    assert isinstance(cfg.generation_kwargs["repetition_penalty"], float)  # as a resume compares it
    assert GrpoConfig(repetition_penalty=1.3).sampling["repetition_penalty"] == 1.3
    job = build_config(grpo_section(generation_kwargs={"min_p": 0.1, "top_p": 0.9}))
    assert (job.grpo.sampling["min_p"], job.grpo.sampling["top_p"]) == (0.1, 0.9)
    assert build_config(grpo_section(generation_kwargs={"temperature": 1})).grpo.sampling["temperature"] == 1.0
    job = load_config("tiny", ["--data.format=prompts", "--data.dataset=p.jsonl", "--model.init_from=b",
                               "--grpo.reward_funcs=retnet.train.rewards:exact_match", "--grpo.num_generations=4",
                               "--train.global_batch_size=16", "--train.micro_batch_size=8",
                               '--grpo.generation_kwargs={"top_k": 3, "repetition_penalty": 1.2}',
                               "--grpo.generation_kwargs.max_new_tokens=12", "--grpo.repetition_penalty=1.05",
                               "--grpo.generation_kwargs.top_p=.9", "--grpo.generation_kwargs.min_p=none"])
    # the dotted keys read as the plain fields do: ".9" a number, "none" None
    assert job.grpo.generation_kwargs == {"top_k": 3, "repetition_penalty": 1.2, "max_new_tokens": 12,
                                          "top_p": 0.9, "min_p": None}
    assert (job.grpo.sampling["top_k"], job.grpo.sampling["repetition_penalty"]) == (3, 1.2)


def test_a_resume_compares_the_settings_sampled_with():
    """A generation_kwargs key is the field it overrides: a resume that moves a value between them changes
    nothing, another value is named as the field; max_new_tokens is compared where either run sets it; a
    checkpoint from before these settings has TRL's defaults."""
    from retnet.train.config import grpo_changes

    def saved(**grpo) -> dict:
        return {"grpo": build_config(grpo_section(**grpo)).grpo.to_dict()}

    def now(**grpo):
        return build_config(grpo_section(**grpo))

    assert grpo_changes(saved(top_k=5, repetition_penalty=1.2), now(generation_kwargs={
        "top_k": 5, "repetition_penalty": 1.2})) == []
    assert grpo_changes(saved(repetition_penalty=1.2), now(repetition_penalty=1.3)) == [
        "grpo.repetition_penalty: checkpoint 1.2, now 1.3"]
    assert grpo_changes(saved(), now(generation_kwargs={"repetition_penalty": 1.3})) == [
        "grpo.repetition_penalty: checkpoint 1.0, now 1.3"]
    assert grpo_changes(saved(), now(generation_kwargs={"max_new_tokens": 256})) == []
    assert grpo_changes(saved(), now(generation_kwargs={"max_new_tokens": 8})) == [
        "grpo.generation_kwargs.max_new_tokens: checkpoint 256, now 8"]
    # the same sampled length moved to generation_kwargs: max_completion_length is then dr_grpo's divisor alone
    assert grpo_changes(saved(max_completion_length=64), now(generation_kwargs={"max_new_tokens": 64})) == []
    assert grpo_changes(saved(max_completion_length=64, loss_type="dr_grpo"),
                        now(generation_kwargs={"max_new_tokens": 64}, loss_type="dr_grpo")) == [
        "grpo.max_completion_length: checkpoint 64, now 256"]
    assert grpo_changes(saved(loss_type="sapo"), now(loss_type="sapo", sapo_temperature_neg=1.2)) == [
        "grpo.sapo_temperature_neg: checkpoint 1.05, now 1.2"]
    before = saved()
    for name in ("repetition_penalty", "generation_kwargs", "sapo_temperature_pos", "sapo_temperature_neg"):
        del before["grpo"][name]
    assert grpo_changes(before, now()) == []


def test_a_generation_samples_with_the_overridden_settings(toy, monkeypatch, caplog):  # noqa: F811
    """Through GrpoData: the sampler gets generation_kwargs' values over the fields', draws max_new_tokens
    uniforms a completion, the step's longest sequence counts them, and the start-up line names the penalty."""
    from types import SimpleNamespace

    from retnet.model import RetNetForCausalLM
    from retnet.train import grpo

    data = prompts_data(toy)
    calls = []

    def sampled(model, prompts, noise, **kwargs):
        calls.append({"length": noise.shape[1], **kwargs})
        return [np.array([5, 6])] * len(noise), [True] * len(noise)

    monkeypatch.setattr(grpo, "sample", sampled)
    model = RetNetForCausalLM.from_pretrained(toy / "base").train()
    cfg = build_config(grpo_section(reward_funcs=["toy_rewards:a_share"], max_completion_length=4, top_k=9,
                                    repetition_penalty=1.1, generation_kwargs={"repetition_penalty": 1.4,
                                                                               "max_new_tokens": 6})).grpo
    trainer = SimpleNamespace(cfg=SimpleNamespace(grpo=cfg, train=SimpleNamespace(steps=1)),
                              device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False),
                              raw_model=model, peft_model=None, fsdp=False, tp_mesh=None, cp_size=1)
    with caplog.at_level("INFO", logger="retnet.train.grpo"):
        data.start(trainer)
    assert "at most 6 tokens each (temperature 1, top_p 1, top_k 9, repetition_penalty 1.4" in caplog.text
    assert data.sequence_length(cfg) == data.longest_prompt + 6
    data.micro_batches(2)
    assert calls and all((c["length"], c["repetition_penalty"], c["top_k"]) == (6, 1.4, 9) for c in calls)


def test_a_run_samples_with_a_repetition_penalty_and_trains_cispo(toy, tmp_path):  # noqa: F811
    """A short real run: two steps on one generation (num_iterations 2) of the micro base, sampled with a
    repetition penalty, on the cispo loss (TRL's recommended cap 5); TRL's cispo_clip_ratio is logged in place of
    the clip ratios, and the checkpoint's config keeps the settings."""
    from retnet.train.__main__ import main

    from .conftest import metrics
    from .test_grpo import grpo_args

    out = tmp_path / "run"
    args = grpo_args(toy, out, grpo__repetition_penalty=1.3, grpo__loss_type="cispo", grpo__epsilon_high=5.0,
                     grpo__num_iterations=2, train__steps=2, train__eval_interval=2, checkpoint__interval=2,
                     train__eval_blocks=2)
    assert main(args) == 0
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and "cispo_clip_ratio" in r and "clip_ratio/low_mean" not in r
               for r in records)
    assert "completions/mean_length" in records[0] and np.isfinite(metrics(out, "val")[0]["val_reward"])
    import json

    saved = json.loads((out / "config.json").read_text())["grpo"]
    assert (saved["repetition_penalty"], saved["loss_type"]) == (1.3, "cispo")
