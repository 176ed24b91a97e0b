"""loss.png of a distillation run: its training loss is the KD mix, its validation loss the plain cross-entropy."""

from __future__ import annotations

import json

import pytest

RECORDS = [{"kind": "val", "step": 0, "val_loss": 6.24},
           {"kind": "train", "step": 1, "loss": 1.07, "kd_loss": 1.07, "ce_loss": 6.25},
           {"kind": "train", "step": 2, "loss": 1.03, "kd_loss": 1.03, "ce_loss": 6.21},
           {"kind": "val", "step": 2, "val_loss": 6.13}]


def _lines(monkeypatch, tmp_path, config: dict) -> dict[str, list]:
    """The plotted lines of ``RECORDS`` under ``config`` (the run's config.json): label -> y values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from retnet.train.plots import plot_losses

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "config.json").write_text(json.dumps(config))
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png") == tmp_path / "loss.png"
    return {line.get_label(): list(line.get_ydata()) for line in figures[-1].axes[0].get_lines()}


def test_a_distillation_plot_draws_the_training_cross_entropy_its_validation_measures(monkeypatch, tmp_path):
    """The validation curve (cross-entropy, ~6.2) was drawn against the training KD loss (~1.0) alone, under one
    label: a gap of 5 nats that is no overfitting. The training cross-entropy (ce_loss) is drawn beside it."""
    lines = _lines(monkeypatch, tmp_path, {"data": {"format": "text"},
                                           "distill": {"teacher": "runs/big/export", "alpha": 1.0}})
    assert lines == {"train (distillation loss)": [1.07, 1.03], "train (cross-entropy)": [6.25, 6.21],
                     "validation (cross-entropy)": [6.24, 6.13]}


@pytest.mark.parametrize("config", [{"data": {"format": "text"}},
                                    {"distill": {"teacher": "runs/big/export", "alpha": 0.0}}])
def test_other_runs_plot_their_loss_alone(monkeypatch, tmp_path, config):
    """Without a teacher, or at distill.alpha 0 (the loss is the cross-entropy), the two curves as before."""
    lines = _lines(monkeypatch, tmp_path, config)
    assert lines == {"train": [1.07, 1.03], "validation": [6.24, 6.13]}
