"""``coco_map`` against pycocotools used directly, plus known values and edge cases.

Masks are rectangles ``(r0, r1, c0, c1)`` (end exclusive) on 32x32 images; boxes are
``[c0, r0, c1, r1]`` so that the box equals the mask's pixel extent. All objects are
smaller than 32² pixels, i.e. COCO "small": ``APm``/``APl`` are undefined (NaN).
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from ctlesion.metrics import coco_map, legacy_map

H = W = 32
NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# 101-point interpolation with precision 1 up to recall 0.5 and nothing above: 51 of 101 points
HALF = 51 / 101


def rect(r0, r1, c0, c1):
    m = torch.zeros(H, W, dtype=torch.uint8)
    m[r0:r1, c0:c1] = 1
    return m


def box_of(m):
    ys, xs = torch.nonzero(m, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def target(*masks, labels=None):
    n = len(masks)
    return {
        "boxes": torch.tensor([box_of(m) for m in masks], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels if labels is not None else [1] * n, dtype=torch.int64),
        "masks": torch.stack(masks) if n else torch.zeros((0, H, W), dtype=torch.uint8),
    }


def pred(*masks, scores=(), labels=None):
    k = len(masks)
    return {
        "boxes": torch.tensor([box_of(m) for m in masks], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels if labels is not None else [1] * k, dtype=torch.int64),
        "scores": torch.tensor(list(scores), dtype=torch.float32),
        "masks": (
            torch.stack([m.float() * 0.8 + 0.1 for m in masks])[:, None]
            if k
            else torch.zeros((0, 1, H, W))
        ),
    }


def assert_stats(actual: dict, expected: dict):
    for name in NAMES:
        a, e = actual[name], expected[name]
        if isinstance(e, float) and math.isnan(e):
            assert math.isnan(a), (name, a)
        else:
            assert a == pytest.approx(e, abs=1e-9), (name, a, e)


def pycocotools_direct(preds, targets):
    """Independent reference: COCO objects written out by hand, one annotation at a time."""
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, segm, bbox, cats = [], [], [], [], set()
    for i, (p, t) in enumerate(zip(preds, targets), start=1):
        images.append({"id": i, "height": H, "width": W})
        for m, lab, b in zip(t["masks"].numpy(), t["labels"].tolist(), t["boxes"].tolist()):
            anns.append({
                "id": len(anns) + 1, "image_id": i, "category_id": lab, "iscrowd": 0,
                "segmentation": mask_util.encode(np.asfortranarray(m)),
                "area": float(m.sum()), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
            })
            cats.add(lab)
        for m, lab, s, b in zip(p["masks"][:, 0].numpy(), p["labels"].tolist(),
                                p["scores"].tolist(), p["boxes"].tolist()):
            rle = mask_util.encode(np.asfortranarray((m > 0.5).astype(np.uint8)))
            segm.append({"image_id": i, "category_id": lab, "segmentation": rle, "score": s})
            bbox.append({"image_id": i, "category_id": lab, "score": s,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
            cats.add(lab)
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": c} for c in sorted(cats)]}
        gt.createIndex()
        for iou_type, res in (("segm", segm), ("bbox", bbox)):
            ev = COCOeval(gt, gt.loadRes(res), iouType=iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[iou_type] = {n: (x if x > -1 else math.nan) for n, x in zip(NAMES, ev.stats)}
    return out


def test_matches_direct_pycocotools():
    a, b, c = rect(2, 12, 2, 12), rect(16, 30, 16, 24), rect(20, 28, 2, 10)
    preds = [
        pred(rect(2, 12, 3, 12), rect(16, 26, 16, 24), rect(0, 4, 26, 32),
             scores=[0.9, 0.6, 0.7], labels=[1, 2, 1]),
        pred(rect(20, 28, 2, 9), rect(2, 12, 2, 12), scores=[0.4, 0.95], labels=[2, 1]),
        pred(rect(5, 9, 5, 9), scores=[0.3], labels=[1]),  # FP on a negative image
    ]
    targets = [target(a, b, labels=[1, 2]), target(c, labels=[2]), target()]
    ours = coco_map(preds, targets)
    ref = pycocotools_direct(preds, targets)
    assert ours["num_images"] == 3
    for iou_type in ("segm", "bbox"):
        assert_stats(ours[iou_type], ref[iou_type])
    # sanity: non-trivial values
    assert 0.0 < ours["segm"]["AP"] < 1.0


def test_perfect_prediction(capsys):
    a, b = rect(2, 12, 2, 12), rect(16, 30, 16, 24)
    preds = [pred(a, b, scores=[0.9, 0.8], labels=[1, 2]), pred()]
    targets = [target(a, b, labels=[1, 2]), target()]
    r = coco_map(preds, targets)
    perfect = {"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "APs": 1.0, "APm": math.nan, "APl": math.nan}
    assert_stats(r["segm"], perfect)
    assert_stats(r["bbox"], perfect)
    assert "note" not in r
    assert capsys.readouterr().out == ""  # pycocotools' printing is suppressed


def test_half_right():
    # two lesions, one found perfectly, no false positives: precision 1 up to recall 0.5
    a, b = rect(2, 12, 2, 12), rect(16, 30, 16, 24)
    r = coco_map([pred(a, scores=[0.9])], [target(a, b)])
    half = {"AP": HALF, "AP50": HALF, "AP75": HALF, "APs": HALF, "APm": math.nan, "APl": math.nan}
    assert_stats(r["segm"], half)
    assert_stats(r["bbox"], half)


def test_wrong_class_scores_zero():
    a = rect(2, 12, 2, 12)
    r = coco_map([pred(a, scores=[0.9], labels=[2])], [target(a, labels=[1])])
    # category 1 has GT and no hit -> 0; category 2 has no GT -> undefined, left out of the mean
    assert r["segm"]["AP"] == 0.0 and r["bbox"]["AP"] == 0.0


def test_no_predictions_at_all():
    a = rect(2, 12, 2, 12)
    r = coco_map([pred(), pred()], [target(a), target()])
    zero = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": math.nan, "APl": math.nan}
    assert_stats(r["segm"], zero)
    assert_stats(r["bbox"], zero)


@pytest.mark.parametrize("with_prediction", [False, True])
def test_no_ground_truth_gives_nan_and_note(with_prediction):
    p = pred(rect(2, 12, 2, 12), scores=[0.9]) if with_prediction else pred()
    r = coco_map([p, pred()], [target(), target()])
    for iou_type in ("segm", "bbox"):
        assert all(math.isnan(r[iou_type][n]) for n in NAMES)
    assert "no ground-truth" in r["note"]
    assert r["num_images"] == 2


def test_input_formats_agree():
    a, b = rect(2, 12, 2, 12), rect(16, 30, 16, 24)
    preds = [pred(rect(2, 12, 3, 12), rect(16, 28, 16, 24), scores=[0.9, 0.5])]
    targets = [target(a, b)]
    ref = coco_map(preds, targets)
    as_bool = [dict(preds[0], masks=preds[0]["masks"][:, 0] > 0.5)]
    as_numpy = [{k: v.numpy() for k, v in preds[0].items()}]
    no_gt_boxes = [{k: v for k, v in targets[0].items() if k != "boxes"}]  # boxes from masks
    for p, t in [(as_bool, targets), (as_numpy, targets), (preds, no_gt_boxes)]:
        r = coco_map(p, t)
        assert_stats(r["segm"], ref["segm"])
        assert_stats(r["bbox"], ref["bbox"])


def test_validation():
    with pytest.raises(ValueError, match="1 predictions but 2 targets"):
        coco_map([pred()], [target(), target()])
    bad = pred(rect(2, 12, 2, 12), scores=[0.9])
    bad["masks"] = torch.zeros((1, 1, H, W + 2))
    with pytest.raises(ValueError, match="image 0"):
        coco_map([bad], [target(rect(2, 12, 2, 12))])


def test_legacy_and_coco_differ_on_reused_prediction():
    # Same case as test_metrics_legacy.py::test_reused_prediction_blocks_a_second_one.
    # G1 = A (100 px), G2 = A minus its last column (90 px); P1 = A (score .9),
    # P2 = A minus two columns (80 px, score .8). IoU(P2, G2) = 80/90 = 0.889.
    # Legacy loops over GT and lets G2 re-use P1 (IoU .9 > .889): P2 is a false positive,
    #   AP = 0.5 at every threshold.
    # COCO walks detections in score order, one-to-one: P1 -> G1, P2 -> G2, so AP = 1 for
    #   t = .50 ... .85 (8 thresholds); at t = .90 and .95 P2 misses (0.889 < t) and
    #   precision 1 up to recall 0.5 gives 51/101. AP = (8 + 2 * 51/101) / 10.
    a, g2, p2 = rect(0, 10, 0, 10), rect(0, 10, 0, 9), rect(0, 10, 0, 8)
    preds, targets = [pred(a, p2, scores=[0.9, 0.8])], [target(a, g2)]
    legacy = legacy_map(preds, targets)
    coco = coco_map(preds, targets)["segm"]
    assert legacy["AP50"] == pytest.approx(0.5) and legacy["mAP"] == pytest.approx(0.5)
    assert coco["AP50"] == pytest.approx(1.0)
    assert coco["AP"] == pytest.approx((8 + 2 * HALF) / 10)


def test_legacy_and_coco_differ_on_negative_slices():
    # A perfect hit on image 1 and a low-confidence false positive on a lesion-free image 2.
    # Legacy averages per-image APs: (1 + 0) / 2 = 0.5 (a negative image with any prediction
    #   scores 0). COCO pools detections over the dataset and sorts them by score: the FP comes
    #   after the only TP, so precision is 1 at recall 1 and AP = 1.
    a = rect(2, 12, 2, 12)
    preds = [pred(a, scores=[0.9]), pred(rect(20, 28, 20, 28), scores=[0.1])]
    targets = [target(a), target()]
    assert legacy_map(preds, targets)["mAP"] == pytest.approx(0.5)
    assert coco_map(preds, targets)["segm"]["AP"] == pytest.approx(1.0)
