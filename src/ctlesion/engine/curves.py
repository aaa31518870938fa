"""Learning curves: ``curves.png`` next to ``train_log.jsonl``, so a user sees whether a run
converged.

:func:`curve_series` turns the log's records into per-epoch series: the mean of every loss
term over the epoch's steps (keys containing ``loss``), and each validation metric at the
epochs it was scored. A ``resume`` line drops what a run logged after the position it
resumed from, so a run resumed from an earlier checkpoint is drawn once, as it was trained.
:func:`plot_learning_curves` draws them (matplotlib's object API on its Agg canvas: no
pyplot, no global backend change); :func:`write_learning_curves` does both, atomically.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .io import atomic_write

__all__ = ["CurveSeries", "read_log", "curve_series", "plot_learning_curves", "write_learning_curves",
           "LOG_FILE", "CURVES_FILE"]

LOG_FILE, CURVES_FILE = "train_log.jsonl", "curves.png"


@dataclass
class CurveSeries:
    """``train[term] = [(epoch, mean over the epoch's steps)]``; ``validation[metric] =
    [(epoch, value)]``; epochs count from 1."""

    train: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    validation: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def read_log(path: str | Path) -> list[dict]:
    """The records of a JSONL log; a line that does not parse (a run killed mid-line) is
    left out with a warning naming the file and line."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{number}: unreadable log line left out of the learning curves", stacklevel=2)
    return records


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def curve_series(records: list[dict]) -> CurveSeries:
    """Per-epoch loss means and validation metrics of a run's log records (see the module)."""
    steps: list[dict] = []
    scored: list[dict] = []
    for record in records:
        event = record.get("event")
        if event == "resume":     # what was logged past the resumed position did not happen in this run
            steps = [r for r in steps if r.get("step", 0) <= record.get("step", 0)]
            scored = [r for r in scored if r.get("epoch", 0) <= record.get("epoch", 0)]
        elif event == "validation":
            scored.append(record)
        elif event is None and "epoch" in record:
            steps.append(record)
    sums: dict[str, dict[int, list[float]]] = {}
    for record in steps:
        for key, value in record.items():
            if "loss" in key and _number(value):
                sums.setdefault(key, {}).setdefault(int(record["epoch"]), []).append(float(value))
    series = CurveSeries()
    for key, per_epoch in sums.items():
        series.train[key] = [(epoch, sum(v) / len(v)) for epoch, v in sorted(per_epoch.items())]
    for record in scored:
        for key, value in record.items():
            if key not in ("event", "epoch", "step") and (_number(value) or value is None):
                series.validation.setdefault(key, []).append(
                    (int(record["epoch"]), float("nan") if value is None else float(value)))
    for key in series.validation:   # one value per epoch: the last one scored
        series.validation[key] = sorted(dict(series.validation[key]).items())
    return series


def plot_learning_curves(series: CurveSeries, path: str | Path, title: str | None = None) -> Path:
    """Write the curves as a PNG (atomically): loss terms per epoch (log scale when all are
    positive) and, when there are any, the validation metrics."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = 2 if series.validation else 1
    fig = Figure(figsize=(6.4 * panels, 4.2), dpi=100)
    ax = fig.add_subplot(1, panels, 1)
    values = [v for points in series.train.values() for _, v in points if math.isfinite(v)]
    for key, points in sorted(series.train.items(), key=lambda kv: (kv[0] not in ("loss", "cls_loss", "seg_loss"), kv[0])):
        ax.plot([e for e, _ in points], [v for _, v in points], marker="o", markersize=3,
                linewidth=2.0 if key in ("loss", "cls_loss", "seg_loss") else 1.0, label=key)
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean training loss")
    ax.set_title("training losses (mean over each epoch)")
    if series.train:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no training steps logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, alpha=0.3)
    if series.validation:
        vx = fig.add_subplot(1, 2, 2)
        for key, points in sorted(series.validation.items()):
            vx.plot([e for e, _ in points], [v for _, v in points], marker="o", markersize=3, label=key)
        scores = [v for points in series.validation.values() for _, v in points if math.isfinite(v)]
        if scores and 0.0 <= min(scores) and max(scores) <= 1.0:
            vx.set_ylim(-0.02, 1.02)      # AP, F1, accuracy, Dice: on their whole scale
        vx.set_xlabel("epoch")
        vx.xaxis.set_major_locator(MaxNLocator(integer=True))
        vx.set_title("validation")
        vx.legend(fontsize=7)
        vx.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def write_learning_curves(out_dir: str | Path, title: str | None = None) -> Path | None:
    """``OUT/curves.png`` from ``OUT/train_log.jsonl`` (``None`` when there is no log yet)."""
    out_dir = Path(out_dir)
    log = out_dir / LOG_FILE
    if not log.is_file():
        return None
    return plot_learning_curves(curve_series(read_log(log)), out_dir / CURVES_FILE, title)
