"""Slice classification scoring: run a classifier over a labelled dataset, report with
scikit-learn (:func:`ctlesion.metrics.classification_report`)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import EvalConfig
from ..data.sample import Sample, collate_samples
from ..errors import DataError
from ..metrics import classification_report
from ..models.rcnn_parts import binary_masks
from ..viz import plot_confusion_matrix
from .io import atomic_write_text, write_json
from .labels import check_dataset_classes, slice_labels

__all__ = ["run_classifier", "classify_batch", "evaluate_classifier", "slice_record", "write_classification_outputs"]


def slice_record(sample: Sample, probabilities: torch.Tensor, class_names, rois: dict | None = None) -> dict:
    """One slice's prediction as plain JSON types."""
    probs = [float(p) for p in probabilities]
    best = int(torch.as_tensor(probabilities).argmax())
    record = {
        "sample_id": sample.sample_id,
        "source": sample.source,
        "slice_index": sample.slice_index,
        "patient": sample.meta.get("patient"),
        "label": sample.label,
        "predicted": best,
        "predicted_class": class_names[best],
        "probabilities": dict(zip(class_names, probs)),
    }
    if rois is not None and rois.get("weights") is not None:
        record["roi_boxes"] = [[round(float(v), 2) for v in box] for box in rois["boxes"]]
        record["roi_scores"] = [round(float(v), 4) for v in rois["scores"]]
        record["roi_weights"] = [float(v) for v in rois["weights"]]
    return record


@torch.inference_mode()
def run_classifier(
    model, batches: Iterable[list[Sample]], device: torch.device, *, cls_bn: str = "eval", seed: int = 0,
    with_detections: bool = False, progress: bool = True, total: int | None = None, mask_thresh: float = 0.5,
    frames: bool = True,
):
    """Yield ``(sample, probabilities [C], rois, detection)`` for every sample.

    Probabilities are the softmax of the logits (the papers predict the argmax, which is
    the same under softmax). The RoI-batch padding is seeded by ``seed`` (spec §10 #29),
    and the model's modes are restored afterwards. Detection masks are boolean
    (the stock pasted masks ``> mask_thresh``, :func:`~ctlesion.models.rcnn_parts.binary_masks`);
    ``frames=False``: only their pixel counts (``mask_areas``, no ``masks``).
    """
    model.to(device)
    model.padding_generator = torch.Generator().manual_seed(seed)
    try:
        with model.inference(cls_bn), binary_masks(model, mask_thresh, frames=frames):
            for batch in tqdm(batches, disable=not progress, total=total, desc="classify", unit="batch",
                              dynamic_ncols=True):
                images = [s.image.to(device) for s in batch]
                for sample, result in zip(batch, classify_batch(model, images, with_detections)):
                    yield (sample, *result)
    finally:
        model.padding_generator = None


def classify_batch(model, images: list[torch.Tensor], with_detections: bool = False) -> list[tuple]:
    """One forward of a classifier in its inference modes: per image ``(probabilities [C],
    rois, detection)`` (on the CPU except the detection)."""
    out = model(images, with_detections=with_detections)
    probs = torch.softmax(out.logits.float(), dim=1).cpu()
    results = []
    for i in range(len(images)):
        rois = None if out.rois is None else {
            k: ((v.float() if v.is_floating_point() else v).cpu() if torch.is_tensor(v) else v)
            for k, v in out.rois[i].items()}
        results.append((probs[i], rois, None if out.detections is None else out.detections[i]))
    return results


def evaluate_classifier(
    model, dataset, device: torch.device, *, eval_cfg: EvalConfig | None = None, cls_bn: str = "eval",
    batch_size: int = 1, progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Score a labelled classification dataset: ``(metrics, per-slice records)``.

    ``metrics`` is :func:`~ctlesion.metrics.classification_report`'s dict (weighted F1 with
    ``eval_cfg.f1_weights``, default the test shares), plus ``f1_weighted_paper`` (the
    papers' fixed 0.45/0.35/0.20) when there are three classes, and ``settings``.
    """


    check_dataset_classes(dataset, model, "the evaluation data")
    eval_cfg = eval_cfg or EvalConfig()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_samples, generator=torch.Generator())
    names = list(model.class_names)
    records, y_true, y_pred, scores = [], [], [], []
    for sample, probs, rois, _ in run_classifier(model, loader, device, cls_bn=cls_bn, seed=eval_cfg.seed,
                                                 progress=progress, total=len(loader)):
        slice_labels([sample], names, "evaluation")
        rec = slice_record(sample, probs, names, rois)
        records.append(rec)
        y_true.append(sample.label)
        y_pred.append(rec["predicted"])
        scores.append(probs.tolist())
    if not records:
        raise DataError("the evaluation dataset is empty")
    metrics = classification_report(y_true, y_pred, names, class_weights=eval_cfg.f1_weights, scores=scores)
    if len(names) == 3:
        metrics["f1_weighted_paper"] = classification_report(y_true, y_pred, names, class_weights="paper")["f1_weighted"]
    metrics["settings"] = {"cls_bn": cls_bn, "padding_seed": eval_cfg.seed, "f1_weights": eval_cfg.f1_weights}
    return metrics, records


def write_classification_outputs(out_dir, metrics: dict, records: list[dict], title: str) -> None:
    """Write ``metrics.json``, ``predictions.jsonl`` (one record per slice) and
    ``confusion_matrix.png`` into ``out_dir``."""
    import json
    from pathlib import Path


    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    plot_confusion_matrix(metrics["confusion_matrix"], metrics["class_names"], out_dir / "confusion_matrix.png",
                          title=title)
