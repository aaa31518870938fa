"""Pixel-level overlap of the lesion mask: Dice, sensitivity and specificity.

This is how the segmentation literature scores COVID-SemiSeg (Inf-Net, Fan et al., IEEE
TMI 2020): the union of the detected instances against the union of the ground-truth
lesions, per slice, then averaged over slices. Reported for the binary lesion mask (every
class together) and for each class alone.

Rules, stated where they are reported:

* the predicted mask is the union of the detections scoring at least ``score_thresh``,
  each binarised as the detector's masks are (``compact_prediction``);
* Dice = 2 TP / (2 TP + FP + FN); a slice with neither ground truth nor prediction counts as
  Dice 1 (a correct "nothing here");
* sensitivity = TP / (TP + FN) is undefined on a slice without ground truth, and
  specificity = TN / (TN + FP) on a slice that is lesion everywhere: such slices are left out
  of that mean, and the number of slices in each mean is reported.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .arrays import as_numpy

__all__ = ["pixel_metrics", "slice_counts", "PIXEL_RULES"]

PIXEL_RULES = ("per slice, then the mean over slices; predicted mask = union of detections with score >= "
               "score_thresh; Dice = 1 on a slice with neither ground truth nor prediction; sensitivity "
               "(specificity) leaves out slices without lesion (background) pixels")


def _union(masks, keep: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The union of the kept masks ``[K, H, W]`` (booleans or 0/1; float probabilities > 0.5)."""
    if not keep.any():
        return np.zeros(shape, dtype=bool)
    masks = as_numpy(masks)[keep]
    return (masks > 0.5 if np.issubdtype(masks.dtype, np.floating) else masks > 0).any(axis=0)


def slice_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    """``(TP, FP, FN, TN)`` of two boolean masks of one slice."""
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    return tp, fp, fn, int(pred.size) - tp - fp - fn


def _summary(counts: list[tuple[int, int, int, int]]) -> dict:
    dice, sens, spec = [], [], []
    for tp, fp, fn, tn in counts:
        dice.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
        if tp + fn:
            sens.append(tp / (tp + fn))
        if tn + fp:
            spec.append(tn / (tn + fp))

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return {"dice": mean(dice), "sensitivity": mean(sens), "specificity": mean(spec),
            "slices": len(counts), "slices_with_lesion": len(sens), "slices_with_background": len(spec)}


def pixel_metrics(predictions: Sequence[dict], targets: Sequence[dict], class_names: Sequence[str],
                  score_thresh: float = 0.5) -> dict:
    """Dice / sensitivity / specificity of the lesion mask and of each class.

    ``predictions``: per slice ``masks`` ``[K, H, W]`` (boolean or 0/1; floats > 0.5 are lesion),
    ``scores`` ``[K]`` and ``labels`` ``[K]`` (1-based). ``targets``: per slice ``masks``
    ``[N, H, W]`` and ``labels`` ``[N]``. ``class_names[i - 1]`` names label ``i``.
    Returns ``{"lesion": {...}, "<class>": {...}, "score_thresh", "rules"}`` (a class named
    ``lesion`` is the binary mask itself and appears once).
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    # A one-class model whose class is called "lesion" has the binary mask as its class.
    classes = [(i, name) for i, name in enumerate(class_names, start=1) if name != "lesion"]
    per_class: dict[str, list] = {"lesion": [], **{name: [] for _, name in classes}}
    for pred, target in zip(predictions, targets):
        truth_masks = as_numpy(target["masks"])
        shape = tuple(truth_masks.shape[-2:])
        truth_labels = as_numpy(target["labels"]).astype(np.int64)
        scores = as_numpy(pred["scores"]).astype(np.float64)
        labels = as_numpy(pred["labels"]).astype(np.int64)
        confident = scores >= score_thresh
        everything = np.ones(len(truth_labels), dtype=bool)
        per_class["lesion"].append(slice_counts(_union(pred["masks"], confident, shape),
                                                _union(truth_masks, everything, shape)))
        for i, name in classes:
            per_class[name].append(slice_counts(_union(pred["masks"], confident & (labels == i), shape),
                                                _union(truth_masks, truth_labels == i, shape)))
    out: dict = {name: _summary(counts) for name, counts in per_class.items()}
    out["score_thresh"] = float(score_thresh)
    out["rules"] = PIXEL_RULES
    return out
