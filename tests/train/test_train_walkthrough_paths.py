"""The README's training section read as a newcomer runs it: what the start-up line says a step holds under each
objective (DPO and reward models batch preference pairs, GRPO completions, not blocks of data.seq_len tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retnet.train.__main__ import main

from .conftest import save_micro_base

PAIRS = 12


def standard_pair(i: int) -> dict:
    return {"prompt": f"Q: is {i} even?\nA:", "chosen": " Maybe, yes", "rejected": " Maybe, no", "solution": "yes"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """pairs.jsonl (standard preference rows, also GRPO prompt rows with a solution) and base/: a random-init micro
    RetNet with a BPE trained on them, saved as an export is (every run's model.init_from)."""
    from retnet.tokenization import train_byte_level_bpe

    root = tmp_path_factory.mktemp("walkthrough")
    rows = [standard_pair(i) for i in range(PAIRS)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    texts = [row["prompt"] + row[side] for row in rows for side in ("chosen", "rejected")]
    save_micro_base(root / "base", train_byte_level_bpe(texts, vocab_size=300))
    return root


def one_step_args(toy: Path, out: Path, **overrides) -> list[str]:
    values = {
        "model.init_from": toy / "base", "data.dataset": toy / "pairs.jsonl", "data.seq_len": 32,
        "data.val_fraction": 0.2, "data.cache_dir": toy / "cache", "train.output_dir": out, "train.steps": 1,
        "train.global_batch_size": 4, "train.micro_batch_size": 2, "train.eval_interval": 0, "train.eval_blocks": 2,
        "optim.warmup_steps": 0, "checkpoint.interval": 0, "checkpoint.export": False, "logging.progress": False,
        "logging.tensorboard": False, "logging.log_interval": 1,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return ["--config", "tiny", *[f"--{k}={v}" for k, v in values.items()]]


@pytest.mark.parametrize(("objective", "unit"), [
    ({"data__format": "preference"}, "global 4 preference pairs (chosen + rejected: up to 32 tokens each)"),
    ({"data__format": "preference", "reward__enabled": "true"},
     "global 4 preference pairs (chosen + rejected: up to 32 tokens each)"),
    ({"data__format": "prompts", "grpo__reward_funcs": "retnet.train.rewards:exact_match",
      "grpo__num_generations": 2, "grpo__max_completion_length": 4},
     "global 4 completions (prompt + completion: up to "),
], ids=["dpo", "reward", "grpo"])
def test_the_start_up_line_counts_what_a_step_batches(toy, tmp_path, capsys, objective, unit):
    """README (DPO): "A micro-batch of train.micro_batch_size pairs is 2× as many sequences"; (GRPO):
    "train.global_batch_size counts completions". The start-up line said "global 4 blocks of 32 tokens" for both."""
    capsys.readouterr()
    assert main(one_step_args(toy, tmp_path / "run", **objective)) == 0
    log = capsys.readouterr().err
    assert unit in log
    assert "blocks of" not in log.split("model fine-tuned from base:", 1)[1].split("\n", 1)[0]


@pytest.mark.parametrize("exported", [True, False], ids=["exported", "still-training"])
def test_a_runs_output_dir_as_the_teacher_is_refused_naming_its_export(toy, tmp_path, exported):
    """README (distillation): refused, naming distill.teacher, "a run's train.output_dir given for its export (the
    error names the export)". A run's output_dir holds config.json (its resolved training configuration), so the
    check for a missing config.json never fired: the refusal was about its tokenizer, or "holds a None model"."""
    import shutil

    from retnet.train.config import ConfigError, DistillConfig
    from retnet.train.distill import resolve_teacher

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"preset": "tiny"}, "train": {"output_dir": str(run)}}))
    if exported:
        shutil.copytree(toy / "base", run / "export")
    with pytest.raises(ConfigError, match=r"distill\.teacher .* is a training run's train.output_dir") as refusal:
        resolve_teacher(DistillConfig(teacher=str(run)))
    assert str(run / "export") in str(refusal.value)
    assert resolve_teacher(DistillConfig(teacher=str(toy / "base"))) == toy / "base"  # a model directory still is one
