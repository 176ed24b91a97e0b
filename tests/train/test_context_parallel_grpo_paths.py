"""Context parallelism (``train.context_parallel``) on GRPO, and beside tensor parallelism on GRPO and preference
pairs: two torchrun gloo ranks of one context-parallel group (each sampling half of its prompts, then every
completion's row split along time for the policy, reference and old-policy passes) log one process's GRPO records
(losses, rewards and every metric, gradient norms, validation) under a per-token normalization with truncated
completions masked and a sequence-level ratio, a KL term and two steps on each generation; four ranks (two pieces ×
two tensor-parallel slices) resume one process's checkpoint within a generation under a per-sequence normalization
and log its next step, and log one process's DPO and reward-model records."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from retnet.train.checkpoint import load_checkpoint
from retnet.train.config import ConfigError, load_config
from retnet.train.preference import METRICS as DPO_METRICS
from retnet.train.reward import METRICS as REWARD_METRICS

from .conftest import metrics, one_thread, run_train_many
from .test_context_parallel_preference_paths import uneven  # noqa: F401 - the fixture
from .test_grpo import grpo_args, prompts_data, toy  # noqa: F401 - toy: the fixture
from .test_preference import assert_records_match, dpo_args
from .test_preference import toy as pairs  # noqa: F401 - the fixture

# Two steps on each generation (sampled for steps 1 and 3; steps 2 and 4 train with a ratio off 1), a KL term,
# validation at steps 0 and 4 of 3 prompts (the second piece samples the third and a padding copy of it), a
# checkpoint at every step (steps 1 and 3 within a generation). AdamW's eps raised: a step of eps 1e-8 takes a gradient component near 0 to about ±lr whatever its size, so the split's other summation order
# moved a few weights by 5e-5 after two steps, and the next generation drew another token (rounding amplified into
# a discrete draw); a component below 1e-5 now moves in proportion to it.
COMMON = {"train__steps": 4, "grpo__num_iterations": 2, "grpo__beta": 0.05, "grpo__epsilon_high": 0.28,
          "train__eval_interval": 4, "checkpoint__interval": 1, "checkpoint__keep_last": 4,
          "optim__eps": 1e-5, "train__eval_blocks": 3}
# A per-token normalization (over the global batch's unmasked completion tokens) with GSPO's sequence-level ratio,
# whose mean log ratio runs over both pieces of a completion the cut falls in; a per-sequence one with the token ratio
DAPO = {**COMMON, "grpo__loss_type": "dapo", "grpo__importance_sampling_level": "sequence",
        "grpo__mask_truncated_completions": "true"}
GRPO = {**COMMON, "grpo__loss_type": "grpo"}
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


def cuts_inside_a_completion(toy, run) -> int:  # noqa: F811 - toy: the fixture
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
def stopping(toy):  # noqa: F811 - toy: the fixture
    """The toy base, whose ``generation_config`` stops a completion at every fourth id too: the random model then
    ends most completions within their 8 tokens, at lengths of all sorts (at its EOS alone it runs every one to 8,
    the rows of equal sequences, which two pieces cut between two of them), and masks some (the truncated ones)."""
    from transformers import GenerationConfig

    base = toy / "stopping"
    shutil.copytree(toy / "base", base)
    GenerationConfig(eos_token_id=list(range(0, 300, 4))).save_pretrained(base)
    return base


@pytest.fixture(scope="module")
def alone(toy, stopping, tmp_path_factory):  # noqa: F811 - toy: the fixture
    """The one-process runs of the two objectives, on one thread as each rank computes: their output dirs."""
    root = tmp_path_factory.mktemp("grpo-alone")
    from retnet.train.__main__ import main

    with one_thread():
        for name, settings in (("dapo", DAPO), ("grpo", GRPO)):
            assert main(grpo_args(toy, root / name, **settings, model__init_from=stopping)) == 0
    return root


def preference_common(objective: str, uneven) -> dict:  # noqa: F811 - uneven: the fixture's path
    """The preference runs' settings: 2 steps of micro 2 × accum 2 with validation at steps 0 and 2 on the uneven
    pairs, a reward model's or DPO's."""
    extra = {"reward__enabled": "true"} if objective == "reward" else {}
    return dict(data__dataset=uneven, train__steps=2, train__eval_interval=2, checkpoint__interval=0, **extra)


@pytest.fixture(scope="module")
def four_ranks(toy, stopping, alone, pairs, uneven, tmp_path_factory):  # noqa: F811 - the fixtures
    """The module's 4-rank runs (2 pieces × 2 tensor-parallel slices) in one torchrun launch, each rank's process
    importing torch once, not three times: ``grpo``, the one-process grpo run resumed from its step-3 checkpoint
    (a copy of ``alone``'s without step 4), then ``dpo`` and ``reward``, each after its one-process run (in this
    process, on one thread as each rank computes). ``name`` -> (the one-process run's output dir, the split run's,
    the split run finished)."""
    from retnet.train.__main__ import main

    root = tmp_path_factory.mktemp("four-ranks")
    resumed = root / "grpo" / "split"
    shutil.copytree(alone / "grpo", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    runs = {"grpo": grpo_args(toy, resumed, **GRPO, model__init_from=stopping, train__context_parallel=2,
                              train__tensor_parallel=2)}
    for objective in ("dpo", "reward"):
        common = preference_common(objective, uneven)
        with one_thread():  # as each rank computes
            assert main(dpo_args(pairs, root / objective / "single", **common)) == 0, objective
        runs[objective] = dpo_args(pairs, root / objective / "split", **common, train__context_parallel=2,
                                   train__tensor_parallel=2)
    finished = run_train_many(list(runs.values()), nproc=4, out=root / "launch")
    singles = {"grpo": alone / "grpo", "dpo": root / "dpo" / "single", "reward": root / "reward" / "single"}
    return {name: (singles[name], root / name / "split", done) for name, done in zip(runs, finished, strict=True)}


@pytest.mark.slow
def test_ranks_splitting_each_row_log_the_grpo_records_of_one_process(toy, stopping, alone, four_ranks, tmp_path,  # noqa: F811
                                                                       run):
    """dapo with GSPO's ratio on 2 ranks from the start: the same completions, rewards, losses, KL, clip ratios and
    gradient norms as one process (each rank sampled half of the prompts, then every rank holds them all; each
    metric counted once a group, each rank's loss its half), the rows of some micro-batches cut inside a
    completion; a checkpoint within a generation holds the one process's (the same completions, old and reference
    log-probs). grpo with the token ratio, resumed on 2 pieces × 2 tensor-parallel slices from one process's step-3
    checkpoint within the generation sampled for step 3 (its old and reference log-probs restored): step 4, its
    weights and its validation as the one process's. Counting the metrics or the loss on both ranks, or leaving out
    the sum of the pieces' log-probs, moves them by far more than the tolerance."""
    split = tmp_path / "dapo"
    done = run(grpo_args(toy, split, **DAPO, model__init_from=stopping, train__context_parallel=2), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    assert "world 2 / context parallel 2 = 1 data-parallel groups × micro 8 × accum 2" in done.stderr
    assert cuts_inside_a_completion(toy, split) > 0
    # The first generation's steps (the weights 3e-7 apart at step 2) and the validation at step 0: measured 6e-7.
    # Then, the same completions drawn again: the weights' drift (AdamW's steps normalized) moves the gradient norm
    # and the KL by up to 4e-5 at step 4 (as test_context_parallel_preference_paths.py's gradient norms, 1e-4).
    assert_grpo_records_match(alone / "dapo", split, "train", {1, 2}, rel=1e-5)
    assert_grpo_records_match(alone / "dapo", split, "val", {0}, rel=1e-5)
    assert_grpo_records_match(alone / "dapo", split, "train", {3, 4}, rel=2e-4)
    assert_grpo_records_match(alone / "dapo", split, "val", {4}, rel=2e-4)
    assert max(r["clip_ratio/region_mean"] for r in metrics(split)) > 0  # the ratio left the clip's region
    ours, theirs = (torch.load(run / "checkpoints" / "step_00000003" / "trainer.pt", weights_only=False)
                    ["ranks"][0]["data"]["generation"] for run in (split, alone / "dapo"))
    assert np.array_equal(ours["completions"], theirs["completions"])
    for name in ("old", "reference"):
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)

    # (four_ranks' grpo: GRPO on 2 pieces × 2 slices, resumed from a copy of alone's grpo run without step 4)
    _, resumed, done = four_ranks["grpo"]
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    assert "resuming with 4 (train.context_parallel 2, train.tensor_parallel 2)" in done.stderr
    assert_grpo_records_match(alone / "grpo", resumed, "train", {4}, rel=1e-5)  # from the same weights
    assert_grpo_records_match(alone / "grpo", resumed, "val", {4}, rel=2e-4)  # after its update
    for name, tensor in load_checkpoint(alone / "grpo" / "checkpoints" / "step_00000004")["model"].items():
        torch.testing.assert_close(load_checkpoint(resumed / "checkpoints" / "step_00000004")["model"][name], tensor,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_four_ranks_splitting_rows_and_layers_log_the_preference_records_of_one_process(
        objective, four_ranks):
    """DPO and a reward model, 2 steps of micro 2 × accum 2 with validation at steps 0 and 2, on the pairs whose rows
    are cut inside a sequence: 4 ranks, 2 pieces of each row × 2 slices of each layer (the pieces' per-sequence
    sums over the ranks holding the same slice), log one process's losses, metrics and gradient norms (the
    tolerances of test_context_parallel_preference_paths.py)."""
    names = REWARD_METRICS if objective == "reward" else DPO_METRICS
    # (four_ranks' runs: preference_common's settings, one process, then 2 pieces × 2 slices)
    single, split, four = four_ranks[objective]
    assert four.returncode == 0, four.stderr[-3000:] + four.stdout[-2000:]
    assert "world 4 / context parallel 2 / tensor parallel 2 = 1 data-parallel groups" in four.stderr
    assert_records_match(single, split, names, tolerance=1e-4 if objective == "reward" else 1e-5)
    norms = [r["grad_norm"] for r in metrics(single)]
    assert [r["grad_norm"] for r in metrics(split)] == pytest.approx(norms, rel=1e-4)


def test_grpo_and_preference_pairs_beside_tensor_parallelism_are_taken(monkeypatch):
    """GRPO under context parallelism deals the prompts to every piece (world / tensor_parallel): a global batch
    that does not split into whole groups of num_generations on each is refused by name."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    prompts = ["--train.context_parallel=2", "--data.format=prompts", "--data.dataset=prompts.jsonl",
               "--model.init_from=base", "--grpo.reward_funcs=retnet.train.rewards:exact_match",
               "--grpo.num_generations=4", "--train.micro_batch_size=8", "--data.seq_len=33"]
    load_config("tiny", [*prompts, "--train.global_batch_size=16"])  # 2 groups of 2 pieces: a prompt each; any seq_len
    with pytest.raises(ConfigError, match=r"on each of the 4 pieces sampling them .*multiple of 16; got 8"):
        load_config("tiny", [*prompts, "--train.global_batch_size=8"])
    load_config("tiny", [*prompts, "--train.tensor_parallel=2", "--train.global_batch_size=8"])  # 2 pieces
    preference = ["--train.context_parallel=2", "--train.tensor_parallel=2", "--data.format=preference",
                  "--data.dataset=pairs.jsonl", "--model.init_from=base"]
    load_config("tiny", preference)
    load_config("tiny", [*preference, "--reward.enabled=true"])


def test_a_pieces_padding_copies_are_sampled_but_not_scored(toy, monkeypatch):  # noqa: F811 - toy: the fixture
    """An evaluation of 1 prompt on 2 pieces: the second piece samples a padding copy of it (its sampling forwards
    in step with the first's) but calls no reward source for it, so a judge or an API is called once a completion
    (as in one process), and the group's gathered rewards are the first piece's alone."""
    from types import SimpleNamespace

    from retnet.model import RetNetForCausalLM
    from retnet.model.context_parallel import ContextGroup
    from retnet.train import grpo
    from retnet.train.config_tuning import GrpoConfig

    data = prompts_data(toy)
    eos = data.tokenizer.eos_token_id
    monkeypatch.setattr(grpo, "sample", lambda model, prompts, noise, **kwargs: (
        [np.array([5, 6, eos])] * len(noise), [False] * len(noise)))
    model = RetNetForCausalLM.from_pretrained(toy / "base").train()
    cfg = GrpoConfig(reward_funcs=["toy_rewards:a_share"], num_generations=4, max_completion_length=4)
    trainer = SimpleNamespace(cfg=SimpleNamespace(grpo=cfg, train=SimpleNamespace(steps=1)),
                              device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False),
                              raw_model=model, peft_model=None, fsdp=False, tp_mesh=None, cp_size=1)
    data.start(trainer)

    class Counting:  # the reward sources, each call's completions counted
        def __init__(self, sources):
            self.sources, self.calls = sources, []

        def __call__(self, split, rows, completions):
            self.calls.append(len(completions))
            return self.sources(split, rows, completions)

        def __getattr__(self, name):
            return getattr(self.sources, name)

    data.sources = counting = Counting(data.sources)
    first_piece = torch.full((4, 1), 0.5)

    def gather(shares, mine, group):  # the group's first piece holds the prompt's completions, scored
        shares[:] = [(mine[0], mine[1], first_piece), mine]

    data.context = ContextGroup(1, 2, None)
    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    generation, _ = data._rollout(data.val, np.array([0]), [(0, 1, 0)])
    assert counting.calls == []  # the padding copy's 4 completions were sampled, not scored
    assert generation.totals.sequences == 4 and len(generation.completions) == 4
    # the first piece's rewards, gathered: every completion of the group holds one
    assert generation.advantages.tolist() == [0.0] * 4
