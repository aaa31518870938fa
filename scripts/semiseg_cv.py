"""K-fold cross-validation of a segmentation preset on COVID-SemiSeg's 50 labelled slices.

    python scripts/semiseg_cv.py configs/semiseg_cpu_r18_s3.yaml --out runs/cv-r18 [--folds 5]
        [--only 0 2] [--set train.time_limit_s=360 ...]

Folds are contiguous blocks of the slices in numeric file order (fold k holds slices
k*n/K .. (k+1)*n/K - 1): no slice is in two folds, and neighbouring numbers, which in this
collection often come from one scan, stay on one side. MedSeg gives no patient ids, so a
patient may still have slices on both sides of a fold boundary.

For each fold: write ``OUT/fold-k/{train,test}.txt``, train the preset on the training
slices (``data.split``; ``val_data`` off), score the final checkpoint on the held-out fold
with ``ctlesion.engine.api.evaluate_checkpoint`` (legacy + COCO + pixel Dice), and write
``OUT/fold-k/eval/metrics.json``. At the end ``OUT/cv.json`` holds every fold and the mean
and standard deviation of each number, and the Markdown table is printed. A fold whose
``eval/metrics.json`` exists is not redone (rerun the same command after a stop).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from ctlesion.data.discovery import natural_key
from ctlesion.engine.api import evaluate_checkpoint
from ctlesion.engine.io import write_json
from ctlesion.engine.train import train
from ctlesion.experiment import load_experiment
from cv_folds import mean_sd, run_folds

NUMBERS = {
    "COCO segm AP": ("coco", "segm", "AP"),
    "COCO segm AP50": ("coco", "segm", "AP50"),
    "legacy mAP": ("legacy", "mAP"),
    "legacy AP50": ("legacy", "AP50"),
    "Dice": ("pixel", "lesion", "dice"),
    "sensitivity": ("pixel", "lesion", "sensitivity"),
    "specificity": ("pixel", "lesion", "specificity"),
    "GGO Dice": ("pixel", "GGO", "dice"),
    "C Dice": ("pixel", "C", "dice"),
}


def fold_lists(names: list[str], folds: int) -> list[list[str]]:
    """Contiguous blocks of ``names`` (already in order), sizes differing by at most one."""
    per, extra = divmod(len(names), folds)
    out, start = [], 0
    for k in range(folds):
        size = per + (k < extra)
        out.append(names[start:start + size])
        start += size
    return out


def pick(metrics: dict, path: tuple[str, ...]):
    """The number at ``path`` in ``metrics``, or None where the fold has none (e.g. a class
    with no pixels)."""
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics


def with_all_numbers(row: dict, fold_dir: Path) -> dict:
    """``row`` with any of NUMBERS it lacks (a fold finished before they were added) read
    from the fold's ``eval/metrics.json``."""
    missing = [name for name in NUMBERS if name not in row]
    metrics_file = fold_dir / "eval" / "metrics.json"
    if missing and metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        row = {**row, **{name: pick(metrics, NUMBERS[name]) for name in missing}}
    return row


def run_fold(cfg_path: str, overrides: list[str], out: Path, train_names: list[str], test_names: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("\n".join(train_names) + "\n")
    (out / "test.txt").write_text("\n".join(test_names) + "\n")
    cfg = load_experiment(cfg_path, [*overrides, f"data.split={out / 'train.txt'}", "val_data=null",
                                     "train.eval_every=null"])
    start = time.monotonic()
    result = train(cfg, out / "train", resume=(out / "train" / "checkpoint").exists(), progress=False)
    seconds = time.monotonic() - start
    # The held-out fold as the training data was read (same root, size, min_area), not augmented.
    test_data = replace(cfg.data, split=str(out / "test.txt"), augment=None, cache=False)
    metrics = evaluate_checkpoint(result.checkpoint, test_data, out / "eval", overlays=4, progress=False)
    return {"steps": result.steps, "epochs": result.epochs_done, "train_seconds": round(seconds, 1),
            **{name: pick(metrics, path) for name, path in NUMBERS.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only", type=int, nargs="*", help="run only these folds (0-based)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_experiment(args.config, args.set)
    images = Path(cfg.data.root) / "Imgs"
    names = sorted((p.name for p in images.iterdir() if p.suffix.lower() in (".jpg", ".png")), key=natural_key)
    blocks = fold_lists(names, args.folds)
    out = Path(args.out)

    def fold(k: int, fold_dir: Path) -> dict:
        test_names = blocks[k]
        train_names = [n for j, b in enumerate(blocks) if j != k for n in b]
        return {"test": test_names, **run_fold(args.config, args.set, fold_dir, train_names, test_names)}

    rows = [with_all_numbers(row, out / f"fold-{row['fold']}") for row in run_folds(out, len(blocks), args.only, fold)]
    summary = mean_sd(rows, NUMBERS)
    write_json(out / "cv.json", {"config": args.config, "overrides": args.set, "folds": args.folds,
                                 "rows": rows, "summary": summary})
    print("| fold | steps | s | " + " | ".join(NUMBERS) + " |")
    print("|---" * (len(NUMBERS) + 3) + "|")
    for r in sorted(rows, key=lambda r: r["fold"]):
        print(f"| {r['fold']} | {r['steps']} | {r['train_seconds']:.0f} | "
              + " | ".join("n/a" if r[n] is None else f"{r[n]:.3f}" for n in NUMBERS) + " |")
    print("| mean ± sd | | | " + " | ".join(f"{summary[n]['mean']:.3f} ± {summary[n]['std']:.3f}" if n in summary
                                             else "n/a" for n in NUMBERS) + " |")


if __name__ == "__main__":
    main()
