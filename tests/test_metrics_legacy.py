"""Hand-computed cases for the author's per-image segmentation AP (``legacy_map``).

Conventions in these tests: masks are axis-aligned rectangles on a 20x20 image, written as
``(r0, r1, c0, c1)`` slices (end exclusive); label 1 unless stated. A 10x10 GT has 100 pixels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctlesion.metrics import legacy_map
from ctlesion.metrics.legacy import DEFAULT_IOU_THRESHOLDS

H = W = 20
KEYS = [f"{t:.2f}" for t in DEFAULT_IOU_THRESHOLDS]


def rect(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.uint8)
    m[r0:r1, c0:c1] = 1
    return m


def target(*masks: torch.Tensor, labels=None) -> dict:
    n = len(masks)
    return {
        "boxes": torch.zeros((n, 4)),
        "labels": torch.tensor(labels if labels is not None else [1] * n, dtype=torch.int64),
        "masks": torch.stack(masks) if n else torch.zeros((0, H, W), dtype=torch.uint8),
    }


def pred(*masks: torch.Tensor, scores=(), labels=None) -> dict:
    """torchvision-style output: masks [K,1,H,W] float probabilities (0.9 inside, 0.1 outside)."""
    k = len(masks)
    probs = (
        torch.stack([m.float() * 0.8 + 0.1 for m in masks])[:, None]
        if k
        else torch.zeros((0, 1, H, W))
    )
    return {
        "boxes": torch.zeros((k, 4)),
        "labels": torch.tensor(labels if labels is not None else [1] * k, dtype=torch.int64),
        "scores": torch.tensor(list(scores), dtype=torch.float32),
        "masks": probs,
    }


A = rect(0, 10, 0, 10)  # 100 px
B = rect(12, 18, 12, 18)  # 36 px, disjoint from A


def all_thresholds(value: float) -> dict:
    return {k: value for k in KEYS}


# --------------------------------------------------------------------------- output format
def test_default_thresholds_and_keys():
    assert DEFAULT_IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    r = legacy_map([pred(A, scores=[0.9])], [target(A)])
    assert set(r) == {"AP50", "AP75", "mAP", "per_threshold", "num_images"}
    assert list(r["per_threshold"]) == KEYS
    assert r["num_images"] == 1


# --------------------------------------------------------------------------- negatives
@pytest.mark.parametrize(
    "p, t, expected",
    [
        (pred(), target(), 1.0),  # no GT, no prediction -> 1 (author's rule)
        (pred(B, scores=[0.9]), target(), 0.0),  # prediction on a negative slice -> 0
        (pred(), target(A), 0.0),  # missed lesion -> 0
    ],
    ids=["empty-empty", "no-gt-with-pred", "gt-no-pred"],
)
def test_empty_sides(p, t, expected):
    r = legacy_map([p], [t])
    assert r["per_threshold"] == all_thresholds(expected)
    assert r["mAP"] == r["AP50"] == r["AP75"] == expected


def test_negatives_are_averaged_over_images():
    preds = [pred(), pred(B, scores=[0.9]), pred()]
    targets = [target(), target(), target(A)]
    r = legacy_map(preds, targets)
    # (1 + 0 + 0) / 3 at every threshold
    assert r["per_threshold"] == pytest.approx(all_thresholds(1 / 3))
    assert r["mAP"] == pytest.approx(1 / 3)
    assert r["num_images"] == 3


# --------------------------------------------------------------------------- matching
def test_perfect_single_match():
    r = legacy_map([pred(A, scores=[0.7])], [target(A)])
    assert r["per_threshold"] == all_thresholds(1.0)
    assert r["AP50"] == r["AP75"] == r["mAP"] == 1.0


@pytest.mark.parametrize(
    "hit_score, miss_score, expected",
    [
        # ranked [miss, hit]: tp = [0, 1]; precision = [0/1, 1/2]; recall = [0/2, 1/2].
        # With sentinels p = [0, 0, .5, 0], r = [0, 0, .5, 1]; envelope p = [.5, .5, .5, 0].
        # Recall changes at r: 0 -> .5 (p .5) and .5 -> 1 (p 0): AP = .5*.5 + .5*0 = 0.25
        (0.8, 0.9, 0.25),
        # ranked [hit, miss]: precision = [1, 1/2], recall = [1/2, 1/2]: AP = .5*1 = 0.5
        (0.9, 0.8, 0.5),
    ],
    ids=["miss-then-hit", "hit-then-miss"],
)
def test_two_gt_ranking(hit_score, miss_score, expected):
    miss = rect(0, 4, 14, 20)  # overlaps nothing
    # listed hit first: the function must sort by score itself
    p = pred(A, miss, scores=[hit_score, miss_score])
    r = legacy_map([p], [target(A, B)])
    assert r["per_threshold"] == pytest.approx(all_thresholds(expected))


def test_one_prediction_matches_two_lesions_and_counts_once():
    # Two overlapping GT lesions: G1 = A (100 px), G2 = A minus its last column (90 px).
    # One prediction P = A: IoU(P, G1) = 1, IoU(P, G2) = 90/100 = 0.9.
    g2 = rect(0, 10, 0, 9)
    # t < 0.9: the GT loop matches P to G1 and then again to G2 (no one-to-one constraint);
    # pred_match[P] is overwritten, so P is still ONE true positive: precision [1],
    # recall [1/2] -> AP = 0.5. For t >= 0.9 only G1 matches: the same AP 0.5.
    r = legacy_map([pred(A, scores=[0.9])], [target(A, g2)])
    assert r["per_threshold"] == pytest.approx(all_thresholds(0.5))


def test_reused_prediction_blocks_a_second_one():
    # G1 = A (100 px), G2 = cols 0..8 (90 px), both inside A.
    # P1 (score .9) = A:          IoU(P1,G1) = 1.0, IoU(P1,G2) = 90/100 = 0.9
    # P2 (score .8) = cols 0..7:  IoU(P2,G1) = 0.8, IoU(P2,G2) = 80/90 = 0.889
    # Author: G1 takes P1 (best IoU); G2 takes P1 again (0.9 > 0.889), P2 stays unmatched.
    #   tp = [1, 0]; precision [1, 1/2]; recall [1/2, 1/2] -> AP = 0.5 at every threshold
    #   (t = 0.9, 0.95: G2 has no candidate, P1 matches G1 only -> still 0.5).
    # COCO (one-to-one, score order): P1 -> G1, P2 -> G2 -> AP 1.0 for t <= 0.85;
    #   see tests/test_metrics_coco.py::test_legacy_and_coco_differ_on_reused_prediction.
    g2 = rect(0, 10, 0, 9)
    p2 = rect(0, 10, 0, 8)
    r = legacy_map([pred(A, p2, scores=[0.9, 0.8])], [target(A, g2)])
    assert r["per_threshold"] == pytest.approx(all_thresholds(0.5))
    assert r["mAP"] == pytest.approx(0.5)


def test_wrong_class_is_no_match():
    r = legacy_map([pred(A, scores=[0.9], labels=[2])], [target(A, labels=[1])])
    assert r["per_threshold"] == all_thresholds(0.0)


def test_candidate_of_other_class_is_skipped_for_next_best():
    # GT class 1 = A. P1 (class 2) = A (IoU 1), P2 (class 1) = cols 0..7 (IoU .8).
    # Candidates in IoU order: P1 (wrong class, skipped), P2 (match) for t < 0.8.
    # Ranked [P1, P2]: tp = [0, 1] -> precision [0, 1/2], recall [0, 1] -> AP = 0.5.
    p = pred(A, rect(0, 10, 0, 8), scores=[0.9, 0.8], labels=[2, 1])
    r = legacy_map([p], [target(A)])
    expected = {k: (0.5 if t < 0.8 else 0.0) for k, t in zip(KEYS, DEFAULT_IOU_THRESHOLDS)}
    assert r["per_threshold"] == pytest.approx(expected)


def test_iou_equal_to_threshold_is_not_a_match():
    half = rect(0, 10, 0, 5)  # 50 px inside A: IoU = 50 / 100 = 0.5 exactly
    r = legacy_map([pred(half, scores=[0.9])], [target(A)], iou_thresholds=[0.45, 0.5])
    assert r["per_threshold"] == {"0.45": 1.0, "0.50": 0.0}
    assert r["mAP"] == 0.5
    assert r["AP50"] == 0.0  # strict '>' (matterport uses '>=')
    assert r["AP75"] == 0.0  # reported even when 0.75 is not among iou_thresholds


def test_iou_08_counts_up_to_075():
    p = rect(0, 10, 0, 8)  # 80 px inside A: IoU = 0.8
    r = legacy_map([pred(p, scores=[0.9])], [target(A)])
    # 1 at t = .50 .55 .60 .65 .70 .75 (6 values), 0 at .80 (not > .80) .85 .90 .95
    expected = {k: (1.0 if t <= 0.75 else 0.0) for k, t in zip(KEYS, DEFAULT_IOU_THRESHOLDS)}
    assert r["per_threshold"] == expected
    assert r["AP50"] == r["AP75"] == 1.0
    assert r["mAP"] == pytest.approx(6 / 10)


# --------------------------------------------------------------------------- confidence cut
def test_score_threshold_drops_low_score_false_positive():
    preds = [pred(A, scores=[0.9]), pred(B, scores=[0.1])]  # image 2 is a negative slice
    targets = [target(A), target()]
    # without a cut: (1 + 0) / 2
    assert legacy_map(preds, targets)["mAP"] == pytest.approx(0.5)
    # with the author's cut the FP disappears and the negative slice scores 1: (1 + 1) / 2
    r = legacy_map(preds, targets, score_threshold=0.5)
    assert r["mAP"] == pytest.approx(1.0)
    # scores equal to the threshold are kept (only score < threshold is dropped)
    assert legacy_map(preds, targets, score_threshold=0.1)["mAP"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- input formats
def test_probability_and_binary_masks_agree():
    g2 = rect(0, 10, 0, 9)
    preds = [pred(A, rect(0, 10, 0, 8), B, scores=[0.9, 0.8, 0.95], labels=[1, 1, 2])]
    targets = [target(A, g2, B, labels=[1, 1, 2])]
    ref = legacy_map(preds, targets)

    as_bool = [dict(preds[0], masks=preds[0]["masks"][:, 0] > 0.5)]
    as_uint8 = [dict(preds[0], masks=(preds[0]["masks"][:, 0] > 0.5).to(torch.uint8))]
    as_numpy = [{k: v.numpy() for k, v in preds[0].items()}]
    tgt_numpy = [{k: v.numpy() for k, v in targets[0].items()}]
    for p, t in [(as_bool, targets), (as_uint8, targets), (as_numpy, tgt_numpy)]:
        assert legacy_map(p, t) == ref


def test_mask_threshold_is_strict():
    p = pred(A, scores=[0.9])
    p["masks"] = A.float()[None, None] * 0.5  # exactly 0.5 inside: nothing survives "> 0.5"
    assert legacy_map([p], [target(A)])["mAP"] == 0.0
    assert legacy_map([p], [target(A)], mask_threshold=0.4)["mAP"] == 1.0


# --------------------------------------------------------------------------- validation
def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="1 predictions but 2 targets"):
        legacy_map([pred()], [target(), target()])


def test_mask_size_mismatch_names_the_image():
    bad = pred(A, scores=[0.9])
    bad["masks"] = torch.zeros((1, 1, H + 1, W))
    with pytest.raises(ValueError, match="image 1"):
        legacy_map([pred(A, scores=[0.9]), bad], [target(A), target(A)])


def test_no_images_gives_nan():
    r = legacy_map([], [])
    assert r["num_images"] == 0 and math.isnan(r["mAP"])


def test_vectorised_iou_matches_pixel_loop():
    from ctlesion.metrics.legacy import _mask_iou

    rng = np.random.default_rng(0)
    p = rng.random((5, 16, 16)) > 0.6
    g = rng.random((3, 16, 16)) > 0.7
    g[2] = False  # empty GT
    p[4] = False  # empty prediction: 0/0 -> 0
    for i in range(5):
        for j in range(3):
            inter = np.logical_and(p[i], g[j]).sum()
            union = np.logical_or(p[i], g[j]).sum()
            assert _mask_iou(p, g)[i, j] == pytest.approx(inter / union if union else 0.0)
