"""A run ends with the validation of its final step, also one resumed at exactly train.steps whose checkpoint's
step has no validation record (a run shortened to a checkpoint's step), and never twice (a finished run run again,
an evaluation at a checkpoint's step); the loss plot's title counts the parameters as the start-up log does."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from retnet.train.__main__ import main

from .conftest import timeless

CHECKPOINTED = dict(checkpoint__interval=3)


def _val_steps(read_metrics, out) -> list[int]:
    return [r["step"] for r in read_metrics(out, "val")]


@pytest.mark.parametrize("eval_interval", [0, 3], ids=["no-eval-at-the-checkpoint", "eval-at-the-checkpoint"])
def test_a_run_shortened_to_a_checkpoints_step_ends_with_its_validation_once(
        eval_interval, micro, tmp_path, read_metrics, capsys):
    out = tmp_path / "run"
    common = dict(**CHECKPOINTED, train__eval_interval=eval_interval)
    assert main(micro(out, **common, train__steps=6)) == 0
    assert _val_steps(read_metrics, out) == ([0, 3, 6] if eval_interval else [0, 6])
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    capsys.readouterr()

    assert main(micro(out, **common, train__steps=3)) == 0  # resume=auto: step_00000003, already at train.steps
    assert "finished at step 3" in capsys.readouterr().err
    val = read_metrics(out, "val")
    assert [r["step"] for r in val] == [0, 3]  # step 6's dropped; step 3's written once (kept, or evaluated now)
    assert all(r["val_loss"] is not None for r in val)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]

    assert main(micro(out, **common, train__steps=3)) == 0  # the finished run again: only exports again
    assert _val_steps(read_metrics, out) == [0, 3]


def test_an_explicit_resume_at_train_steps_evaluates_its_step(micro, tmp_path, read_metrics):
    out = tmp_path / "run"
    assert main(micro(out, **CHECKPOINTED, train__steps=6)) == 0
    assert main(micro(out, **CHECKPOINTED, train__steps=3,
                      train__resume=out / "checkpoints" / "step_00000003")) == 0
    assert _val_steps(read_metrics, out) == [0, 3]


def test_a_resume_into_another_directory_at_train_steps_evaluates_there(micro, tmp_path, read_metrics):
    """The checkpoint's run had its validation at that step (its final one), the new directory has no record."""
    first, moved = tmp_path / "first", tmp_path / "moved"
    assert main(micro(first, train__steps=3)) == 0
    assert main(micro(moved, train__steps=3, train__resume=first / "checkpoints" / "step_00000003")) == 0
    assert _val_steps(read_metrics, moved) == [3]
    assert _val_steps(read_metrics, first) == [0, 3]


def test_two_ranks_resumed_at_train_steps_evaluate_once(micro, tmp_path, run_many, read_metrics):
    """Rank 0 alone reads metrics.jsonl: every rank must take its answer (else one waits in an evaluation)."""
    out = tmp_path / "run"
    step_3 = out / "checkpoints" / "step_00000003"
    runs = run_many([micro(out, **CHECKPOINTED, train__steps=6),
                     micro(out, **CHECKPOINTED, train__steps=3, train__resume=step_3),
                     micro(out, **CHECKPOINTED, train__steps=3)], 2)
    for done in runs:
        assert done.returncode == 0, done.stderr[-3000:]
    assert "finished at step 3" in runs[1].stderr
    assert _val_steps(read_metrics, out) == [0, 3]


def test_a_run_shortened_to_a_checkpoint_inside_a_log_window_writes_its_final_record(micro, tmp_path, read_metrics):
    """The checkpoint of step 5 holds step 5's loss, not yet logged (logging.log_interval 4): a run shortened to it
    writes the record of step 5 a 5-step run writes (loss, lr, grad norm, tokens), before its validation, once."""
    out, straight = tmp_path / "run", tmp_path / "straight"
    common = dict(checkpoint__interval=5, logging__log_interval=4, optim__schedule="constant")
    assert main(micro(out, **common, train__steps=6)) == 0
    step_5 = out / "checkpoints" / "step_00000005"
    assert main(micro(out, **common, train__steps=5, train__resume=step_5)) == 0
    assert main(micro(straight, **common, train__steps=5)) == 0
    records = [(r["kind"], r["step"]) for r in read_metrics(out, "train") + read_metrics(out, "val")]
    assert sorted(records) == [("train", 4), ("train", 5), ("val", 0), ("val", 5)]
    assert timeless(read_metrics(out)) == timeless(read_metrics(straight))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines[-2:]] == ["train", "val"]

    # the finished run again, its metrics.jsonl holding lines that are JSON but no record (hand-edited): only those go
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('null\n[5]\n{"kind": "train", "step": null}\n')
    assert main(micro(out, **common, train__steps=5)) == 0
    assert (out / "metrics.jsonl").read_text().splitlines() == lines


@pytest.mark.parametrize("line", ["null", "[5]", "7", '"text"', '{"kind": "train", "step": null}',
                                  '{"kind": "train", "step": Infinity}', '{"kind": "val", "step": [3]}'])
def test_a_metrics_line_that_is_no_record_is_dropped_at_a_resume_not_a_traceback(line):
    from retnet.train.trainer import _record_key

    assert _record_key(line)[0] > 10**15  # after every step: a resume keeps none of it
    assert _record_key('{"kind": "val", "step": 3}') == (3, "val")


def test_the_loss_plot_title_counts_parameters_as_the_log_does(micro, tmp_path, monkeypatch, capsys):
    from retnet.train import plots

    titles = []
    monkeypatch.setattr(plots, "plot_losses", lambda metrics, path, title: titles.append(title))
    # a model under 50K parameters (which ".1f" showed as 0.0M)
    assert main(micro(tmp_path / "run", train__steps=1, model__hidden_size=16, model__num_attention_heads=1,
                      model__num_hidden_layers=1, model__vocab_size=512)) == 0
    logged = re.search(r"model \S+: (\d+\.\d+)M parameters", capsys.readouterr().err)
    assert logged is not None and 0 < float(logged.group(1)) < 0.05
    (title,) = titles
    assert f"({logged.group(1)}M params)" in title


def test_a_progress_bar_that_fails_to_open_leaves_no_warning_hooks(micro, tmp_path, monkeypatch):
    """The warning hooks are the bar's, closed with it: entered before it, a bar that raised left warnings.showwarning
    and logging.lastResort patched for the rest of the process."""
    import logging
    import warnings

    import tqdm.auto

    class NoTrainingBar(tqdm.auto.tqdm):  # (a class: datasets subclasses tqdm.auto.tqdm when imported)
        def __init__(self, *args, **kwargs):
            if kwargs.get("desc") == "train":
                raise RuntimeError("no terminal for the bar")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", NoTrainingBar)
    before = warnings.showwarning, logging.lastResort
    with pytest.raises(RuntimeError, match="no terminal for the bar"):
        main(micro(tmp_path / "run", logging__progress=True, train__steps=1))
    assert (warnings.showwarning, logging.lastResort) == before
