"""The separable RoI Align backward (issue 11, training speed): the stock forward, the stock
gradient up to float32 rounding, torchvision's border rules, and the fallbacks."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from ctlesion.models.roi_align_grad import SeparableGradRoIAlign, separable_roi_align_backward
from ctlesion.registry import create_model, default_model_config


def _boxes(n, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand((n, 2), generator=g) * torch.tensor([width, height]) * 0.9
    wh = torch.rand((n, 2), generator=g) * torch.tensor([width, height]) * 0.5
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([0.0, 0.0, float(width), float(height)])          # the whole image
    boxes[1] = torch.tensor([5.0, 5.0, 5.2, 5.1])                             # smaller than a bin (size clamps to 1)
    boxes[2] = torch.tensor([width - 3.0, height - 2.0, width + 20.0, height + 9.0])   # past the border
    boxes[3] = torch.tensor([-12.0, -20.0, 6.0, 4.0])                          # before it (samples < -1 count 0)
    return boxes


@pytest.mark.parametrize("scale,out,sampling", [(1 / 8, 7, 2), (1 / 16, 14, 2), (1 / 4, 5, 3)])
def test_separable_backward_equals_torchvision_gradient(scale, out, sampling):
    g = torch.Generator().manual_seed(0)
    features = torch.randn((2, 6, 12, 10), generator=g)
    boxes = [_boxes(9, 12 / scale, 10 / scale, 1), _boxes(5, 12 / scale, 10 / scale, 2)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    x = features.clone().requires_grad_()
    pooled = roi_align(x, rois, out, scale, sampling, False)
    grad_out = torch.randn(pooled.shape, generator=g)
    pooled.backward(grad_out)
    ours = separable_roi_align_backward(grad_out, rois, features.shape, scale, sampling)
    assert ours.shape == features.shape
    torch.testing.assert_close(ours, x.grad, atol=1e-5, rtol=1e-5)
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])   # train.channels_last
def test_pooler_gives_the_stock_forward_and_gradient_and_falls_back(layout):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn((1, 8, 16, 16), generator=g).contiguous(memory_format=layout)
    boxes, shapes = [_boxes(12, 128, 128, 4)], [(128, 128)]
    stock, ours = MultiScaleRoIAlign(["0"], 7, 2), SeparableGradRoIAlign(["0"], 7, 2)
    results = {}
    for name, pool in (("stock", stock), ("ours", ours)):
        x = feats.clone().requires_grad_()
        y = pool({"0": x}, boxes, shapes)
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).sin()).sum().backward()
        results[name] = (y.detach(), x.grad, y.grad_fn.__class__.__name__)
    # The first call too (torchvision infers the scale there): every call takes one path.
    assert results["ours"][2].startswith("_RoIAlignSeparableGrad")
    assert torch.equal(results["ours"][0], results["stock"][0])               # forward: torchvision's call
    torch.testing.assert_close(results["ours"][1], results["stock"][1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():                                                    # inference: torchvision's pooler
        assert torch.equal(ours({"0": feats}, boxes, shapes), stock({"0": feats}, boxes, shapes))
    two = SeparableGradRoIAlign(["0", "1"], 7, 2)                             # several levels: torchvision's
    x = feats.clone().requires_grad_()
    for _ in range(2):
        y = two({"0": x, "1": x[:, :, ::2, ::2]}, boxes, shapes)
    assert not y.grad_fn.__class__.__name__.startswith("_RoIAlignSeparableGrad")


def test_detectors_use_it_unless_configured_otherwise():
    cfg = default_model_config("maskrcnn-r18-s2")
    model = create_model(cfg)
    assert isinstance(model.roi_heads.box_roi_pool, SeparableGradRoIAlign)
    assert isinstance(model.roi_heads.mask_roi_pool, SeparableGradRoIAlign)
    cfg.detector.roi_align_backward = "torchvision"
    stock = create_model(cfg)
    assert type(stock.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    assert list(stock.state_dict()) == list(model.state_dict())


def test_a_training_step_gets_the_stock_gradients():
    cfg = default_model_config("maskrcnn-r18-s2")
    cfg.detector.min_size, cfg.detector.max_size = 64, 64
    grads = {}
    for rule in ("torchvision", "separable"):
        cfg.detector.roi_align_backward = rule
        torch.manual_seed(0)
        model = create_model(cfg).train()
        image = torch.rand((1, 64, 64), generator=torch.Generator().manual_seed(1))
        mask = torch.zeros((1, 64, 64), dtype=torch.uint8)
        mask[0, 20:40, 16:36] = 1
        target = {"boxes": torch.tensor([[16.0, 20.0, 36.0, 40.0]]), "labels": torch.tensor([1]), "masks": mask}
        torch.manual_seed(2)                                                  # the same RoI sampling
        sum(model([image], [target]).values()).backward()
        grads[rule] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["separable"].keys() == grads["torchvision"].keys()
    conv1 = "backbone.body.conv1.weight"
    assert grads["torchvision"][conv1].abs().sum() > 0                         # the gradient reaches the backbone
    for name, grad in grads["torchvision"].items():
        torch.testing.assert_close(grads["separable"][name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_threaded_forward_equals_one_call_bitwise(workers):
    from ctlesion.models.roi_align_grad import threaded_roi_align

    g = torch.Generator().manual_seed(5)
    features = torch.randn((2, 4, 10, 10), generator=g)
    boxes = _boxes(100, 80, 80, 6)
    rois = torch.cat([(torch.arange(100) % 2).float()[:, None], boxes], 1)
    one = roi_align(features, rois, 7, 1 / 8, 2, False)
    assert torch.equal(threaded_roi_align(features, rois, (7, 7), 1 / 8, 2, workers), one)
