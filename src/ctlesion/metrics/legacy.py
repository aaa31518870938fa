"""The author's ("legacy") segmentation mAP, re-implemented for paper comparison only.

Every segmentation number in the Ter-Sarkisov papers comes from two functions of
``AlexTS1980/COVID-CT-Mask-Net``: ``utils.compute_overlaps_masks`` / ``compute_matches`` /
``compute_ap`` (per-image AP, adapted from matterport/Mask_RCNN ``mrcnn/utils.py``) and
``evaluation_mean_ap.compute_map`` (average over images). :func:`legacy_map` reproduces them.
It is **not** COCO mAP; use :func:`ctlesion.metrics.coco_map` for a conformant number and
report both, together with the confidence threshold, NMS threshold and detection cap used.

What the original code does (read in the author's ``utils.py`` and ``evaluation_mean_ap.py``),
and what this module therefore does:

* **Images.** Every image counts. For one IoU threshold the per-image APs are stored in a
  zero-initialised vector of length #images and averaged. An image with neither GT nor
  predictions is set to 1; an image with only GT or only predictions is skipped, i.e. keeps
  its 0. ``AP@t`` is the mean over images; the reported mAP is the mean of ``AP@t`` over
  ``t = 0.50, 0.55, ..., 0.95`` (``torch.arange(0.5, 1, 0.05)``, 10 values).
* **Masks.** Predicted masks are binarised with ``mask > mask_threshold`` (strict), GT masks
  are used as 0/1. IoU is ``intersection / (area_pred + area_gt - intersection)`` on
  full-image masks, via one matrix product of the flattened masks. The original has no
  epsilon (its "+1" comment is not applied), so two empty masks give 0/0 = NaN, which never
  passes ``> t``; here such pairs get IoU 0, which has the same effect.
* **Ranking.** Predictions are sorted by score with ``argsort().flip()``: one list for all
  classes (no per-class AP). Ties are ordered as a stable ascending sort reversed (the later
  of two equal-score predictions ranks first); the 2019 torch sort made no stability promise,
  so tie order in the original was implementation-defined.
* **Matching is driven by GT, not by predictions.** For each GT object in order, take the
  predictions whose IoU with it is **strictly greater** than ``t``, order them by decreasing IoU
  (again ``argsort().flip()``, so among equal IoUs the lower-scored prediction is tried first),
  and match the first whose label equals the GT label; then stop for that GT. A prediction
  already matched to an earlier GT is **not** excluded: it can be matched again, and its
  ``pred_match`` entry is simply overwritten with the later GT index. A prediction therefore
  counts as at most *one* true positive however many GTs it matched, and a GT that "took" an
  already-used prediction leaves any other overlapping prediction unmatched (a false positive).
* **AP.** ``tp_i = pred_match_i > -1`` over the ranked predictions; precision at rank k is
  ``cumsum(tp)[k] / k``; recall is ``cumsum(tp)[k] / #GT`` (all classes). Sentinels
  (recall 0, precision 0) and (recall 1, precision 0) are added, precision is replaced by its
  running maximum from the right, and AP is the sum of ``Δrecall × precision`` at the points
  where recall changes (VOC all-point AP, identical to matterport's ``compute_ap``).
* **Confidence cut.** The author applies it inside the model (``box_score_thresh =
  --confidence_th``, 0.75 in the SSM README, 0.05 in paper 000). ``score_threshold`` here
  emulates it on already-computed outputs by dropping predictions with ``score <
  score_threshold``. Note that torchvision's ``box_score_thresh`` keeps ``score > thresh``;
  the two differ only for scores exactly equal to the threshold.

Differences from matterport's ``compute_matches`` (which the author adapted): matterport loops
over *predictions* in score order, gives each one its highest-IoU *still unmatched* same-class
GT, and accepts ``IoU >= t`` (it breaks on ``iou < t``), so matching there is one-to-one.
The author's rewrite loops over GT, requires ``IoU > t`` and allows a prediction to be reused.

Deliberate implementation differences from the original that do not change results:
IoU is computed once per image (not once per threshold) in float64 from exact integer pixel
counts (the original uses float32; for images up to 512×512 no IoU lies close enough to a
threshold for the two to disagree, and exact ties such as IoU = 0.5 at t = 0.5 are "no match"
in both); thresholds are ``round(linspace(0.5, 0.95, 10), 2)`` so there is no float drift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .arrays import as_numpy

__all__ = ["legacy_map", "DEFAULT_IOU_THRESHOLDS"]

#: 0.50:0.05:0.95, the ten thresholds of the author's ``evaluation_mean_ap.py``.
DEFAULT_IOU_THRESHOLDS: tuple[float, ...] = tuple(
    float(t) for t in np.round(np.linspace(0.5, 0.95, 10), 2)
)


# --------------------------------------------------------------------------------------
# input normalisation (shared with ctlesion.metrics.coco)
# --------------------------------------------------------------------------------------
def _pred_masks(masks: Any, count: int, mask_threshold: float, index: int) -> np.ndarray | None:
    """Predicted masks ``[K,1,H,W]`` or ``[K,H,W]`` -> bool ``[K,H,W]`` (``None`` if no spatial
    size is known, which is only allowed when ``count == 0``)."""
    if masks is None:
        if count:
            raise ValueError(f"image {index}: prediction has {count} scores but no 'masks'")
        return None
    m = as_numpy(masks)
    if m.ndim == 4:
        if m.shape[1] != 1:
            raise ValueError(
                f"image {index}: predicted masks must be [K,1,H,W] or [K,H,W], got {m.shape}"
            )
        m = m[:, 0]
    elif m.ndim != 3:
        if count == 0 and m.size == 0:
            return None
        raise ValueError(
            f"image {index}: predicted masks must be [K,1,H,W] or [K,H,W], got {m.shape}"
        )
    if m.shape[0] != count:
        raise ValueError(
            f"image {index}: {m.shape[0]} predicted masks but {count} scores"
        )
    if m.dtype == np.bool_:
        return m
    return m > mask_threshold


def _gt_masks(masks: Any, count: int, index: int) -> np.ndarray | None:
    """GT masks ``[N,H,W]`` (any dtype, non-zero = foreground) -> bool ``[N,H,W]``."""
    if masks is None:
        if count:
            raise ValueError(f"image {index}: target has {count} labels but no 'masks'")
        return None
    m = as_numpy(masks)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        if count == 0 and m.size == 0:
            return None
        raise ValueError(f"image {index}: target masks must be [N,H,W], got {m.shape}")
    if m.shape[0] != count:
        raise ValueError(f"image {index}: {m.shape[0]} target masks but {count} labels")
    return m if m.dtype == np.bool_ else m != 0


def _prepare_image(
    pred: Mapping[str, Any],
    target: Mapping[str, Any],
    index: int,
    mask_threshold: float,
    score_threshold: float | None,
) -> dict[str, Any]:
    """Validate and normalise one (prediction, target) pair.

    Returns numpy ``scores`` [K] float64, ``labels`` [K] int64, ``masks`` bool [K,H,W] or None,
    ``boxes`` [K,4] or None, ``gt_labels`` [N], ``gt_masks`` bool [N,H,W] or None,
    ``gt_boxes`` [N,4] or None and ``size`` (H, W) or None. Predictions below
    ``score_threshold`` are already removed.
    """
    if not isinstance(pred, Mapping) or not isinstance(target, Mapping):
        raise TypeError(f"image {index}: predictions and targets must be dicts")
    scores = as_numpy(pred.get("scores", np.zeros(0))).astype(np.float64).reshape(-1)
    labels = as_numpy(pred.get("labels", np.zeros(0, np.int64))).astype(np.int64).reshape(-1)
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(
            f"image {index}: {labels.shape[0]} predicted labels but {scores.shape[0]} scores"
        )
    masks = _pred_masks(pred.get("masks"), scores.shape[0], mask_threshold, index)
    boxes = pred.get("boxes")
    boxes = None if boxes is None else as_numpy(boxes).astype(np.float64).reshape(-1, 4)
    if boxes is not None and boxes.shape[0] != scores.shape[0]:
        raise ValueError(
            f"image {index}: {boxes.shape[0]} predicted boxes but {scores.shape[0]} scores"
        )

    gt_labels = as_numpy(target.get("labels", np.zeros(0, np.int64))).astype(np.int64).reshape(-1)
    gt_masks = _gt_masks(target.get("masks"), gt_labels.shape[0], index)
    gt_boxes = target.get("boxes")
    gt_boxes = None if gt_boxes is None else as_numpy(gt_boxes).astype(np.float64).reshape(-1, 4)

    size = None
    if masks is not None and gt_masks is not None:
        if masks.shape[1:] != gt_masks.shape[1:]:
            raise ValueError(
                f"image {index}: predicted mask size {tuple(masks.shape[1:])} does not match "
                f"target mask size {tuple(gt_masks.shape[1:])}"
            )
    for m in (gt_masks, masks):
        if m is not None:
            size = (int(m.shape[1]), int(m.shape[2]))
            break

    if score_threshold is not None and scores.size:
        keep = scores >= score_threshold
        scores, labels = scores[keep], labels[keep]
        if masks is not None:
            masks = masks[keep]
        if boxes is not None:
            boxes = boxes[keep]

    return {
        "scores": scores,
        "labels": labels,
        "masks": masks,
        "boxes": boxes,
        "gt_labels": gt_labels,
        "gt_masks": gt_masks,
        "gt_boxes": gt_boxes,
        "size": size,
    }


def _check_lengths(predictions: Sequence[Any], targets: Sequence[Any]) -> None:
    if len(predictions) != len(targets):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(targets)} targets; "
            "need exactly one prediction dict per target image"
        )


# --------------------------------------------------------------------------------------
# the author's per-image AP
# --------------------------------------------------------------------------------------
def _mask_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU matrix [K, N] of bool masks [K,H,W] and [N,H,W] (empty ∪ empty -> 0).

    Areas are exact integer counts; intersections are one float32 matrix product restricted to
    the pixels covered by some GT mask (float32 sums of 0/1 are exact below 2**24 pixels).
    """
    p = pred.reshape(pred.shape[0], -1)
    g = gt.reshape(gt.shape[0], -1)
    area_p = np.count_nonzero(p, axis=1).astype(np.float64)
    area_g = np.count_nonzero(g, axis=1).astype(np.float64)
    support = np.flatnonzero(g.any(axis=0))
    if support.size:
        inter = p[:, support].astype(np.float32) @ g[:, support].astype(np.float32).T
        inter = inter.astype(np.float64)
    else:
        inter = np.zeros((p.shape[0], g.shape[0]), dtype=np.float64)
    union = area_p[:, None] + area_g[None, :] - inter
    safe = np.where(union > 0, union, 1.0)
    return np.where(union > 0, inter / safe, 0.0)


def _desc_order(values: np.ndarray) -> np.ndarray:
    """``argsort().flip()`` with a stable sort (ties: later index first)."""
    return np.argsort(values, kind="stable")[::-1]


def _image_ap(
    overlaps: np.ndarray, pred_labels: np.ndarray, gt_labels: np.ndarray, iou_threshold: float
) -> float:
    """Author's ``compute_matches`` + ``compute_ap`` for one image and one threshold.

    ``overlaps`` [K, N] and ``pred_labels`` must already be in descending score order.
    """
    num_pred, num_gt = overlaps.shape
    pred_match = np.full(num_pred, -1, dtype=np.int64)
    for i in range(num_gt):  # loop over GT objects, in GT order
        col = overlaps[:, i]
        cand = np.flatnonzero(col > iou_threshold)  # strictly greater
        if cand.size == 0:
            continue
        for p in cand[_desc_order(col[cand])]:  # decreasing IoU
            if pred_labels[p] == gt_labels[i]:
                pred_match[p] = i  # overwrites an earlier match: predictions are reusable
                break
    tp = np.cumsum(pred_match > -1, dtype=np.float64)
    precisions = np.concatenate([[0.0], tp / np.arange(1, num_pred + 1), [0.0]])
    recalls = np.concatenate([[0.0], tp / num_gt, [1.0]])
    precisions = np.maximum.accumulate(precisions[::-1])[::-1]
    idx = np.flatnonzero(recalls[:-1] != recalls[1:]) + 1
    return float(np.sum((recalls[idx] - recalls[idx - 1]) * precisions[idx]))


def legacy_map(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    iou_thresholds: Sequence[float] | None = None,
    score_threshold: float | None = None,
    mask_threshold: float = 0.5,
) -> dict[str, Any]:
    """The author's per-image segmentation AP, averaged over images, then over IoU thresholds.

    This is the "mAP" of the Ter-Sarkisov papers (``evaluation_mean_ap.compute_map`` +
    ``utils.compute_ap``), kept for comparison with published numbers. It is *not* COCO mAP:
    see the module docstring for the exact algorithm and :func:`ctlesion.metrics.coco_map`.

    Args:
        predictions (list[dict]): one dict per image in torchvision's Mask R-CNN output format:
            ``scores`` [K], ``labels`` [K] int, ``masks`` [K,1,H,W] float probabilities
            (binarised with ``> mask_threshold``) or [K,H,W] bool/uint8/float; ``boxes`` [K,4]
            is accepted and ignored. Tensors (any device) or numpy arrays.
        targets (list[dict]): one torchvision target dict per image: ``labels`` [N] int and
            ``masks`` [N,H,W] (non-zero = foreground); ``boxes`` ignored. An image without
            lesions has N = 0.
        iou_thresholds (sequence of float, optional): IoU thresholds ``t``; a prediction matches
            only if IoU is strictly greater than ``t``. Default 0.50:0.05:0.95 (10 values).
        score_threshold (float, optional): drop predictions with ``score < score_threshold``
            before scoring (the author's confidence cut). Default: keep all.
        mask_threshold (float): probability threshold for non-bool predicted masks (strict ``>``).

    Returns:
        dict: ``mAP`` (mean of ``per_threshold``), ``AP50`` and ``AP75`` (always evaluated at
        0.50 and 0.75, whether or not they are in ``iou_thresholds``), ``per_threshold``
        (``{"0.50": AP, ...}``, keys formatted with two decimals) and ``num_images``. With no
        images every AP is NaN.

    Per image: no GT and no predictions -> 1; GT but no predictions, or predictions but no GT
    -> 0; otherwise the all-point AP of the ranked predictions with GT-driven, non-unique
    matching (module docstring).

    Raises:
        ValueError: ``len(predictions) != len(targets)``, inconsistent counts within a dict,
            or predicted and target masks of the same image with different sizes.
    """
    _check_lengths(predictions, targets)
    thresholds = (
        DEFAULT_IOU_THRESHOLDS
        if iou_thresholds is None
        else tuple(float(t) for t in np.round(np.asarray(iou_thresholds, dtype=np.float64), 10))
    )
    if len(thresholds) == 0:
        raise ValueError("iou_thresholds must not be empty")
    keys = [f"{t:.2f}" for t in thresholds]
    if len(set(keys)) != len(keys):
        raise ValueError(f"iou_thresholds must be distinct at two decimals, got {thresholds}")
    extra = [t for t in (0.5, 0.75) if t not in thresholds]
    all_t = list(thresholds) + extra

    n = len(predictions)
    aps = np.zeros((n, len(all_t)), dtype=np.float64)
    for v, (pred, target) in enumerate(zip(predictions, targets)):
        item = _prepare_image(pred, target, v, mask_threshold, score_threshold)
        k, g = item["scores"].shape[0], item["gt_labels"].shape[0]
        if k == 0 and g == 0:
            aps[v] = 1.0
            continue
        if k == 0 or g == 0:
            continue  # stays 0, as in the original
        order = _desc_order(item["scores"])
        overlaps = _mask_iou(item["masks"], item["gt_masks"])[order]
        labels = item["labels"][order]
        for j, t in enumerate(all_t):
            aps[v, j] = _image_ap(overlaps, labels, item["gt_labels"], t)

    per_t = aps.mean(axis=0) if n else np.full(len(all_t), np.nan)
    by_t = dict(zip(all_t, (float(x) for x in per_t)))
    per_threshold = {key: by_t[t] for key, t in zip(keys, thresholds)}
    return {
        "AP50": by_t[0.5],
        "AP75": by_t[0.75],
        "mAP": float(np.mean([by_t[t] for t in thresholds])),
        "per_threshold": per_threshold,
        "num_images": n,
    }
