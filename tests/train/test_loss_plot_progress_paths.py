"""loss.png while a run goes on: drawn again at its checkpoints and evaluations (not only when it ends), an earlier
run's removed at the start, written whole or not at all, and a plot that cannot be written only a warning."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from retnet.train.trainer import Trainer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def drawn(monkeypatch):
    """The train curve's steps of each loss plot drawn, in order (the figures caught as pyplot closes them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps: list[list[float]] = []
    close = plt.close

    def caught(fig=None):
        if fig is not None:
            steps.append(next(list(line.get_xdata()) for line in fig.axes[0].get_lines() if line.get_label() == "train"))
        close(fig)

    monkeypatch.setattr(plt, "close", caught)
    return steps


def _fail_before_step(monkeypatch, step: int, fail) -> None:
    """Make the run call ``fail(trainer)`` instead of training step ``step``."""
    train_step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step",
                        lambda self: fail(self) if self.step + 1 == step else train_step(self))


def test_the_plot_follows_the_run_and_a_resumed_one_keeps_the_steps_before(micro, run_here, drawn, tmp_path,
                                                                           monkeypatch):
    """loss.png was drawn only when a run ended: a run in an output_dir holding an earlier run's plot showed that
    old curve until it finished, and for good when it crashed. It is removed at the start and drawn at each
    checkpoint; the resumed run's plot has the steps before the resume too (metrics.jsonl keeps them)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "loss.png").write_bytes(b"an earlier run's curve")

    def crash(trainer):
        raise RuntimeError("killed")

    train_step = Trainer.train_step
    _fail_before_step(monkeypatch, 3, crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_here(micro(out, train__steps=4, checkpoint__interval=2))
    assert (out / "loss.png").read_bytes().startswith(PNG)
    assert drawn == [[1, 2]]  # at the checkpoint of step 2
    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert run_here(micro(out, train__steps=4, checkpoint__interval=2)).returncode == 0
    assert (out / "loss.png").read_bytes().startswith(PNG)
    assert drawn[-1] == [1, 2, 3, 4]
    assert not list(out.glob(".tmp-*"))


def test_a_run_stopped_on_a_nan_loss_plots_its_curve_up_to_the_stop(micro, run_here, drawn, tmp_path, monkeypatch):
    """A non-finite loss stops the run (exit status 3) before its end, where the plot was drawn: an earlier run's
    loss.png stayed, passing for this run's curve."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "loss.png").write_bytes(b"an earlier run's curve")
    _fail_before_step(monkeypatch, 3, lambda trainer: trainer._stop_nonfinite("non-finite loss nan"))
    assert run_here(micro(out, train__steps=4)).returncode == 3
    assert (out / "loss.png").read_bytes().startswith(PNG)
    assert drawn == [[1, 2]]


def test_a_nan_stop_records_the_steps_since_the_last_record(micro, run_here, drawn, read_metrics, tmp_path,
                                                           monkeypatch):
    """With logging.log_interval above 1 the finite steps between the last record and a non-finite loss (up to 9 at
    the default 10), those just before the divergence, were in neither metrics.jsonl nor the plot drawn at the stop.
    They get their record, as the window a run never stopped would average so far."""
    out = tmp_path / "run"
    losses = []
    train_step = Trainer.train_step

    def step(trainer):
        if trainer.step + 1 == 7:
            trainer._stop_nonfinite("loss is nan")
        losses.append(train_step(trainer))
        return losses[-1]

    monkeypatch.setattr(Trainer, "train_step", step)
    assert run_here(micro(out, train__steps=8, logging__log_interval=4)).returncode == 3
    records = read_metrics(out)
    assert [r["step"] for r in records] == [4, 6]
    assert records[1]["loss"] == pytest.approx(sum(losses[4:6]) / 2, rel=1e-12)
    assert records[1]["tokens"] == 6 * 4 * 32 and records[1]["tokens_per_s"] > 0
    assert drawn[-1] == [4, 6]


def test_a_nan_stop_right_after_a_checkpoint_leaves_its_window_to_the_resume(micro, run_here, read_metrics, tmp_path,
                                                                           monkeypatch):
    """The checkpoint of the step before the stop carries the steps since the last record, and its resume writes
    their record: one written at the stop too would have counted them twice."""
    out = tmp_path / "run"
    args = micro(out, train__steps=8, logging__log_interval=4, checkpoint__interval=6)
    with monkeypatch.context() as patch:
        _fail_before_step(patch, 7, lambda trainer: trainer._stop_nonfinite("loss is nan"))
        assert run_here(args).returncode == 3
    assert [r["step"] for r in read_metrics(out)] == [4]
    assert run_here(args).returncode == 0
    assert [r["step"] for r in read_metrics(out)] == [4, 8]


def test_the_record_at_a_nan_stop_leaves_the_stopped_steps_metrics_out(micro, run_here, read_metrics, tmp_path,
                                                                       monkeypatch):
    """A distillation's kd_loss and ce_loss went into the log window before the step's gradient norm was checked:
    the record written at the stop would have averaged a step that never trained (loss = alpha·kd + (1−alpha)·ce
    no longer held)."""
    import torch

    assert run_here(micro(tmp_path / "teacher", train__steps=1, checkpoint__export=True)).returncode == 0
    out = tmp_path / "run"
    args = [a for a in micro(out, train__steps=4, logging__log_interval=2) if not a.startswith("--data.tokenizer=")]
    clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def clip_or_nan(*args, **kwargs):
        calls.append(clip(*args, **kwargs))
        return torch.tensor(float("nan")) if len(calls) == 4 else calls[-1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_or_nan)
    stopped = run_here([*args, f"--distill.teacher={tmp_path / 'teacher' / 'export'}", "--distill.alpha=0.5"])
    assert stopped.returncode == 3 and "gradient norm is nan" in stopped.stderr
    record = read_metrics(out)[-1]
    assert record["step"] == 3
    assert record["loss"] == pytest.approx(0.5 * record["kd_loss"] + 0.5 * record["ce_loss"], rel=1e-6)


def _full_disk(monkeypatch):
    """Figure.savefig writing half a file, then failing as a full disk does."""
    from matplotlib.figure import Figure

    def savefig(self, fname, **kwargs):
        Path(fname).write_bytes(PNG[:4])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig)


def test_a_plot_that_cannot_be_written_is_a_warning(micro, run_here, tmp_path, monkeypatch):
    """A full disk while drawing loss.png, after the checkpoint and the export were written, raised its OSError out
    of the run: a traceback and a failing exit for a run that succeeded."""
    out = tmp_path / "run"
    _full_disk(monkeypatch)
    done = run_here(micro(out, train__steps=2, checkpoint__export=True))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "could not write" in done.stderr and "No space left on device" in done.stderr
    assert (out / "export" / "config.json").is_file() and (out / "checkpoints" / "step_00000002").is_dir()
    assert not (out / "loss.png").exists() and not list(out.glob(".tmp-*"))


def test_a_plot_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """Drawn while the run goes on, loss.png must never be half a PNG to whoever looks at it, nor after a draw
    that failed: the earlier plot stays as it was."""
    import json

    from retnet.train.plots import plot_losses

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"kind": "train", "step": 1, "loss": 5.0}) + "\n")
    assert plot_losses(metrics, tmp_path / "loss.png") == tmp_path / "loss.png"
    before = (tmp_path / "loss.png").read_bytes()
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        plot_losses(metrics, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes() == before and before.startswith(PNG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_a_draw_while_the_run_goes_on_waits_in_proportion_to_its_cost_and_never_stops_the_run(tmp_path, monkeypatch,
                                                                                              caplog):
    """A draw reads the whole metrics.jsonl: late in a long run it takes seconds, which every rank waits out at the
    next step's all-reduce, so the next waits at least 50 times as long (not only 30 s); and one that fails while the
    run goes on (a matplotlib error, not only an OS error) is a warning, not the end of the training."""
    import types

    from retnet.train import plots
    from retnet.train import trainer as trainer_module

    clock = [1000.0]
    monkeypatch.setattr(trainer_module, "monotonic", lambda: clock[0])
    calls = []

    def slow_draw(*args, **kwargs):
        calls.append(clock[0])
        clock[0] += 2.0  # a draw of 2 s: the next no sooner than 100 s after it began
        if len(calls) == 2:
            raise ValueError("a matplotlib error")

    monkeypatch.setattr(plots, "plot_losses", slow_draw)
    fake = types.SimpleNamespace(
        is_main=True, _plotted_at=None, _plot_gap=trainer_module._PLOT_EVERY_S, metrics_path=tmp_path / "m.jsonl",
        _metrics=types.SimpleNamespace(flush=lambda: None), output_dir=tmp_path, model_name="micro", n_params=1e6,
        cfg=types.SimpleNamespace(lora=types.SimpleNamespace(enabled=False)))

    def plot(at: float, final: bool = False) -> None:
        clock[0] = at
        Trainer._plot(fake, final)

    plot(1000.0)
    plot(1040.0)  # past 30 s, within 100 s of the last draw's start: skipped
    assert calls == [1000.0]
    plot(1101.0)  # the draw fails: a warning
    assert calls == [1000.0, 1101.0] and "a matplotlib error" in caplog.text
    with pytest.raises(ValueError, match="a matplotlib error"):
        calls.clear()
        calls.append(0.0)  # the second call raises again: at the end a failure that is no OS error is raised
        plot(1102.0, final=True)


def test_log_lines_stand_apart_from_the_progress_bar_and_the_last_names_what_was_written(micro, run_here, tmp_path):
    """With the progress bar (the default) each log line began on the bar's line (``tok_s=536][17:57:01 rank0] step
    20: val loss ...``; the start-up line on its 0% frame), the export drew transformers' "Writing model shards" bar,
    and closing the bar drew it again under the final ``finished`` line, which named the output directory only."""
    import re

    from transformers.utils import logging as transformers_logging

    out = tmp_path / "run"
    done = run_here(micro(out, train__steps=4, train__eval_interval=2, checkpoint__interval=2,
                          checkpoint__export=True, logging__progress=True))
    assert done.returncode == 0, done.stderr
    pieces = [piece for piece in re.split(r"[\r\n]", done.stderr) if piece.strip()]
    assert any(piece.startswith("train:") for piece in pieces)  # the bar was drawn
    glued = [piece for piece in pieces if " rank0] " in piece and not piece.startswith("[")]
    assert not glued, glued
    assert "Writing model shards" not in done.stderr
    assert transformers_logging.is_progress_bar_enabled()  # hidden for the export only
    assert pieces[-1].endswith(f"] finished at step 4; outputs in {out} (model: {out / 'export'}, loss plot: "
                               f"{out / 'loss.png'})"), pieces[-3:]


def test_a_library_warning_mid_run_goes_above_the_progress_bar(micro, run_here, tmp_path, monkeypatch):
    """A ``warnings.warn`` of a library while the bar was open (torch's, transformers') was printed on the bar's
    line (``| 2/4 [00:01<00:01, ...]/.../x.py:3: UserWarning: ...``) and the bar's next frame over it."""
    import re
    import sys
    import warnings

    # As outside pytest, which records warnings instead of printing them
    monkeypatch.setattr(warnings, "_showwarnmsg_impl",
                        lambda message: sys.stderr.write(warnings._formatwarnmsg(message)))
    train_step = Trainer.train_step

    def step_and_warn(self):
        loss = train_step(self)
        if self.step == 2:
            warnings.warn("a library's warning mid-run", UserWarning, stacklevel=1)
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_and_warn)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        done = run_here(micro(tmp_path / "run", train__steps=4, logging__progress=True))
    assert done.returncode == 0, done.stderr
    pieces = [piece for piece in re.split(r"[\r\n]", done.stderr) if piece.strip()]
    assert any(piece.startswith("train:") for piece in pieces)  # the bar was drawn
    warned = [piece for piece in pieces if "UserWarning: " in piece]
    assert len(warned) == 1 and re.match(r"\S+\.py:\d+: UserWarning: ", warned[0]), warned
    assert warnings.showwarning is warnings._showwarning_orig  # the run's end put it back
