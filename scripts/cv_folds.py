"""What the cross-validation scripts share: a resumable loop over folds and the mean / sd
summary (imported by ``semiseg_cv.py`` and ``ctmd_block_cv.py``, which run from this folder)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Callable, Iterable

from ctlesion.engine.io import write_json


def run_folds(out: Path, count: int, only: Iterable[int] | None, run_fold: Callable[[int, Path], dict]) -> list[dict]:
    """Every fold's row: a finished fold's ``OUT/fold-k/result.json`` as saved, else
    ``run_fold(k, fold_dir)`` (only for the folds in ``only``, all when ``None``), saved and
    printed (lists, e.g. the test slice names, left out of the printed line)."""
    rows = []
    for k in range(count):
        fold_dir = out / f"fold-{k}"
        done = fold_dir / "result.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        if only is not None and k not in only:
            continue
        row = {"fold": k, **run_fold(k, fold_dir)}
        write_json(done, row)
        rows.append(row)
        print(json.dumps({key: v for key, v in row.items() if not isinstance(v, list)}), flush=True)
    return rows


def mean_sd(rows: list[dict], names: Iterable[str]) -> dict:
    """``{name: {"mean", "std"}}`` over the rows that have a value (sample sd; 0 for one row)."""
    summary = {}
    for name in names:
        values = [r[name] for r in rows if r.get(name) is not None]
        if values:
            summary[name] = {"mean": statistics.fmean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return summary
