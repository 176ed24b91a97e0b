"""SimPO (``dpo.loss_type = "simpo"``, TRL's CPOTrainer with ``loss_type="simpo"``) and ORPO
(``dpo.loss_type = "orpo"``, TRL's ORPOTrainer): the losses, rewards and metrics against float64 transcriptions of
TRL's ``cpo_loss`` / ``odds_ratio_loss`` and the ``get_batch_loss_metrics`` around them (the length-averaged
log-probs of ``get_batch_logps(average_log_prob=True)``, the NLL's cross-entropy over token logits), gradients
through the token logits included; ORPO's log(1 − p) near p = 1; an ORPO run that starts at the formula's loss,
learns, logs TRL's metrics, computes no reference and resumes bit for bit; and the refused settings."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from retnet.train.__main__ import main
from retnet.train.config import ConfigError, DpoConfig, build_config, dpo_changes
from retnet.train.preference import (
    METRICS,
    ORPO_METRICS,
    REFERENCE_FILE,
    _log1mexp,
    completion_logps,
    dpo_loss,
    orpo_log_odds,
)

from .conftest import metrics, timeless
from .test_preference import build, dpo_args, toy  # noqa: F401 - toy: the module-scoped fixture, shared


# ----------------------------------------------------------------------------------------------------------
# TRL, transcribed (its variable names): CPOTrainer.cpo_loss (loss_type "simpo") and get_batch_loss_metrics's
# ``losses.mean() + cpo_alpha * policy_nll_loss``; ORPOTrainer.odds_ratio_loss and its ``policy_nll_loss -
# losses.mean()``; get_batch_logps with average_log_prob=True; the NLL's nn.CrossEntropyLoss over the chosen rows
# ----------------------------------------------------------------------------------------------------------
def trl_cpo_simpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta, label_smoothing, simpo_gamma):
    logits = policy_chosen_logps - policy_rejected_logps
    gamma_logratios = simpo_gamma / beta
    logits = logits - gamma_logratios
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards = beta * policy_chosen_logps.detach()
    rejected_rewards = beta * policy_rejected_logps.detach()
    return losses, chosen_rewards, rejected_rewards


def trl_odds_ratio_loss(policy_chosen_logps, policy_rejected_logps, *, beta):
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        torch.log1p(-torch.exp(policy_chosen_logps)) - torch.log1p(-torch.exp(policy_rejected_logps))
    )
    sig_ratio = F.sigmoid(log_odds)
    ratio = torch.log(sig_ratio)
    losses = beta * ratio
    chosen_rewards = beta * policy_chosen_logps.detach()
    rejected_rewards = beta * policy_rejected_logps.detach()
    return losses, chosen_rewards, rejected_rewards, torch.mean(ratio), torch.mean(log_odds)


def trl_batch_logps(logits, labels, label_pad_token_id=-100):
    """get_batch_logps(average_log_prob=True) of already shifted logits and labels."""
    loss_mask = labels != label_pad_token_id
    labels = torch.where(labels == label_pad_token_id, 0, labels)
    per_token_logps = logits.log_softmax(-1).gather(2, labels.unsqueeze(2)).squeeze(2)
    return (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)


def trl_nll(chosen_logits, chosen_labels):
    """The cross_entropy_loss of concatenated_forward (nn.CrossEntropyLoss, ignore_index -100) over the chosen
    rows. (TRL's ORPO takes every token of the chosen rows, the prompt's too; ours, as CPO's, the completion's:
    the labels here are the completion tokens, so both read the same tokens.)"""
    return torch.nn.CrossEntropyLoss()(chosen_logits.flatten(end_dim=1), chosen_labels.flatten(end_dim=1))


def token_batch(seed, pairs=4, vocab=13, longest=9, scale=3.0):
    """Random token logits ``[2B, T, V]`` (requiring grad) and labels of 2B completions of random lengths
    (padding -100), with our summed log-probs of them and the lengths."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (2 * pairs,), generator=generator)
    logits = (torch.randn(2 * pairs, longest, vocab, generator=generator, dtype=torch.float64) * scale)
    logits.requires_grad_(True)
    labels = torch.randint(0, vocab, (2 * pairs, longest), generator=generator)
    labels[torch.arange(longest)[None] >= lengths[:, None]] = -100
    mask = labels != -100
    per_token = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    return logits, labels, per_token.sum(-1), lengths


# ----------------------------------------------------------------------------------------------------------
# The formulas
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cpo_alpha", [None, 0.0, 1.5])
def test_simpo_is_trls_cpo_simpo_with_its_gradients(cpo_alpha):
    """Our SimPO loss (mean over the pairs), rewards and gradient through the token logits are TRL's CPOTrainer's
    with loss_type "simpo", for each beta, simpo_gamma and label_smoothing: the length-averaged log-probs' margin
    beyond γ/β, the rewards β times the averages; cpo_alpha None is TRL's cpo_alpha 0 (pure SimPO)."""
    for seed, (beta, gamma, smoothing) in enumerate([(0.1, 0.5, 0.0), (2.0, 0.5, 0.0), (2.5, 1.4, 0.1),
                                                      (0.5, 0.0, 0.3)]):
        logits, labels, policy, lengths = token_batch(seed)
        pairs = len(lengths) // 2
        cfg = DpoConfig(loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=smoothing,
                        cpo_alpha=cpo_alpha)
        losses, chosen, rejected = dpo_loss(policy, torch.zeros_like(policy), lengths, cfg)
        (gradient,) = torch.autograd.grad(losses.mean(), logits, retain_graph=True)
        averaged = trl_batch_logps(logits, labels)
        want, want_chosen, want_rejected = trl_cpo_simpo_loss(*averaged.chunk(2), beta=beta,
                                                              label_smoothing=smoothing, simpo_gamma=gamma)
        want_loss = want.mean() + (cpo_alpha or 0.0) * trl_nll(logits[:pairs], labels[:pairs])
        (want_gradient,) = torch.autograd.grad(want_loss, logits)
        what = f"beta {beta} gamma {gamma} label_smoothing {smoothing} cpo_alpha {cpo_alpha}"
        torch.testing.assert_close(losses.mean(), want_loss, rtol=1e-12, atol=1e-12, msg=what)
        torch.testing.assert_close(gradient, want_gradient, rtol=1e-10, atol=1e-14, msg=what)
        torch.testing.assert_close(chosen, want_chosen, rtol=1e-12, atol=1e-12, msg=what)
        torch.testing.assert_close(rejected, want_rejected, rtol=1e-12, atol=1e-12, msg=what)
        if not cpo_alpha:  # without the NLL the pair's loss is its own: TRL's per-pair losses
            torch.testing.assert_close(losses, want, rtol=1e-12, atol=1e-12, msg=what)
        assert gradient.abs().sum() > 0, what


def test_simpo_reads_no_reference_and_its_gamma_moves_the_loss():
    """A reference handed in is not read (the run passes zeros; CPO has no reference model), and γ shifts the
    margin: γ = β·m makes the loss of a pair of averaged margin m log 2."""
    policy = torch.tensor([-4.0, -6.0, -9.0, -12.0], dtype=torch.float64)
    lengths = torch.tensor([2, 3, 3, 4])
    cfg = DpoConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    reference = torch.tensor([-1.0, -50.0, 3.0, -7.0], dtype=torch.float64)
    assert torch.equal(dpo_loss(policy, reference, lengths, cfg)[0],
                       dpo_loss(policy, torch.zeros_like(policy), lengths, cfg)[0])
    margins = policy[:2] / lengths[:2] - policy[2:] / lengths[2:]  # -2 + 3 = 1, -2 + 3 = 1
    at = DpoConfig(loss_type="simpo", beta=2.0, simpo_gamma=2.0 * margins[0].item())
    torch.testing.assert_close(dpo_loss(policy, reference, lengths, at)[0],
                               torch.full((2,), torch.log(torch.tensor(2.0)).item(), dtype=torch.float64))


def test_orpo_is_trls_with_its_gradients_and_metrics():
    """Our ORPO loss (mean over the pairs: λ·(−log σ(log odds)) + the chosen tokens' NLL), rewards, gradient
    through the token logits and the two log-odds metrics are TRL's ORPOTrainer's, for each beta (its λ)."""
    for seed, beta in enumerate((0.1, 0.25, 1.0, 3.0)):
        for scale in (0.5, 4.0):  # near-uniform completions, and confident ones (averages near 0)
            logits, labels, policy, lengths = token_batch(10 + seed, scale=scale)
            pairs = len(lengths) // 2
            cfg = DpoConfig(loss_type="orpo", beta=beta)
            losses, chosen, rejected = dpo_loss(policy, torch.zeros_like(policy), lengths, cfg)
            (gradient,) = torch.autograd.grad(losses.mean(), logits, retain_graph=True)
            averaged = trl_batch_logps(logits, labels)
            want, want_chosen, want_rejected, log_odds_ratio, log_odds_chosen = trl_odds_ratio_loss(
                *averaged.chunk(2), beta=beta)
            want_loss = trl_nll(logits[:pairs], labels[:pairs]) - want.mean()
            (want_gradient,) = torch.autograd.grad(want_loss, logits)
            what = f"beta {beta} scale {scale}"
            torch.testing.assert_close(losses.mean(), want_loss, rtol=1e-12, atol=1e-12, msg=what)
            torch.testing.assert_close(gradient, want_gradient, rtol=1e-9, atol=1e-13, msg=what)
            torch.testing.assert_close(chosen, want_chosen, rtol=1e-12, atol=1e-12, msg=what)
            torch.testing.assert_close(rejected, want_rejected, rtol=1e-12, atol=1e-12, msg=what)
            # the metrics as _pair_loss sums them: log σ of the log odds, and the log odds, of the averages
            log_odds = orpo_log_odds(*(policy.detach() / lengths).chunk(2))
            torch.testing.assert_close(F.logsigmoid(log_odds).mean(), log_odds_ratio.detach(), rtol=1e-10,
                                       atol=1e-12, msg=what)
            torch.testing.assert_close(log_odds.mean(), log_odds_chosen.detach(), rtol=1e-10, atol=1e-12, msg=what)
            assert gradient.abs().sum() > 0, what


def test_orpo_log1mexp_is_accurate_near_p_1_with_finite_gradients():
    """log(1 − p) of an average log-prob x near 0 (a confident completion): TRL's log1p(−exp(x)) loses most of
    its digits there in float32 (1 − eˣ cancels); ours (expm1 above −ln 2) stays within float32's precision of the
    float64 value, on both sides of the split, and its gradient is finite (neither branch's infinities leak)."""
    x32 = (-torch.logspace(-6, 1, 60)).requires_grad_(True)  # to -10 (below, both are float32 log1p)
    x64 = x32.detach().double()  # the same points: the errors are the functions', not the inputs' rounding
    exact = torch.log(-torch.expm1(x64))
    ours = _log1mexp(x32)
    trls = torch.log1p(-torch.exp(x32.detach()))
    ours_error = ((ours.double() - exact) / exact.abs()).abs().max().item()
    trls_error = ((trls.double() - exact) / exact.abs()).abs().max().item()
    assert ours_error < 1e-6 < trls_error, (ours_error, trls_error)
    (gradient,) = torch.autograd.grad(ours.sum(), x32)
    torch.testing.assert_close(gradient.double(), -1 / torch.expm1(-x64), rtol=1e-5, atol=0)


def test_orpo_of_a_sure_completion_has_a_finite_loss_and_gradient():
    """A completion the model is sure of has token log-probs of exactly 0 in float32 (the label's logit 30 above
    the rest: logsumexp rounds to it), so an average of 0, p = 1: TRL's log(1 − p) is −inf there, which made a
    chosen one's gradient NaN (0 · ∞) and a rejected one's loss inf, poisoning the step. Every combination stays
    finite, the NLL still reaches the sure chosen tokens, and an unsure pair's loss is unchanged beside them."""
    vocab, length = 16, 3
    labels = torch.arange(4 * length) % vocab
    for sure in ((0,), (1,), (0, 1), (0, 1, 2, 3)):  # which of [chosen 0, chosen 1, rejected 0, rejected 1]
        base = torch.randn(4 * length, vocab, generator=torch.Generator().manual_seed(len(sure)))
        for row in sure:
            base[row * length:(row + 1) * length].scatter_(-1, labels[row * length:(row + 1) * length, None], 30.0)
        logits = base.requires_grad_(True)
        token = logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # as completion_logps
        policy = token.view(4, length).sum(-1)
        assert all(policy[row].item() == 0.0 for row in sure), policy  # exactly p = 1, not just near it
        lengths = torch.full((4,), length)
        losses, _, _ = dpo_loss(policy, torch.zeros_like(policy), lengths, DpoConfig(loss_type="orpo"))
        (gradient,) = torch.autograd.grad(losses.mean(), logits)
        assert torch.isfinite(losses).all() and torch.isfinite(gradient).all(), (sure, losses, gradient)
        log_odds = orpo_log_odds(*(policy.detach() / lengths).chunk(2))  # the logged metrics' input
        assert torch.isfinite(log_odds).all() and torch.isfinite(F.logsigmoid(log_odds)).all(), (sure, log_odds)
    # away from p = 1 nothing moved: TRL's formula in float64
    policy = torch.tensor([-0.3, -2.0, -1.2, -0.01], dtype=torch.float64) * 3
    lengths = torch.full((4,), 3)
    losses, _, _ = dpo_loss(policy, torch.zeros_like(policy), lengths, DpoConfig(loss_type="orpo", beta=0.5))
    want, *_ = trl_odds_ratio_loss(*(policy / lengths).chunk(2), beta=0.5)
    nll = -policy[:2].sum() / lengths[:2].sum()
    torch.testing.assert_close(losses, nll - want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# A run
# ----------------------------------------------------------------------------------------------------------
RUN = dict(dpo__loss_type="orpo", dpo__beta=0.5, train__seed=0)


def test_an_orpo_run_learns_logs_trls_metrics_and_resumes_exactly(toy, tmp_path, monkeypatch):  # noqa: F811
    """ORPO: no reference pass and no reference file; the first step's loss is the formula's on the initial model;
    the loss and the chosen NLL fall, the chosen answers win; the records hold TRL's metrics, nll_loss,
    log_odds_ratio and log_odds_chosen (train and validation); a resume from step 4 retraces the run bit for
    bit."""
    import retnet.train.preference as preference

    def refuse(*args, **kwargs):
        raise AssertionError("an ORPO run computed the reference log-probs")

    monkeypatch.setattr(preference, "compute_reference", refuse)
    out = tmp_path / "run"
    assert main(dpo_args(toy, out, **RUN)) == 0
    assert not (out / REFERENCE_FILE).exists()
    train, val = metrics(out), metrics(out, "val")
    names = (*METRICS, "nll_loss", *ORPO_METRICS)
    assert all(set(names) <= set(record) for record in train)
    assert all({f"val_{name}" for name in names} <= set(record) for record in val)
    for record in train:  # the rewards are β times the length-averaged log-probs (TRL logs those as logps/*)
        assert record["rewards/chosen"] == pytest.approx(0.5 * record["logps/chosen"], rel=1e-5)
        assert -20 < record["logps/chosen"] < 0  # an average, not a sum of ~10 tokens'
        assert record["log_odds_ratio"] < 0

    # step 1: the loss is the formula's on the initial model
    from transformers import AutoModelForCausalLM

    data = build(toy, toy / "pairs.jsonl")  # (seed 0, micro-batches of 2, global batch 4: the run's)
    model = AutoModelForCausalLM.from_pretrained(toy / "base").eval()
    cfg = DpoConfig(loss_type="orpo", beta=0.5)
    losses, log_odds = [], []
    with torch.no_grad():
        for batch in data.micro_batches(2):
            policy = completion_logps(model, batch)
            losses.append(dpo_loss(policy, torch.zeros_like(policy), batch.lengths, cfg)[0].mean())
            log_odds.append(orpo_log_odds(*(policy / batch.lengths).chunk(2)))
    assert train[0]["loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    assert train[0]["log_odds_chosen"] == pytest.approx(torch.cat(log_odds).mean().item(), rel=1e-4, abs=1e-6)

    assert train[-1]["loss"] < train[0]["loss"] - 0.2, [r["loss"] for r in train]
    assert train[-1]["nll_loss"] < train[0]["nll_loss"], [r["nll_loss"] for r in train]
    assert train[-1]["log_odds_chosen"] > train[0]["log_odds_chosen"]
    assert train[-1]["rewards/accuracies"] == 1.0 and val[-1]["val_rewards/accuracies"] == 1.0

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000008")
    assert main(dpo_args(toy, copy, **RUN)) == 0
    for kind in ("train", "val"):
        assert timeless(metrics(copy, kind)) == timeless(metrics(out, kind))
    assert not (copy / REFERENCE_FILE).exists()


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------
def preference(**dpo) -> dict:
    return {"data": {"format": "preference", "dataset": "p.jsonl"}, "model": {"init_from": "base"}, "dpo": dpo}


@pytest.mark.parametrize(("dpo", "message"), [
    ({"loss_type": "cpo"}, r"dpo.loss_type must be one of \(.*'apo_down'\) \(TRL's DPOTrainer\), 'simpo' \(its "
     r"CPOTrainer\) or 'orpo' \(its ORPOTrainer\) \(TRL's names; .*\); got 'cpo'"),
    ({"loss_type": "orpo", "label_smoothing": 0.1},
     r"dpo.label_smoothing does not apply to dpo.loss_type 'orpo' \(TRL's ORPOTrainer has none\); got 0.1"),
    ({"loss_type": "simpo", "rpo_alpha": 1.0},
     r"dpo.rpo_alpha does not apply to dpo.loss_type 'simpo': its NLL weight is dpo.cpo_alpha .*; got 1.0"),
    ({"loss_type": "orpo", "rpo_alpha": 1.0},
     r"dpo.rpo_alpha does not apply to dpo.loss_type 'orpo': ORPO's loss holds the chosen completions' NLL "
     r"already .*; got 1.0"),
    ({"simpo_gamma": 1.0}, r"dpo.simpo_gamma applies to dpo.loss_type 'simpo' only, not 'sigmoid'; got 1.0"),
    ({"loss_type": "orpo", "simpo_gamma": 1.0},
     r"dpo.simpo_gamma applies to dpo.loss_type 'simpo' only, not 'orpo'; got 1.0"),
    ({"loss_type": "simpo", "simpo_gamma": -0.5}, r"dpo.simpo_gamma must be >= 0; got -0.5"),
    ({"loss_type": "simpo", "simpo_gamma": float("nan")}, r"dpo.simpo_gamma must be >= 0 and finite; got nan"),
    ({"loss_type": "simpo", "simpo_gamma": "big"}, r"dpo.simpo_gamma"),
    ({"cpo_alpha": 1.0}, r"dpo.cpo_alpha applies to dpo.loss_type 'simpo' only, not 'sigmoid' \(RPO's "
     r"dpo.rpo_alpha adds the same NLL term to DPO's losses\); got 1.0"),
    ({"loss_type": "orpo", "cpo_alpha": 1.0}, r"dpo.cpo_alpha applies to dpo.loss_type 'simpo' only, not 'orpo'"),
    ({"loss_type": "simpo", "cpo_alpha": -1.0}, r"dpo.cpo_alpha must be >= 0; got -1.0"),
    ({"loss_type": "simpo", "cpo_alpha": float("inf")}, r"dpo.cpo_alpha must be >= 0 and finite; got inf"),
    ({"loss_type": "simpo", "beta": 0.0}, r"dpo.beta must be > 0; got 0.0"),
])
def test_bad_simpo_orpo_settings_are_refused_by_name(dpo, message):
    with pytest.raises(ConfigError, match=message):
        build_config(preference(**dpo))


@pytest.mark.parametrize("value", [True, "1", [1.0]])
def test_a_cpo_alpha_of_another_type_is_refused_by_the_config_itself(value):
    """Built in code (not through the TOML loader, which types it first), DpoConfig refuses a cpo_alpha that is
    no number, as it does a simpo_gamma: True was taken as weight 1, a string raised a bare TypeError."""
    with pytest.raises(ConfigError, match=r"dpo.cpo_alpha must be a number >= 0 \(or None: off\); got "):
        DpoConfig(loss_type="simpo", cpo_alpha=value)


def test_simpo_and_orpo_are_reference_free_whatever_reference_free_says():
    """Neither reads a reference: ``reference_free`` true is accepted (it says so again), false (the default)
    asks for nothing; the NLL weight is cpo_alpha's for SimPO (None: off, TRL's cpo_alpha 0), 1 for ORPO."""
    for loss_type in ("simpo", "orpo"):
        for reference_free in (False, True):
            cfg = build_config(preference(loss_type=loss_type, reference_free=reference_free)).dpo
            assert not cfg.uses_reference
    assert DpoConfig(loss_type="simpo").nll_weight is None
    assert DpoConfig(loss_type="simpo", cpo_alpha=0.0).nll_weight == 0.0
    assert DpoConfig(loss_type="orpo").nll_weight == 1.0
    assert DpoConfig(rpo_alpha=0.3).nll_weight == 0.3 and DpoConfig().uses_reference
    assert not DpoConfig(reference_free=True).uses_reference
    assert DpoConfig().simpo_gamma == 0.5  # TRL's CPOConfig default


def test_the_settings_are_typed_from_the_command_line_and_held_by_a_resume():
    """``dpo.simpo_gamma`` and ``dpo.cpo_alpha`` from the command line; a checkpoint from before them (no such
    keys) differs only in what was changed, and a resume that changes them is listed (refused)."""
    job = build_config(preference(), [("dpo.loss_type", "simpo"), ("dpo.simpo_gamma", "1"),
                                      ("dpo.cpo_alpha", "0.5")])
    assert (job.dpo.loss_type, job.dpo.simpo_gamma, job.dpo.cpo_alpha) == ("simpo", 1.0, 0.5)
    assert build_config(preference(loss_type="simpo"), [("dpo.cpo_alpha", "none")]).dpo.cpo_alpha is None
    old = build_config(preference()).to_dict()
    del old["dpo"]["simpo_gamma"], old["dpo"]["cpo_alpha"]  # an older checkpoint's
    assert dpo_changes(old, job) == ["dpo.loss_type: checkpoint 'sigmoid', now 'simpo'",
                                     "dpo.simpo_gamma: checkpoint 0.5, now 1.0",
                                     "dpo.cpo_alpha: checkpoint None, now 0.5"]
    orpo = build_config(preference(loss_type="orpo", beta=0.2))
    assert dpo_changes(orpo.to_dict(), build_config(preference(loss_type="orpo", beta=0.2))) == []
    assert dpo_changes(orpo.to_dict(), build_config(preference(loss_type="simpo", beta=0.2))) == [
        "dpo.loss_type: checkpoint 'orpo', now 'simpo'"]


def test_simpo_orpo_settings_without_preference_data_are_refused():
    for dpo in ({"loss_type": "orpo"}, {"loss_type": "simpo", "simpo_gamma": 1.0, "cpo_alpha": 1.0}):
        with pytest.raises(ConfigError, match=rf"dpo.loss_type is set but data.format is 'text'.*; got "
                                              rf"'{dpo['loss_type']}'"):
            build_config({"data": {"format": "text", "dataset": "p.jsonl"}, "dpo": dpo})
