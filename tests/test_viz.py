"""Overlays, contact sheets and confusion-matrix pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ctlesion.viz import (
    CLASS_COLOURS, class_colour, contact_sheet, draw_overlay, plot_confusion_matrix, save_overlay,
)

GREY = 0.5  # -> 128 in the picture


def grey(h=128, w=128):
    return torch.full((1, h, w), GREY)


def square_prediction(h=128, w=128, box=(40, 40, 80, 80), label=2, score=0.9, prob=0.95):
    x1, y1, x2, y2 = box
    masks = torch.zeros((1, 1, h, w))
    masks[0, 0, y1:y2, x1:x2] = prob
    return {
        "boxes": torch.tensor([box], dtype=torch.float32),
        "labels": torch.tensor([label]),
        "scores": torch.tensor([score]),
        "masks": masks,
    }


def pixels(im):
    return np.asarray(im).astype(int)


@pytest.mark.parametrize("shape,expected", [
    ((64, 64), (256, 256)), ((128, 128), (256, 256)), ((512, 512), (512, 512)), ((60, 100), (300, 180)),
])
def test_overlay_is_rgb_and_upscaled(shape, expected):
    im = draw_overlay(torch.rand(1, *shape), square_prediction(*shape, box=(5, 5, 30, 30)), ("GGO", "C"))
    assert im.mode == "RGB" and im.size == expected
    # [H, W] numpy input works the same.
    assert draw_overlay(np.zeros(shape, np.float32)).size == expected


def test_mask_pixels_take_class_colour_far_pixels_stay_grey():
    im = pixels(draw_overlay(grey(), square_prediction(), ("GGO", "C")))  # scale 2
    r, g, b = im[120, 120]  # centre of the mask (60, 60) upscaled
    red = CLASS_COLOURS["C"]
    assert r > 128 + 20 and g < 128 - 20 and b < 128 - 20
    assert abs(r - red[0]) < abs(128 - red[0])
    assert (im[240, 240] == 128).all()  # far from the instance and the legend
    assert (im[250, 10] == 128).all()


def test_below_threshold_not_drawn():
    base = pixels(draw_overlay(grey(), None, ("GGO", "C")))
    low = pixels(draw_overlay(grey(), square_prediction(score=0.3), ("GGO", "C"), score_threshold=0.5))
    assert np.array_equal(base, low)
    # One kept and one dropped: the dropped one's region matches the empty overlay.
    kept = square_prediction(box=(10, 70, 40, 100), score=0.8)
    dropped = square_prediction(box=(80, 70, 120, 110), score=0.2)
    both = {k: torch.cat([kept[k], dropped[k]]) for k in kept}
    im = pixels(draw_overlay(grey(), both, ("GGO", "C")))
    assert np.array_equal(im[150:230, 170:250], base[150:230, 170:250])
    assert not np.array_equal(im[150:190, 30:70], base[150:190, 30:70])


def test_empty_prediction_and_variants():
    empty = {
        "boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64),
        "scores": torch.zeros((0,)), "masks": torch.zeros((0, 1, 128, 128)),
    }
    base = pixels(draw_overlay(grey(), None))
    assert np.array_equal(pixels(draw_overlay(grey(), empty)), base)
    # [K, H, W] uint8 masks, no boxes, no scores: drawn in the merged "lesion" colour.
    pred = square_prediction(label=1)
    variant = {"labels": pred["labels"], "masks": (pred["masks"][:, 0] > 0.5).to(torch.uint8)}
    r, g, b = pixels(draw_overlay(grey(), variant))[120, 120]
    assert r > g > b and r > 150
    # Class id outside class_names falls back to the palette instead of failing.
    assert draw_overlay(grey(), square_prediction(label=7), ("GGO", "C")).size == (256, 256)
    assert class_colour("something", 1) != class_colour("something", 2)


def test_ground_truth_outline_and_title():
    h = w = 128
    masks = torch.zeros((1, h, w), dtype=torch.uint8)
    masks[0, 50:90, 50:90] = 1
    target = {"boxes": torch.tensor([[50.0, 50.0, 90.0, 90.0]]), "labels": torch.tensor([1]), "masks": masks}
    im = pixels(draw_overlay(grey(), None, target=target))
    edge = im[100:180, 100]  # left edge of the GT square, upscaled x2
    assert (edge == 255).all(axis=1).any() and (edge == 0).all(axis=1).any()  # dashed white/black
    assert (im[140, 140] == 128).all()  # inside stays untouched
    titled = draw_overlay(grey(), None, target=target, title="phantom 0")
    assert titled.width == 256 and titled.height > 256


def test_save_overlay_and_contact_sheet(tmp_path):
    path = save_overlay(tmp_path / "a" / "b" / "overlay.png", grey(), square_prediction(), class_names=("GGO", "C"))
    assert path.is_file() and path.stat().st_size > 0
    assert Image.open(path).size == (256, 256)
    tiles = [draw_overlay(grey()) for _ in range(5)] + [draw_overlay(grey(300, 200))]
    sheet = contact_sheet(tiles, columns=4)
    assert sheet.size == (4 * 256 + 5 * 4, 2 * 300 + 3 * 4)  # cells as big as the largest tile
    with pytest.raises(ValueError):
        contact_sheet([])


@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_matrix_png(tmp_path, normalize):
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])
    path = plot_confusion_matrix(cm, ("Normal", "CP", "COVID-19"), tmp_path / "out" / "cm.png", normalize=normalize)
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.width > 100 and im.height > 100
    with pytest.raises(ValueError):
        plot_confusion_matrix(cm, ("a", "b"), tmp_path / "bad.png")
