"""Two torchrun ranks of the training launcher resume their own checkpoints to the losses of a run never stopped, in
every checkpoint layout (DDP full and sharded, FSDP2 sharded, streamed data; FSDP2's full layout in
test_tensor_parallel.py), DDP over 2 ranks logs one process's losses, and a global batch the 2 ranks cannot split
is refused. Every 2-rank run of the module is one of a single torchrun launch (``two_rank_runs``). Apart from
test_training.py so that pytest-xdist can run these long launches beside it."""

from __future__ import annotations

import math

import pytest
import torch

from retnet.train.checkpoint import list_checkpoints, verify_checkpoint

from .conftest import micro_args, run_train_many

# The 2-rank runs of test_two_ranks_resume_the_same_losses: a constant learning rate, checkpoints at step 3.
RESUMED = dict(checkpoint__interval=3, optim__schedule="constant")
SHARDED_DDP = dict(checkpoint__layout="sharded")  # DDP: every rank holds the whole state; each writes a part of it
LAYOUTS = {
    "ddp-streaming": dict(data__streaming=True, data__val_documents=10),  # DDP, streaming data split by node
    "fsdp2": dict(train__parallelism="fsdp"),  # FSDP2: each rank saves and loads its shard
    # (FSDP2's full layout, gathered on rank 0 and cut by each rank, is the tensor-parallel runs' default: the same
    # code loads and saves it in test_tensor_parallel.py, under FSDP2 too)
    "ddp-sharded-layout": SHARDED_DDP,  # DDP: every rank holds the whole state; each writes a part of it
}


def _fsdp_sharded(setup: dict) -> bool:
    return setup.get("train__parallelism") == "fsdp" and "checkpoint__layout" not in setup


@pytest.fixture(scope="module")
def two_rank_runs(corpus, tokenizer_dir, cache_dir, tmp_path_factory):
    """Every 2-rank run of this module, one after another in one torchrun launch (a rank's start, importing torch
    and transformers, dwarfs a micro run): for each layout of test_two_ranks_resume_the_same_losses its whole
    5-step run and its resume(s), then test_batch_that_does_not_divide_across_two_ranks's refused run (last: it
    changes nothing the others read). ``{layout: (whole directory, whole run, resumed directory, [resume runs])}``
    and ``"indivisible": (output directory, run)``. The ddp-sharded-layout whole run is also the DDP run that
    test_ddp_two_processes_match_one_process compares with one process."""
    root = tmp_path_factory.mktemp("two-ranks")

    def micro(out, **overrides):
        return micro_args(corpus, tokenizer_dir, cache_dir, out, **overrides)

    plan, slices = [], {}
    for name, setup in LAYOUTS.items():
        whole, resumed = root / name / "whole", root / name / "resumed"
        common = dict(**setup, **RESUMED)
        runs = [micro(whole, **common, train__steps=5, checkpoint__export=_fsdp_sharded(setup))]
        if setup.get("checkpoint__layout") == "sharded":
            # extends a finished 3-step run to 5 (resume=auto in its own directory)
            runs += [micro(resumed, **common, train__steps=3), micro(resumed, **common, train__steps=5)]
        else:
            # resumes the whole run's checkpoint into another directory (one run fewer)
            runs += [micro(resumed, **common, train__steps=5,
                           train__resume=whole / "checkpoints" / "step_00000003")]
        slices[name] = (whole, resumed, len(plan), len(plan) + len(runs))
        plan += runs
    indivisible = root / "indivisible"
    plan.append(micro(indivisible, train__global_batch_size=6, train__micro_batch_size=2))
    done = run_train_many(plan, nproc=2, out=root / "launch")
    results = {name: (whole, done[start], resumed, done[start + 1:end])
               for name, (whole, resumed, start, end) in slices.items()}
    results["indivisible"] = (indivisible, done[-1])
    return results


@pytest.fixture(scope="module")
def sharded_ddp_run(two_rank_runs):
    """The 5-step run of 2 DDP ranks writing sharded checkpoints, shared by two tests: the whole run that
    test_two_ranks_resume_the_same_losses[ddp-sharded-layout] resumes, and the DDP run that
    test_ddp_two_processes_match_one_process compares with one process. ``(output directory, process)``."""
    whole, done, _, _ = two_rank_runs["ddp-sharded-layout"]
    return whole, done


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(micro, tmp_path, sharded_ddp_run, run_here, read_metrics):
    """DDP over 2 ranks (micro 2 × accum 1 × 2 ranks) and one process (micro 2 × accum 2) of the same global batch
    of 4 log the same training and validation losses (at steps 0 and 5). The 2 ranks' run is the one
    test_two_ranks_resume_the_same_losses resumes (its checkpoint settings change no loss)."""
    single = tmp_path / "single"
    ddp, two = sharded_ddp_run
    one = run_here(micro(single, **SHARDED_DDP, **RESUMED, train__steps=5))  # global 4 = micro 2 × accum 2 × 1 rank
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr + two.stdout
    assert "world 2 × micro 2 × accum 1" in two.stderr
    a = [r["loss"] for r in read_metrics(single)]
    b = [r["loss"] for r in read_metrics(ddp)]
    assert len(a) == len(b) == 5 and a[0] != a[-1]
    assert b == pytest.approx(a, rel=1e-4)
    assert [r["step"] for r in read_metrics(ddp, "val")] == [r["step"] for r in read_metrics(single, "val")] == [0, 5]
    assert [r["val_loss"] for r in read_metrics(ddp, "val")] == pytest.approx(
        [r["val_loss"] for r in read_metrics(single, "val")], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_resume_the_same_losses(layout, two_rank_runs, micro, tmp_path, run_here, read_metrics):
    """2 torchrun ranks: the 5-step run resumed from its step-3 checkpoint replays its last losses (model,
    optimizer and each rank's data position restored). A constant learning rate, so the schedule does not
    depend on train.steps. One layout also extends a finished 3-step run to 5 (resume=auto in its own
    directory); the others resume the whole run's checkpoint into another directory (one run fewer). Every
    layout's runs are the module's launch (two_rank_runs; the ddp-sharded-layout whole run is
    test_ddp_two_processes_match_one_process's too)."""
    setup = LAYOUTS[layout]
    common = dict(**setup, **RESUMED)
    fsdp_sharded = _fsdp_sharded(setup)
    whole, done, resumed, resumes = two_rank_runs[layout]
    assert done.returncode == 0, done.stderr[-3000:]
    if setup.get("checkpoint__layout") == "sharded":
        first, again = resumes
        assert first.returncode == 0
    else:
        (again,) = resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 3" in again.stderr
    expected = [r["loss"] for r in read_metrics(whole)]
    got = [r["loss"] for r in read_metrics(resumed)]
    assert len(expected) == 5 and got[-2:] == pytest.approx(expected[-2:], rel=1e-6)
    if fsdp_sharded:
        # FSDP2 trains, checkpoints at the interval and at the end, and exports a whole model from its shards.
        from transformers import AutoModelForCausalLM

        assert all(math.isfinite(x) for x in expected) and expected[-1] < expected[0]
        assert [verify_checkpoint(p)["step"] for p in list_checkpoints(whole / "checkpoints")] == [3, 5]
        exported = AutoModelForCausalLM.from_pretrained(whole / "export")
        assert exported.config.hidden_size == 32 and torch.isfinite(exported(torch.tensor([[1, 2, 3]])).logits).all()
        # Sharded (the default under FSDP2): each rank wrote and hashed its own shard. One process reads both
        # (another world size), and continues the same losses up to the order of the gradient reduction.
        checkpoint = whole / "checkpoints" / "step_00000003"
        files = verify_checkpoint(checkpoint)["files"]
        assert {"state/__0_0.distcp", "state/__1_0.distcp"} <= set(files) and not (checkpoint / "model.pt").exists()
        one = tmp_path / "one"
        alone = run_here(micro(one, **common, train__steps=5, train__resume=checkpoint))
        assert alone.returncode == 0, alone.stderr[-3000:]
        assert "written by 2 ranks" in alone.stderr
        assert [r["loss"] for r in read_metrics(one)] == pytest.approx(expected[-2:], rel=1e-5)


@pytest.mark.slow
def test_batch_that_does_not_divide_across_two_ranks(two_rank_runs):
    out, done = two_rank_runs["indivisible"]
    assert done.returncode != 0
    assert "train.global_batch_size (6) must be a multiple of train.micro_batch_size × world_size" in done.stderr
    assert not (out / "checkpoints").exists()
