"""TRL's ``bco_pair`` and ``sft`` DPO loss types and its combined losses (``loss_type`` a list weighted by
``loss_weights``, MPO), as TRL 0.20 to 0.28's DPOTrainer computes them, against independent transcriptions
(test_dpo_loss_types' ``trl_dpo_loss`` and ``TrlRunningMoments``): bco_pair's running mean micro-batch after
micro-batch and over ranks, its exact resume from a checkpoint's state, the sft term and the weighted sums through
the token logits; the refused settings; and an MPO run that starts at the formula's loss and resumes bit for bit."""

from __future__ import annotations

import io
import math
import shutil

import pytest
import torch

import retnet.train.preference as preference
from retnet.train.__main__ import main
from retnet.train.checkpoint import list_checkpoints, load_checkpoint_trainer
from retnet.train.config import ConfigError, DpoConfig, build_config, dpo_changes
from retnet.train.preference import METRICS, RunningMean, dpo_loss

from .conftest import metrics, timeless
from .test_dpo_loss_types import TrlRunningMoments, trl_dpo_loss, trl_nll_loss
from .test_preference import dpo_args, toy  # noqa: F401 - toy: the module-scoped fixture, shared

MPO = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}  # the MPO paper's weights


def batches(count: int, pairs: int = 3, dtype=torch.float32, seed: int = 0):
    """``count`` micro-batches of (policy, reference, lengths): ``[2 · pairs]`` summed log-probs drifting apart, the
    policy's upwards (the rewards' running mean moves)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for step in range(count):
        reference = -torch.rand(2 * pairs, generator=generator, dtype=torch.float64) * 30 - 1
        policy = reference + torch.randn(2 * pairs, generator=generator, dtype=torch.float64) * (1 + step) + step
        out.append((policy.to(dtype), reference.to(dtype), torch.randint(1, 30, (2 * pairs,), generator=generator)))
    return out


# ----------------------------------------------------------------------------------------------------------
# bco_pair's running mean
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bco_pair_shifts_by_trls_running_mean_batch_after_batch(dtype):
    """Six micro-batches through one running mean each: every batch's losses, rewards and gradient are TRL's
    with its RunningMoments updated the same way, and the means agree to the bit (float32 increments added to a
    float64 mean, as TRL's Python float)."""
    cfg = DpoConfig(loss_type="bco_pair", beta=0.3)
    ours, theirs = RunningMean(), TrlRunningMoments()
    for policy, reference, lengths in batches(6, dtype=dtype):
        policy = policy.requires_grad_(True)
        losses, chosen, rejected = dpo_loss(policy, reference, lengths, cfg, ours.update)
        (gradient,) = torch.autograd.grad(losses.mean(), policy)
        mine = policy.detach().clone().requires_grad_(True)
        want = trl_dpo_loss(*mine.chunk(2), *reference.chunk(2), beta=0.3, label_smoothing=0.0,
                            loss_type="bco_pair", running=theirs)
        (want_gradient,) = torch.autograd.grad(want[0].mean(), mine)
        assert float(ours.mean) == theirs.mean and ours.count == theirs.count
        torch.testing.assert_close(losses, want[0], rtol=0, atol=0)
        torch.testing.assert_close(gradient, want_gradient, rtol=0, atol=0)
        torch.testing.assert_close((chosen, rejected), want[1:], rtol=0, atol=0)
    assert abs(theirs.mean) > 0.1  # (the shift moved)


def test_bco_pair_over_ranks_shifts_by_the_mean_of_their_batches(monkeypatch):
    """Distributed (three ranks, the all-reduce simulated): each rank's mean reward is summed over the group and
    divided by its size, as TRL's get_global_statistics; every rank holds TRL's mean after each update, the count
    growing by the rank count."""
    world = 3
    steps = [batches(world, seed=seed) for seed in range(4)]
    cfg = DpoConfig(loss_type="bco_pair", beta=0.5)
    ranks, theirs = [RunningMean() for _ in range(world)], TrlRunningMoments()
    monkeypatch.setattr(preference, "is_distributed", lambda: True)
    for step in steps:
        means = [0.5 * torch.cat((p - r).chunk(2)).mean() for p, r, _ in step]
        total = torch.stack(means).sum()

        def all_reduce(tensor, group=None, total=total):
            assert group == "dp"
            tensor.copy_(total)

        monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
        for running, (policy, reference, lengths) in zip(ranks, step, strict=True):
            dpo_loss(policy, reference, lengths, cfg, lambda mean, running=running: running.update(mean, "dp", world))
        theirs.update(*[mean.reshape(1) for mean in means])
        assert [float(running.mean) for running in ranks] == [theirs.mean] * world
        assert [running.count for running in ranks] == [theirs.count] * world


def test_the_running_mean_resumes_exactly():
    """Three batches, the state saved as a checkpoint holds it (torch.save of the data state) and loaded into a
    fresh mean: the next three batches' losses are those of the mean never saved, bit for bit; without the state
    they are not."""
    cfg = DpoConfig(loss_type="bco_pair", beta=0.2)
    data = batches(6, seed=3)
    kept = RunningMean()
    for policy, reference, lengths in data[:3]:
        dpo_loss(policy, reference, lengths, cfg, kept.update)
    buffer = io.BytesIO()
    torch.save({"running": kept.state_dict()}, buffer)
    buffer.seek(0)
    resumed, fresh = RunningMean(), RunningMean()
    resumed.load_state_dict(torch.load(buffer, weights_only=True)["running"])
    for policy, reference, lengths in data[3:]:
        want = dpo_loss(policy, reference, lengths, cfg, kept.update)[0]
        assert torch.equal(dpo_loss(policy, reference, lengths, cfg, resumed.update)[0], want)
        assert not torch.equal(dpo_loss(policy, reference, lengths, cfg, fresh.update)[0], want)
    assert torch.equal(resumed.value(), kept.value())


# ----------------------------------------------------------------------------------------------------------
# sft and the combined losses
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("loss_type", "weights", "rpo_alpha"), [
    ("sft", None, None),
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], None),  # MPO
    (["ipo", "sft"], [1.0, 0.5], None),  # IPO in the list: every type's log-probs length-averaged, as TRL's
    (["hinge", "apo_zero", "nca_pair"], None, 0.3),  # weights 1 each, RPO's term on top
])
def test_sft_and_combined_losses_are_trls_through_the_token_logits(loss_type, weights, rpo_alpha):
    """TRL's get_batch_loss_metrics: the sum over the loss types of weight × dpo_loss(type), sft the chosen
    tokens' cross-entropy (its nll_loss), rpo_alpha × that added, the mean over the pairs; equal to ours in value
    and in the gradient through the token logits, two micro-batches in a row (bco_pair's mean carried)."""
    generator = torch.Generator().manual_seed(4)
    cfg = DpoConfig(loss_type=loss_type, loss_weights=weights, rpo_alpha=rpo_alpha, beta=0.4)
    kinds = loss_type if isinstance(loss_type, list) else [loss_type]
    ours_running, trl_running = RunningMean(), TrlRunningMoments()
    pairs, vocab, longest = 3, 11, 9
    for _ in range(2):
        lengths = torch.randint(1, longest + 1, (2 * pairs,), generator=generator)
        logits = torch.randn(2 * pairs, longest, vocab, generator=generator, dtype=torch.float64)
        logits.requires_grad_(True)
        labels = torch.randint(1, vocab, (2 * pairs, longest), generator=generator)  # (TRL drops token id 0 too)
        labels[torch.arange(longest)[None] >= lengths[:, None]] = 0  # padding: TRL's ignored label
        policy = (logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1) * (labels != 0)).sum(-1)
        reference = policy.detach() + torch.randn(2 * pairs, generator=generator, dtype=torch.float64)
        ours = dpo_loss(policy, reference, lengths, cfg, ours_running.update)
        (gradient,) = torch.autograd.grad(ours[0].mean(), logits, retain_graph=True)
        average = (lambda logps, lengths=lengths: logps / lengths) if "ipo" in kinds else (lambda logps: logps)
        nll = trl_nll_loss(logits[:pairs], labels[:pairs])
        want = 0
        for kind, weight in zip(kinds, weights or [1.0] * len(kinds), strict=True):
            want = want + trl_dpo_loss(*average(policy).chunk(2), *average(reference).chunk(2), beta=0.4,
                                       label_smoothing=0.0, loss_type=kind, running=trl_running,
                                       nll_loss=nll)[0] * weight
        if rpo_alpha is not None:
            want = want + rpo_alpha * nll
        (want_gradient,) = torch.autograd.grad(want.mean(), logits)
        torch.testing.assert_close(ours[0], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gradient, want_gradient, rtol=1e-10, atol=1e-14)
        rewards = 0.4 * (average(policy) - average(reference)).detach()  # β·log-ratio, whatever the weights
        torch.testing.assert_close(torch.cat(ours[1:]), rewards, rtol=1e-12, atol=1e-12)


def test_sft_alone_is_the_chosen_nll_for_every_pair():
    policy, reference, lengths = batches(1, pairs=4, dtype=torch.float64)[0]
    losses = dpo_loss(policy, reference, lengths, DpoConfig(loss_type="sft"))[0]
    assert torch.equal(losses, (-policy[:4].sum() / lengths[:4].sum()).expand(4))


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------
def job(**dpo) -> dict:
    return {"data": {"format": "preference", "dataset": "p.jsonl"}, "model": {"init_from": "base"}, "dpo": dpo}


@pytest.mark.parametrize(("dpo", "message"), [
    ({"loss_type": ["sigmoid", "kto_pair"]},
     r"dpo.loss_type as a list \(TRL's combined losses\) must name loss types of \(.*'bco_pair', 'sft', .*\) "
     r"\(unknown: \['kto_pair'\]\); got \['sigmoid', 'kto_pair'\]"),
    ({"loss_type": ["sigmoid", "simpo"]}, r"dpo.loss_type .*'simpo' and 'orpo' are not DPOTrainer's.*; got "
     r"\['sigmoid', 'simpo'\]"),
    ({"loss_type": []}, r"dpo.loss_type as a list .* \(unknown: \[\]\); got \[\]"),
    ({"loss_type": [[1]]}, r"dpo.loss_type as a list .* \(unknown: \[\[1\]\]\); got \[\[1\]\]"),  # (was a TypeError)
    ({"loss_type": ["sigmoid", "sft", "sigmoid"]}, r"dpo.loss_type must not name a loss type twice .*; got "
     r"\['sigmoid', 'sft', 'sigmoid'\]"),
    ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2]},
     r"dpo.loss_weights must give one weight per loss type of dpo.loss_type \['sigmoid', 'bco_pair', 'sft'\] "
     r"\(3\), not 2; got \[0.8, 0.2\]"),
    ({"loss_weights": [1.0, 1.0]}, r"dpo.loss_weights must give one weight per loss type of dpo.loss_type "
     r"'sigmoid' \(1\), not 2; got \[1.0, 1.0\]"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, -0.5]},
     r"dpo.loss_weights must be finite numbers >= 0 \(not: -0.5\); got \[1.0, -0.5\]"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, float("nan")]}, r"dpo.loss_weights must be finite"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, True]}, r"dpo.loss_weights must be finite"),
    ({"loss_type": "simpo", "loss_weights": [1.0]}, r"dpo.loss_weights does not apply to dpo.loss_type 'simpo'"),
    ({"loss_type": ["sigmoid", "bco_pair"], "reference_free": True},
     r"dpo.reference_free applies to .* only: TRL's 'bco_pair' loss reads the reference model's log-probs"),
    ({"loss_type": ["hinge", "sft"], "label_smoothing": 0.1}, r"dpo.label_smoothing applies to .* not "
     r"\['hinge', 'sft'\]; got 0.1"),
    ({"loss_type": ["sigmoid", "sft"], "discopop_tau": 0.1}, r"dpo.discopop_tau applies to dpo.loss_type "
     r"'discopop' only"),
])
def test_bad_combined_settings_are_refused_by_name(dpo, message):
    with pytest.raises(ConfigError, match=message):
        build_config(job(**dpo))


def test_combined_settings_from_toml_and_the_command_line():
    """A list and its weights from the command line (comma-separated weights arrive as strings, TOML's as numbers);
    a list of one is its name (TRL's DPOConfig); sft takes a zero reference, a list whose types all do too; the
    smoothing is taken when one type of the list reads it; a resume compares the weights."""
    cli = build_config(job(), [("dpo.loss_type", "[sigmoid,bco_pair,sft]"), ("dpo.loss_weights", "0.8,0.2,1")])
    assert (cli.dpo.loss_type, cli.dpo.loss_weights) == (MPO["loss_type"], MPO["loss_weights"])
    assert (cli.dpo.types, cli.dpo.weights) == (("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0))
    assert build_config(job(**MPO)).dpo == cli.dpo
    assert build_config(job(loss_type=["bco_pair"])).dpo.loss_type == "bco_pair"
    assert build_config(job(loss_type=["sigmoid", "sft"], reference_free=True)).dpo.uses_reference is False
    assert build_config(job(loss_type=["hinge", "sigmoid"], label_smoothing=0.1)).dpo.label_smoothing == 0.1
    assert DpoConfig(loss_type=["sigmoid", "sft"]).weights == (1.0, 1.0)
    assert DpoConfig(loss_type="sft").logs_nll and not DpoConfig().logs_nll
    old = build_config(job(loss_type=MPO["loss_type"])).to_dict()
    del old["dpo"]["loss_weights"]  # an older checkpoint's
    assert dpo_changes(old, cli) == ["dpo.loss_weights: checkpoint None, now [0.8, 0.2, 1.0]"]


# ----------------------------------------------------------------------------------------------------------
# A run
# ----------------------------------------------------------------------------------------------------------
def test_an_mpo_run_starts_at_the_formula_logs_the_nll_and_resumes_exactly(toy, tmp_path):  # noqa: F811
    """MPO (sigmoid 0.8, bco_pair 0.2, sft 1.0) on the micro model: at step 1 the policy is the reference, the
    rewards and their running mean 0, so the loss is 0.8·log 2 + 0.2·2·log 2 + the chosen NLL; the records hold
    TRL's metrics and nll_loss; the checkpoints hold the running mean; a resume from step 4 retraces the run bit
    for bit (its losses read the mean the checkpoint holds)."""
    run = {"dpo__loss_type": "[sigmoid,bco_pair,sft]", "dpo__loss_weights": "[0.8,0.2,1.0]", "train__seed": 0}
    out = tmp_path / "run"
    assert main(dpo_args(toy, out, **run)) == 0
    train, val = metrics(out), metrics(out, "val")
    assert all({*METRICS, "nll_loss"} <= set(record) for record in train)
    assert all({f"val_{name}" for name in (*METRICS, "nll_loss")} <= set(record) for record in val)
    assert train[0]["loss"] == pytest.approx(1.2 * math.log(2) + train[0]["nll_loss"], rel=1e-5)
    assert train[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert train[-1]["loss"] < train[0]["loss"] and train[-1]["rewards/margins"] > 0

    steps = list_checkpoints(out / "checkpoints")
    saved = [load_checkpoint_trainer(step)["ranks"][0]["data"]["running"] for step in steps]
    assert [state["count"] for state in saved] == pytest.approx([1e-24 + 8, 1e-24 + 16])  # a mean per micro-batch
    assert saved[0]["mean"] != 0.0 and saved[1]["mean"] != saved[0]["mean"]

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / steps[-1].name)
    assert main(dpo_args(toy, copy, **run)) == 0
    for kind in ("train", "val"):
        assert timeless(metrics(copy, kind)) == timeless(metrics(out, kind))
