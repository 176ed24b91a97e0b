"""TRL's other DPO loss types, reference-free DPO and RPO: every ``dpo.loss_type`` against an independent float64
transcription of TRL's ``DPOTrainer.dpo_loss`` (TRL 0.15 to 0.19: ``loss_type`` one string, ``reference_free``,
``rpo_alpha``; bco_pair's running mean and sft as TRL 0.20 to 0.28 compute them, test_dpo_combined_losses.py
holding the rest of their tests), gradients included; RPO's NLL against TRL's cross-entropy over token logits; a reference-free RPO
run that starts at the formula's loss, learns, logs TRL's metrics and resumes bit for bit without a reference
file; and the refused settings."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retnet.train.__main__ import main
from retnet.train.config import ConfigError, DpoConfig, build_config, dpo_changes
from retnet.train.config_tuning import DPO_LOSS_TYPES, DPO_REFERENCE_FREE_LOSS_TYPES, DPO_SMOOTHED_LOSS_TYPES
from retnet.train.preference import METRICS, REFERENCE_FILE, chosen_nll, completion_logps, dpo_loss

from .conftest import metrics, timeless
from .test_preference import build, dpo_args, toy  # noqa: F401 - toy: the module-scoped fixture, shared


# ----------------------------------------------------------------------------------------------------------
# TRL, transcribed (its variable names; the losses of DPOTrainer.dpo_loss, RPO's term of
# get_batch_loss_metrics, IPO's length averaging of concatenated_forward)
# ----------------------------------------------------------------------------------------------------------
class TrlRunningMoments:
    """TRL's ``RunningMoments`` (``trl/trainer/utils.py``, 0.20 to 0.28) and its ``update``'s arithmetic: Python
    floats, each update's values as float32 tensors. ``update(*xs)``: one value a rank, several as its
    ``get_global_statistics`` reduces them over an accelerator of that many processes."""

    def __init__(self):
        self.mean, self.std, self.var, self.count = 0, 1, 1, 1e-24

    @torch.no_grad()
    def update(self, *xs):
        if len(xs) > 1:
            global_sum = torch.stack([x.sum() for x in xs]).sum()
            count = torch.tensor(float(sum(x.numel() for x in xs)), dtype=global_sum.dtype)
            global_mean = global_sum / count
            global_var = torch.stack([((x - global_mean) ** 2).sum() for x in xs]).sum() / count
            xs_mean, xs_var, xs_count = global_mean, global_var, count.item()
        else:
            xs_count = xs[0].numel()
            xs_var, xs_mean = torch.var_mean(xs[0], unbiased=False)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        self.mean += (delta * xs_count / tot_count).item()
        new_var = tot_sum / tot_count
        self.std = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
        self.var = new_var.item()
        self.count = tot_count


def trl_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, label_smoothing,
                 loss_type, reference_free=False, discopop_tau=0.05, running=None, nll_loss=None):
    chosen_logratios = chosen_logps - (not reference_free) * ref_chosen_logps
    rejected_logratios = rejected_logps - (not reference_free) * ref_rejected_logps
    logratios = chosen_logps - rejected_logps
    ref_logratios = torch.zeros(1, dtype=logratios.dtype) if reference_free else ref_chosen_logps - ref_rejected_logps
    logits = logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  + F.logsigmoid(-beta * logits) * label_smoothing) / (1 - 2 * label_smoothing)
    elif loss_type == "exo_pair":
        if label_smoothing == 0:
            label_smoothing = 1e-3
        losses = (beta * logits).sigmoid() * (F.logsigmoid(beta * logits) - math.log(1 - label_smoothing)) \
            + (-beta * logits).sigmoid() * (F.logsigmoid(-beta * logits) - math.log(label_smoothing))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "sppo_hard":
        a = chosen_logps - ref_chosen_logps
        b = rejected_logps - ref_rejected_logps
        losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        chosen_rewards = (chosen_logps - ref_chosen_logps) * beta
        rejected_rewards = (rejected_logps - ref_rejected_logps) * beta
        losses = -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) \
            - 0.5 * F.logsigmoid(-rejected_rewards)
    elif loss_type == "aot_pair":
        chosen_logratios_sorted, _ = torch.sort(chosen_logps - ref_chosen_logps, dim=0)
        rejected_logratios_sorted, _ = torch.sort(rejected_logps - ref_rejected_logps, dim=0)
        delta = chosen_logratios_sorted - rejected_logratios_sorted
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "aot":
        logratios_sorted, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
        ref_logratios_sorted, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
        delta = logratios_sorted - ref_logratios_sorted
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "apo_zero":
        losses = (1 - F.sigmoid(beta * chosen_logratios)) + F.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        losses = F.sigmoid(beta * chosen_logratios) + (1 - F.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    elif loss_type == "discopop":
        logits = (chosen_logps - rejected_logps - (ref_chosen_logps - ref_rejected_logps)) * beta
        log_ratio_modulation = torch.sigmoid(logits / discopop_tau)
        losses = -F.logsigmoid(logits) * (1 - log_ratio_modulation) + torch.exp(-logits) * log_ratio_modulation
    elif loss_type == "bco_pair":  # TRL 0.20 to 0.28 (its DPOTrainer's self.running; a fresh one when not given)
        running = running or TrlRunningMoments()
        chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
        running.update(torch.cat((chosen_rewards, rejected_rewards), 0).mean().detach())
        delta = running.mean
        losses = -F.logsigmoid(beta * (chosen_logps - ref_chosen_logps) - delta) \
            - F.logsigmoid(-(beta * (rejected_logps - ref_rejected_logps) - delta))
    elif loss_type == "sft":  # its concatenated_forward's nll_loss, every pair's
        losses = nll_loss.expand(chosen_logps.shape[0])
    else:
        raise ValueError(loss_type)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def trl_nll_loss(chosen_logits, chosen_labels):
    """RPO's ``nll_loss`` of TRL's concatenated_forward: prompt and padding labels are 0, its ignore_index."""
    return F.cross_entropy(torch.flatten(chosen_logits, end_dim=1), torch.flatten(chosen_labels, end_dim=1),
                           ignore_index=0)


def ipo_averaged(loss_type, lengths):
    """TRL's concatenated_forward: IPO's log-probs (the policy's and the reference's) are length-averaged."""
    return (lambda logps: logps / lengths) if loss_type == "ipo" else (lambda logps: logps)


def smoothings(loss_type):
    return [0.0, 0.1, 0.3] if loss_type in DPO_SMOOTHED_LOSS_TYPES else [0.0]


def cases():
    """(loss_type, beta, label_smoothing, discopop_tau) of every loss type but sft, whose TRL loss is of the token
    logits (test_dpo_combined_losses.py)."""
    for loss_type in (kind for kind in DPO_LOSS_TYPES if kind != "sft"):
        for beta in (0.05, 0.5, 2.0):
            for smoothing in smoothings(loss_type):
                for tau in ((0.05, 0.5) if loss_type == "discopop" else (0.05,)):
                    yield loss_type, beta, smoothing, tau


# ----------------------------------------------------------------------------------------------------------
# The formulas
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reference_free", [False, True])
def test_every_loss_type_is_trls_with_its_gradients(reference_free):
    """Random summed log-probs of 5 pairs (near and far from the reference): our losses, rewards and gradient of
    the mean loss are TRL's, for each beta and label_smoothing. IPO's are of the length-averaged log-probs, as
    TRL's concatenated_forward hands them to its dpo_loss. Reference-free: our zero reference against TRL's
    reference_free flag beside a real reference model, whose loss ignores that reference (its rewards do not:
    TRL still runs the reference model for its metrics, a reference-free run here reports β·log π)."""
    generator = torch.Generator().manual_seed(0)
    tested = set()
    for loss_type, beta, smoothing, tau in cases():
        if reference_free and loss_type not in DPO_REFERENCE_FREE_LOSS_TYPES:
            continue
        for scale in (0.3, 6.0):
            reference = -torch.rand(10, generator=generator, dtype=torch.float64) * 30 - 1
            policy = (reference + torch.randn(10, generator=generator, dtype=torch.float64) * scale)
            policy.requires_grad_(True)
            lengths = torch.randint(1, 30, (10,), generator=generator)
            cfg = DpoConfig(beta=beta, loss_type=loss_type, label_smoothing=smoothing, discopop_tau=tau,
                            reference_free=reference_free)
            ours = dpo_loss(policy, torch.zeros_like(reference) if reference_free else reference, lengths, cfg)
            (gradient,) = torch.autograd.grad(ours[0].mean(), policy)
            theirs_policy = policy.detach().clone().requires_grad_(True)
            averaged = ipo_averaged(loss_type, lengths)
            want = trl_dpo_loss(*averaged(theirs_policy).chunk(2), *averaged(reference).chunk(2), beta=beta,
                                label_smoothing=smoothing, loss_type=loss_type, reference_free=reference_free,
                                discopop_tau=tau)
            (want_gradient,) = torch.autograd.grad(want[0].mean(), theirs_policy)
            what = f"{loss_type} beta {beta} label_smoothing {smoothing} tau {tau} scale {scale}"
            torch.testing.assert_close(ours[0], want[0], rtol=1e-12, atol=1e-12, msg=what)
            torch.testing.assert_close(gradient, want_gradient, rtol=1e-10, atol=1e-14, msg=what)
            assert gradient.abs().sum() > 0, what
            if reference_free:  # the rewards against the zero reference: β·log π
                for got, logps in zip(ours[1:], averaged(policy.detach()).chunk(2), strict=True):
                    torch.testing.assert_close(got, beta * logps, rtol=1e-12, atol=1e-12, msg=what)
            else:
                for got, expected in zip(ours[1:], want[1:], strict=True):
                    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=what)
            tested.add(loss_type)
    assert tested == set(DPO_REFERENCE_FREE_LOSS_TYPES if reference_free else DPO_LOSS_TYPES) - {"sft"}


def test_the_loss_types_refused_reference_free_read_the_reference_in_trl():
    """Why reference_free is refused for the rest: TRL's loss for them changes with the reference model's
    log-probs even with reference_free set, so it runs a reference this run would skip."""
    generator = torch.Generator().manual_seed(1)
    policy = -torch.rand(10, generator=generator, dtype=torch.float64) * 20
    one, other = (-torch.rand(10, generator=generator, dtype=torch.float64) * 20 for _ in range(2))
    for loss_type in DPO_LOSS_TYPES:
        losses = [trl_dpo_loss(*policy.chunk(2), *reference.chunk(2), beta=0.5, label_smoothing=0.0,
                               loss_type=loss_type, reference_free=True, nll_loss=torch.tensor(1.5))[0]
                  for reference in (one, other)]
        assert torch.equal(*losses) == (loss_type in DPO_REFERENCE_FREE_LOSS_TYPES), loss_type


def test_aot_sorts_over_the_micro_batch():
    """AOT's losses are of the batch's sorted margins (TRL's per-device batch, here the micro-batch): a pair's
    loss depends on the other pairs, and swapping two pairs leaves the sorted losses as they were."""
    policy = torch.tensor([-3.0, -9.0, -1.0, -8.0, -2.0, -4.0], dtype=torch.float64)
    reference = torch.tensor([-5.0, -5.0, -5.0, -5.0, -5.0, -5.0], dtype=torch.float64)
    lengths = torch.ones(6, dtype=torch.int64)
    order = torch.tensor([1, 0, 2, 4, 3, 5])
    for loss_type in ("aot", "aot_pair"):
        cfg = DpoConfig(loss_type=loss_type, beta=0.5)
        losses = dpo_loss(policy, reference, lengths, cfg)[0]
        swapped = dpo_loss(policy[order], reference[order], lengths, cfg)[0]
        assert torch.equal(losses, swapped), loss_type  # sorted: the pairs' order does not matter
        alone = dpo_loss(policy[[0, 3]], reference[[0, 3]], lengths[:2], cfg)[0]
        assert not torch.isclose(alone, losses[0]), loss_type  # but the other pairs do


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero"])
def test_rpo_adds_trls_nll_of_the_chosen_tokens(loss_type):
    """TRL's RPO term: rpo_alpha × the cross-entropy over every chosen completion token of the batch (a token
    mean, not a mean of the sequences' means), added to each pair's loss, the gradient through the token logits
    included. Computed here from the summed log-probs and the lengths (each rank's, under context parallelism
    the group's)."""
    generator = torch.Generator().manual_seed(2)
    pairs, vocab, longest = 3, 11, 9
    lengths = torch.randint(1, longest + 1, (2 * pairs,), generator=generator)
    logits = torch.randn(2 * pairs, longest, vocab, generator=generator, dtype=torch.float64).requires_grad_(True)
    labels = torch.randint(1, vocab, (2 * pairs, longest), generator=generator)  # (TRL drops token id 0 too)
    labels[torch.arange(longest)[None] >= lengths[:, None]] = 0  # padding: TRL's ignored label
    per_token = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1) * (labels != 0)
    policy = per_token.sum(-1)
    reference = policy.detach() + torch.randn(2 * pairs, generator=generator, dtype=torch.float64)
    alpha = 0.7
    cfg = DpoConfig(loss_type=loss_type, rpo_alpha=alpha)
    ours = dpo_loss(policy, reference, lengths, cfg)[0].mean()
    (gradient,) = torch.autograd.grad(ours, logits, retain_graph=True)  # (TRL's loss below reuses the graph)
    averaged = ipo_averaged(loss_type, lengths)
    nll = trl_nll_loss(logits[:pairs], labels[:pairs])
    want = (trl_dpo_loss(*averaged(policy).chunk(2), *averaged(reference).chunk(2), beta=0.1, label_smoothing=0.0,
                         loss_type=loss_type)[0] + alpha * nll).mean()
    (want_gradient,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(chosen_nll(policy.detach(), lengths), nll.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient, want_gradient, rtol=1e-10, atol=1e-14)
    without = dpo_loss(policy.detach(), reference, lengths, DpoConfig(loss_type=loss_type))[0].mean()
    assert ours.item() == pytest.approx(without.item() + alpha * nll.item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# A run
# ----------------------------------------------------------------------------------------------------------
RUN = dict(dpo__loss_type="robust", dpo__label_smoothing=0.1, dpo__reference_free=True, dpo__rpo_alpha=0.5,
           dpo__beta=0.2, train__seed=0)


def test_a_reference_free_rpo_run_learns_logs_trls_metrics_and_resumes_exactly(toy, tmp_path, monkeypatch):  # noqa: F811
    """Robust DPO, reference-free, with RPO: no reference pass and no reference file; the first step's loss is
    the formula's on the initial model (zero reference, the chosen tokens' NLL added); the loss and the chosen
    NLL fall, the chosen answers win; the records hold TRL's metrics and nll_loss; a resume from step 4 retraces
    the run bit for bit."""
    import retnet.train.preference as preference

    def refuse(*args, **kwargs):
        raise AssertionError("a reference-free run computed the reference log-probs")

    monkeypatch.setattr(preference, "compute_reference", refuse)
    out = tmp_path / "run"
    assert main(dpo_args(toy, out, **RUN)) == 0
    assert not (out / REFERENCE_FILE).exists()
    train, val = metrics(out), metrics(out, "val")
    names = (*METRICS, "nll_loss")
    assert all(set(names) <= set(record) for record in train)
    assert all({f"val_{name}" for name in names} <= set(record) for record in val)
    for record in train:  # the rewards are β·log π (the reference is 0), the margins their difference
        assert record["rewards/chosen"] == pytest.approx(0.2 * record["logps/chosen"], rel=1e-5)
        assert record["rewards/margins"] == pytest.approx(record["rewards/chosen"] - record["rewards/rejected"],
                                                          rel=1e-4, abs=1e-6)

    # step 1: the loss is the formula's on the initial model
    from transformers import AutoModelForCausalLM

    data = build(toy, toy / "pairs.jsonl")  # (seed 0, micro-batches of 2, global batch 4: the run's)
    model = AutoModelForCausalLM.from_pretrained(toy / "base").eval()
    cfg = DpoConfig(loss_type="robust", label_smoothing=0.1, reference_free=True, rpo_alpha=0.5, beta=0.2)
    losses = []
    with torch.no_grad():
        for batch in data.micro_batches(2):
            policy = completion_logps(model, batch)
            losses.append(dpo_loss(policy, torch.zeros_like(policy), batch.lengths, cfg)[0].mean())
    assert train[0]["loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)

    assert train[-1]["loss"] < train[0]["loss"] - 0.2, [r["loss"] for r in train]
    assert train[-1]["nll_loss"] < train[0]["nll_loss"], [r["nll_loss"] for r in train]
    assert train[-1]["rewards/accuracies"] == 1.0 and val[-1]["val_rewards/accuracies"] == 1.0

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000008")
    assert main(dpo_args(toy, copy, **RUN)) == 0
    for kind in ("train", "val"):
        assert timeless(metrics(copy, kind)) == timeless(metrics(out, kind))
    assert not (copy / REFERENCE_FILE).exists()


# ----------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------
def preference(**dpo) -> dict:
    return {"data": {"format": "preference", "dataset": "p.jsonl"}, "model": {"init_from": "base"}, "dpo": dpo}


@pytest.mark.parametrize(("dpo", "message"), [
    ({"loss_type": "sigmoid_norm"}, r"dpo.loss_type must be one of \('sigmoid', 'ipo', 'hinge', 'robust', "
     r"'exo_pair', 'nca_pair', 'sppo_hard', 'aot', 'aot_pair', 'discopop', 'bco_pair', 'sft', 'apo_zero', "
     r"'apo_down'\) .*; got 'sigmoid_norm'"),
    ({"loss_type": "kto_pair"}, r"dpo.loss_type must be one of .*; got 'kto_pair'"),
    *[({"loss_type": kind, "label_smoothing": 0.1},
       rf"dpo.label_smoothing applies to dpo.loss_type 'sigmoid', 'robust', 'exo_pair', 'aot', 'aot_pair', 'simpo' only "
       rf"\(TRL's '{kind}' loss ignores it\), not '{kind}'; got 0.1")
      for kind in ("hinge", "ipo", "nca_pair", "sppo_hard", "apo_zero", "apo_down", "discopop")],
    ({"loss_type": "robust", "label_smoothing": 0.5}, r"dpo.label_smoothing must be in \[0, 0.5\); got 0.5"),
    ({"loss_type": "discopop", "discopop_tau": 0.0}, r"dpo.discopop_tau must be > 0; got 0.0"),
    ({"loss_type": "discopop", "discopop_tau": float("nan")}, r"dpo.discopop_tau must be > 0 and finite; got nan"),
    ({"discopop_tau": 0.1}, r"dpo.discopop_tau applies to dpo.loss_type 'discopop' only, not 'sigmoid'; got 0.1"),
    *[({"loss_type": kind, "reference_free": True},
       rf"dpo.reference_free applies to dpo.loss_type .* only: TRL's '{kind}' loss reads the reference model's "
       rf"log-probs even with reference_free.*; got True")
      for kind in ("nca_pair", "sppo_hard", "aot", "aot_pair", "discopop", "bco_pair")],
    ({"rpo_alpha": -1.0}, r"dpo.rpo_alpha must be >= 0; got -1.0"),
    ({"rpo_alpha": float("inf")}, r"dpo.rpo_alpha must be >= 0 and finite; got inf"),
    ({"rpo_alpha": "one"}, r"dpo.rpo_alpha"),
])
def test_bad_dpo_settings_are_refused_by_name(dpo, message):
    with pytest.raises(ConfigError, match=message):
        build_config(preference(**dpo))


def test_the_new_settings_are_typed_from_the_command_line_and_held_by_a_resume():
    job = build_config(preference(), [("dpo.reference_free", "true"), ("dpo.rpo_alpha", "1"),
                                      ("dpo.loss_type", "exo_pair")])
    assert (job.dpo.reference_free, job.dpo.rpo_alpha, job.dpo.loss_type) == (True, 1.0, "exo_pair")
    assert build_config(preference(), [("dpo.rpo_alpha", "none")]).dpo.rpo_alpha is None
    old = build_config(preference()).to_dict()
    del old["dpo"]["reference_free"], old["dpo"]["rpo_alpha"], old["dpo"]["discopop_tau"]  # an older checkpoint's
    assert dpo_changes(old, job) == ["dpo.loss_type: checkpoint 'sigmoid', now 'exo_pair'",
                                     "dpo.reference_free: checkpoint False, now True",
                                     "dpo.rpo_alpha: checkpoint None, now 1.0"]


def test_dpo_settings_without_preference_data_are_refused():
    with pytest.raises(ConfigError, match=r"dpo.reference_free is set but data.format is 'text'"):
        build_config({"data": {"format": "text", "dataset": "p.jsonl"}, "dpo": {"reference_free": True}})
    with pytest.raises(ConfigError, match=r"dpo.rpo_alpha is set but data.format is 'text'"):
        build_config({"data": {"format": "text", "dataset": "p.jsonl"}, "dpo": {"rpo_alpha": 1.0}})


def test_an_exo_pair_label_smoothing_of_zero_is_trls_1e_3():
    policy, reference = torch.tensor([-3.0, -4.0], dtype=torch.float64), torch.tensor([-3.5, -3.5],
                                                                                     dtype=torch.float64)
    lengths = torch.ones(2, dtype=torch.int64)
    zero = dpo_loss(policy, reference, lengths, DpoConfig(loss_type="exo_pair"))[0]
    small = dpo_loss(policy, reference, lengths, DpoConfig(loss_type="exo_pair", label_smoothing=1e-3))[0]
    assert torch.equal(zero, small) and np.isfinite(zero.item())
