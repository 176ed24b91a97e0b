"""Context parallelism (``train.context_parallel``) on preference pairs: two torchrun gloo ranks splitting each
micro-batch's packed row of pairs along time log one process's DPO and reward-model records (training and
validation losses, every metric, the gradient norms) and, for DPO, compute its reference log-probs; a row the pieces
do not divide is padded with a sequence of its own."""

from __future__ import annotations

import pytest
import torch

from retnet.model.context_parallel import ContextGroup
from retnet.train.config import load_config
from retnet.train.preference import METRICS as DPO_METRICS
from retnet.train.preference import REFERENCE_FILE
from retnet.train.reward import METRICS as REWARD_METRICS

from .conftest import one_thread, run_train_many
from .test_preference import assert_records_match, dpo_args, question, toy, write_jsonl  # noqa: F401 - toy


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Standard pairs whose rejected answers run 1 to 3 words longer than the chosen ones: a row of 2 pairs (their
    chosen sequences, then their rejected ones) is then cut inside a sequence, and is of odd length in some rows
    (padded to split). (The toy pairs' answers are equally long: their rows are cut between the chosen and the
    rejected halves, where no state crosses.)"""
    rows = [{"prompt": f"Q: {question(i)}\nA:", "chosen": " Maybe, yes", "rejected": " Maybe" + ", no" * (1 + i % 3)}
            for i in range(23)]
    return write_jsonl(tmp_path_factory.mktemp("uneven") / "pairs.jsonl", rows)


def test_a_row_the_pieces_do_not_divide_gets_a_sequence_of_padding():
    """A packed row of 7 tokens (sequences of 3 and 4) over 2 ranks: 8 tokens, the eighth a sequence of its own, so
    that no state crosses into it from the real ones; each piece's cu_seqlens and its start in the row."""
    row, bounds = torch.arange(1, 8)[None], torch.tensor([0, 3, 7], dtype=torch.int32)
    first, first_shard, first_start = ContextGroup(0, 2).shard(row, bounds)
    second, second_shard, second_start = ContextGroup(1, 2).shard(row, bounds)
    assert (first_start, second_start) == (0, 4) and first_shard.lengths == (4, 4)
    assert first["input_ids"].tolist() == [[1, 2, 3, 4]] and second["input_ids"].tolist() == [[5, 6, 7, 0]]
    assert first["cu_seqlens"].tolist() == [0, 3, 4] and second["cu_seqlens"].tolist() == [0, 3, 4]
    assert second_shard.offsets == (0, 1)  # the second piece goes on one token into the second sequence
    _, even, _ = ContextGroup(1, 2).shard(row[:, :6], torch.tensor([0, 3, 6], dtype=torch.int32))
    assert even.offsets == (0, 0) and even.lengths == (3, 3)  # divided: no padding


def test_pairs_of_any_length_are_taken():
    """Rows of pairs are padded to split: data.seq_len need not divide (it bounds a sequence, not a row)."""
    load_config("tiny", ["--train.context_parallel=2", "--model.init_from=base", "--data.format=preference",
                         "--data.dataset=pairs.jsonl", "--data.seq_len=33"])
    load_config("tiny", ["--train.context_parallel=2", "--model.init_from=base", "--data.format=preference",
                         "--data.dataset=pairs.jsonl", "--reward.enabled=true"])


def split_common(objective: str, uneven) -> dict:
    """The split runs' settings: 3 steps of micro 2 × accum 2, validation at steps 0, 2 and 3, on the uneven pairs; a
    reward model's or DPO's."""
    extra = {"reward__enabled": "true"} if objective == "reward" else {}
    return dict(data__dataset=uneven, train__steps=3, train__eval_interval=2, checkpoint__interval=0, **extra)


@pytest.fixture(scope="module")
def two_ranks(toy, uneven, tmp_path_factory):  # noqa: F811 - toy, uneven: the fixtures
    """The DPO and reward-model runs of 2 ranks in one torchrun launch (each rank's process imports torch once, not
    twice), each after its one-process run (in this process, on one thread as each rank computes: the thread
    count's summation order is not the split's): ``objective`` -> (the one-process run's output dir, the split
    run's, the split run finished)."""
    from retnet.train.__main__ import main

    root, runs = tmp_path_factory.mktemp("two-ranks"), {}
    for objective in ("dpo", "reward"):
        common = split_common(objective, uneven)
        with one_thread():
            assert main(dpo_args(toy, root / objective / "single", **common)) == 0, objective
        runs[objective] = dpo_args(toy, root / objective / "split", **common, train__context_parallel=2)
    finished = run_train_many(list(runs.values()), nproc=2, out=root / "launch")
    return {name: (root / name / "single", root / name / "split", done)
            for name, done in zip(runs, finished, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_two_ranks_splitting_each_row_of_pairs_log_the_records_of_one_process(objective, two_ranks, read_metrics):
    """3 steps of micro 2 × accum 2 (2 pairs a row: 4 sequences cut inside one, which the second piece goes on
    with from the state the first leaves), validation at steps 0, 2 and 3: one process and two ranks of one
    context-parallel group log the same losses, metrics (each pair counted once, not once a piece) and gradient
    norms. DPO: the reference log-probs are one process's (the pieces' sums added up). A reward model: each
    sequence's score read on the piece holding its last token. Dropping the state that crosses the cut, or counting
    the metrics or the gradients C times, moves them by far more than the tolerance."""
    metrics_names = REWARD_METRICS if objective == "reward" else DPO_METRICS
    single, split, two = two_ranks[objective]  # (split_common's settings)
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-2000:]
    assert "world 2 / context parallel 2 = 1 data-parallel groups × micro 2 × accum 2" in two.stderr
    for kind, key in (("train", "loss"), ("val", "val_loss")):  # measured 1e-7
        assert [r[key] for r in read_metrics(split, kind)] == pytest.approx(
            [r[key] for r in read_metrics(single, kind)], rel=1e-5)
    # Every metric (rel or abs): counted once a piece, one doubles. Measured DPO's 9e-7; a reward model's rewards 9e-6
    # (near zero, where AdamW's normalized steps on near-zero gradients amplify the split's other summation order)
    assert_records_match(single, split, metrics_names, tolerance=1e-4 if objective == "reward" else 1e-5)
    # the gradients' scale too, which AdamW's steps hide (measured 3e-7)
    norms = [r["grad_norm"] for r in read_metrics(single)]
    assert [r["grad_norm"] for r in read_metrics(split)] == pytest.approx(norms, rel=1e-4)
    assert [r["tokens"] for r in read_metrics(split)] == [r["tokens"] for r in read_metrics(single)]
    if objective == "dpo":
        for part in ("train", "val"):
            torch.testing.assert_close(torch.load(split / REFERENCE_FILE)[part],
                                       torch.load(single / REFERENCE_FILE)[part], rtol=1e-6, atol=1e-5)
