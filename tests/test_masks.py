"""extract_instances: fixed value -> class tables, connectivity, area filter, boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctlesion.data.masks import MASK_TYPES, extract_instances, get_mask_type


def square(codes: np.ndarray, value: int, r0: int, c0: int, side: int) -> np.ndarray:
    codes[r0 : r0 + side, c0 : c0 + side] = value
    return codes


def c_only() -> np.ndarray:
    """Lungs plus one consolidation blob and no GGO: the original code's label-shift case."""
    codes = np.zeros((64, 64), np.uint8)
    square(codes, 1, 0, 0, 64)
    return square(codes, 3, 10, 10, 20)


@pytest.mark.parametrize(
    "mask_type, expected_labels",
    [
        ("merge", [1]),       # lesion
        ("both", [2]),        # C stays C even with no GGO present
        ("separate", [1, 3]), # lung instance + C (not shifted to 2)
        ("ggo", []),          # C goes to background
    ],
)
def test_consolidation_only_keeps_its_class(mask_type, expected_labels):
    target = extract_instances(c_only(), mask_type, min_area=100)
    assert target["labels"].tolist() == expected_labels


def test_both_ggo_and_c_get_fixed_ids_regardless_of_presence():
    codes = np.zeros((64, 64), np.uint8)
    square(codes, 2, 2, 2, 15)
    square(codes, 3, 40, 40, 15)
    target = extract_instances(codes, "both", min_area=100)
    assert target["labels"].tolist() == [1, 2]
    ggo_only = square(np.zeros((64, 64), np.uint8), 2, 2, 2, 15)
    assert extract_instances(ggo_only, "both")["labels"].tolist() == [1]


@pytest.mark.parametrize("mask_type", sorted(MASK_TYPES))
@pytest.mark.parametrize("shape", [(32, 48), (7, 5)])
def test_negative_slice_gives_empty_target_with_correct_shapes(mask_type, shape):
    codes = np.zeros(shape, np.uint8)
    target = extract_instances(codes, mask_type)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (0, *shape) and target["masks"].dtype == torch.uint8


def test_lung_only_is_negative_except_in_separate():
    codes = np.ones((40, 40), np.uint8)
    assert extract_instances(codes, "merge")["labels"].numel() == 0
    assert extract_instances(codes, "separate")["labels"].tolist() == [1]


@pytest.mark.parametrize("side, min_area, kept", [(10, 100, 0), (10, 99, 1), (11, 100, 1), (10, 0, 1)])
def test_area_filter_is_strictly_greater(side, min_area, kept):
    codes = square(np.zeros((32, 32), np.uint8), 2, 5, 5, side)  # area side**2
    assert len(extract_instances(codes, "merge", min_area=min_area)["labels"]) == kept


def test_eight_connectivity_joins_diagonal_pixels():
    codes = np.zeros((10, 10), np.uint8)
    for i in range(6):
        codes[i, i] = 2  # a diagonal line: one 8-connected component, six 4-connected ones
    target = extract_instances(codes, "merge", min_area=0)
    assert len(target["labels"]) == 1
    assert int(target["masks"][0].sum()) == 6


def test_merge_joins_touching_ggo_and_c_but_both_splits_them():
    codes = np.zeros((40, 40), np.uint8)
    square(codes, 2, 5, 5, 12)
    square(codes, 3, 5, 17, 12)  # touches the GGO square on its right edge
    merged = extract_instances(codes, "merge", min_area=100)
    assert merged["labels"].tolist() == [1]
    assert int(merged["masks"][0].sum()) == 2 * 144
    assert extract_instances(codes, "both", min_area=100)["labels"].tolist() == [1, 2]


def test_ggo_mode_drops_consolidation_pixels():
    codes = np.zeros((40, 40), np.uint8)
    square(codes, 2, 5, 5, 12)
    square(codes, 3, 5, 17, 12)
    target = extract_instances(codes, "ggo", min_area=100)
    assert target["labels"].tolist() == [1]
    assert int(target["masks"][0].sum()) == 144
    assert target["masks"][0][5:17, 17:29].sum() == 0


def test_box_is_xyxy_with_exclusive_max_and_mask_matches():
    codes = np.zeros((30, 40), np.uint8)
    codes[3:13, 7:22] = 2  # rows 3..12, cols 7..21
    target = extract_instances(codes, "merge", min_area=100)
    assert target["boxes"].tolist() == [[7.0, 3.0, 22.0, 13.0]]
    mask = target["masks"][0].numpy()
    assert mask.shape == (30, 40) and mask.sum() == 150 and mask[3:13, 7:22].all()


def test_separate_components_sorted_by_class_then_found_order():
    codes = np.zeros((50, 50), np.uint8)
    square(codes, 3, 2, 2, 11)
    square(codes, 2, 30, 30, 11)
    square(codes, 2, 2, 30, 11)
    target = extract_instances(codes, "both", min_area=100)
    assert target["labels"].tolist() == [1, 1, 2]
    assert target["masks"].shape == (3, 50, 50)


@pytest.mark.parametrize("bad", [4, 255])
def test_unknown_code_raises(bad):
    codes = np.zeros((8, 8), np.uint8)
    codes[0, 0] = bad
    with pytest.raises(ValueError, match=str(bad)):
        extract_instances(codes, "merge")


def test_non_2d_and_unknown_mask_type_raise():
    with pytest.raises(ValueError, match="2-D"):
        extract_instances(np.zeros((2, 8, 8), np.uint8), "merge")
    with pytest.raises(ValueError, match="unknown mask type"):
        get_mask_type("lesions")


@pytest.mark.parametrize("name, num_classes", [("merge", 2), ("both", 3), ("ggo", 2), ("separate", 4)])
def test_num_classes_counts_background(name, num_classes):
    assert get_mask_type(name).num_classes == num_classes
