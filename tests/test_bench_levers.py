"""scripts/bench_levers.py's lever switches: each variant turns off what it says inside its
block and leaves the default path as it was after it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

import ctlesion.models.rcnn_parts as parts
import ctlesion.models.roi_align_gather as gather

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_levers.py"


@pytest.fixture(scope="module")
def bench_levers():
    spec = importlib.util.spec_from_file_location("bench_levers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_levers"] = module          # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_levers", None)


def _state():
    return (parts._fast_pools, parts.LesionRoIHeads.mask_logits, parts.LesionMaskPredictor._fast,
            parts.LesionBoxHead.conv_min_rois, gather.GatherRoIAlign.forward)


def test_the_variant_defaults_are_the_default_path(bench_levers):
    default = bench_levers.Variant("x")
    assert (default.roi_align, default.precision, default.channels_last, default.compiled) == ("gather", "fp32", True,
                                                                                               False)
    assert default.mask_channels_last and default.gemm_predictor and default.box_conv and default.bf16_pooling
    named = [v for v in bench_levers.VARIANTS if "(the default)" in v.name]
    assert len(named) == 1 and named[0] == bench_levers.Variant(named[0].name)
    assert len({v.name for v in bench_levers.VARIANTS}) == len(bench_levers.VARIANTS)


def test_each_lever_is_off_inside_its_block_and_restored_after(bench_levers):
    before = _state()
    off = bench_levers.Variant("all off", roi_align="one", mask_channels_last=False, gemm_predictor=False,
                               box_conv=False, bf16_pooling=False)
    with bench_levers.levers(off):
        inside = _state()
        assert parts.LesionBoxHead.conv_min_rois == float("inf")
        assert parts.LesionMaskPredictor._fast(None, torch.zeros(1)) is False
        assert parts._fast_pools(None, 2, "gather") == []                      # torchvision's pooler as built
    assert all(a is not b for a, b in zip(before, inside))                   # every lever switched
    assert _state() == before
    with bench_levers.levers(bench_levers.Variant("default")):
        assert _state()[1:] == before[1:]                                     # nothing else patched


def test_float32_pooling_variant_pools_bf16_features_in_float32(bench_levers):
    """The 'before' of --precision bf16: the same boxes pooled in float32 and cast once, which
    is what torchvision's autocast RoI Align gives."""
    torch.manual_seed(0)
    stock = MultiScaleRoIAlign(["0"], 7, 2)
    pool = gather.GatherRoIAlign(stock)
    features = {"0": torch.randn(1, 8, 16, 16).bfloat16()}
    boxes = [torch.tensor([[3.0, 4.0, 60.0, 50.0], [10.0, 0.0, 30.0, 63.0], [0.5, 0.5, 9.0, 7.0]])]
    sizes = [(64, 64)]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = pool(features, boxes, sizes)
        with bench_levers.levers(bench_levers.Variant("before", precision="bf16", bf16_pooling=False)):
            before = pool(features, boxes, sizes)
        ref = stock(features, boxes, sizes)
    assert ours.dtype == before.dtype == torch.bfloat16
    torch.testing.assert_close(before.float(), ref.float(), atol=1e-5, rtol=8e-3)
    assert not torch.equal(ours, before)                                      # two poolings, not one
