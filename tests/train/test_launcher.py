"""What ``retnet-train`` shows as a user runs it, tested on the trainer's parts without a training run."""

from __future__ import annotations

import types

import pytest
import torch

from retnet.train import trainer as trainer_module
from retnet.train.trainer import Trainer


@pytest.mark.parametrize("progress", [False, True])
def test_the_validation_loss_is_shown_with_or_without_the_progress_bar(progress, monkeypatch):
    """With the progress bar (``logging.progress``, the default) the validation loss was written nowhere on the
    console, not even the final one: only the bar's training loss, and metrics.jsonl, told how the run went."""
    shown, records = [], []
    monkeypatch.setattr(trainer_module.logger, "info", lambda message, *args: shown.append(message % args))
    data = types.SimpleNamespace(masked=False, val_batches=lambda blocks: [torch.zeros(2, 4, dtype=torch.long)])
    stub = types.SimpleNamespace(
        model=torch.nn.Linear(1, 1), cfg=types.SimpleNamespace(train=types.SimpleNamespace(eval_blocks=2)),
        data=data, device=torch.device("cpu"), group_rank=0, counts_loss=True, autocast=torch.autocast("cpu",
                                                                                                     enabled=False),
        _loss=lambda batch: torch.tensor(2.5), _log=records.append, is_main=True, step=7,
        _progress=object() if progress else None)
    assert Trainer.evaluate(stub) == pytest.approx(2.5)
    assert records[0]["val_loss"] == pytest.approx(2.5)
    assert [line for line in shown if "val loss" in line] == ["step 7: val loss 2.5000, ppl 12.18"]


@pytest.mark.parametrize("named", ["checkpoints", "output_dir"])
def test_a_resume_path_that_holds_checkpoints_names_the_one_to_give(named, tmp_path):
    """``--train.resume=runs/x`` or ``runs/x/checkpoints`` (a folder of checkpoints, as other launchers take) was
    refused as "incomplete: no manifest.json (a crash while writing?)": a corrupt checkpoint, not a wrong path."""
    from retnet.train.checkpoint import CheckpointError

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step:08d}").mkdir(parents=True)
    given = root if named == "checkpoints" else tmp_path
    stub = types.SimpleNamespace(cfg=types.SimpleNamespace(train=types.SimpleNamespace(resume=str(given))),
                                 ckpt_root=tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=r"train\.resume .* holds checkpoints.*step_00000004.*train\.resume=auto"):
        Trainer._pick_checkpoint(stub)
