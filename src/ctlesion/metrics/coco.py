"""COCO-conformant mask and box mAP via pycocotools, built in memory.

The reference numbers of this project: ``pycocotools.cocoeval.COCOeval`` with ``iouType="segm"``
and ``"bbox"`` and its defaults (IoU 0.50:0.05:0.95, 101 recall points, maxDets 100, area
ranges small/medium/large). Ground truth and detections are converted the way torchvision's
``references/detection/coco_utils.py`` does, without temporary files:

* one COCO image per input image (ids 1..n, height/width from the masks);
* one GT annotation per instance: RLE of the mask (``pycocotools.mask.encode``), ``area`` = mask
  pixel count, ``bbox`` = the target's ``boxes`` as ``[x, y, w, h]`` (derived from the mask when
  the target has no ``boxes``), ``iscrowd`` 0;
* categories = every label value seen in targets or predictions (category id = label);
* segm detections: RLE of the binarised mask (``> mask_threshold``) with score; bbox detections:
  the predicted box as ``[x, y, w, h]`` with score (separate result sets, so that the segm
  evaluation uses mask areas, as torchvision's ``CocoEvaluator`` does).

Edge cases: with no detections at all ``COCO.loadRes`` cannot be used (it indexes the first
result), so an empty result set is built directly; pycocotools then scores every category that
has GT as 0. With no GT annotations at all COCO AP is undefined (there are no positives), so
every AP is NaN and the result carries a ``note``. pycocotools reports -1 for undefined entries
(e.g. ``APl`` when no GT is large); those become NaN. pycocotools' printing is suppressed.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ctlesion.metrics.legacy import _check_lengths, _prepare_image

__all__ = ["coco_map", "COCO_STAT_NAMES"]

#: Names of the first six ``COCOeval.stats`` entries, in order.
COCO_STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    out = boxes.astype(np.float64).copy()
    out[:, 2:] -= out[:, :2]
    return out


def _encode(masks: np.ndarray) -> list[dict[str, Any]]:
    """bool [K,H,W] -> list of K compressed RLEs."""
    from pycocotools import mask as mask_util

    if masks.shape[0] == 0:
        return []
    return mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def _nan_stats() -> dict[str, float]:
    return {name: math.nan for name in COCO_STAT_NAMES}


def _build(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    mask_threshold: float,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    from pycocotools import mask as mask_util

    images, annotations, segm_res, bbox_res = [], [], [], []
    categories: set[int] = set()
    ann_id = 1
    for v, (pred, target) in enumerate(zip(predictions, targets)):
        item = _prepare_image(pred, target, v, mask_threshold, None)
        image_id = v + 1
        h, w = item["size"] if item["size"] is not None else (0, 0)
        images.append({"id": image_id, "height": h, "width": w})

        gt_rles = _encode(item["gt_masks"]) if item["gt_masks"] is not None else []
        if gt_rles:
            areas = item["gt_masks"].reshape(len(gt_rles), -1).sum(axis=1)
            if item["gt_boxes"] is not None and item["gt_boxes"].shape[0] == len(gt_rles):
                gt_boxes = _xyxy_to_xywh(item["gt_boxes"])
            else:
                gt_boxes = mask_util.toBbox(gt_rles).astype(np.float64)
            for rle, label, area, box in zip(gt_rles, item["gt_labels"], areas, gt_boxes):
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": int(label),
                        "segmentation": rle,
                        "area": float(area),
                        "bbox": [float(x) for x in box],
                        "iscrowd": 0,
                    }
                )
                categories.add(int(label))
                ann_id += 1

        k = item["scores"].shape[0]
        if k == 0:
            continue
        rles = _encode(item["masks"])
        boxes = (
            _xyxy_to_xywh(item["boxes"])
            if item["boxes"] is not None
            else mask_util.toBbox(rles).astype(np.float64)
        )
        for rle, label, score, box in zip(rles, item["labels"], item["scores"], boxes):
            categories.add(int(label))
            segm_res.append(
                {"image_id": image_id, "category_id": int(label), "segmentation": rle,
                 "score": float(score)}
            )
            bbox_res.append(
                {"image_id": image_id, "category_id": int(label),
                 "bbox": [float(x) for x in box], "score": float(score)}
            )

    dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in sorted(categories)],
    }
    return dataset, segm_res, bbox_res


def _evaluate(coco_gt: Any, results: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if results:
        coco_dt = coco_gt.loadRes(results)
    else:  # loadRes fails on an empty list: an empty result set with the same images
        coco_dt = COCO()
        coco_dt.dataset = {
            "images": list(coco_gt.dataset["images"]),
            "categories": list(coco_gt.dataset["categories"]),
            "annotations": [],
        }
        coco_dt.createIndex()
    ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return {
        name: (float(x) if x > -1 else math.nan)
        for name, x in zip(COCO_STAT_NAMES, ev.stats[: len(COCO_STAT_NAMES)])
    }


def coco_map(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    mask_threshold: float = 0.5,
) -> dict[str, Any]:
    """COCO mask (``segm``) and box (``bbox``) AP computed by pycocotools.

    Args:
        predictions (list[dict]): one dict per image in torchvision's Mask R-CNN output format:
            ``boxes`` [K,4] xyxy, ``labels`` [K] int, ``scores`` [K], ``masks`` [K,1,H,W] float
            probabilities (binarised with ``> mask_threshold``) or [K,H,W] bool/uint8/float.
            Tensors (any device) or numpy arrays. No score cut is applied here: COCO AP is
            meant to see all detections (pycocotools keeps the top 100 per image and class).
        targets (list[dict]): torchvision target dicts: ``boxes`` [N,4] xyxy, ``labels`` [N],
            ``masks`` [N,H,W] (non-zero = foreground). Category ids are the label values.
        mask_threshold (float): probability threshold for non-bool predicted masks.

    Returns:
        dict: ``{"segm": {"AP", "AP50", "AP75", "APs", "APm", "APl"}, "bbox": {...},
        "num_images": int}``, values in [0, 1] or NaN where pycocotools reports the entry as
        undefined (-1). When there is no GT annotation at all, every value is NaN and a
        ``"note"`` key explains why.

    Raises:
        ValueError: ``len(predictions) != len(targets)``, inconsistent counts within a dict,
            or predicted and target masks of the same image with different sizes.
    """
    from pycocotools.coco import COCO

    _check_lengths(predictions, targets)
    dataset, segm_res, bbox_res = _build(predictions, targets, mask_threshold)
    out: dict[str, Any] = {"num_images": len(predictions)}
    if not dataset["annotations"]:
        out["segm"], out["bbox"] = _nan_stats(), _nan_stats()
        out["note"] = (
            "no ground-truth annotations in the dataset: COCO AP is undefined without "
            "positives, so every value is NaN"
        )
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        out["segm"] = _evaluate(coco_gt, segm_res, "segm")
        out["bbox"] = _evaluate(coco_gt, bbox_res, "bbox")
    return out
