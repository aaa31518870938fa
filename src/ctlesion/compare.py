"""``ctlesion compare``: every classifier family on the same phantoms with the same budget.

Trains the Single-Shot Model, the Affinity model, the Attention model, LSTM-2 and the
ResNet18 benchmark from scratch, each for the same wall-clock budget on the same
synthetic phantoms (classification and segmentation sets), scores each on the same
held-out phantoms, prints one table and writes ``OUT/comparison.json``. Per family the
run folder (config, log, checkpoint, metrics, confusion matrix) is ``OUT/compare/<family>``.

This is a like-for-like smoke comparison on a CPU, not a reproduction of the papers'
tables: the budget is minutes, the images are 128-px phantoms, and every model starts
from random weights.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from .config import DataConfig, EvalConfig, ExperimentConfig, TrainConfig
from .errors import ConfigError
from .registry import default_model_config

__all__ = ["FAMILIES", "compare_config", "run_compare"]

# family -> registry model; all ResNet18-based.
FAMILIES = {
    "ssm": "ssm-2branch-r18-s3",
    "affinity": "affinity-r18",
    "attention": "attention-r18",
    "lstm2": "lstm2-r18",
    "resnet18": "cnn-resnet18",
}
COMPARE_SIZE = 128
TRAIN_SEED, SEG_SEED, HELDOUT_SEED = 2, 1, 10_001


def compare_config(family: str, budget_s: float, size: int = COMPARE_SIZE, quick: bool = False) -> ExperimentConfig:
    """One family's run: its registry defaults at ``size`` px, lr 1e-4, the family's own
    update and copy rules ("auto"), stopped by the time budget."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}; choose from {list(FAMILIES)}")
    model = default_model_config(FAMILIES[family])
    model.detector = replace(
        model.detector, min_size=size, max_size=size,
        rpn_pre_nms_top_n_train=min(model.detector.rpn_pre_nms_top_n_train, 500),
        rpn_post_nms_top_n_train=min(model.detector.rpn_post_nms_top_n_train, 300),
        rpn_pre_nms_top_n_test=min(model.detector.rpn_pre_nms_top_n_test, 500),
        rpn_post_nms_top_n_test=min(model.detector.rpn_post_nms_top_n_test, 300),
        box_batch_size_per_image=64, box_positive_fraction=0.5,
    )
    model.classifier = replace(model.classifier, input_size=size)
    data = DataConfig(format="phantom", num_samples=12 if quick else 300, phantom_size=size, seed=TRAIN_SEED,
                      min_area=20, cache=True)
    seg = replace(data, seed=SEG_SEED, num_samples=12 if quick else 120)
    train = TrainConfig(epochs=1 if quick else 20, lr=1e-4, weight_decay=1e-4, batch_size=1, seed=0,
                        save_every=100, max_steps_per_epoch=2 if quick else None, time_limit_s=budget_s)
    val = replace(data, num_samples=12 if quick else 48, seed=HELDOUT_SEED)
    return ExperimentConfig(model=model, data=data, val_data=val, seg_data=seg, train=train,
                            eval=EvalConfig(score_thresh=0.5))


def run_compare(out: str | Path = "demo-output", budget_s: float = 150.0, families=None,
                quick: bool = False, progress: bool = True) -> dict:
    """Train and score each family; returns (and writes) the comparison table."""
    from .engine.api import evaluate_checkpoint
    from .engine.io import write_json
    from .engine.train import train_classifier
    from .registry import count_parameters, create_model

    out = Path(out)
    rows = []
    for family in families or list(FAMILIES):
        cfg = compare_config(family, budget_s, quick=quick)
        print(f"[compare] {family}: {cfg.model.name}, {budget_s:.0f} s budget")
        run_dir = out / "compare" / family
        result = train_classifier(cfg, run_dir, progress=progress)
        metrics = evaluate_checkpoint(result.checkpoint, cfg.val_data, run_dir, progress=False,
                                      title=f"{family}: {{n}} held-out phantoms")
        with torch.device("meta"):
            params = count_parameters(create_model(cfg.model))
        rows.append({
            "family": family, "model": cfg.model.name, "params_M": round(params / 1e6, 2),
            "iterations": result.steps, "train_seconds": round(result.seconds, 1),
            "overall_accuracy": metrics["overall_accuracy"], "f1_weighted": metrics["f1_weighted"],
            "f1_macro": metrics["f1_macro"], "roc_auc_macro": metrics.get("roc_auc_macro"),
            "sensitivity": metrics["sensitivity"],
            "update_rule": cfg.train.update_rule, "copy_rule": cfg.train.copy_rule, "cls_bn": cfg.train.cls_bn,
        })
    table = {"budget_s_per_family": budget_s, "image_size": COMPARE_SIZE,
             "heldout": f"phantom:n={cfg.val_data.num_samples},size={COMPARE_SIZE},seed={HELDOUT_SEED}",
             "rows": rows,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", table)
    print(format_comparison(rows))
    return table


def format_comparison(rows: list[dict]) -> str:
    head = f"{'family':<10} {'model':<20} {'params':>8} {'iters':>6} {'acc %':>7} {'F1w %':>7} {'AUC':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        auc = "-" if r["roc_auc_macro"] is None else f"{r['roc_auc_macro']:.3f}"
        lines.append(f"{r['family']:<10} {r['model']:<20} {r['params_M']:>7.2f}M {r['iterations']:>6} "
                     f"{100 * r['overall_accuracy']:>7.2f} {100 * (r['f1_weighted'] or 0):>7.2f} {auc:>6}")
    return "\n".join(lines)
