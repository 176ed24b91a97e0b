"""The preference, reward and GRPO loss math against float64 references written from TRL's documented formulas
(padded ``[B, T]`` tensors, as TRL computes them, where the project packs its tokens): values, gradients and the
logged metrics on seeded random inputs (extreme log ratios clipped on both sides, ε_high ≠ ε, δ, all-equal
rewards, one-token completions, masked completions, β 0), then runs of the real trainer whose logged losses and
metrics equal the references computed from the checkpointed models' own log-probs."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retnet.train.__main__ import main
from retnet.train.checkpoint import load_checkpoint
from retnet.train.config import DpoConfig, GrpoConfig
from retnet.train.evaluate_reward import reward_metrics
from retnet.train.grpo import Totals, advantages, batch_std, clipped_tokens, grpo_loss, pack
from retnet.train.preference import _metric_sums, dpo_loss
from retnet.train.reward import reward_loss
from retnet.train.rewards import length_target, reward_values

from .conftest import metrics, one_thread, save_micro_base

CASES = 60


def close(got, want, rtol: float, atol: float, what: str) -> None:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True), \
        f"{what}: got {got.tolist()}, expected {want.tolist()}"


# ----------------------------------------------------------------------------------------------------------
# References: TRL's formulas in float64
# ----------------------------------------------------------------------------------------------------------
def trl_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_length, rejected_length, beta,
            loss_type, label_smoothing):
    """(losses, chosen rewards, rejected rewards, the logged log-probs) of DPOTrainer's ``sigmoid`` / ``ipo``."""
    if loss_type == "ipo":  # TRL averages the log-probs over the completion tokens, the reference's too
        policy_chosen, ref_chosen = policy_chosen / chosen_length, ref_chosen / chosen_length
        policy_rejected, ref_rejected = policy_rejected / rejected_length, ref_rejected / rejected_length
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    return (losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach(),
            (policy_chosen.detach(), policy_rejected.detach()))


def trl_reward_loss(chosen, rejected, coefficient, margin):
    """RewardTrainer's batch loss."""
    loss = -F.logsigmoid(chosen - rejected - (0 if margin is None else margin)).mean()
    return loss + coefficient * torch.mean((chosen + rejected) ** 2) if coefficient else loss


def trl_advantages(rewards, generations, scale):
    """(advantages, the std they were divided by, whether the group's std is 0), GRPOTrainer's."""
    rewards = rewards.double()
    grouped = rewards.view(-1, generations)
    centred = rewards - grouped.mean(1).repeat_interleave(generations)
    group_std = grouped.std(1).repeat_interleave(generations)
    std = rewards.std().expand_as(rewards) if scale == "batch" else group_std
    return (centred if scale == "none" else centred / (std + 1e-4)), std, \
        torch.isclose(group_std, torch.zeros_like(group_std))


def trl_grpo(logps, old, ref, advantage, mask, cfg, sequences, tokens, micro_sequences=None):
    """(loss, the KL estimates' sum, [low, high, region] clipped tokens) of GRPOTrainer's ``_compute_loss`` on
    padded ``[B, T]`` log-probs, ``mask`` its completion mask (0 on padding and masked completions);
    ``sequences`` / ``tokens`` the global batch's completions and unmasked tokens (README: the aggregation over the
    whole global batch), ``micro_sequences`` this micro-batch's completions (``bnpo``: its share of the mean of the
    micro-batches' token means)."""
    B, T = logps.shape
    log_ratio = logps - (logps.detach() if old is None else old)
    if cfg.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    A = advantage.unsqueeze(1)
    high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    if cfg.loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=high).detach() * A * logps
    elif cfg.loss_type == "sapo":
        tau = torch.where(A > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * A
    else:
        coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon, 1 + high)
        capped = coef_1 if cfg.delta is None else torch.clamp(coef_1, max=cfg.delta)
        per_token = -torch.min(capped * A, coef_2 * A)
    per_token = per_token.expand(B, T)
    kl = torch.zeros(())
    if cfg.beta:
        per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
        per_token = per_token + cfg.beta * per_token_kl
        kl = (per_token_kl.detach() * mask).sum()
    if cfg.loss_type in ("grpo", "sapo"):
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / sequences
    elif cfg.loss_type in ("dapo", "cispo"):
        loss = (per_token * mask).sum() / max(tokens, 1.0)
    elif cfg.loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (sequences * cfg.max_completion_length)
    elif cfg.loss_type == "luspo":
        loss = (per_token * mask).sum(-1).sum() / sequences
    else:  # bnpo
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0) * ((micro_sequences or B) / sequences)
    if cfg.loss_type == "cispo":
        capped = ((coef_1 > high) & (A > 0)).expand(B, T) * mask
        clipped = torch.stack([torch.zeros(()), capped.sum(), capped.sum()])
    elif cfg.loss_type == "sapo" or old is None:
        clipped = torch.zeros(3)
    else:  # README: token-weighted, the ratio before δ's cap
        low = ((coef_1 < 1 - cfg.epsilon) & (A < 0)).expand(B, T) * mask
        above = ((coef_1 > 1 + high) & (A > 0)).expand(B, T) * mask
        clipped = torch.stack([low.sum(), above.sum(), ((low + above) > 0).sum()])
    return loss, kl, clipped.double()


def padded(values: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``[B, T]`` float64 of packed ``[M]`` values, zeros after each completion."""
    out = torch.zeros(len(lengths), max(lengths), dtype=torch.float64)
    for row, chunk in enumerate(values.double().split(lengths)):
        out[row, :len(chunk)] = chunk
    return out


# ----------------------------------------------------------------------------------------------------------
# Differential fuzz
# ----------------------------------------------------------------------------------------------------------
def test_dpo_losses_rewards_gradients_and_metrics_are_trls():
    rng = random.Random(0)
    torch.manual_seed(0)
    for case in range(CASES):
        pairs, scale = rng.randint(1, 6), rng.choice([0.1, 5.0, 80.0])
        policy = (torch.randn(2 * pairs, dtype=torch.float64) * scale - scale).requires_grad_(True)
        reference = policy.detach().clone() if case % 7 == 0 else \
            torch.randn(2 * pairs, dtype=torch.float64) * scale - scale
        lengths = torch.tensor([rng.randint(1, 40) for _ in range(2 * pairs)])
        loss_type = rng.choice(["sigmoid", "ipo"])
        smoothing = 0.0 if loss_type == "ipo" else rng.choice([0.0, 0.1, 0.49])
        beta = rng.choice([0.01, 0.1, 1.0, 5.0])
        what = f"case {case}: {loss_type}, label_smoothing {smoothing}, beta {beta}"
        losses, chosen, rejected = dpo_loss(policy, reference, lengths, DpoConfig(
            beta=beta, loss_type=loss_type, label_smoothing=smoothing))
        (gradient,) = torch.autograd.grad(losses.mean(), policy)
        theirs = policy.detach().clone().requires_grad_(True)
        want, want_chosen, want_rejected, logged = trl_dpo(
            theirs[:pairs], theirs[pairs:], reference[:pairs], reference[pairs:], lengths[:pairs], lengths[pairs:],
            beta, loss_type, smoothing)
        (want_gradient,) = torch.autograd.grad(want.mean(), theirs)
        close(losses, want, 1e-10, 1e-12, f"{what}: losses")
        close(gradient, want_gradient, 1e-9, 1e-14, f"{what}: gradient")
        close(torch.cat([chosen, rejected]), torch.cat([want_chosen, want_rejected]), 1e-12, 1e-12, f"{what}: rewards")
        # TRL's rewards/chosen, rejected, accuracies, margins, logps/chosen, rejected (IPO's averaged), as sums
        sums = [want_chosen.sum(), want_rejected.sum(), (want_chosen > want_rejected).double().sum(),
                (want_chosen - want_rejected).sum(), logged[0].sum(), logged[1].sum()]
        compared = policy / lengths if loss_type == "ipo" else policy
        close(_metric_sums(chosen, rejected, compared), torch.stack(sums), 1e-6, 1e-4, f"{what}: metrics")


def test_reward_losses_gradients_and_metrics_are_trls():
    rng = random.Random(1)
    torch.manual_seed(1)
    for case in range(CASES):
        pairs = rng.randint(1, 6)
        scores = (torch.randn(2 * pairs, dtype=torch.float64) * rng.choice([0.1, 3.0, 50.0])).requires_grad_(True)
        margin = None if case % 3 == 0 else torch.randn(pairs, dtype=torch.float64) * 2
        coefficient = rng.choice([0.0, 0.01, 1.0])
        what = f"case {case}: center_rewards_coefficient {coefficient}, margin {margin is not None}"
        chosen, rejected = scores.chunk(2)
        loss = reward_loss(chosen, rejected, coefficient, margin).mean()
        (gradient,) = torch.autograd.grad(loss, scores)
        theirs = scores.detach().clone().requires_grad_(True)
        want = trl_reward_loss(*theirs.chunk(2), coefficient, margin)
        (want_gradient,) = torch.autograd.grad(want, theirs)
        close(loss, want, 1e-10, 1e-12, f"{what}: loss")
        close(gradient, want_gradient, 1e-10, 1e-12, f"{what}: gradient")
        c, r = chosen.detach(), rejected.detach()
        got = reward_metrics(torch.stack([c, r], 1), margin)
        expected = {"accuracy": (c > r).double().mean(), "margin": (c - r).mean(), "rewards/chosen": c.mean(),
                    "rewards/rejected": r.mean(), "loss": trl_reward_loss(c, r, 0.0, margin)}
        for name, value in expected.items():
            close(got[name], value, 1e-10, 1e-12, f"{what}: retnet-eval's {name}")


def test_advantages_are_trls_and_equal_rewards_give_none():
    rng = random.Random(2)
    torch.manual_seed(2)
    for case in range(CASES):
        generations, groups = rng.randint(2, 6), rng.randint(1, 4)
        rewards = torch.randn(generations * groups) * rng.choice([0.01, 1.0, 100.0])
        for group in range(groups):
            if rng.random() < 0.4:
                rewards[group * generations:(group + 1) * generations] = rng.choice([0.1, 1 / 3, -7.77, 123.456])
        scale = rng.choice(["group", "batch", "none"])
        what = f"case {case}: scale_rewards {scale}, {generations} generations"
        spread = batch_std(rewards, len(rewards), rewards.double().sum().item(), torch.device("cpu")) \
            if scale == "batch" else None
        got, std, zero = advantages(rewards, generations, scale, spread)
        want, want_std, want_zero = trl_advantages(rewards, generations, scale)
        close(got, want, 1e-5, 1e-6, f"{what}: advantages")
        close(std, want_std, 1e-5, 1e-7, f"{what}: std")
        assert zero.tolist() == want_zero.tolist(), what
        for group in range(groups):
            rows = slice(group * generations, (group + 1) * generations)
            if bool((rewards[rows] == rewards[rows][0]).all()) and scale == "group":
                assert got[rows].abs().sum() == 0, f"{what}: equal rewards' advantages"


def random_grpo_case(rng: random.Random, case: int):
    """A micro-batch's config, packed batch, float32 log-probs and global totals, and their padded forms."""
    count, longest = rng.randint(1, 6), rng.choice([1, 3, 8])
    lengths = [1] * count if case % 5 == 0 else [rng.randint(1, longest) for _ in range(count)]
    loss_type = rng.choice(["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo"])
    settings = {"loss_type": loss_type, "max_completion_length": longest,
                "importance_sampling_level": "sequence" if loss_type == "luspo" else rng.choice(["token", "sequence"]),
                "beta": 0.0 if loss_type == "luspo" or case % 3 == 0 else rng.choice([0.04, 0.5])}
    if loss_type == "sapo":
        settings.update(sapo_temperature_pos=rng.choice([1.0, 0.5]), sapo_temperature_neg=rng.choice([1.05, 2.0]))
    else:
        settings.update(epsilon=rng.choice([0.0, 0.2, 0.5]), epsilon_high=rng.choice(
            [None, 5.0, 0.5, 1.2] if loss_type == "cispo" else [None, 0.28, 0.05, 3.0]))
    if loss_type not in ("cispo", "sapo"):
        settings["delta"] = rng.choice([None, 1.1, 1.5, 4.0])
    cfg = GrpoConfig(**settings)
    advantage = torch.randn(count) * rng.choice([0.5, 3.0])
    advantage[torch.rand(count) < 0.2] = 0.0
    active = torch.rand(count) > 0.25
    if case % 11 == 0:
        active[:] = False  # every completion truncated and masked
    logps = -torch.rand(sum(lengths)) * 5
    # log ratios of up to ±3 · 3: ρ far outside the clip on both sides
    old = logps + torch.randn(len(logps)) * rng.choice([0.05, 0.5, 3.0]) if case % 4 else torch.zeros(0)
    reference = logps + torch.randn(len(logps)) * rng.choice([0.01, 1.0, 3.0]) if cfg.beta else torch.zeros(0)
    batch = pack([np.array([1 + i]) for i in range(count)], [np.arange(1, 1 + n) for n in lengths], advantage, active)
    batch = batch._replace(old=old, reference=reference)
    extra = rng.choice([0, 3])  # the rest of the global batch, on other micro-batches
    totals = Totals(float(count + extra), float(sum(n for n, a in zip(lengths, active) if a) + 2 * extra))
    mask = padded(torch.cat([torch.full((n,), float(a)) for n, a in zip(lengths, active)]), lengths)
    return cfg, batch, logps, totals, lengths, mask


def test_grpo_losses_gradients_kl_and_clip_counts_are_trls():
    rng = random.Random(3)
    torch.manual_seed(3)
    for case in range(3 * CASES):
        cfg, batch, logps, totals, lengths, mask = random_grpo_case(rng, case)
        what = (f"case {case}: {cfg.loss_type}, {cfg.importance_sampling_level}, beta {cfg.beta}, epsilon "
                f"{cfg.epsilon}/{cfg.epsilon_high}, delta {cfg.delta}, old {len(batch.old) > 0}, lengths {lengths}, "
                f"active {batch.active.tolist()}")
        ours = logps.clone().requires_grad_(True)
        loss, kl = grpo_loss(ours, batch, cfg, totals)
        (gradient,) = torch.autograd.grad(loss, ours)
        theirs = padded(logps, lengths).requires_grad_(True)
        old = padded(batch.old, lengths) if len(batch.old) else None
        reference = padded(batch.reference, lengths) if len(batch.reference) else None
        want, want_kl, want_clipped = trl_grpo(theirs, old, reference, batch.advantages.double(), mask, cfg,
                                               totals.sequences, totals.tokens)
        (want_gradient,) = torch.autograd.grad(want, theirs)
        want_gradient = torch.cat([row[:n] for row, n in zip(want_gradient, lengths)])
        close(loss, want, 2e-4, 2e-5 * max(1.0, abs(want.item())), f"{what}: loss")
        close(gradient, want_gradient, 2e-3, 1e-5 * max(1.0, want_gradient.abs().max().item()), f"{what}: gradient")
        close(kl, want_kl, 1e-4, 1e-4, f"{what}: kl")
        close(clipped_tokens(logps, batch, cfg), want_clipped, 0, 0, f"{what}: clipped tokens")


def test_grpo_micro_batches_add_up_to_the_global_batch():
    """However a global batch is split, the micro-batches' losses and gradients add up to its own (bnpo's is per
    micro-batch by definition)."""
    rng = random.Random(4)
    torch.manual_seed(4)
    for case in range(CASES):
        count = rng.choice([2, 4, 6])
        lengths = [rng.randint(1, 6) for _ in range(count)]
        loss_type = rng.choice(["dapo", "grpo", "dr_grpo", "cispo", "sapo", "luspo"])
        cfg = GrpoConfig(loss_type=loss_type, max_completion_length=6, beta=0.0 if loss_type == "luspo" else 0.1,
                         importance_sampling_level="sequence" if loss_type == "luspo" else
                         rng.choice(["token", "sequence"]))
        advantage, active = torch.randn(count), torch.rand(count) > 0.3
        logps = -torch.rand(sum(lengths)) * 3
        old, reference = logps + torch.randn(len(logps)) * 0.3, logps + torch.randn(len(logps)) * 0.3
        totals = Totals(float(count), float(sum(n for n, a in zip(lengths, active) if a)))

        def split(sizes: list[int], logps=logps, lengths=lengths, advantage=advantage, active=active, old=old,
                  reference=reference, cfg=cfg, totals=totals) -> tuple[torch.Tensor, torch.Tensor]:
            ours, total, token, first = logps.clone().requires_grad_(True), 0.0, 0, 0
            for size in sizes:
                tokens = sum(lengths[first:first + size])
                batch = pack([np.array([1])] * size, [np.arange(1, 1 + n) for n in lengths[first:first + size]],
                             advantage[first:first + size], active[first:first + size])
                batch = batch._replace(old=old[token:token + tokens],
                                       reference=reference[token:token + tokens] if cfg.beta else torch.zeros(0))
                total = total + grpo_loss(ours[token:token + tokens], batch, cfg, totals)[0]
                token, first = token + tokens, first + size
            return total.detach(), torch.autograd.grad(total, ours)[0]

        whole, whole_gradient = split([count])
        for sizes in ([count // 2, count - count // 2], [1] * count):
            part, part_gradient = split(sizes)
            close(part, whole, 1e-5, 1e-6, f"case {case}: {loss_type} in micro-batches of {sizes}")
            close(part_gradient, whole_gradient, 1e-5, 1e-6, f"case {case}: {loss_type} gradient, {sizes}")


def test_rewards_that_are_text_or_infinite_are_refused_naming_the_function():
    """float() reads "1.5" and b"1", which TRL's torch.tensor refuses; an infinite reward (or one beyond float32)
    makes its group's advantages NaN. NaN stays TRL's None."""
    for bad, said in ((["1.5", 2.0], r"not a number \(str '1.5'\)"), ([b"1", 2], r"not a number \(bytes b'1'\)"),
                      ([1.0, float("inf")], r"inf for completion 1: a reward must be finite"),
                      ([-1e39, 0.0], r"-1e\+39 for completion 0: a reward must be finite")):
        with pytest.raises(RuntimeError, match=rf"grpo.reward_funcs: f returned .*{said}"):
            reward_values("f", bad, 2)
    assert reward_values("f", [float("nan"), None], 2).isnan().all()
    assert length_target(["abc", "ab"], target_length=[float("nan"), 2]) == [None, 0.0]
    with pytest.raises(ValueError, match=r"'target_length' column holds float inf"):
        length_target(["abc"], target_length=[float("inf")])
    # an int beyond float's range: named, not a bare OverflowError; as a target length, a length (no float())
    with pytest.raises(RuntimeError, match=r"grpo.reward_funcs: f returned .*not a number \(OverflowError"):
        reward_values("f", [10**400, 1], 2)
    assert length_target(["abc"], target_length=[10**400]) == [-1.0]


# ----------------------------------------------------------------------------------------------------------
# The trainer: logged losses and metrics against the references, from the models' own log-probs
# ----------------------------------------------------------------------------------------------------------
RECORDING_REWARD = '''
import json, os

def parity(prompts, completions, completion_ids, **kwargs):
    """The share of even ids: groups of equal and of differing rewards; every call recorded."""
    rewards = [sum(1 for i in ids if i % 2 == 0) / len(ids) for ids in completion_ids]
    with open(os.environ["LOSS_MATH_REWARDS"], "a") as out:
        out.write(json.dumps({"prompts": prompts, "ids": completion_ids, "rewards": rewards}) + "\\n")
    return rewards
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """pairs.jsonl (standard preference rows), prompts.jsonl, loss_math_rewards.py on the path, and base/: a
    random-init micro RetNet with a BPE trained on the rows."""
    from retnet.tokenization import train_byte_level_bpe

    root = tmp_path_factory.mktemp("loss-math")
    things = ["the sky", "a cat", "the sea", "a tree", "an apple", "the moon"]
    pairs = [{"prompt": f"Q: Is {things[i % 6]} nice {i}?\nA:", "chosen": " Maybe, yes",
              "rejected": " Maybe, no" if i % 3 else " No"} for i in range(24)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs))
    prompts = [{"prompt": f"Say a word {i}:"} for i in range(12)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prompts))
    (root / "loss_math_rewards.py").write_text(RECORDING_REWARD)
    texts = [row["prompt"] + row[side] for row in pairs for side in ("chosen", "rejected")]
    save_micro_base(root / "base", train_byte_level_bpe(texts + [row["prompt"] + " aaa bbb" for row in prompts],
                                                        vocab_size=300))
    with pytest.MonkeyPatch.context() as patch, one_thread():
        patch.syspath_prepend(str(root))
        yield root
    sys.modules.pop("loss_math_rewards", None)


def run_args(toy: Path, out: Path, **overrides) -> list[str]:
    values = {"model.init_from": toy / "base", "data.dataset": toy / "pairs.jsonl", "data.format": "preference",
              "data.seq_len": 32, "data.val_fraction": 0.25, "data.cache_dir": toy / "cache",
              "train.output_dir": out, "train.steps": 2, "train.global_batch_size": 4, "train.micro_batch_size": 2,
              "train.eval_interval": 2, "train.eval_blocks": 8, "optim.lr": 3e-2, "optim.warmup_steps": 1,
              "optim.schedule": "constant", "checkpoint.interval": 1, "checkpoint.export": False,
              "logging.progress": False, "logging.tensorboard": False, "logging.log_interval": 1}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return ["--config", "tiny", *[f"--{k}={v}" for k, v in values.items()]]


def checkpointed(model_class, toy: Path, out: Path, step: int, **config):
    """The run's model at ``step`` (0: ``model.init_from``), in eval mode."""
    model = model_class.from_pretrained(toy / "base", **config)
    if step:
        model.load_state_dict(load_checkpoint(out / "checkpoints" / f"step_{step:08d}")["model"])
    return model.eval()


def token_logps(model, prompt, completion) -> torch.Tensor:
    """``[len(completion)]`` float64: each completion token's log-prob, the sequence alone through ``model``."""
    ids = torch.from_numpy(np.concatenate([prompt, completion]).astype(np.int64))[None]
    with torch.no_grad():
        logps = model(input_ids=ids, use_cache=False).logits[0].double().log_softmax(-1)
    return logps[torch.arange(len(prompt) - 1, ids.shape[1] - 1), torch.as_tensor(completion, dtype=torch.long)]


def preference_pairs(toy: Path, seed: int = 1337):
    """The run's data, rebuilt: its splits, and the pairs of its steps 1 and 2 (the trainer's batching)."""
    from retnet.train.config import DataConfig
    from retnet.train.data import build_data

    data = build_data(DataConfig(dataset=str(toy / "pairs.jsonl"), format="preference", seq_len=32,
                                 val_fraction=0.25, cache_dir=str(toy / "cache")),
                      vocab_size=300, seed=seed, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
                      tokenizer_dir=toy / "base", barrier=lambda: None)
    steps = [np.concatenate([batch.pairs.numpy() for batch in data.micro_batches(2)]) for _ in range(2)]
    return data, steps


@pytest.mark.parametrize(("loss_type", "beta", "smoothing"), [("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0)])
def test_dpo_runs_log_the_reference_formula_of_their_models(toy, tmp_path, loss_type, beta, smoothing):
    """Step 2's training loss and metrics (the step-1 checkpoint's policy on step 2's pairs) and step 2's validation
    (the step-2 checkpoint on every validation pair) equal TRL's formulas on log-probs from each sequence run alone
    in float64 and the saved reference log-probs, which are the init_from model's."""
    from retnet.model import RetNetForCausalLM

    out = tmp_path / "run"
    assert main(run_args(toy, out, dpo__loss_type=loss_type, dpo__beta=beta, dpo__label_smoothing=smoothing)) == 0
    data, steps = preference_pairs(toy)
    saved = torch.load(out / "reference_logps.pt", weights_only=True)
    base = checkpointed(RetNetForCausalLM, toy, out, 0)
    for split, pairs in (("train", data.train), ("val", data.val)):
        recomputed = torch.stack([torch.stack([token_logps(base, *pairs.parts(i)[:2]).sum(),
                                               token_logps(base, pairs.parts(i)[0], pairs.parts(i)[2]).sum()])
                                  for i in range(len(pairs))])
        close(saved[split], recomputed, 1e-5, 1e-4, f"{split} reference log-probs")

    def expected(model, pairs, ids, reference):
        sums = torch.stack([torch.stack([token_logps(model, *pairs.parts(i)[:2]).sum(),
                                         token_logps(model, pairs.parts(i)[0], pairs.parts(i)[2]).sum()])
                            for i in ids])
        lengths = torch.as_tensor(np.asarray(pairs.lengths)[ids][:, 1:], dtype=torch.float64)
        losses, chosen, rejected, logged = trl_dpo(sums[:, 0], sums[:, 1], reference[ids, 0].double(),
                                                   reference[ids, 1].double(), lengths[:, 0], lengths[:, 1], beta,
                                                   loss_type, smoothing)
        return {"loss": losses.mean(), "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                "rewards/accuracies": (chosen > rejected).double().mean(), "rewards/margins": (chosen - rejected).mean(),
                "logps/chosen": logged[0].mean(), "logps/rejected": logged[1].mean()}

    step_2 = next(r for r in metrics(out) if r["step"] == 2)
    want = expected(checkpointed(RetNetForCausalLM, toy, out, 1), data.train, steps[1], saved["train"])
    validation = next(r for r in metrics(out, "val") if r["step"] == 2)
    want_val = expected(checkpointed(RetNetForCausalLM, toy, out, 2), data.val, np.arange(len(data.val)), saved["val"])
    assert want["loss"] != pytest.approx(want_val["loss"])  # a policy moved off the reference
    for name, value in want.items():
        assert step_2[name] == pytest.approx(value.item(), rel=1e-4, abs=1e-5), name
        assert validation[f"val_{name}"] == pytest.approx(want_val[name].item(), rel=1e-4, abs=1e-5), name


def test_a_reward_run_logs_the_reference_formula_of_its_model(toy, tmp_path):
    """A reward model with centering: step 2's loss and metrics (the step-1 checkpoint's scores of step 2's pairs)
    and the validation's (step 2's scores) equal RewardTrainer's formula on each sequence scored alone."""
    from retnet.model import RetNetForSequenceClassification

    out = tmp_path / "run"
    assert main(run_args(toy, out, reward__enabled="true", reward__center_rewards_coefficient=0.1)) == 0
    data, steps = preference_pairs(toy)

    def expected(step, pairs, ids):
        model = checkpointed(RetNetForSequenceClassification, toy, out, step, num_labels=1, dropout=0.0)
        with torch.no_grad():
            scores = torch.tensor([[model(input_ids=torch.from_numpy(np.concatenate(
                [pairs.parts(i)[0], pairs.parts(i)[side]]).astype(np.int64))[None]).logits[0, 0].double().item()
                for side in (1, 2)] for i in ids], dtype=torch.float64)
        chosen, rejected = scores.unbind(1)
        return {"loss": trl_reward_loss(chosen, rejected, 0.1, None), "accuracy": (chosen > rejected).double().mean(),
                "margin": (chosen - rejected).mean(), "rewards/chosen": chosen.mean(),
                "rewards/rejected": rejected.mean()}

    step_2 = next(r for r in metrics(out) if r["step"] == 2)
    validation = next(r for r in metrics(out, "val") if r["step"] == 2)
    for name, value in expected(1, data.train, steps[1]).items():
        assert step_2[name] == pytest.approx(value.item(), rel=1e-4, abs=1e-5), name
    for name, value in expected(2, data.val, np.arange(len(data.val))).items():
        assert validation[f"val_{name}"] == pytest.approx(value.item(), rel=1e-4, abs=1e-5), name


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_a_grpo_run_logs_the_reference_formula_of_its_model(toy, tmp_path, monkeypatch, loss_type):
    """Two steps on one generation (num_iterations 2), a KL term, the batch's std, truncated completions masked
    and a tight clip: step 1 (ρ 1, the policy the reference) and step 2 (ρ the step-1 checkpoint's to init_from's
    log-probs) log TRL's loss, KL and clip ratios computed from the recorded completions and rewards, and the
    generation's reward metrics."""
    from transformers import AutoTokenizer

    from retnet.model import RetNetForCausalLM

    out, recorded, stopping = tmp_path / "run", tmp_path / "rewards.jsonl", tmp_path / "base"
    monkeypatch.setenv("LOSS_MATH_REWARDS", str(recorded))
    # the micro model's weights, but a seventh of the ids stop a completion (generation_config's eos_token_id list):
    # completions that finish and ones that are truncated, which are masked
    shutil.copytree(toy / "base", stopping)
    generation = json.loads((stopping / "generation_config.json").read_text())
    stops = sorted({generation["eos_token_id"], *range(7, 300, 7)})
    (stopping / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": stops}))
    settings = dict(data__format="prompts", data__dataset=toy / "prompts.jsonl", data__val_fraction=0.2,
                    grpo__reward_funcs="loss_math_rewards:parity", grpo__num_generations=4,
                    grpo__max_completion_length=5, grpo__beta=0.1, grpo__num_iterations=2, grpo__epsilon=0.02,
                    grpo__epsilon_high=0.05, grpo__scale_rewards="batch", grpo__mask_truncated_completions="true",
                    model__init_from=stopping,
                    grpo__loss_type=loss_type, train__global_batch_size=8, train__micro_batch_size=4,
                    train__eval_blocks=1, optim__lr=0.1)
    assert main(run_args(toy, out, **{k: str(v) for k, v in settings.items()})) == 0
    calls = [json.loads(line) for line in recorded.read_text().splitlines()]
    (generation,) = [call for call in calls if len(call["ids"]) == 8]  # evaluations sample 1 prompt × 4
    tokenizer = AutoTokenizer.from_pretrained(toy / "base")
    prompts = [np.asarray(tokenizer(p, add_special_tokens=False).input_ids) for p in generation["prompts"]]
    completions = [np.asarray(ids) for ids in generation["ids"]]
    lengths = [len(ids) for ids in completions]
    active = [int(ids[-1]) in stops for ids in completions]  # the others were truncated
    assert 0 < sum(active) < len(active)
    rewards = torch.tensor(generation["rewards"], dtype=torch.float32)
    advantage, std, zero = trl_advantages(rewards, 4, "batch")
    mask = padded(torch.cat([torch.full((n,), float(a)) for n, a in zip(lengths, active)]), lengths)
    cfg = GrpoConfig(loss_type=loss_type, beta=0.1, epsilon=0.02, epsilon_high=0.05, max_completion_length=5)
    base, moved = checkpointed(RetNetForCausalLM, toy, out, 0), checkpointed(RetNetForCausalLM, toy, out, 1)
    reference = padded(torch.cat([token_logps(base, p, c) for p, c in zip(prompts, completions)]), lengths)
    policy = padded(torch.cat([token_logps(moved, p, c) for p, c in zip(prompts, completions)]), lengths)
    tokens = float(sum(n for n, a in zip(lengths, active) if a))
    records = {r["step"]: r for r in metrics(out)}
    every_token = float(sum(lengths))  # dapo's normaliser, TRL's num_items_in_batch: counted before the masking
    expected = {1: trl_grpo(reference, None, reference, advantage, mask, cfg, 8.0, every_token),
                2: trl_grpo(policy, reference, reference, advantage, mask, cfg, 8.0, every_token)}
    assert abs(expected[2][0] - expected[1][0]) > 1e-4 and expected[2][2][2] > 0  # moved, and clipped
    for step, (loss, kl, clipped) in expected.items():
        record = records[step]
        assert record["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6), step
        assert record["kl"] == pytest.approx(kl.item() / max(tokens, 1.0), rel=1e-3, abs=1e-6), step
        for name, count in zip(("low_mean", "high_mean", "region_mean"), clipped.tolist()):
            assert record[f"clip_ratio/{name}"] == pytest.approx(count / max(tokens, 1.0), abs=1e-6), (step, name)
    first = records[1]
    assert first["reward"] == pytest.approx(rewards.double().mean().item(), rel=1e-6)
    assert first["reward_std"] == pytest.approx(std.mean().item(), rel=1e-5)
    assert first["frac_reward_zero_std"] == pytest.approx(zero.double().mean().item())
    assert first["completions/mean_length"] == pytest.approx(float(np.mean(lengths)))
    assert first["completions/clipped_ratio"] == pytest.approx(1 - float(np.mean(active)))
    assert "reward" not in records[2]  # a step on an earlier generation samples none (TRL's)
    # the final evaluation: the step-2 model on its own completions (ρ 1), the KL to init_from's
    evaluation = [call for call in calls if len(call["ids"]) == 4][-1]
    prompts = [np.asarray(tokenizer(p, add_special_tokens=False).input_ids) for p in evaluation["prompts"]]
    completions = [np.asarray(ids) for ids in evaluation["ids"]]
    lengths = [len(ids) for ids in completions]
    rewards = torch.tensor(evaluation["rewards"], dtype=torch.float32)
    advantage, std, _ = trl_advantages(rewards, 4, "batch")
    final = checkpointed(RetNetForCausalLM, toy, out, 2)
    policy = padded(torch.cat([token_logps(final, p, c) for p, c in zip(prompts, completions)]), lengths)
    reference = padded(torch.cat([token_logps(base, p, c) for p, c in zip(prompts, completions)]), lengths)
    active = [int(ids[-1]) in stops for ids in completions]
    mask = padded(torch.cat([torch.full((n,), float(a)) for n, a in zip(lengths, active)]), lengths)
    tokens = float(sum(n for n, a in zip(lengths, active) if a))
    loss, kl, _ = trl_grpo(policy, None, reference, advantage, mask, cfg, 4.0, float(sum(lengths)))
    validation = next(r for r in metrics(out, "val") if r["step"] == 2)
    assert validation["val_loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
    assert validation["val_kl"] == pytest.approx(kl.item() / max(tokens, 1.0), rel=1e-3, abs=1e-6)
    assert validation["val_reward"] == pytest.approx(rewards.double().mean().item(), rel=1e-6)
    assert validation["val_reward_std"] == pytest.approx(std.mean().item(), rel=1e-5)
