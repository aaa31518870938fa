"""Leave-one-slice-block-out cross-validation of a slice classifier on COVID-CT-MD.

    python scripts/ctmd_block_cv.py configs/ctmd_ssm_r18_s3_cpu.yaml --out runs/ctmd-ssm [--blocks 3]
        [--gap 3] [--only 0] [--set train.time_limit_s=600 ...]

With three patients (one per class) no test set is patient-disjoint: every split of slices
leaks the patient. This is the honest substitute: each patient's slices (in head-to-feet
order) are cut into ``--blocks`` contiguous blocks; fold ``k`` tests on block ``k`` of every
patient and trains on the other blocks, leaving out the ``--gap`` slices on each side of
the test block (neighbouring slices look alike, 2 mm apart here). What it measures is how
well a model recognises other parts of scans it has seen, **not** diagnosis of a new
patient.

Writes ``OUT/fold-k/`` (training run, ``eval/metrics.json``, confusion matrix,
per-slice predictions) and ``OUT/cv.json`` with every fold and the mean / sd; prints a
Markdown table. Finished folds (``result.json``) are not redone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from torch.utils.data import Dataset

from ctlesion.data.factory import build_dataset
from ctlesion.engine.api import scoring_cls_bn
from ctlesion.engine.checkpoint import load_checkpoint
from ctlesion.engine.evaluate_classifier import evaluate_classifier, write_classification_outputs
from ctlesion.engine.io import write_json
from ctlesion.engine.loop import resolve_device
from ctlesion.engine.train import train
from ctlesion.experiment import load_experiment
from cv_folds import mean_sd, run_folds


class Slices(Dataset):
    """The slices ``indices`` of ``dataset``, keeping its class names, labels and patients."""

    def __init__(self, dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self.slice_class_names = dataset.slice_class_names
        self.labels = [dataset.labels[i] for i in self.indices]
        self.patient_ids = [dataset.patient_ids[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def block_folds(patient_ids: list[str], blocks: int, gap: int) -> list[tuple[list[int], list[int]]]:
    """``(train indices, test indices)`` per fold: block ``k`` of each patient is the test set;
    training leaves out ``gap`` slices on either side of it."""
    by_patient: dict[str, list[int]] = {}
    for i, pid in enumerate(patient_ids):
        by_patient.setdefault(pid, []).append(i)
    folds = []
    for k in range(blocks):
        train_idx, test_idx = [], []
        for members in by_patient.values():
            per, extra = divmod(len(members), blocks)
            start = k * per + min(k, extra)
            stop = start + per + (k < extra)
            test_idx += members[start:stop]
            train_idx += [m for j, m in enumerate(members) if j < start - gap or j >= stop + gap]
        folds.append((train_idx, test_idx))
    return folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--gap", type=int, default=3, help="slices left out of training on each side of a test block")
    parser.add_argument("--only", type=int, nargs="*")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_experiment(args.config, args.set)
    full = build_dataset(cfg.data, cfg.model.detector.mask_type)
    folds = block_folds(list(full.patient_ids), args.blocks, args.gap)
    out = Path(args.out)

    def fold(k: int, fold_dir: Path) -> dict:
        train_idx, test_idx = folds[k]
        start = time.monotonic()
        result = train(cfg, fold_dir / "train", dataset=Slices(full, train_idx), progress=False,
                       resume=(fold_dir / "train" / "checkpoint").exists())
        seconds = time.monotonic() - start
        model, run_cfg, _ = load_checkpoint(result.checkpoint)
        metrics, records = evaluate_classifier(model, Slices(full, test_idx), resolve_device("auto"),
                                               eval_cfg=run_cfg.eval, cls_bn=scoring_cls_bn(run_cfg), progress=False)
        write_classification_outputs(fold_dir / "eval", metrics, records,
                                     title=f"{run_cfg.model.name}, block {k}: {len(test_idx)} slices")
        return {"train_slices": len(train_idx), "test_slices": len(test_idx), "steps": result.steps,
                "train_seconds": round(seconds, 1), "accuracy": metrics["overall_accuracy"],
                "f1_weighted": metrics["f1_weighted"], "sensitivity": metrics.get("sensitivity")}

    rows = run_folds(out, len(folds), args.only, fold)
    summary = mean_sd(rows, ("accuracy", "f1_weighted"))
    write_json(out / "cv.json", {"config": args.config, "overrides": args.set, "blocks": args.blocks, "gap": args.gap,
                                 "rows": rows, "summary": summary})
    print("| block | train / test slices | steps | s | accuracy | weighted F1 | sensitivity per class |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["fold"]):
        sens = ", ".join(f"{c} {v:.2f}" for c, v in (r["sensitivity"] or {}).items() if v is not None)
        print(f"| {r['fold']} | {r['train_slices']} / {r['test_slices']} | {r['steps']} | {r['train_seconds']:.0f} | "
              f"{r['accuracy']:.3f} | {r['f1_weighted']:.3f} | {sens} |")
    if summary:
        print("| mean ± sd | | | | " + " | ".join(f"{summary[n]['mean']:.3f} ± {summary[n]['std']:.3f}"
                                                  for n in ("accuracy", "f1_weighted")) + " | |")


if __name__ == "__main__":
    main()
