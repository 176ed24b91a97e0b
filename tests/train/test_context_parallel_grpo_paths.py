"""Context parallelism (``train.context_parallel``) beside tensor parallelism on GRPO and preference pairs: four
torchrun gloo ranks (two pieces × two tensor-parallel slices) resume one process's GRPO checkpoint within a
generation under a per-sequence normalization and log its next step, and log one process's DPO and reward-model
records; the refusals of a GRPO batch the pieces cannot share, and a piece's padding copies of a prompt sampled but
not scored. (Two ranks splitting each row on GRPO from the start: test_grpo.py, in its 2-rank launch.) The launch
also runs test_context_parallel.py's 4-rank case: plain rows split over two data-parallel groups of 2 ranks, checked
here by a test of its name (``[plain-4-ranks]``), and on its first 2 and 3 ranks tests/model/test_context_parallel.py's
rows split along time (context_parallel_cases.py), checked here by the tests of their names: one 4-rank launch for
the three modules' ranks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from retnet.train.checkpoint import load_checkpoint
from retnet.train.config import ConfigError, load_config
from retnet.train.preference import METRICS as DPO_METRICS
from retnet.train.reward import METRICS as REWARD_METRICS
from tests.launch import selected_tests
from tests.model.context_parallel_cases import CASES, PIECE, PIECES, XPOS_CASES, build_case

from .conftest import launch_runs, metrics, micro_args, one_thread
from .test_context_parallel import SPLIT_ROWS, assert_split_rows_log_one_process
from .test_context_parallel_preference_paths import uneven  # noqa: F401 - the fixture
from .test_grpo import COMMON, assert_grpo_records_match, grpo_args, prompts_data, stopping, toy  # noqa: F401 - the fixtures
from .test_preference import assert_records_match, dpo_args
from .test_preference import toy as pairs  # noqa: F401 - the fixture

# tests/model/test_context_parallel.py's rows, on the launch's first ranks: those of CASES in 3 pieces, then the xPos
# rows in 2 pieces (on the first two ranks, a group of their own) and in 3
XPOS_RUNS = [(name, pieces) for pieces in (2, 3) for name in XPOS_CASES]
PIECE_RUNS = [*((name, PIECES) for name in CASES), *XPOS_RUNS]
PIECE_TESTS = ("test_pieces_give_the_whole_rows_outputs_loss_and_gradients",
               "test_without_the_earlier_pieces_state_the_outputs_differ",
               "test_xpos_pieces_give_the_whole_rows_outputs_loss_and_gradients")
PIECES_WORKER = Path(__file__).with_name("context_parallel_pieces_worker.py")

# test_grpo.py's settings of its 2-rank run (COMMON), under a per-sequence normalization with the token ratio, over
# its first generation's 2 steps (a checkpoint at step 1 within it; validation at steps 0 and 2)
GRPO = {**COMMON, "grpo__loss_type": "grpo", "train__steps": 2, "train__eval_interval": 2}


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
    selected tests' runs): ``grpo``, the one-process grpo run (``alone``) resumed from its step-1 checkpoint (a copy
    of ``alone``'s without step 2) on 2 pieces × 2 tensor-parallel slices, then ``dpo`` and ``reward`` (2 × 2 too),
    each after its one-process run (in this process, on one thread as each rank computes), and ``plain``: the plain
    rows of test_context_parallel.py's SPLIT_ROWS split in two on two data-parallel groups, after its one-process
    run (in this process, as that module's runs); before them, on the first ranks, tests/model/test_context_parallel.py's
    rows split along time (PIECE_RUNS, into ``pieces``). ``name`` -> (the one-process run's output dir, the split
    run's, the split run finished); ``"pieces"`` -> (the launch finished, the ranks' results' dir) where they ran."""
    from retnet.train.__main__ import main

    selected, root = selected_tests(request, parameters=True), tmp_path_factory.mktemp("four-ranks")
    runs, singles = {}, {}
    if "test_four_ranks_splitting_rows_and_layers_resume_the_grpo_records_of_one_process" in selected:
        # toy puts toy_rewards.py on the runs' PYTHONPATH while it is up: requested before the launch
        prompts, init, one = (request.getfixturevalue(name) for name in ("toy", "stopping", "alone"))
        resumed = root / "grpo" / "split"
        shutil.copytree(one / "grpo", resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000002")
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
    cases = PIECE_RUNS if any(name.startswith(PIECE_TESTS) for name in selected) else []
    if not (runs or cases):
        return {}
    launch, finished = launch_runs(list(runs.values()), 4, root / "launch", worker=PIECES_WORKER, cases=cases,
                                   cases_out=str(root / "pieces"))
    done = {name: (singles[name], root / name / "split", run) for name, run in zip(runs, finished, strict=True)}
    return {**done, "pieces": (launch, root / "pieces")} if cases else done


@pytest.mark.slow
def test_four_ranks_splitting_rows_and_layers_resume_the_grpo_records_of_one_process(alone, four_ranks):
    """grpo with the token ratio, resumed on 2 pieces × 2 tensor-parallel slices from one process's step-1
    checkpoint within the generation sampled for step 1 (its old and reference log-probs restored): step 2, its
    weights and its validation as the one process's. (2 ranks splitting each row from the start, under dapo with
    GSPO's ratio: test_grpo.py's test_ranks_splitting_each_row_log_the_grpo_records_of_one_process, a run of its
    2-rank launch.)"""
    # (four_ranks' grpo: GRPO on 2 pieces × 2 slices, resumed from a copy of alone's grpo run without step 2)
    _, resumed, done = four_ranks["grpo"]
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    assert "resuming with 4 (train.context_parallel 2, train.tensor_parallel 2)" in done.stderr
    assert_grpo_records_match(alone / "grpo", resumed, "train", {2}, rel=1e-5)  # from the same weights
    assert_grpo_records_match(alone / "grpo", resumed, "val", {2}, rel=2e-4)  # after its update
    for name, tensor in load_checkpoint(alone / "grpo" / "checkpoints" / "step_00000002")["model"].items():
        torch.testing.assert_close(load_checkpoint(resumed / "checkpoints" / "step_00000002")["model"][name], tensor,
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


# ----------------------------------------------------------------------------------------------------------
# tests/model/test_context_parallel.py's rows split along time on the launch's first ranks (context_parallel_cases)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks_results(four_ranks):
    """Each rank's saved pieces (of the first 3 ranks of four_ranks' launch), ``name@pieces`` -> its loss, last hidden
    states and gradients."""
    launch, out = four_ranks["pieces"]
    missing = [rank for rank in range(PIECES) if not (out / f"rank{rank}.pt").exists()]
    assert not missing, f"ranks {missing} saved no pieces: " + launch.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(PIECES)]


def assert_pieces_give_the_whole_row(ranks_results, name: str, pieces: int, hidden_tol: dict, grad_tol: dict):
    """The ``pieces`` ranks' hidden states, summed losses and summed gradients of case ``name`` are the whole row's
    in one process."""
    model, input_ids, labels, cu_seqlens, mode = build_case(name, pieces)
    whole = model(input_ids=input_ids, labels=labels, cu_seqlens=cu_seqlens, retention_mode=mode, use_cache=False,
                  output_hidden_states=True)
    whole.loss.backward()
    results = [ranks_results[rank][f"{name}@{pieces}"] for rank in range(pieces)]
    hidden = torch.cat([piece["hidden"] for piece in results], 1)
    assert torch.isfinite(hidden).all()
    torch.testing.assert_close(hidden, whole.hidden_states[-1].detach(), **hidden_tol)
    # num_items_in_batch = the whole row's targets: the pieces' losses add up to its mean
    torch.testing.assert_close(sum(piece["loss"] for piece in results), whole.loss.detach(), rtol=1e-5, atol=1e-6)
    for param_name, param in model.named_parameters():
        summed = sum(piece["grads"][param_name] for piece in results)
        torch.testing.assert_close(summed, param.grad, **grad_tol, msg=param_name)


@pytest.mark.parametrize("name", list(CASES))
def test_pieces_give_the_whole_rows_outputs_loss_and_gradients(ranks_results, name):
    """tests/model/test_context_parallel.py's rows (context_parallel_cases.CASES) in 3 pieces on 3 gloo ranks: the
    whole row's outputs, loss and gradients in one process."""
    assert_pieces_give_the_whole_row(ranks_results, name, PIECES, dict(rtol=1e-4, atol=1e-5), dict(rtol=1e-4, atol=1e-6))


def test_without_the_earlier_pieces_state_the_outputs_differ(ranks_results):
    """The check above can fail: the last piece run alone from a zero state (positions as in the row) is off."""
    model, input_ids, _, _, mode = build_case("rows_chunkwise")
    whole = model(input_ids=input_ids, use_cache=False, output_hidden_states=True, retention_mode=mode)
    alone = model(input_ids=input_ids[:, -PIECE:], position_ids=torch.arange(2 * PIECE, 3 * PIECE)[None],
                  use_cache=False, output_hidden_states=True, retention_mode=mode)
    assert (alone.hidden_states[-1] - whole.hidden_states[-1][:, -PIECE:]).abs().max() > 1e-2
    torch.testing.assert_close(ranks_results[-1][f"rows_chunkwise@{PIECES}"]["hidden"], whole.hidden_states[-1][:, -PIECE:],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, pieces", XPOS_RUNS, ids=[f"{name}-{pieces}" for name, pieces in XPOS_RUNS])
def test_xpos_pieces_give_the_whole_rows_outputs_loss_and_gradients(ranks_results, name, pieces):
    """tests/model/test_context_parallel.py's xPos rows (XPOS_CASES) in 2 and 3 pieces: the whole row's."""
    assert_pieces_give_the_whole_row(ranks_results, name, pieces, dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-5, atol=1e-5))
