"""GRPO (``data.format = "prompts"``): a run that learns a reward, the loss and advantage formulas by hand, the
seeded sampler, exact resume, two gloo ranks against one process (DDP, FSDP2, and context parallelism splitting
each row), several steps on a generation (``num_iterations``) and a resume between them, LoRA's adapters-disabled
reference, the reward model source scoring as the reward trainer does, conversational prompts, and the refusals."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.checkpoint import load_checkpoint
from retnet.train.config import ConfigError, GrpoConfig, build_config, grpo_changes
from retnet.train.grpo import (
    SUMS,
    GrpoBatch,
    RewardSources,
    Totals,
    advantages,
    batch_std,
    clipped_tokens,
    grpo_loss,
    pack,
    reward_values,
    token_logps,
    unscored_warning,
)
from retnet.train.grpo_sampling import gathered_weights, sample, stop_tokens, uniforms

from .conftest import metrics, one_thread, run_train_many, save_micro_base

# A reward the micro model learns in a few steps: the share of "a" in the completion's text.
TOY_REWARDS = '''
CALLS = []

def a_share(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [t.count("a") / max(len(t), 1) for t in texts]

def record(prompts, completions, completion_ids, **columns):
    CALLS.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns})
    return [None if i % 2 else 1.0 for i in range(len(completions))]

def popper(prompts, completions, solution, **kwargs):
    """Changes what it gets, as TRL's examples do: the prompts' last messages, the columns."""
    CALLS.append({"prompts": [p if isinstance(p, str) else list(p) for p in prompts], "completions": completions,
                  "same": [a is b for a, b in zip(prompts, prompts[1:])]})
    for prompt, answer in zip(prompts, solution):
        if not isinstance(prompt, str):
            prompt.pop()
        if isinstance(answer, list):
            answer.append("changed")
    return [0.5] * len(completions)

def exact_match(completions, **kwargs):  # a built-in's name: refused beside it
    return [0.0] * len(completions)

def as_numpy(completions, **kwargs):
    import numpy
    return numpy.full(len(completions), 0.25)

def one_short(completions, **kwargs):
    import numpy
    return numpy.zeros(len(completions) - 1)
'''
PROMPTS = 40
STEPS = 16
STRIP = ("time", "tokens_per_s")


@pytest.fixture(scope="module", autouse=True)
def _as_launched_ranks_compute():
    """Every run here on one thread, as the launched ranks compared to them and the resumes compared bit for bit
    (:func:`~tests.train.conftest.one_thread`)."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """prompts.jsonl (standard, with a ``solution`` column), conv.jsonl (conversational), prefill.jsonl (ending
    with an assistant message, a list column), toy_rewards.py on the path (this process's and the runs'), and base/: a random-init micro RetNet with a BPE trained on the rows."""
    from retnet.tokenization import train_byte_level_bpe

    root = tmp_path_factory.mktemp("grpo")
    rows = [{"prompt": f"Say a word {i}:", "solution": "aaa"} for i in range(PROMPTS)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    conv = [{"prompt": [{"role": "user", "content": f"Say a word {i}"}], "solution": "aaa"} for i in range(PROMPTS)]
    (root / "conv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conv))
    prefill = [{"prompt": [{"role": "user", "content": f"Say a word {i}"}, {"role": "assistant", "content": "<a>"}],
                "solution": ["aaa"]} for i in range(PROMPTS)]
    (root / "prefill.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefill))
    (root / "toy_rewards.py").write_text(TOY_REWARDS)
    tokenizer = train_byte_level_bpe([r["prompt"] + " aaa bbb" for r in rows], vocab_size=300)
    save_micro_base(root / "base", tokenizer)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        patch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
        yield root
    sys.modules.pop("toy_rewards", None)


def grpo_args(toy: Path, out: Path, **overrides) -> list[str]:
    """CLI arguments of a GRPO run of the micro base on the toy prompts (``section__key`` overrides): 4 prompts ×
    4 generations a step, micro 8 × accum 2, a KL term against the frozen init_from model, a constant rate (a
    shorter run's records are a prefix)."""
    values = {
        "model.init_from": toy / "base", "data.format": "prompts", "data.dataset": toy / "prompts.jsonl",
        "data.val_fraction": 0.1, "data.cache_dir": toy / "cache", "train.output_dir": out,
        "grpo.reward_funcs": "toy_rewards:a_share", "grpo.num_generations": 4, "grpo.max_completion_length": 8,
        "grpo.beta": 0.02,
        # a seed of typical learning: over 16 steps seeds 0-5 end between 0.3 and 1.0 mean reward, 1337 at 0.16
        "train.seed": 3,
        "train.steps": STEPS, "train.global_batch_size": 16, "train.micro_batch_size": 8, "train.eval_interval": 8,
        "train.eval_blocks": 4, "optim.lr": 3e-2, "optim.warmup_steps": 1, "optim.schedule": "constant",
        "checkpoint.interval": 8, "checkpoint.export": False, "logging.progress": False,
        "logging.tensorboard": False, "logging.log_interval": 1,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return ["--config", "tiny", *[f"--{k}={v}" for k, v in values.items()]]


def strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in STRIP} for r in records]


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """The 16-step run (checkpoints at 8 and 16, exported): its output directory."""
    out = tmp_path_factory.mktemp("grpo-run") / "run"
    assert main(grpo_args(toy, out, checkpoint__export=True)) == 0
    return out


def base_model(toy: Path):
    from retnet.model import RetNetForCausalLM

    return RetNetForCausalLM.from_pretrained(toy / "base").eval()


def tokenizer_of(toy: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy / "base")


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------
def test_a_run_learns_the_reward(trained):
    """The mean reward rises clearly; the records carry TRL's metric names; the KL to the reference (the frozen
    init_from model) is 0 at the first step, then grows; validation at 0, 8 and 16; exported."""
    train, val = metrics(trained), metrics(trained, "val")
    rewards = [r["reward"] for r in train]
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.15, rewards
    assert val[-1]["val_reward"] > val[0]["val_reward"] + 0.15, val
    assert [r["step"] for r in val] == [0, 8, 16]
    names = {"reward", "reward_std", "rewards/a_share/mean", "completions/mean_length", "completions/clipped_ratio",
             "frac_reward_zero_std", "kl"}
    assert names <= set(train[0])
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-7) and train[-1]["kl"] > 1e-4, [r["kl"] for r in train]
    assert {f"val_{name}" for name in names} | {"val_loss"} <= set(val[0])
    assert all(r["rewards/a_share/mean"] == pytest.approx(r["reward"]) for r in train)  # one source, weight 1
    assert all(0 < r["completions/mean_length"] <= 8 and 0 <= r["completions/clipped_ratio"] <= 1 for r in train)
    assert (trained / "export" / "model.safetensors").is_file()


def test_a_resume_retraces_the_run(trained, toy, tmp_path):
    """From the step-8 checkpoint the records (losses, rewards, validation) are the uninterrupted run's bit for
    bit: the data position, the sampler's step and the log window are in the checkpoint."""
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000016")
    assert main(grpo_args(toy, copy, checkpoint__export=True)) == 0
    for kind in ("train", "val"):
        assert strip(metrics(copy, kind)) == strip(metrics(trained, kind))


def test_a_resume_with_other_grpo_settings_is_refused(trained, toy, tmp_path, capsys):
    now = build_config({"data": {"format": "prompts", "dataset": "p.jsonl"}, "model": {"init_from": str(toy / "base")},
                        "grpo": {"reward_funcs": ["toy_rewards:a_share"], "num_generations": 4, "beta": 0.1},
                        "train": {"global_batch_size": 16, "micro_batch_size": 8}})
    saved = json.loads((trained / "config.json").read_text())
    assert grpo_changes(saved, now) == ["grpo.max_completion_length: checkpoint 8, now 256",
                                        "grpo.beta: checkpoint 0.02, now 0.1"]
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    capsys.readouterr()
    assert main(grpo_args(toy, copy, train__steps=20, grpo__temperature=0.7)) == EXIT_CONFIG
    assert "other GRPO settings: grpo.temperature: checkpoint 1.0, now 0.7" in capsys.readouterr().err


ITERATED = {"train__steps": 6, "checkpoint__interval": 4, "grpo__num_iterations": 3, "grpo__epsilon_high": 0.28,
            "train__eval_interval": 6}
CLIP = ("clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_mean", "clip_ratio/high_max",
        "clip_ratio/region_mean")


@pytest.fixture(scope="module")
def two_gloo_ranks(toy, stopping, tmp_path_factory):
    """The module's 2-rank runs, one after another in one torchrun launch (a rank's start, importing torch and
    transformers, dwarfs these runs): the DDP run of test_two_gloo_ranks_match_one_process, the FSDP2 run of
    test_fsdp_matches_one_process_and_resumes_within_a_generation, then that run resumed from its step-4
    checkpoint (within the generation of step 3) into another directory, and the context-parallel run of
    test_ranks_splitting_each_row_log_the_grpo_records_of_one_process. ``{name: (output directory, run)}``."""
    root = tmp_path_factory.mktemp("grpo-two-ranks")
    ddp, fsdp, resumed, split = root / "ddp", root / "fsdp", root / "resumed", root / "context-parallel"
    runs = {
        "ddp": (ddp, grpo_args(toy, ddp, train__steps=4, checkpoint__interval=0)),
        "fsdp": (fsdp, grpo_args(toy, fsdp, **ITERATED, train__parallelism="fsdp")),
        "resumed": (resumed, grpo_args(toy, resumed, **ITERATED, train__parallelism="fsdp",
                                       train__resume=fsdp / "checkpoints" / "step_00000004")),
        "context-parallel": (split, grpo_args(toy, split, **DAPO, model__init_from=stopping,
                                              train__context_parallel=2)),
    }
    done = run_train_many([args for _, args in runs.values()], nproc=2, out=root / "launch")
    return {name: (out, run) for (name, (out, _)), run in zip(runs.items(), done, strict=True)}


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(trained, two_gloo_ranks):
    """DDP, micro 8 × accum 1 × 2 ranks (2 groups each): the same completions (sampled per group, not per rank),
    rewards, losses and gradient norms (a wrong normalization would scale them) as the one-process run's first
    steps (micro 8 × accum 2). The run is one of the module's 2-rank launch (two_gloo_ranks)."""
    ddp, done = two_gloo_ranks["ddp"]
    assert done.returncode == 0, done.stderr + done.stdout
    assert "world 2 × micro 8 × accum 1" in done.stderr and "(2 groups per rank)" in done.stderr
    one, two = metrics(trained)[:4], metrics(ddp)
    assert len(two) == 4
    for key in ("loss", "grad_norm", "reward", "reward_std", "completions/mean_length", "frac_reward_zero_std", "kl"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=2e-3, abs=1e-6), key
    assert metrics(ddp, "val")[0]["val_reward"] == pytest.approx(metrics(trained, "val")[0]["val_reward"], rel=1e-5)


@pytest.fixture(scope="module")
def iterated(toy, tmp_path_factory):
    """6 steps of grpo.num_iterations 3 (two generations, at steps 0 and 3), checkpoints at 4 (the second step on
    the generation of step 3) and 6: its output directory."""
    out = tmp_path_factory.mktemp("grpo-iterated") / "run"
    assert main(grpo_args(toy, out, **ITERATED)) == 0
    return out


def test_num_iterations_steps_on_each_generation_and_resumes_within_one(iterated, trained, toy, tmp_path):
    """μ 3: the generation metrics at its first step only (steps 1 and 4), the loss, KL and TRL's clip ratios at
    every step; the first step is the μ-1 run's bit for bit (the same sampler seed, a ratio of exactly 1: its
    training forward's log-probs are the old ones); the data position counts
    generations. The step-4 checkpoint holds the generation of step 3 (its old and reference log-probs), and a
    resume from it retraces the uninterrupted run bit for bit."""
    train = metrics(iterated)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [("reward" in r) for r in train] == [True, False, False, True, False, False]
    assert all(set(CLIP) | {"loss", "kl"} <= set(r) for r in train)
    first = metrics(trained)[0]
    same = ("reward", "loss", "grad_norm")
    assert [train[0][k] for k in same] == [first[k] for k in same]
    assert all(train[0][name] == 0.0 for name in CLIP)  # the policy is the sampling one: a ratio of 1
    assert max(r["clip_ratio/region_mean"] for r in train) > 0, train  # lr 3e-2 moves it out of [0.8, 1.28]
    for r in train:  # one rank: its share is the mean; region is low or high
        assert r["clip_ratio/low_min"] == pytest.approx(r["clip_ratio/low_mean"])
        assert r["clip_ratio/high_max"] == pytest.approx(r["clip_ratio/high_mean"])
        assert r["clip_ratio/region_mean"] == pytest.approx(r["clip_ratio/low_mean"] + r["clip_ratio/high_mean"])
    state = torch.load(iterated / "checkpoints" / "step_00000004" / "trainer.pt", weights_only=False)
    data = state["ranks"][0]["data"]
    assert data["consumed"] == 8 and data["steps"] == 4 and data["generation"]["step"] == 3
    saved = data["generation"]
    assert len(saved["lengths"]) == 16 and len(saved["old"]) == len(saved["reference"]) == saved["lengths"].sum()
    final = torch.load(iterated / "checkpoints" / "step_00000006" / "trainer.pt", weights_only=False)
    assert "generation" not in final["ranks"][0]["data"]  # all 3 steps taken: nothing left to resume
    copy = tmp_path / "copy"
    shutil.copytree(iterated, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000006")
    assert main(grpo_args(toy, copy, **ITERATED)) == 0
    for kind in ("train", "val"):
        assert strip(metrics(copy, kind)) == strip(metrics(iterated, kind))
    resumed, whole = (load_checkpoint(run / "checkpoints" / "step_00000006")["model"] for run in (copy, iterated))
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)


def test_a_resume_within_a_generation_on_other_ranks_is_refused(iterated):
    """Each rank holds its share of the generation: the step-4 checkpoint of one process cannot resume on two."""
    from retnet.train.grpo import GrpoData

    state = torch.load(iterated / "checkpoints" / "step_00000004" / "trainer.pt", weights_only=False)
    data = GrpoData.__new__(GrpoData)
    data.world_size = 2
    with pytest.raises(ConfigError, match=r"within the grpo.num_iterations steps on the generation of step 3, "
                                          r"which its 1 data-parallel rank\(s\) hold one share each: resume it with 1 "
                                          r"data-parallel rank\(s\) \(world size / train.tensor_parallel\)"):
        data.load_state_dict(state["ranks"][0]["data"])


def test_a_resume_within_a_generation_with_another_global_batch_is_refused(iterated, toy, tmp_path, capsys):
    """The generation's completions were sampled for the checkpoint's global batch and their loss normalized
    over it: a resume within it with another train.global_batch_size is refused by name (it stopped on an assert
    at the next step, and under python -O DDP would not have synchronized the gradients)."""
    copy = tmp_path / "copy"
    shutil.copytree(iterated, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000006")
    capsys.readouterr()
    assert main(grpo_args(toy, copy, **{**ITERATED, "train__global_batch_size": 32})) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert ("at GRPO step 4 is within the grpo.num_iterations steps on the generation of step 3, sampled with "
            "train.global_batch_size 16; this run has train.global_batch_size 32: resume it with "
            "train.global_batch_size=16, or from a checkpoint between generations") in err, err
    assert "Traceback" not in err


def test_a_resume_within_a_generation_with_another_micro_batch_retraces_the_run(iterated, toy, tmp_path):
    """The generation is kept whole (its completions, advantages, old and reference log-probs, the global
    batch's totals): a resume within it with micro 4 × accum 4 (the run's: 8 × 2) regroups it and retraces the
    run, to float rounding (the micro-batches' losses add up in another order); validation samples alike."""
    copy = tmp_path / "copy"
    shutil.copytree(iterated, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000006")
    assert main(grpo_args(toy, copy, **{**ITERATED, "train__micro_batch_size": 4})) == 0
    for kind in ("train", "val"):
        resumed, whole = strip(metrics(copy, kind)), strip(metrics(iterated, kind))
        assert [sorted(r) for r in resumed] == [sorted(r) for r in whole]
        for got, expected in zip(resumed, whole, strict=True):
            # ~1e-6 relative apart here (the loss, KL), the gradient norm up to 1.1e-5 (measured with transformers
            # 5.25: the micro-batches' gradients add up in another order). Validation samples with those weights,
            # ~1e-7 apart: a token may flip (in a CI run: val_loss 3.7e-3 relative apart), so its figures are
            # compared to 1e-2.
            rel = 3e-5 if kind == "train" else 1e-2
            for key, value in expected.items():
                close = isinstance(value, float) and got[key] == pytest.approx(value, rel=rel, abs=1e-7)
                assert close or got[key] == value, (kind, key, got[key], value)


def test_the_old_policy_is_the_first_steps_training_forward(toy, tmp_path, monkeypatch):
    """With dropout (model.dropout 0.3) and μ 2 the old log-probs are those of the generation's first step's
    training forwards (train mode, before its update, as TRL's), one per micro-batch (accum 2): that step's ρ is
    exactly 1, so its loss and gradient norm are the μ-1 run's bit for bit and no token is clipped (old from an
    eval-mode forward made ρ ≠ 1). The checkpoint at step 1 (taken after that step's update) holds them, and a
    resume from it retraces step 2 bit for bit."""
    from retnet.train import grpo

    settings = dict(model__dropout=0.3, train__steps=2, train__eval_interval=0, checkpoint__interval=1)
    assert main(grpo_args(toy, tmp_path / "one", **settings)) == 0
    forwards, real = [], grpo.token_logps

    def recording(model, batch, temperature=1.0):
        out = real(model, batch, temperature)
        if out.requires_grad:  # the training forwards (the reference's and evaluation's take no gradient)
            forwards.append(out.detach().clone())
        return out

    monkeypatch.setattr(grpo, "token_logps", recording)
    two = tmp_path / "two"
    assert main(grpo_args(toy, two, grpo__num_iterations=2, **settings)) == 0
    once, iterated = metrics(tmp_path / "one")[0], metrics(two)
    same = ("reward", "loss", "grad_norm")
    assert [iterated[0][k] for k in same] == [once[k] for k in same]
    assert all(iterated[0][name] == 0.0 for name in CLIP)
    assert len(forwards) == 4  # 2 steps × 2 micro-batches, none added for the old log-probs
    saved = torch.load(two / "checkpoints" / "step_00000001" / "trainer.pt", weights_only=False)
    generation = saved["ranks"][0]["data"]["generation"]
    assert generation["step"] == 0 and torch.equal(generation["old"], torch.cat(forwards[:2]))
    assert not torch.equal(forwards[0], forwards[2])  # step 2's forward: the updated policy, other dropout
    copy = tmp_path / "copy"
    shutil.copytree(two, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000002")
    assert main(grpo_args(toy, copy, grpo__num_iterations=2, **settings)) == 0
    assert strip(metrics(copy)) == strip(iterated)


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_within_a_generation(iterated, two_gloo_ranks):
    """FSDP2 on two gloo ranks (the policy and the frozen reference sharded per layer; each rank decodes until
    every rank's rows are done), μ 3: the rewards, losses, KL and clip ratios of the one-process run (to 2e-3
    relative, as DDP); and a resume of its step-4 checkpoint, within the generation of step 3, retraces it. Both
    runs are of the module's 2-rank launch (two_gloo_ranks): the resume, into another directory, records steps 5
    and 6 and the evaluation at 6, compared with the whole run's."""
    fsdp, done = two_gloo_ranks["fsdp"]
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    assert "reference: model.init_from's weights, frozen" in done.stderr and ", sharded" in done.stderr
    one, two = metrics(iterated), metrics(fsdp)
    assert len(two) == 6
    for key in ("loss", "grad_norm", "kl", *CLIP[::2]):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=2e-3, abs=1e-6), key
    # the extremes of the two ranks' shares, whose token-weighted mean is the batch's
    assert all(r["clip_ratio/low_min"] <= r["clip_ratio/low_mean"] + 1e-7 and
               r["clip_ratio/high_max"] >= r["clip_ratio/high_mean"] - 1e-7 for r in two), two
    for key in ("reward", "reward_std", "completions/mean_length", "frac_reward_zero_std"):
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in one if key in r], rel=1e-5), key
    assert [("reward" in r) for r in two] == [("reward" in r) for r in one]
    # at step 0 only: later, weights ~1e-4 apart can flip a sampled token (the draw is discrete)
    assert metrics(fsdp, "val")[0]["val_reward"] == pytest.approx(metrics(iterated, "val")[0]["val_reward"], rel=1e-5)
    resumed, done = two_gloo_ranks["resumed"]
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    assert "at step 4" in done.stderr
    for kind in ("train", "val"):
        after = [r for r in strip(metrics(fsdp, kind)) if r["step"] > 4]
        assert after and strip(metrics(resumed, kind)) == after


# ----------------------------------------------------------------------------------------------------------
# Context parallelism (train.context_parallel) on GRPO: 2 ranks, a run of the module's 2-rank launch (2 pieces × 2
# tensor-parallel slices on 4 ranks: test_context_parallel_grpo_paths.py, which takes these settings)
# ----------------------------------------------------------------------------------------------------------
# Two steps on each generation (sampled for steps 1 and 3; steps 2 and 4 train with a ratio off 1), a KL term,
# validation at steps 0 and 4 of 3 prompts (the second piece samples the third and a padding copy of it), a
# checkpoint at every step (steps 1 and 3 within a generation). AdamW's eps raised: a step of eps 1e-8 takes a gradient component near 0 to about ±lr whatever its size, so the split's other summation order
# moved a few weights by 5e-5 after two steps, and the next generation drew another token (rounding amplified into
# a discrete draw); a component below 1e-5 now moves in proportion to it.
COMMON = {"train__steps": 4, "grpo__num_iterations": 2, "grpo__beta": 0.05, "grpo__epsilon_high": 0.28,
          "train__eval_interval": 4, "checkpoint__interval": 1, "checkpoint__keep_last": 4,
          "optim__eps": 1e-5, "train__eval_blocks": 3}
# A per-token normalization (over the global batch's unmasked completion tokens) with GSPO's sequence-level ratio,
# whose mean log ratio runs over both pieces of a completion the cut falls in
DAPO = {**COMMON, "grpo__loss_type": "dapo", "grpo__importance_sampling_level": "sequence",
        "grpo__mask_truncated_completions": "true",
        "train__seed": 2}  # a seed whose completions some 2-rank micro-batch cuts inside (the test needs one)
METRICS = ("loss", "grad_norm", "kl", "reward", "reward_std", "rewards/a_share/mean", "completions/mean_length",
           "completions/clipped_ratio", "frac_reward_zero_std", "clip_ratio/low_mean", "clip_ratio/low_min",
           "clip_ratio/high_mean", "clip_ratio/high_max", "clip_ratio/region_mean")


def assert_grpo_records_match(expected, got, kind: str, steps: set[int], rel: float) -> None:
    """The ``kind`` records of ``got`` at ``steps`` are ``expected``'s to ``rel``: every metric of them, present in
    the same records (a generation's metrics at its first step only)."""
    names = METRICS if kind == "train" else ["val_loss", *(f"val_{m}" for m in METRICS)]
    one = [r for r in metrics(expected, kind) if r["step"] in steps]
    two = [r for r in metrics(got, kind) if r["step"] in steps]
    assert [r["step"] for r in two] == [r["step"] for r in one] == sorted(steps)
    for name in names:
        assert [name in r for r in two] == [name in r for r in one], (kind, name)
        values = [r[name] for r in one if name in r]
        assert [r[name] for r in two if name in r] == pytest.approx(values, rel=rel, abs=1e-7), (kind, name)


def cuts_inside_a_completion(toy, run) -> int:
    """How many of the micro-batches (of 8) of the generations a run's step-1 and step-3 checkpoints hold have their
    row's halfway point, where the two pieces split it, strictly inside a completion (the prompt and the
    completion's first tokens on the first piece, its last tokens on the second)."""
    inside, train = 0, prompts_data(toy).train
    for step in (1, 3):
        saved = torch.load(run / "checkpoints" / f"step_{step:08d}" / "trainer.pt", weights_only=False)
        generation = saved["ranks"][0]["data"]["generation"]
        prompts = [len(train.tokens[row]) for row in generation["rows"]]
        for lo in range(0, len(prompts), 8):
            sequences = list(zip(prompts[lo:lo + 8], generation["lengths"][lo:lo + 8], strict=True))
            starts = np.cumsum([0, *(prompt + length for prompt, length in sequences)])
            cut = -(-starts[-1] // 2)  # (a row of odd length padded)
            inside += any(start + prompt < cut < start + prompt + length
                          for start, (prompt, length) in zip(starts, sequences, strict=False))
    return inside


@pytest.fixture(scope="module")
def stopping(toy):
    """The toy base, whose ``generation_config`` stops a completion at every fourth id too: the random model then
    ends most completions within their 8 tokens, at lengths of all sorts (at its EOS alone it runs every one to 8,
    the rows of equal sequences, which two pieces cut between two of them), and masks some (the truncated ones)."""
    from transformers import GenerationConfig

    base = toy / "stopping"
    shutil.copytree(toy / "base", base)
    GenerationConfig(eos_token_id=list(range(0, 300, 4))).save_pretrained(base)
    return base


@pytest.fixture(scope="module")
def dapo_alone(toy, stopping, tmp_path_factory):
    """The one-process DAPO run (on one thread, as each rank computes: _as_launched_ranks_compute): its output
    dir."""
    out = tmp_path_factory.mktemp("grpo-alone") / "dapo"
    assert main(grpo_args(toy, out, **DAPO, model__init_from=stopping)) == 0
    return out


@pytest.mark.slow
def test_ranks_splitting_each_row_log_the_grpo_records_of_one_process(toy, dapo_alone, two_gloo_ranks):
    """dapo with GSPO's ratio on 2 ranks of one context-parallel group (each sampling half of its prompts, then
    every completion's row split along time for the policy, reference and old-policy passes): the same
    completions, rewards, losses, KL, clip ratios and gradient norms as one process (each rank sampled half of the
    prompts, then every rank holds them all; each metric counted once a group, each rank's loss its half), the rows
    of some micro-batches cut inside a completion; a checkpoint within a generation holds the one process's (the
    same completions, old and reference log-probs). Counting the metrics or the loss on both ranks, or leaving out
    the sum of the pieces' log-probs, moves them by far more than the tolerance. The run is one of the module's
    2-rank launch (two_gloo_ranks)."""
    split, done = two_gloo_ranks["context-parallel"]
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    assert "world 2 / context parallel 2 = 1 data-parallel groups × micro 8 × accum 2" in done.stderr
    assert cuts_inside_a_completion(toy, split) > 0
    # The first generation's steps (the weights 3e-7 apart at step 2) and the validation at step 0: measured 6e-7.
    # Then, the same completions drawn again: the weights' drift (AdamW's steps normalized) moves the gradient norm
    # and the KL by up to 4e-5 at step 4 (as test_context_parallel_preference_paths.py's gradient norms, 1e-4).
    assert_grpo_records_match(dapo_alone, split, "train", {1, 2}, rel=1e-5)
    assert_grpo_records_match(dapo_alone, split, "val", {0}, rel=1e-5)
    # (2e-3: on another machine's CPU kernels, 2026-12-07, step 4's gradient norm was 7e-4 rel apart)
    assert_grpo_records_match(dapo_alone, split, "train", {3, 4}, rel=2e-3)
    assert_grpo_records_match(dapo_alone, split, "val", {4}, rel=2e-3)
    assert max(r["clip_ratio/region_mean"] for r in metrics(split)) > 0  # the ratio left the clip's region
    ours, theirs = (torch.load(run / "checkpoints" / "step_00000003" / "trainer.pt", weights_only=False)
                    ["ranks"][0]["data"]["generation"] for run in (split, dapo_alone))
    assert np.array_equal(ours["completions"], theirs["completions"])
    for name in ("old", "reference"):
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's read of it
def test_lora_with_a_kl_term_under_fsdp_follows_one_process(toy, tmp_path):
    """LoRA, beta > 0 (the reference: the sharded policy with its adapters disabled) and μ 2 under FSDP2 (here in
    this process, a gloo group of one rank) give the one-process run's rewards, losses and KL."""
    from .conftest import train_fsdp_in_process

    settings = dict(train__steps=4, train__eval_interval=0, checkpoint__interval=0, lora__rank=4, lora__alpha=8,
                    optim__lr=5e-2, optim__weight_decay=0.0, grpo__beta=0.1, grpo__num_iterations=2)
    assert main(grpo_args(toy, tmp_path / "one", **settings)) == 0
    train_fsdp_in_process(grpo_args(toy, tmp_path / "fsdp", **settings)[2:], resumed_step=0)
    one, fsdp = metrics(tmp_path / "one"), metrics(tmp_path / "fsdp")
    assert one[0]["kl"] == pytest.approx(0.0, abs=1e-7) and one[-1]["kl"] > 1e-6, one
    assert [r.get("reward") for r in fsdp] == [r.get("reward") for r in one]
    for key in ("loss", "kl", "clip_ratio/region_mean"):
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-8), key


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's read of it
def test_lora_with_a_kl_term_uses_the_adapters_disabled_reference(toy, tmp_path):
    """With LoRA and beta > 0 the reference is the policy with its adapters disabled: equal to the base model's
    log-probs (a fresh load of model.init_from), not the trained policy's; the KL starts at 0 and grows."""
    from retnet.train.config import load_config
    from retnet.train.trainer import Trainer

    out = tmp_path / "lora"
    args = grpo_args(toy, out, train__steps=3, train__eval_interval=0, checkpoint__interval=0, lora__rank=4,
                     lora__alpha=8, optim__lr=5e-2, optim__weight_decay=0.0, grpo__beta=0.1)
    trainer = Trainer(load_config("tiny", args[2:]))
    try:
        trainer.train()
        records = metrics(out)
        assert records[0]["kl"] == pytest.approx(0.0, abs=1e-7) and records[-1]["kl"] > 1e-6, records
        data = trainer.data
        assert data.reference is None
        assert data.stops == [tokenizer_of(toy).eos_token_id]  # the toy's generation config adds no other
        # MFU: the FLOPs per token are those of the longest prompt + completion, known before start() ran
        from retnet.train.flops import flops_per_token

        assert data.seq_len == data.longest_prompt + 8 == data.sequence_length(trainer.cfg.grpo)
        assert trainer.flops_per_token == flops_per_token(trainer.model_config, data.seq_len, trainer.n_trainable)
        assert trainer.flops_per_token != flops_per_token(trainer.model_config, data.longest_prompt,
                                                          trainer.n_trainable)
        batch = pack([data.train.tokens[i] for i in (0, 1)], [np.array([5, 6, 7]), np.array([8, 9])],
                     torch.zeros(2))
        with torch.no_grad():
            reference = data._reference_logps(batch)
            base = token_logps(base_model(toy), batch)
            policy = token_logps(trainer.raw_model.eval(), batch)
        torch.testing.assert_close(reference, base, rtol=1e-5, atol=1e-5)
        assert (policy - base).abs().max() > 1e-4  # the adapters moved
        # The trainer's accumulation (each micro-batch's loss / accum) gives the gradient and value of the global
        # batch's loss, the sum of the micro-batches' shares of it.
        trainer.raw_model.train()
        batches = data.micro_batches(trainer.accum)
        assert len(batches) == trainer.accum == 2
        params = [p for p in trainer.raw_model.parameters() if p.requires_grad]
        got = sum((data.loss(trainer.raw_model, b) / trainer.accum) for b in batches)
        got_grads = torch.autograd.grad(got, params)
        expected = sum(grpo_loss(token_logps(trainer.raw_model, b), b, data.cfg, data._totals)[0] for b in batches)
        expected_grads = torch.autograd.grad(expected, params)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-8)
        for one, two in zip(got_grads, expected_grads):
            torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-8)
        assert data._totals.sequences == 16 and data._totals.tokens == sum(b.lengths.sum().item() for b in batches)
    finally:
        trainer.close()


# ----------------------------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------------------------
def test_advantages_are_trls():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    got, std, zero = advantages(rewards, 4, "group")
    groups = rewards.view(2, 4)
    expected = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(got, expected.flatten())
    assert zero.tolist() == [False] * 4 + [True] * 4 and std[0] == groups[0].std()
    got, std, _ = advantages(rewards, 4, "batch", rewards.std().item())
    torch.testing.assert_close(got, ((groups - groups.mean(1, keepdim=True)) / (rewards.std() + 1e-4)).flatten())
    got, _, _ = advantages(rewards, 4, "none")
    torch.testing.assert_close(got, (groups - groups.mean(1, keepdim=True)).flatten())


def test_completions_no_source_scored_are_warned_of():
    """TRL warns when every reward function returns None for a completion: it gets 0, and a group of them no
    gradient, otherwise seen only as a flat reward curve."""
    nan = float("nan")
    rows = np.array([4, 4, 9, 9])
    scored = torch.tensor([[1.0, nan], [nan, 0.5], [0.0, 0.0], [nan, 2.0]])
    assert unscored_warning(scored, rows, ["exact_match", "rm"]) is None
    partly = torch.tensor([[1.0, nan], [nan, 0.5], [nan, nan], [nan, nan]])
    warning = unscored_warning(partly, rows, ["exact_match", "rm"])
    assert "every reward source (exact_match, rm) returned None for 2 of 4 completions" in warning
    assert "prompt row 9" in warning and "'solution'" in warning


@pytest.mark.parametrize("value", [0.1, 1 / 3, -7.77, 123.456])
def test_equal_rewards_have_zero_std_and_zero_advantages(value):
    """184 equal rewards (23 groups of 8): the batch std is exactly 0 (the one-pass variance rounded below 0
    here, and its ``** 0.5`` was a complex number), and for every scaling the advantages are exactly 0 and every
    group counts as zero-std (a float32 group mean can round off the rewards; divided by 1e-4 that was not 0)."""
    rewards = torch.full((184,), value)
    spread = batch_std(rewards, 184.0, rewards.double().sum().item(), torch.device("cpu"))
    assert spread == 0.0
    for scale in ("group", "batch", "none"):
        got, std, zero = advantages(rewards, 8, scale, spread)
        assert got.dtype == torch.float32 and not got.any() and not std.any() and zero.all(), scale
    unequal = torch.randn(184, generator=torch.Generator().manual_seed(0))
    assert batch_std(unequal, 184.0, unequal.double().sum().item(), torch.device("cpu")) == pytest.approx(
        unequal.double().std().item(), rel=1e-12)


def test_token_logps_equal_a_sequence_by_sequence_computation(toy):
    model = base_model(toy)
    prompts, completions = [np.array([3, 4, 5]), np.array([6])], [np.array([7, 8]), np.array([9, 10, 11])]
    batch = pack(prompts, completions, torch.zeros(2))
    with torch.no_grad():
        got = token_logps(model, batch, temperature=0.5)
        expected = []
        for prompt, completion in zip(prompts, completions):
            sequence = torch.from_numpy(np.concatenate([prompt, completion]))[None]
            logps = (model(input_ids=sequence, use_cache=False).logits[0].float() / 0.5).log_softmax(-1)
            targets = torch.arange(len(prompt), sequence.shape[1])
            expected.append(logps[targets - 1, sequence[0, targets]])
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.2])
def test_the_loss_is_the_formula(loss_type, beta):
    """One micro-batch of 3 completions (lengths 2, 3, 1) of a global batch of 8 completions, 20 tokens: the value
    and the gradient of each token's log-prob are those of the formulas written out by hand."""
    advantage = torch.tensor([0.5, -1.0, 2.0])
    batch = pack([np.array([1]), np.array([2]), np.array([3])], [np.array([4, 5]), np.array([6, 7, 8]),
                                                                 np.array([9])], advantage)
    reference = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0, -0.1])
    batch = batch._replace(reference=reference)
    logps = torch.tensor([-1.2, -1.9, -0.7, -1.5, -2.0, -0.3], requires_grad=True)
    cfg = GrpoConfig(loss_type=loss_type, beta=beta, max_completion_length=4)
    loss, kl = grpo_loss(logps, batch, cfg, Totals(sequences=8, tokens=20))
    loss.backward()
    per_token_a = torch.tensor([0.5, 0.5, -1.0, -1.0, -1.0, 2.0])
    delta = reference - logps.detach()
    per_kl = torch.exp(delta) - delta - 1
    per_token = -per_token_a + beta * per_kl  # ratio 1
    d_token = -per_token_a + beta * (1 - torch.exp(delta))  # d/dlogp of -A·exp(logp - sg) and of k3
    if loss_type == "dapo":
        weights = torch.full((6,), 1 / 20)
    elif loss_type == "grpo":
        weights = torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1.0]) / 8
    else:
        weights = torch.full((6,), 1 / (8 * 4))
    assert loss.item() == pytest.approx((per_token * weights).sum().item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(logps.grad, d_token * weights)
    assert kl.item() == pytest.approx(per_kl.sum().item() if beta else 0.0, rel=1e-6)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_the_clipped_loss_of_a_later_iteration_is_the_formula(loss_type):
    """With the old policy's log-probs (``old``, num_iterations > 1) the ratio ρ = exp(logp − old) is clipped to
    [1 − epsilon, 1 + epsilon_high]: the loss is −min(ρA, clip(ρ)A), a clipped token has no gradient, and the
    clipped tokens are counted as TRL's (low: ρ < 1 − ε with A < 0; high: ρ > 1 + ε_high with A > 0). A token of
    ρ 1.25, A > 0 lies between 1 + ε and 1 + ε_high: not clipped (it would be with ε as the upper clip)."""
    advantage = torch.tensor([0.5, -1.0, 2.0, 1.0])
    batch = pack([np.array([1]), np.array([2]), np.array([3]), np.array([4])],
                 [np.array([4, 5]), np.array([6, 7, 8]), np.array([9]), np.array([10, 11])], advantage)
    # high A>0, inside, low A<0, low A<0, high A<0, inside, between 1 + ε and 1 + ε_high A>0, inside
    ratio = torch.tensor([1.4, 0.9, 0.5, 0.7, 1.5, 1.2, 1.25, 1.1])
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0, -0.1, -0.7, -2.5])
    batch = batch._replace(old=old)
    logps = (old + ratio.log()).requires_grad_(True)
    cfg = GrpoConfig(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, max_completion_length=4)
    loss, _ = grpo_loss(logps, batch, cfg, Totals(sequences=8, tokens=20))
    loss.backward()
    a = torch.tensor([0.5, 0.5, -1.0, -1.0, -1.0, 2.0, 1.0, 1.0])
    per_token = -torch.min(ratio * a, ratio.clamp(0.8, 1.28) * a)
    free = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # the unclipped term is the min: gradient −ρA
    weights = {"dapo": torch.full((8,), 1 / 20), "dr_grpo": torch.full((8,), 1 / (8 * 4)),
               "grpo": torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1.0, 1 / 2, 1 / 2]) / 8}[loss_type]
    assert loss.item() == pytest.approx((per_token * weights).sum().item(), rel=1e-5)
    torch.testing.assert_close(logps.grad, -ratio * a * free * weights)
    assert clipped_tokens(logps, batch, cfg).tolist() == [2.0, 1.0, 3.0]  # low, high, region
    assert clipped_tokens(logps, batch._replace(old=torch.zeros(0)), cfg).tolist() == [0.0, 0.0, 0.0]
    assert GrpoConfig(epsilon=0.1).epsilon_upper == 0.1 and cfg.epsilon_upper == 0.28  # None: epsilon (TRL's)


def test_the_sampler_is_seeded_and_independent_of_the_batch(toy):
    """The same uniforms give the same completions; a group sampled alone or beside another group gets the same
    ones; other seed words other completions. EOS ends a completion; a clipped one has none."""
    model, eos = base_model(toy), tokenizer_of(toy).eos_token_id
    prompts = [np.array([5, 6, 7, 8]), np.array([9, 10])]
    noise = torch.cat([uniforms((1, 2, position), 4, 12) for position in (0, 1)])
    assert torch.equal(uniforms((1, 2, 0), 4, 12), uniforms((1, 2, 0), 4, 12))
    both, clipped = sample(model, prompts, noise, eos=eos, temperature=1.5)
    again, _ = sample(model, prompts, noise, eos=eos, temperature=1.5)
    alone, _ = sample(model, prompts[1:], noise[4:], eos=eos, temperature=1.5)
    assert all(np.array_equal(a, b) for a, b in zip(both, again))
    assert all(np.array_equal(a, b) for a, b in zip(both[4:], alone))
    other, _ = sample(model, prompts, torch.cat([uniforms((1, 3, p), 4, 12) for p in (0, 1)]), eos=eos,
                      temperature=1.5)
    assert any(not np.array_equal(a, b) for a, b in zip(both, other))
    for completion, cut in zip(both, clipped):
        assert (eos not in completion) == cut and (cut or completion[-1] == eos) and 1 <= len(completion) <= 12
    greedy, _ = sample(model, prompts, noise, eos=eos, temperature=1.0, top_p=1e-6)  # top_p ~0: the argmax
    with torch.no_grad():
        first = model(input_ids=torch.from_numpy(prompts[0])[None]).logits[0, -1].argmax().item()
    assert all(g[0] == first for g in greedy[:4])
    # another stop id (a chat model's end of turn): a completion ends at it, with it, and is not clipped
    stopped, cut = sample(model, prompts, noise, eos=[eos, first], temperature=1.0, top_p=1e-6)
    assert all(s.tolist() == [first] for s in stopped[:4]) and not any(cut[:4])
    assert all(np.array_equal(a, b) for a, b in zip(stopped[4:], greedy[4:]) if first not in b)


def test_the_sampler_never_draws_a_padded_vocabularys_extra_rows(toy):
    """A vocabulary padded past the tokenizer's ids (model.vocab_size): with ``vocab`` the rows past it are never
    drawn, even when they would win every step (as vLLM trims them); without it they are."""
    model, eos = base_model(toy), tokenizer_of(toy).eos_token_id
    bound = model.config.vocab_size - 4
    with torch.no_grad():  # the last 4 rows: far above any other, the greedy pick of every step
        model.get_output_embeddings().weight[bound:] = 40 * model.get_output_embeddings().weight[bound:].sign()
    prompts = [np.array([5, 6, 7, 8])]
    noise = uniforms((1, 2, 0), 2, 6)
    padded, _ = sample(model, prompts, noise, eos=eos, temperature=1.0)
    assert any(token >= bound for completion in padded for token in completion)  # the test can fail
    kept, _ = sample(model, prompts, noise, eos=eos, temperature=1.0, vocab=bound)
    assert all(token < bound for completion in kept for token in completion)


def _sample_on_two_fsdp_ranks(rank: int, rendezvous: str, base: str, out: str) -> None:
    """One of two gloo ranks: greedy completions of two prompts by the micro base, alone and then sharded by FSDP2
    with ``all_ranks``, and the forwards each took. Rank 0 stops at each prompt's first token, rank 1 at EOS only
    (which the greedy draw does not reach): without ``all_ranks`` rank 0 would leave rank 1 alone in the next
    forward's all-gather."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from retnet.model import RetNetForCausalLM

    torch.set_num_threads(1)  # forked: no OpenMP pool of the parent's to wait on (as DataLoader workers)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        model = RetNetForCausalLM.from_pretrained(base).eval()
        prompts = [np.array([5, 6, 7, 8]), np.array([9, 10])]
        noise = torch.cat([uniforms((1, 2, position), 2, 12) for position in (0, 1)])
        with torch.no_grad():
            firsts = [model(input_ids=torch.from_numpy(p)[None]).logits[0, -1].argmax().item() for p in prompts]
        eos = firsts if rank == 0 else [model.config.eos_token_id]
        alone, _ = sample(model, prompts, noise, eos=eos, top_p=1e-6)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        forwards, gathers = [], []
        model.register_forward_hook(lambda *_: forwards.append(1))
        # What FSDP2 gathers a module's shards with (all_gather_single from torch 2.12; before, into_tensor).
        name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
        all_gather = getattr(dist, name)

        def counted(*args, **kwargs):
            gathers.append(1)
            return all_gather(*args, **kwargs)

        setattr(dist, name, counted)
        synced, _ = sample(model, prompts, noise, eos=eos, top_p=1e-6, all_ranks=True)
        per_token = len(gathers)
        with gathered_weights(model):
            once, _ = sample(model, prompts, noise, eos=eos, top_p=1e-6, all_ranks=True)
        torch.save({"alone": alone, "synced": synced, "once": once, "forwards": len(forwards), "firsts": firsts,
                    "gathers": (per_token, len(gathers) - per_token), "layers": len(model.model.layers),
                    "after": type(next(model.parameters())).__name__}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp_ranks_decode_until_every_rank_is_done(toy, tmp_path):
    """Under FSDP each forward is a collective: the rank whose rows all stopped keeps decoding (1 prefill + 11
    steps, as the rank that runs to max length), and its completions are those it samples on its own."""
    from torch.multiprocessing import start_processes

    # a file of this test's for the ranks' store: a free port picked here might be another process's by the time
    # rank 0 binds it
    rendezvous = tmp_path / "rendezvous"
    start_processes(_sample_on_two_fsdp_ranks, args=(str(rendezvous), str(toy / "base"), str(tmp_path)), nprocs=2,
                    start_method="fork")  # spawn would import torch and this module again, ~10 s
    ranks = [torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [r["forwards"] for r in ranks] == [24, 24]
    for r in ranks:
        # Without gathered_weights each layer is gathered at every one of the 12 forwards (the root once: FSDP2 keeps
        # the root's weights after forward); within it each layer once (the root is still gathered).
        assert r["gathers"] == (12 * r["layers"] + 1, r["layers"]), r["gathers"]
        assert r["after"] == "DTensor"  # resharded when the block ends
        assert all(np.array_equal(a, b) for a, b in zip(r["alone"], r["once"], strict=True))
    first = ranks[0]
    assert [c.tolist() for c in first["alone"]] == [[first["firsts"][0]]] * 2 + [[first["firsts"][1]]] * 2
    assert all(len(c) == 12 for c in ranks[1]["alone"])  # no EOS: the rank runs to max length
    for r in ranks:
        assert all(np.array_equal(a, b) for a, b in zip(r["alone"], r["synced"], strict=True))


def test_stop_tokens_add_the_generation_configs_eos_ids(toy):
    """The tokenizer's EOS, then generation_config.eos_token_id (an int or a list, without repeats), as
    generate stops; the reward functions' texts leave a final stop token out, as they leave EOS out."""
    from transformers import GenerationConfig

    tokenizer = tokenizer_of(toy)
    eos = tokenizer.eos_token_id
    assert stop_tokens(tokenizer) == stop_tokens(tokenizer, GenerationConfig()) == [eos]
    assert stop_tokens(tokenizer, GenerationConfig(eos_token_id=7)) == [eos, 7]
    assert stop_tokens(tokenizer, GenerationConfig(eos_token_id=[eos, 9, 7])) == [eos, 9, 7]
    data = prompts_data(toy)
    end = tokenizer.encode("a")[0]
    sources = RewardSources(GrpoConfig(reward_funcs=["toy_rewards:a_share"]), tokenizer, data.encoder,
                            torch.device("cpu"), torch.autocast("cpu", enabled=False), stops=[eos, end])
    got = sources(data.train, np.array([0, 0]), [np.array([*tokenizer.encode("b"), end]), np.array([end, end])])
    assert got[:, 0].tolist() == [0.0, 1.0]  # "b" (its stop token left out), "a" (only the last one is)


# ----------------------------------------------------------------------------------------------------------
# Prompts and rewards
# ----------------------------------------------------------------------------------------------------------
def prompts_data(toy: Path, dataset: str = "prompts.jsonl"):
    from retnet.train.config import DataConfig
    from retnet.train.data import build_data

    cfg = DataConfig(dataset=str(toy / dataset), format="prompts", val_fraction=0.1, cache_dir=str(toy / "cache"))
    return build_data(cfg, vocab_size=300, seed=0, micro_batch=8, global_batch=16, rank=0, local_rank=0,
                      world_size=1, tokenizer_dir=toy / "base", barrier=lambda: None)


def test_conversational_prompts_and_the_reward_contract(toy):
    """A conversation is rendered with the generation prompt; reward functions get the prompts as the rows hold
    them, the completions as assistant messages, their ids and every other column; None is left out of the sum."""
    import toy_rewards

    tokenizer = tokenizer_of(toy)
    data = prompts_data(toy, "conv.jsonl")
    prompt = data.train.prompts[0]
    assert tokenizer.decode(data.train.tokens[0]) == tokenizer.apply_chat_template(prompt, tokenize=False,
                                                                                   add_generation_prompt=True)
    cfg = GrpoConfig(reward_funcs=["toy_rewards:record", "toy_rewards:a_share"], reward_weights=[2.0, 1.0])
    sources = RewardSources(cfg, tokenizer, data.encoder, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    eos = tokenizer.eos_token_id
    completions = [np.array([*tokenizer.encode("aab"), eos]), np.array(tokenizer.encode("bb"))]
    toy_rewards.CALLS.clear()
    got = sources(data.train, np.array([0, 0]), completions)
    call = toy_rewards.CALLS[0]
    assert call["prompts"] == [prompt, prompt] and call["solution"] == ["aaa", "aaa"]
    assert call["completions"] == [[{"role": "assistant", "content": "aab"}], [{"role": "assistant", "content": "bb"}]]
    assert call["completion_ids"] == [c.tolist() for c in completions]
    assert got[:, 0].tolist()[0] == 1.0 and got[:, 0].isnan().tolist() == [False, True]
    assert torch.nansum(got * sources.weights, dim=1).tolist() == pytest.approx([2.0 + 2 / 3, 0.0])
    assert sources.names == ["record", "a_share"]


def test_reward_functions_get_their_own_copies_and_trls_prefill_completion(toy):
    """Each call gets a deep copy of each completion's prompt and columns: a function that changes them (TRL's
    ``prompt.pop()``) changes neither the rows nor the next function's or step's arguments. A prompt ending with
    an assistant message comes without it, and its content starts the completion (TRL's bootstrap)."""
    import toy_rewards

    tokenizer = tokenizer_of(toy)
    data = prompts_data(toy, "prefill.jsonl")
    stored = json.loads(json.dumps(data.train.prompts[0]))
    assert stored[-1] == {"role": "assistant", "content": "<a>"}
    assert tokenizer.decode(data.train.tokens[0]).endswith("<a>")  # sampled as the prefill's continuation
    sources = RewardSources(GrpoConfig(reward_funcs=["toy_rewards:popper", "toy_rewards:record"]), tokenizer,
                            data.encoder, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    completions = [np.array(tokenizer.encode(" b</a>")), np.array(tokenizer.encode("a"))]
    toy_rewards.CALLS.clear()
    for _ in range(2):  # two steps
        sources(data.train, np.array([0, 0]), completions)
    popper, record = toy_rewards.CALLS[2:]  # the second step's
    assert popper["prompts"] == record["prompts"] == [stored[:-1], stored[:-1]] and popper["same"] == [False]
    assert record["completions"] == [[{"role": "assistant", "content": "<a> b</a>"}],
                                     [{"role": "assistant", "content": "<a>a"}]]
    assert record["solution"] == [["aaa"], ["aaa"]]
    assert data.train.prompts[0] == stored and data.train.columns[0]["solution"] == ["aaa"]


def test_reward_values_accept_arrays_and_name_the_function_otherwise(toy):
    """A numpy array or tensor of one reward per completion is read; one of another length, None, a number or
    a string is a RuntimeError naming the function (not numpy's "truth value is ambiguous")."""
    assert reward_values("f", np.array([1, 0.5]), 2).tolist() == [1.0, 0.5]
    assert reward_values("f", torch.tensor([[2.0], [3.0]]), 2).tolist() == [2.0, 3.0]
    assert reward_values("f", (None, 1), 2)[0].isnan()
    for bad, said in ((np.zeros(3), "returned 3 rewards"), ([], "returned 0 rewards"),
                      (None, "returned NoneType None"), (torch.tensor(1.0), "returned Tensor"),
                      (np.float32(1.0), "returned float32"), (["x", "y"], "returned a reward that is not a number"),
                      (torch.ones(2, 2), "returned a reward that is not a number")):
        with pytest.raises(RuntimeError, match=rf"grpo.reward_funcs: f {said}.* for 2 completions"):
            reward_values("f", bad, 2)
    data = prompts_data(toy)
    for name, expected in (("as_numpy", [0.25, 0.25]), ("one_short", None)):
        sources = RewardSources(GrpoConfig(reward_funcs=[f"toy_rewards:{name}"]), tokenizer_of(toy), data.encoder,
                                torch.device("cpu"), torch.autocast("cpu", enabled=False))
        completions = [np.array([5, 6]), np.array([7])]
        if expected is None:
            with pytest.raises(RuntimeError, match=r"grpo.reward_funcs: one_short returned 1 rewards for 2"):
                sources(data.train, np.array([0, 0]), completions)
        else:
            assert sources(data.train, np.array([0, 0]), completions)[:, 0].tolist() == expected


@pytest.mark.parametrize("dataset", ["prompts.jsonl", "conv.jsonl", "prefill.jsonl"])
def test_the_reward_model_scores_as_the_reward_trainer(toy, tmp_path, dataset):
    """grpo.reward_model: a completion's score is the classifier's on prompt + completion + EOS encoded as the
    reward trainer encodes a pair (PairEncoder: render_pair for conversations, continuing a prefill), whatever
    a reward function beside it does to its own arguments. Another tokenizer is refused."""
    from retnet.model import RetNetConfig, RetNetForSequenceClassification
    from retnet.train.config import DataConfig
    from retnet.train.preference import PairEncoder, check_pair
    from retnet.train.preference import pack as pack_pairs
    from retnet.train.reward import sequence_rewards

    tokenizer = tokenizer_of(toy)
    config = RetNetConfig.from_pretrained(toy / "base")
    config.num_labels = 1
    torch.manual_seed(1)
    rm = RetNetForSequenceClassification(config).eval()
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    data = prompts_data(toy, dataset)
    sources = RewardSources(GrpoConfig(reward_funcs=["toy_rewards:popper"], reward_model=str(tmp_path / "rm")),
                            tokenizer, data.encoder, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert sources.names == ["popper", "rm"]
    texts = ["aab", "b a"]
    completions = [np.array([*tokenizer.encode(t), tokenizer.eos_token_id]) for t in texts]
    got = sources(data.train, np.array([2, 3]), completions)[:, 1]
    encoder = PairEncoder(tokenizer, DataConfig(dataset="x", format="preference", seq_len=256))
    for index, text, score in zip((2, 3), texts, got.tolist()):
        prompt = data.train.prompts[index]
        answer = (lambda t: t) if isinstance(prompt, str) else (lambda t: [{"role": "assistant", "content": t}])
        pair = encoder.encode([(0, check_pair("x", 0, (prompt, answer(text), answer(text + "zz"))))])
        with torch.no_grad():
            expected = sequence_rewards(rm, pack_pairs([pair.parts(0)], np.zeros(1)))[0]
        assert score == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "rm", other)
    from retnet.tokenization import train_byte_level_bpe

    train_byte_level_bpe(["something else entirely"] * 4, vocab_size=280).save_pretrained(other)
    with pytest.raises(ConfigError, match=r"its tokenizer .* is not the policy's"):
        RewardSources(GrpoConfig(reward_model=str(other)), tokenizer, data.encoder, torch.device("cpu"),
                      torch.autocast("cpu", enabled=False))


def test_builtin_rewards():
    from retnet.train.rewards import exact_match, length_target, matches_pattern

    completions = [" 42 ", [{"role": "assistant", "content": "41"}], "x"]
    assert exact_match(completions, solution=["42", "42", None]) == [1.0, 0.0, None]
    assert exact_match(completions) == [None] * 3
    assert matches_pattern(["<a>1</a>", "<a>1", "z"], pattern=["<a>.*</a>", "<a>.*</a>", None]) == [1.0, 0.0, None]
    assert length_target(["abcd", "ab", "abcdefghij"], target_length=[4, 4, 4]) == [0.0, -0.5, -1.0]


def test_the_metric_sums_have_trls_names():
    assert SUMS[:6] == ("completions", "reward", "reward_std", "length", "clipped", "zero_std")
    assert GrpoBatch._fields[-1] == "reference"


# ----------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------
GOOD = {"data": {"format": "prompts", "dataset": "p.jsonl"}, "model": {"init_from": "b"},
        "grpo": {"reward_funcs": ["retnet.train.rewards:exact_match"], "num_generations": 4},
        "train": {"global_batch_size": 16, "micro_batch_size": 8}}


def merged(**sections) -> dict:
    out = {name: dict(table) for name, table in GOOD.items()}
    for name, table in sections.items():
        out.setdefault(name, {}).update(table)
    return out


@pytest.mark.parametrize(("sections", "message"), [
    ({"grpo": {"beta": 0.1}}, r"grpo.beta is set but data.format is 'text'; GRPO trains on data.format 'prompts'"),
    ({"grpo": {"reward_funcs": ["retnet.train.rewards:exact_match"]}}, r"grpo.reward_funcs is set but data.format"),
    (merged(model={"init_from": None}), r"model.init_from must name the model to tune with data.format 'prompts'"),
    (merged(grpo={"reward_funcs": []}), r"grpo.reward_funcs and grpo.reward_model are both empty"),
    (merged(grpo={"num_generations": 1}), r"grpo.num_generations must be >= 2.*; got 1"),
    (merged(grpo={"reward_weights": [1.0, 2.0]}), r"grpo.reward_weights must give one weight per reward source \(1"),
    (merged(grpo={"reward_weights": [float("nan")]}), r"grpo.reward_weights must be finite numbers"),
    # finite as a float64, inf once the rewards are weighted in float32
    (merged(grpo={"reward_weights": [1e39]}), r"grpo.reward_weights must be finite numbers within float32's range"),
    (merged(grpo={"loss_type": "gspo"}),
     r"grpo.loss_type must be one of \('dapo', 'grpo', 'dr_grpo', 'bnpo', 'cispo', 'sapo', 'luspo'\); got 'gspo'"),
    (merged(grpo={"scale_rewards": "rank"}), r"grpo.scale_rewards must be one of \('group', 'batch', 'none'\)"),
    (merged(grpo={"top_p": 0.0}), r"grpo.top_p must be in \(0, 1\]; got 0.0"),
    (merged(grpo={"temperature": 0.0}), r"grpo.temperature must be > 0; got 0.0"),
    (merged(grpo={"max_completion_length": 0}), r"grpo.max_completion_length must be > 0; got 0"),
    (merged(grpo={"beta": -0.1}), r"grpo.beta must be >= 0; got -0.1"),
    (merged(grpo={"epsilon": 1.0}), r"grpo.epsilon must be in \[0, 1\); got 1.0"),
    (merged(grpo={"reward_funcs": ["exact_match"]}), r"grpo.reward_funcs must be 'module:function' import paths"),
    (merged(grpo={"reward_funcs": ["no_such_module_x:f"]}), r"'no_such_module_x:f': module 'no_such_module_x' cannot"),
    (merged(grpo={"reward_funcs": ["retnet.train.rewards:nothing"]}), r"'retnet.train.rewards' has no 'nothing'"),
    (merged(grpo={"reward_model": "/no/such/rm"}), r"grpo.reward_model must be a RetNetForSequenceClassification"),
    (merged(grpo={"num_iterations": 0}), r"grpo.num_iterations must be an integer >= 1 .*; got 0"),
    (merged(grpo={"num_iterations": 1.5}), r"grpo.num_iterations expects int; got float 1.5"),
    (merged(grpo={"epsilon_high": -0.1}), r"grpo.epsilon_high must be >= 0 .*; got -0.1"),
    ({"grpo": {"num_iterations": 2}}, r"grpo.num_iterations is set but data.format is 'text'"),
    (merged(train={"global_batch_size": 10, "micro_batch_size": 5}),
     r"train.global_batch_size \(completions per step\) must split into whole groups of grpo.num_generations \(4\)"),
    (merged(reward={"enabled": True}), r"data.format must be 'preference' with reward.enabled=true"),
    (merged(dpo={"beta": 0.5}), r"dpo.beta is set but data.format is 'prompts'"),
    (merged(data={"streaming": True}), r"data.streaming cannot be used with data.format 'prompts'"),
    (merged(data={"dataset": "stdlib"}), r"data.dataset must hold prompts with data.format 'prompts'"),
    (merged(data={"dataset": "stdlib", "mixture": {"a": 1, "b": 2}}), r"data.mixture cannot be used with data.format"),
])
def test_bad_grpo_configs_are_refused_by_name(sections, message):
    with pytest.raises(ConfigError, match=message):
        build_config(sections)


def test_the_per_rank_share_must_be_whole_groups(monkeypatch):
    """torchrun's WORLD_SIZE is read at config load: 16 completions on 4 ranks is 4 each, not a group of 8."""
    build_config(merged(grpo={"num_generations": 8}))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"on each of the 4 rank\(s\).*multiple of 32; got 16"):
        build_config(merged(grpo={"num_generations": 8}, train={"micro_batch_size": 4}))


def test_bad_prompt_data_is_refused_by_the_cli(toy, tmp_path, capsys):
    rows = [{"prompt": f"p{i}"} for i in range(6)]
    rows[3]["prompt"] = None
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": "a"}) + "\n" for _ in range(4)))
    for dataset, problem in ((bad, f"'prompt' of {str(bad)!r}, row 3: holds NoneType None"),
                             (texts, "has no 'prompt' column")):
        assert main(grpo_args(toy, tmp_path / "out", data__dataset=dataset)) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err, err


def test_reward_weights_from_the_command_line_are_numbers():
    """--grpo.reward_weights=2,0.5 arrives as strings: read as numbers, one per source (the functions, the model)."""
    cfg = build_config(merged(grpo={"reward_funcs": ["retnet.train.rewards:exact_match",
                                                     "retnet.train.rewards:length_target"],
                                    "reward_weights": ["2", "0.5"]}))
    assert cfg.grpo.reward_weights == [2.0, 0.5] and cfg.grpo.sources == 2
    with pytest.raises(ConfigError, match=r"grpo.reward_weights must be finite numbers within float32's range \(not: 'x'\)"):
        build_config(merged(grpo={"reward_weights": ["x"]}))


def test_reward_sources_of_one_name_are_refused(toy, tmp_path):
    """The metrics name a source by its function's __name__ (or the reward model's directory name): two of one
    name would write one rewards/<name>/mean, so the config is refused, naming both entries."""
    with pytest.raises(ConfigError, match=r"grpo.reward_funcs: 'retnet.train.rewards:exact_match' and "
                                          r"'toy_rewards:exact_match' are both named 'exact_match'"):
        build_config(merged(grpo={"reward_funcs": ["retnet.train.rewards:exact_match", "toy_rewards:exact_match"]}))
    (tmp_path / "a_share").mkdir()
    (tmp_path / "a_share" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"'toy_rewards:a_share' and grpo.reward_model '.*a_share' are both named"):
        build_config(merged(grpo={"reward_funcs": ["toy_rewards:a_share"], "reward_model": str(tmp_path / "a_share")}))


def test_a_default_epsilon_high_equals_epsilon_spelled_out_on_resume():
    """grpo.epsilon_high None is grpo.epsilon (TRL's rule): a resume that spells that value out changes nothing,
    another value is named as used."""
    saved = {"grpo": build_config(merged()).grpo.to_dict()}
    assert saved["grpo"]["epsilon_high"] is None
    assert grpo_changes(saved, build_config(merged(grpo={"epsilon_high": 0.2}))) == []
    assert grpo_changes(saved, build_config(merged(grpo={"epsilon_high": 0.28}))) == [
        "grpo.epsilon_high: checkpoint 0.2, now 0.28"]
    assert grpo_changes(saved, build_config(merged(grpo={"epsilon": 0.1, "epsilon_high": 0.2}))) == [
        "grpo.epsilon: checkpoint 0.2, now 0.1"]


def test_default_reward_weights_equal_the_ones_spelled_out_on_resume():
    """grpo.reward_weights [] is 1 for each source: a resume that spells the ones out changes nothing."""
    two = ["retnet.train.rewards:exact_match", "retnet.train.rewards:length_target"]
    saved = {"grpo": build_config(merged(grpo={"reward_funcs": two})).grpo.to_dict()}
    assert grpo_changes(saved, build_config(merged(grpo={"reward_funcs": two, "reward_weights": [1, 1.0]}))) == []
    assert grpo_changes(saved, build_config(merged(grpo={"reward_funcs": two, "reward_weights": [1, 2]}))) == [
        "grpo.reward_weights: checkpoint [1.0, 1.0], now [1.0, 2.0]"]
