"""The loss curve of a run (train and validation) as a PNG, read back from its ``metrics.jsonl``."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

PLOT_TEMP_PREFIX = ".tmp-"


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (one JSON object a line; unreadable lines, and lines that are JSON but
    no object, skipped)."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _points(records: list[dict], kind: str, key: str) -> list[tuple[float, float]]:
    """(step, value) of the ``kind`` records whose step and ``key`` are finite numbers: a NaN loss, a null or a
    missing one (a foreign or hand-edited file) is a gap, not a crash after the run's export."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    return [(r["step"], r[key]) for r in records
            if r.get("kind") == kind and number(r.get("step")) and number(r.get(key))]


def loss_label(config: dict) -> str:
    """The y-axis label of a run's loss, from its resolved config (the ``config.json`` the trainer writes): a
    language model's is a cross-entropy, the post-training objectives' are not (GRPO's is often negative)."""
    section = lambda name: config.get(name) if isinstance(config.get(name), dict) else {}
    kind = section("data").get("format")
    if kind == "prompts":
        return "GRPO loss"
    if kind == "unpaired":
        return "KTO loss"
    if kind == "preference":
        if section("reward").get("enabled"):
            return "reward model loss"
        loss_type = section("dpo").get("loss_type") or "sigmoid"
        return f"preference loss ({'+'.join(map(str, loss_type)) if isinstance(loss_type, list) else loss_type})"
    if distilled(config):  # (at alpha 0 its loss is the cross-entropy)
        return "distillation loss (nats/token)"
    return "cross-entropy (nats/token)"


def distilled(config: dict) -> bool:
    """Whether a run's resolved config is a distillation whose training loss is not its cross-entropy (a
    ``distill.teacher`` at ``distill.alpha`` above 0): its validation loss is the plain cross-entropy, as every run's."""
    distill = config.get("distill") if isinstance(config.get("distill"), dict) else {}
    alpha = distill.get("alpha", 1.0)
    return bool(distill.get("teacher")) and not (isinstance(alpha, (int, float)) and alpha == 0)


def _run_config(metrics_path: Path) -> dict:
    """The ``config.json`` beside ``metrics_path`` ({} when there is none or it is unreadable)."""
    try:
        config = json.loads((Path(metrics_path).parent / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def plot_losses(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Train loss per logged step and validation loss per evaluation against the step; None if no data. The
    y-axis names the run's objective (:func:`loss_label` of the ``config.json`` beside ``metrics_path``); a
    distillation's training cross-entropy is drawn too, the quantity its validation loss measures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics_path)
    train, val = _points(records, "train", "loss"), _points(records, "val", "val_loss")
    if not train and not val:
        return None
    config = _run_config(metrics_path)
    # A distillation's training loss is its KD mix, its validation the plain cross-entropy (comparable across runs):
    # drawn alone, the two would show a gap of nats that is no overfitting. Its records' ce_loss is the comparable one.
    distillation = distilled(config)
    train_ce = _points(records, "train", "ce_loss") if distillation else []
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        # a lone point is a line of no length: only a marker shows it (a run of one logged step)
        ax.plot(*zip(*train), label="train (distillation loss)" if train_ce else "train", color="tab:blue",
                linewidth=1.2, marker="o" if len(train) == 1 else None, markersize=3.5)
    if train_ce:
        ax.plot(*zip(*train_ce), label="train (cross-entropy)", color="tab:blue", linestyle="--", linewidth=1.2,
                marker="o" if len(train_ce) == 1 else None, markersize=3.5)
    if val:
        ax.plot(*zip(*val), label="validation (cross-entropy)" if distillation else "validation",
                color="tab:orange", marker="o", markersize=3.5, linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a short run's ticks would fall between its steps
    ax.set_ylabel(loss_label(config))
    ax.set_title(title or "RetNet training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    # Redrawn while the run goes on: a viewer (or a run killed mid-write) must never meet half a PNG
    tmp = out_png.with_name(f"{PLOT_TEMP_PREFIX}{out_png.name}-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return out_png


def remove_stale_plots(out_png: Path, *, keep: bool) -> bool:
    """Remove the temporary files of draws of ``out_png`` cut short (a process killed while writing) and, unless
    ``keep``, ``out_png`` itself: the plot of an earlier run in that directory, which would pass for this run's
    until this one draws its own. Whether ``out_png`` was removed."""
    out_png = Path(out_png)
    for path in out_png.parent.glob(f"{PLOT_TEMP_PREFIX}{out_png.name}-*"):
        path.unlink(missing_ok=True)
    if keep or not (out_png.is_file() or out_png.is_symlink()):
        return False
    out_png.unlink(missing_ok=True)
    return True


__all__ = ["distilled", "loss_label", "plot_losses", "read_metrics", "remove_stale_plots"]
