"""Knowledge distillation under context parallelism (``distill.teacher`` with ``train.context_parallel``): torchrun
gloo ranks splitting every packed row in two, the teacher running each rank's piece with its states crossing the cut,
log one process's losses, KD and CE parts, validation losses and gradient norms, count the teacher's forward in their
MFU, and resume from their checkpoint. Dropping the teacher's state that crosses the cut moves the losses by 3e-4."""

from __future__ import annotations

import pytest

from retnet.model import RetNetConfig
from retnet.train.__main__ import main
from retnet.train.flops import flops_per_token

from .conftest import micro_args
from .test_context_parallel import SPLIT_ROWS, _losses
from .test_distill import distill_args

# What a training record logs of a distillation step, each the split run's as one process's
LOGGED = ("loss", "kd_loss", "ce_loss", "grad_norm")


@pytest.fixture(scope="module")
def xpos_teacher(tmp_path_factory, corpus, tokenizer_dir):
    """A teacher of another shape than the students (hidden 48, 3 layers, 3 heads of 16) with xPos, whose states
    crossing a cut move between the pieces' xPos frames, trained 30 steps (a random one's near-uniform predictions
    hardly depend on the context the cut would lose) and exported with its tokenizer."""
    root = tmp_path_factory.mktemp("xpos-teacher")
    assert main(micro_args(corpus, tokenizer_dir, root / "cache", root / "run", checkpoint__export=True,
                           train__steps=30, optim__lr=1e-2, model__hidden_size=48, model__num_hidden_layers=3,
                           model__num_attention_heads=3, model__extra__use_xpos="true")) == 0
    return root / "run" / "export"


@pytest.mark.slow
def test_ranks_splitting_each_row_distill_as_one_process(xpos_teacher, micro, tmp_path, run_many, run_here,
                                                         read_metrics):
    """One process (micro 3 × accum 2) and 2 ranks splitting each packed row of 3 × 32 tokens at token 48 (inside
    the second block's document, which the teacher's and the student's states carry across the cut), at alpha 0.6
    and temperature 2: the same loss, kd_loss, ce_loss and gradient norms at every step, and validation losses (the
    plain cross-entropy, split the same way). The split run resumes from its step-2 checkpoint on 2 ranks to its
    own last records."""
    single, split, resumed = tmp_path / "single", tmp_path / "split", tmp_path / "resumed"
    common = dict(SPLIT_ROWS, data__document_boundaries=True, optim__lr=3e-3, logging__peak_flops=1e12)

    def args(out, **overrides):
        return distill_args(micro(out, **common, **overrides), xpos_teacher, distill__alpha=0.6,
                            distill__temperature=2.0)

    one = run_here(args(single))
    assert one.returncode == 0, one.stderr[-3000:]
    # one launch of 2 ranks: the split run, then its resume checked below
    two, again = run_many([
        args(split, train__context_parallel=2),
        args(resumed, train__context_parallel=2, train__resume=split / "checkpoints" / "step_00000002"),
    ], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-2000:]
    assert "world 2 / context parallel 2 = 1 data-parallel groups × micro 3 × accum 2" in two.stderr
    expected = read_metrics(single)
    assert len(expected) == 4 and expected[-1]["kd_loss"] < expected[0]["kd_loss"]
    assert all(r["loss"] == pytest.approx(0.6 * r["kd_loss"] + 0.4 * r["ce_loss"], rel=1e-6) for r in expected)
    for key in LOGGED:
        assert _losses(read_metrics, split, key=key) == pytest.approx(
            _losses(read_metrics, single, key=key), rel=1e-5), key
    assert _losses(read_metrics, split, "val", "val_loss") == pytest.approx(
        _losses(read_metrics, single, "val", "val_loss"), rel=1e-5)
    assert [r["tokens"] for r in read_metrics(split)] == [r["tokens"] for r in expected]
    # MFU: the teacher's forward (a third of its training FLOPs) beside the student's training, retention over a
    # rank's piece as the trainer counts it (a piece of 48 tokens whose documents span at most a block of 32), the
    # global batch's tokens per second, over both devices
    teacher = RetNetConfig.from_pretrained(xpos_teacher)
    student = RetNetConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       chunk_size=16, vocab_size=teacher.vocab_size)
    per_token = flops_per_token(student, 32) + flops_per_token(teacher, 32) / 3
    assert [r["mfu"] for r in read_metrics(split)] == pytest.approx(
        [per_token * r["tokens_per_s"] / (1e12 * 2) for r in read_metrics(split)], rel=1e-9)

    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 2" in again.stderr
    for key in LOGGED:
        assert _losses(read_metrics, resumed, key=key) == pytest.approx(
            _losses(read_metrics, split, key=key)[-2:], rel=1e-6), key


def test_distillation_is_taken_beside_context_and_tensor_parallelism(tmp_path):
    """The split runs' settings load (the refusal of train.context_parallel with distill.teacher is gone): beside
    tensor parallelism each rank of a piece runs the whole teacher, exchanging its states with the ranks holding the
    same slice of the other pieces (by hand: 2 × 2 ranks, also under FSDP2 with the sequence split, log one
    process's losses to 4e-7). The vocabulary-parallel head stays refused: the KD loss takes the whole head."""
    from retnet.train.config import ConfigError, load_config

    teacher = f"--distill.teacher={tmp_path}"
    assert load_config("tiny", [teacher, "--train.context_parallel=2"]).train.context_parallel == 2
    load_config("tiny", [teacher, "--train.context_parallel=2", "--train.tensor_parallel=2",
                         "--train.sequence_parallel=true"])
    with pytest.raises(ConfigError, match=r"train\.vocab_parallel is not supported with distillation"):
        load_config("tiny", [teacher, "--train.context_parallel=2", "--train.tensor_parallel=2",
                             "--train.vocab_parallel=true"])
