"""Pixel Dice / sensitivity / specificity of the lesion mask (metrics/pixel.py), by hand."""

from __future__ import annotations

import json

import pytest
import torch

from ctlesion.metrics.pixel import pixel_metrics, slice_counts


def _masks(*boxes, size=10):
    out = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        out[i, y1:y2, x1:x2] = True
    return out


def _pred(boxes, scores, labels):
    return {"masks": _masks(*boxes), "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels)}


def _truth(boxes, labels):
    return {"masks": _masks(*boxes).to(torch.uint8), "labels": torch.tensor(labels)}


def test_counts_of_one_slice():
    pred, truth = _masks((0, 0, 4, 5))[0].numpy(), _masks((2, 0, 6, 5))[0].numpy()
    assert slice_counts(pred, truth) == (10, 10, 10, 70)


def test_dice_sensitivity_specificity_by_hand_with_the_union_of_instances():
    # truth: two GGO squares of 4x4 (32 px); prediction: one 4x8 box over the first square and
    # half of nothing (16 TP, 16 FP), and a low-score detection over the second that must not count.
    truth = _truth([(0, 0, 4, 4), (6, 6, 10, 10)], [1, 1])
    pred = _pred([(0, 0, 8, 4), (6, 6, 10, 10)], [0.9, 0.2], [1, 1])
    out = pixel_metrics([pred], [truth], ("GGO", "C"), score_thresh=0.5)
    tp, fp, fn, tn = 16, 16, 16, 100 - 48
    assert out["lesion"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert out["lesion"]["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert out["lesion"]["specificity"] == pytest.approx(tn / (tn + fp))
    assert out["GGO"] == out["lesion"] | {}                       # one class only: the same numbers
    # no C anywhere: Dice 1 (nothing to find, nothing found), sensitivity undefined (left out)
    assert out["C"]["dice"] == 1.0 and out["C"]["sensitivity"] is None and out["C"]["slices_with_lesion"] == 0
    lower = pixel_metrics([pred], [truth], ("GGO", "C"), score_thresh=0.1)
    assert lower["lesion"]["sensitivity"] == 1.0                  # the second detection now counts


def test_classes_are_scored_apart_and_the_lesion_mask_ignores_class_errors():
    truth = _truth([(0, 0, 5, 5)], [1])                           # GGO
    pred = _pred([(0, 0, 5, 5)], [0.9], [2])                      # found, but called consolidation
    out = pixel_metrics([pred], [truth], ("GGO", "C"))
    assert out["lesion"]["dice"] == 1.0
    assert out["GGO"]["dice"] == 0.0 and out["GGO"]["sensitivity"] == 0.0
    assert out["C"]["dice"] == 0.0 and out["C"]["specificity"] == pytest.approx(75 / 100)


def test_slices_are_averaged_and_empty_slices_follow_the_stated_rules():
    hit = (_pred([(0, 0, 5, 5)], [0.9], [1]), _truth([(0, 0, 5, 5)], [1]))                 # Dice 1
    miss = (_pred([], [], []), _truth([(0, 0, 5, 5)], [1]))                                 # Dice 0
    empty = (_pred([], [], []), _truth([], []))                                             # Dice 1 by rule
    false_alarm = (_pred([(0, 0, 2, 5)], [0.9], [1]), _truth([], []))                       # Dice 0
    slices = [hit, miss, empty, false_alarm]
    out = pixel_metrics([p for p, _ in slices], [t for _, t in slices], ("lesion",))["lesion"]
    assert out["dice"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert out["sensitivity"] == pytest.approx((1 + 0) / 2) and out["slices_with_lesion"] == 2
    assert out["specificity"] == pytest.approx((1 + 1 + 1 + 90 / 100) / 4)
    assert out["slices"] == 4
    json.dumps(out)                                                # metrics.json-ready


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        pixel_metrics([_pred([], [], [])] * 2, [_truth([], [])], ("lesion",))
