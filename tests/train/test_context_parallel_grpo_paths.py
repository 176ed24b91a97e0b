"""Context parallelism (``train.context_parallel``) beside tensor parallelism on GRPO and preference pairs: four
torchrun gloo ranks (two pieces × two tensor-parallel slices) resume one process's GRPO checkpoint within a
generation under a per-sequence normalization and log its next step, and log one process's DPO and reward-model
records; the refusals of a GRPO batch the pieces cannot share, and a piece's padding copies of a prompt sampled but
not scored. (Two ranks splitting each row on GRPO from the start: test_grpo.py, in its 2-rank launch.) The launch
also runs test_context_parallel.py's 4-rank case: plain rows split over two data-parallel groups of 2 ranks, checked
here by a test of its name (``[plain-4-ranks]``), one 4-rank launch for both modules' runs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from retnet.train.checkpoint import load_checkpoint
from retnet.train.config import ConfigError, load_config
from retnet.train.preference import METRICS as DPO_METRICS
from retnet.train.reward import METRICS as REWARD_METRICS
from tests.launch import selected_tests

from .conftest import metrics, micro_args, one_thread, run_train_many
from .test_context_parallel import SPLIT_ROWS, assert_split_rows_log_one_process
from .test_context_parallel_preference_paths import uneven  # noqa: F401 - the fixture
from .test_grpo import COMMON, assert_grpo_records_match, grpo_args, prompts_data, stopping, toy  # noqa: F401 - the fixtures
from .test_preference import assert_records_match, dpo_args
from .test_preference import toy as pairs  # noqa: F401 - the fixture

# test_grpo.py's settings of its 2-rank run (COMMON), under a per-sequence normalization with the token ratio
GRPO = {**COMMON, "grpo__loss_type": "grpo"}


@pytest.fixture(scope="module")
def alone(toy, stopping, tmp_path_factory):  # noqa: F811 - toy, stopping: the fixtures
    """The one-process grpo run, on one thread as each rank computes: its output dir's parent (``grpo``)."""
    root = tmp_path_factory.mktemp("grpo-alone")
    from retnet.train.__main__ import main

    with one_thread():
        assert main(grpo_args(toy, root / "grpo", **GRPO, model__init_from=stopping)) == 0
    return root


def preference_common(objective: str, uneven) -> dict:  # noqa: F811 - uneven: the fixture's path
    """The preference runs' settings: 2 steps of micro 2 × accum 2 with validation at steps 0 and 2 on the uneven
    pairs, a reward model's or DPO's."""
    extra = {"reward__enabled": "true"} if objective == "reward" else {}
    return dict(data__dataset=uneven, train__steps=2, train__eval_interval=2, checkpoint__interval=0, **extra)


@pytest.fixture(scope="module")
def four_ranks(request, corpus, tokenizer_dir, cache_dir, tmp_path_factory):
    """The module's 4-rank runs in one torchrun launch, each rank's process importing torch once, not four times (the
    selected tests' runs): ``grpo``, the one-process grpo run (``alone``) resumed from its step-3 checkpoint (a copy
    of ``alone``'s without step 4) on 2 pieces × 2 tensor-parallel slices, then ``dpo`` and ``reward`` (2 × 2 too),
    each after its one-process run (in this process, on one thread as each rank computes), and ``plain``: the plain
    rows of test_context_parallel.py's SPLIT_ROWS split in two on two data-parallel groups, after its one-process
    run (in this process, as that module's runs). ``name`` -> (the one-process run's output dir, the split run's,
    the split run finished)."""
    from retnet.train.__main__ import main

    selected, root = selected_tests(request, parameters=True), tmp_path_factory.mktemp("four-ranks")
    runs, singles = {}, {}
    if "test_four_ranks_splitting_rows_and_layers_resume_the_grpo_records_of_one_process" in selected:
        # toy puts toy_rewards.py on the runs' PYTHONPATH while it is up: requested before the launch
        prompts, init, one = (request.getfixturevalue(name) for name in ("toy", "stopping", "alone"))
        resumed = root / "grpo" / "split"
        shutil.copytree(one / "grpo", resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000004")
        runs["grpo"] = grpo_args(prompts, resumed, **GRPO, model__init_from=init, train__context_parallel=2,
                                 train__tensor_parallel=2)
        singles["grpo"] = one / "grpo"
    preference = "test_four_ranks_splitting_rows_and_layers_log_the_preference_records_of_one_process"
    for objective in ("dpo", "reward"):
        if f"{preference}[{objective}]" not in selected:
            continue
        data = request.getfixturevalue("pairs")
        common = preference_common(objective, request.getfixturevalue("uneven"))
        singles[objective] = root / objective / "single"
        with one_thread():  # as each rank computes
            assert main(dpo_args(data, singles[objective], **common)) == 0, objective
        runs[objective] = dpo_args(data, root / objective / "split", **common, train__context_parallel=2,
                                   train__tensor_parallel=2)
    if "test_ranks_splitting_each_row_log_the_losses_of_one_process[plain-4-ranks]" in selected:
        def plain(out, **overrides):
            return micro_args(corpus, tokenizer_dir, cache_dir, out, **SPLIT_ROWS, data__document_boundaries=False,
                              **overrides)

        singles["plain"] = root / "plain" / "single"
        assert main(plain(singles["plain"])) == 0
        runs["plain"] = plain(root / "plain" / "split", train__context_parallel=2)
    finished = run_train_many(list(runs.values()), nproc=4, out=root / "launch") if runs else []
    return {name: (singles[name], root / name / "split", done) for name, done in zip(runs, finished, strict=True)}


@pytest.mark.slow
def test_four_ranks_splitting_rows_and_layers_resume_the_grpo_records_of_one_process(alone, four_ranks):
    """grpo with the token ratio, resumed on 2 pieces × 2 tensor-parallel slices from one process's step-3
    checkpoint within the generation sampled for step 3 (its old and reference log-probs restored): step 4, its
    weights and its validation as the one process's. (2 ranks splitting each row from the start, under dapo with
    GSPO's ratio: test_grpo.py's test_ranks_splitting_each_row_log_the_grpo_records_of_one_process, a run of its
    2-rank launch.)"""
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


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [4], ids=["plain-4-ranks"])
def test_ranks_splitting_each_row_log_the_losses_of_one_process(nproc, four_ranks, read_metrics):
    """test_context_parallel.py's test of this name on 4 ranks, a run of this module's 4-rank launch: one process
    (micro 3 × accum 2) and 4 ranks splitting each plain row of 32 at 16, inside its document (two data-parallel
    groups of 2: micro 3 × accum 1 × 2 groups), log the same training and validation losses, gradient norms and
    token counts."""
    single, split, many = four_ranks["plain"]
    assert_split_rows_log_one_process(read_metrics, single, split, many, nproc)


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
