"""RoI Align as one weighted gather, and the layout-aware heads that read its output
(issue 11; speed in docs/benchmarks.md, never timed here): the values equal torchvision's
within float32 rounding, borders and levels included, and every case it does not cover
goes to the fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign, roi_align

from ctlesion.models.rcnn_parts import (LesionBoxHead, LesionMaskPredictor, ThreadedRoIAlign, _fast_pools,
                                        binary_masks, roi_align_kernel)
from ctlesion.models.roi_align_gather import GatherRoIAlign, axis_taps, gather_roi_align
from ctlesion.registry import create_model, default_model_config


def _boxes(n, image=(120, 100), seed=0):
    """Random boxes, some past every border, one of zero size and one covering more than the image."""
    g = torch.Generator().manual_seed(seed)
    h, w = image
    xy = torch.rand((n, 2), generator=g) * torch.tensor([w * 1.2, h * 1.2]) - 10
    wh = torch.rand((n, 2), generator=g) * torch.tensor([w * 0.6, h * 0.6])
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([-15.0, -15.0, w + 20.0, h + 20.0])
    boxes[1] = torch.tensor([7.0, 9.0, 7.0, 9.0])
    boxes[2] = torch.tensor([w - 0.5, h - 0.5, w + 3.0, h + 3.0])
    return boxes


class _Spy(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool, self.calls = pool, 0

    def forward(self, *args):
        self.calls += 1
        return self.pool(*args)


@pytest.mark.parametrize("output_size", [7, 14, (5, 3)])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_one_level_equals_torchvision_roi_align(output_size, sampling_ratio):
    torch.manual_seed(0)
    features = torch.randn(2, 6, 15, 13)
    rois = torch.cat([torch.tensor([[0.0]] * 20 + [[1.0]] * 20), _boxes(40)], 1)
    size = (output_size, output_size) if isinstance(output_size, int) else output_size
    ref = roi_align(features, rois, size, 0.125, sampling_ratio, False)
    got = gather_roi_align([features], rois, size, [0.125], sampling_ratio)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_features_give_the_same_values():
    torch.manual_seed(1)
    features = torch.randn(1, 8, 16, 16)
    rois = torch.cat([torch.zeros(30, 1), _boxes(30, (128, 128))], 1)
    a = gather_roi_align([features], rois, (7, 7), [0.125], 2)
    b = gather_roi_align([features.contiguous(memory_format=torch.channels_last)], rois, (7, 7), [0.125], 2)
    assert torch.equal(a, b)


def test_axis_taps_weights_sum_to_the_share_of_samples_inside():
    start = torch.tensor([-30.0, 0.0, 5.0, 14.5])
    end = torch.tensor([-20.0, 16.0, 5.0, 40.0])
    index, weight = axis_taps(start, end, 4, 16, 2)
    assert index.shape == weight.shape == (4, 4, 4)
    assert index.min() >= 0 and index.max() <= 15
    sums = weight.sum(-1)
    assert torch.all(sums[0] == 0)                            # wholly before -1: nothing read
    torch.testing.assert_close(sums[1], torch.ones(4))        # wholly inside
    torch.testing.assert_close(sums[2], torch.ones(4))        # zero size: clamped to one pixel
    assert torch.all(sums[3] <= 1) and sums[3][-1] == 0       # runs past the end (> length)


def test_several_levels_equal_multiscale_roi_align():
    torch.manual_seed(2)
    names = ["0", "1", "2", "3"]
    pool = MultiScaleRoIAlign(names, 7, 2)
    features = {n: torch.randn(2, 4, s, s + 1) for n, s in zip(names, (64, 32, 16, 8))}
    boxes = [_boxes(60, (256, 260), seed=3) * 2, _boxes(25, (256, 260), seed=4)]
    shapes = [(256, 260), (256, 260)]
    ref = pool(features, boxes, shapes)
    with torch.inference_mode():
        got = GatherRoIAlign(pool)(features, boxes, shapes)
    assert len(pool.map_levels(boxes).unique()) > 1                   # the case tests several levels
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def test_no_boxes_and_a_first_call_that_sets_up_the_scales():
    pool = MultiScaleRoIAlign(["0"], 7, 2)
    features = {"0": torch.randn(1, 4, 16, 16)}
    assert pool.scales is None
    with torch.inference_mode():
        empty = GatherRoIAlign(pool)(features, [torch.zeros((0, 4))], [(64, 64)])
    assert empty.shape == (0, 4, 7, 7)
    assert pool.scales == [0.25]


@pytest.mark.parametrize("case", ["grad", "adaptive", "float64"])
def test_cases_it_does_not_cover_go_to_the_fallback(case):
    pool = MultiScaleRoIAlign(["0"], 7, 0 if case == "adaptive" else 2)
    spy = _Spy(pool)
    gather = GatherRoIAlign(pool, spy)
    x = torch.randn(1, 4, 16, 16, dtype=torch.float64 if case == "float64" else torch.float32,
                    requires_grad=case == "grad")
    boxes = [_boxes(10, (64, 64)).to(x.dtype)]
    out = gather({"0": x}, boxes, [(64, 64)])
    if case == "grad":
        out.sum().backward()
        assert x.grad is not None
    assert spy.calls == 1
    with torch.inference_mode():
        if case not in ("adaptive", "float64"):
            gather({"0": x.detach().float()}, [b.float() for b in boxes], [(64, 64)])
            assert spy.calls == 1                                     # covered: no fallback call


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_under_autocast_it_pools_in_the_features_dtype(dtype):
    torch.manual_seed(5)
    names = ["0", "1"]
    pool = MultiScaleRoIAlign(names, 7, 2)
    features = {n: torch.randn(1, 8, s, s).to(dtype) for n, s in zip(names, (32, 16))}
    boxes = [_boxes(40, (128, 128), seed=6)]
    spy = _Spy(pool)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = pool(features, boxes, [(128, 128)])          # torchvision's: float32 pooling, rounded once
        got = GatherRoIAlign(pool, spy)(features, boxes, [(128, 128)])
    assert spy.calls == 0                                             # the gather ran
    assert got.dtype == ref.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        return
    # Against the exact pooling of the same bfloat16 features: bfloat16 tap weights (8
    # significant bits) and a bfloat16 result stay within one bfloat16 step of the largest
    # feature (seen: 0.33 of it), and on average within 2x torchvision's single rounding (1.25x)
    exact = pool({n: f.float() for n, f in features.items()}, boxes, [(128, 128)])
    step = 2.0 ** -7 * max(f.float().abs().max().item() for f in features.values())
    assert 0 < (got.float() - exact).abs().max().item() <= step
    assert (got.float() - exact).abs().mean() < (ref.float() - exact).abs().mean() * 2


def test_a_fixed_sampling_ratio_is_required():
    with pytest.raises(ValueError, match="sampling_ratio"):
        gather_roi_align([torch.zeros(1, 2, 4, 4)], torch.zeros((1, 5)), (2, 2), [1.0], 0)


@pytest.mark.parametrize("conv_min_rois", [1, 13])      # fc6 as a 7x7 convolution / as a permuted GEMM
def test_box_head_reads_channels_last_features_as_the_stock_head(conv_min_rois, monkeypatch):
    monkeypatch.setattr(LesionBoxHead, "conv_min_rois", conv_min_rois)
    torch.manual_seed(3)
    stock = TwoMLPHead(8 * 7 * 7, 16)
    head = LesionBoxHead(8 * 7 * 7, 16)
    head.load_state_dict(stock.state_dict())
    assert list(head.state_dict()) == list(stock.state_dict())
    x = torch.randn(12, 8, 7, 7)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(head(x), stock(x))                             # contiguous: torchvision's path
    torch.testing.assert_close(head(cl), stock(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_rows", [7, 1024])
def test_mask_predictor_gemms_equal_the_transposed_convolution(block_rows, monkeypatch):
    torch.manual_seed(4)
    stock = MaskRCNNPredictor(6, 5, 3)
    pred = LesionMaskPredictor(6, 5, 3)
    pred.load_state_dict(stock.state_dict())
    assert list(pred.state_dict()) == list(stock.state_dict())
    monkeypatch.setattr(LesionMaskPredictor, "block_rows", block_rows)   # 7: blocks end mid-RoI
    x = torch.randn(9, 6, 5, 4)
    cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = stock(x)
        assert torch.equal(pred(x), ref)                              # contiguous: torchvision's path
        got = pred(cl)
    assert got.shape == ref.shape == (9, 3, 10, 8)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_mask_predictor_keeps_autograd_on_torchvision_path():
    pred = LesionMaskPredictor(4, 4, 2)
    x = torch.randn(3, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    pred(x).sum().backward()                                          # weights need a gradient
    assert pred.conv5_mask.weight.grad is not None


def test_binary_masks_pools_by_gather_or_by_threads_and_puts_the_pools_back():
    model = create_model(default_model_config("maskrcnn-r18-s2")).eval()
    heads = model.roi_heads
    box_pool, mask_pool = heads.box_roi_pool, heads.mask_roi_pool
    with binary_masks(model, 0.5):                                     # the default
        assert isinstance(heads.box_roi_pool, GatherRoIAlign) and heads.box_roi_pool.pool is box_pool
        assert isinstance(heads.box_roi_pool.fallback, ThreadedRoIAlign)
        assert isinstance(heads.mask_roi_pool, GatherRoIAlign) and heads.mask_roi_pool.pool is mask_pool
    with binary_masks(model, 0.5, roi_align="torchvision"):
        assert isinstance(heads.box_roi_pool, ThreadedRoIAlign)
    with roi_align_kernel(model, "torchvision"):                       # what speed_options sets
        with binary_masks(model, 0.5):
            assert isinstance(heads.box_roi_pool, ThreadedRoIAlign)
        with binary_masks(model, 0.5, roi_align="gather"):            # an explicit kernel wins
            assert isinstance(heads.box_roi_pool, GatherRoIAlign)
    assert heads.roi_align_kernel == "gather"                          # restored
    assert heads.box_roi_pool is box_pool and heads.mask_roi_pool is mask_pool
    assert len(_fast_pools(heads, 2, "torchvision")) == 2
    heads.box_roi_pool, heads.mask_roi_pool = box_pool, mask_pool
    with pytest.raises(ValueError, match="roi_align"):
        with binary_masks(model, 0.5, roi_align="fast"):
            pass
    with pytest.raises(ValueError, match="roi_align"):
        with roi_align_kernel(model, "fast"):
            pass


def test_the_registry_builds_the_layout_aware_heads():
    model = create_model(default_model_config("ssm-2branch-r18-s3"))
    assert isinstance(model.detector.roi_heads.box_head, LesionBoxHead)
    assert isinstance(model.cls_branch["box_head"], LesionBoxHead)
    assert isinstance(model.detector.roi_heads.mask_predictor, LesionMaskPredictor)
