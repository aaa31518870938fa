"""RoI Align with a fast CPU backward, for training (issue 11, ``docs/benchmarks.md``).

torchvision's CPU ``roi_align`` backward runs on one core and recomputes the bilinear
weights of every sample for every channel: in a joint model's classification step
(1,000 proposals pooled at 7x7 with gradients into the backbone) it took 58 % of the step.

RoI Align (``aligned=False``, a fixed ``sampling_ratio``) is separable: with ``Ay[r]``
(``P x H``) the averaged bilinear weights of RoI ``r``'s bin rows over the feature rows, and
``Ax[r]`` (``Q x W``) those of its bin columns, torchvision's output is exactly

    out[r, c] = Ay[r] @ F[c] @ Ax[r]^T

including its border rules (a sample beyond ``[-1, size]`` counts zero, one in ``[-1, 0]``
is read at 0, one past the last row or column reads that row or column). So the gradient is

    dF[c] = sum_r Ay[r]^T @ G[r, c] @ Ax[r],

two matrix products on all cores. The forward is torchvision's own kernel, run over parts
of the RoIs in ``torch.get_num_threads()`` threads as at inference
(:class:`~ctlesion.models.rcnn_parts.ThreadedRoIAlign`; bitwise the stock outputs); only the
gradient differs from torchvision's, by float32 summation order (~1e-6 relative, tested).

:class:`SeparableGradRoIAlign` is a stock :class:`~torchvision.ops.MultiScaleRoIAlign`
(no parameters, the same state dict) that uses this where it applies: one feature level,
float32 features on the CPU that need a gradient, ``sampling_ratio > 0``, no autocast, no
tracing (ONNX export, ``torch.compile``). Everywhere else (inference, GPUs, the 4-level FPN
model) it is torchvision's pooler.
``detector.roi_align_backward: torchvision`` builds the stock pooler instead.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align

from .rcnn_parts import _executor, roi_parts
from .roi_align_gather import _rois, _tracing, axis_taps

__all__ = ["SeparableGradRoIAlign", "axis_weights", "separable_roi_align_backward", "threaded_roi_align"]

# RoIs per block of the backward's two products (bounds the [block, P*C, W] intermediate).
_BLOCK = 64


def axis_weights(start: Tensor, end: Tensor, bins: int, length: int, sampling_ratio: int) -> Tensor:
    """``[R, bins, length]``: for each RoI spanning ``[start, end)`` (feature coordinates,
    ``aligned=False``) the weight of each feature row (or column) in each output bin: the
    mean over the bin's ``sampling_ratio`` samples of their bilinear weights, with
    torchvision's border rules (:func:`~ctlesion.models.roi_align_gather.axis_taps`, spread
    over the axis)."""
    index, weight = axis_taps(start, end, bins, length, sampling_ratio)
    out = weight.new_zeros((len(start), bins, length))
    return out.scatter_add_(2, index, weight)


def separable_roi_align_backward(grad: Tensor, rois: Tensor, feature_shape: torch.Size, spatial_scale: float,
                                 sampling_ratio: int) -> Tensor:
    """The gradient of ``roi_align(features, rois, ..., spatial_scale, sampling_ratio,
    aligned=False)`` with respect to ``features`` (shape ``feature_shape``, ``[B, C, H, W]``)
    for the output gradient ``grad`` (``[R, C, P, Q]``); ``rois`` ``[R, 5]`` (image index, box)."""
    batch, channels, height, width = feature_shape
    pooled_h, pooled_w = grad.shape[-2:]
    boxes = rois[:, 1:] * spatial_scale
    wy = axis_weights(boxes[:, 1], boxes[:, 3], pooled_h, height, sampling_ratio)     # [R, P, H]
    wx = axis_weights(boxes[:, 0], boxes[:, 2], pooled_w, width, sampling_ratio)      # [R, Q, W]
    out = grad.new_zeros((batch, height, channels * width))
    image = rois[:, 0].long()
    for b in range(batch):
        rows = (image == b).nonzero()[:, 0] if batch > 1 else None
        g, y, x = (grad, wy, wx) if rows is None else (grad[rows], wy[rows], wx[rows])
        for s in range(0, len(g), _BLOCK):
            # [r, C, P, Q] -> [r, P*C, Q] @ [r, Q, W] -> [r, P*C, W] = [(r P), (C W)]
            t = torch.bmm(g[s:s + _BLOCK].transpose(1, 2).reshape(-1, pooled_h * channels, pooled_w),
                          x[s:s + _BLOCK])
            out[b].addmm_(y[s:s + _BLOCK].reshape(-1, height).t(), t.view(-1, channels * width))
    return out.view(batch, height, channels, width).permute(0, 2, 1, 3).contiguous()


def threaded_roi_align(features: Tensor, rois: Tensor, output_size, spatial_scale: float, sampling_ratio: int,
                       workers: int) -> Tensor:
    """torchvision's ``roi_align`` (``aligned=False``) over parts of ``rois`` in ``workers``
    threads (its CPU kernel runs on one core and releases the GIL); each RoI's output
    depends only on its own box, so the joined parts equal one call bitwise. No autograd graph."""
    parts = roi_parts(len(rois), workers)
    if parts < 2:
        return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, False)

    def run(part):
        with torch.no_grad():
            return roi_align(features, part, output_size, spatial_scale, sampling_ratio, False)

    return torch.cat(list(_executor(workers).map(run, rois.tensor_split(parts))))


class _RoIAlignSeparableGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio):
        ctx.save_for_backward(rois)
        ctx.shape, ctx.spatial_scale, ctx.sampling_ratio = features.shape, spatial_scale, sampling_ratio
        return threaded_roi_align(features.detach(), rois, output_size, spatial_scale, sampling_ratio,
                                  torch.get_num_threads())

    @staticmethod
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        grad_features = separable_roi_align_backward(grad.contiguous(), rois, ctx.shape, ctx.spatial_scale,
                                                     ctx.sampling_ratio)
        return grad_features, None, None, None, None


class SeparableGradRoIAlign(MultiScaleRoIAlign):
    """torchvision's pooler; on one CPU float32 feature level that needs a gradient, its
    RoI Align gets the separable backward (see the module docstring)."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[k] for k in self.featmap_names if k in x]
        fast = (len(features) == 1 and features[0].device.type == "cpu" and features[0].dtype == torch.float32
                and features[0].requires_grad and torch.is_grad_enabled() and self.sampling_ratio > 0
                and not torch.is_autocast_enabled("cpu") and not _tracing())
        if not fast:
            return super().forward(x, boxes, image_shapes)
        if self.scales is None:
            # torchvision infers the feature scale at its first call and keeps it: let it, on
            # no boxes, so that every call takes the same path (exact resume needs that).
            with torch.no_grad():
                super().forward(x, [b[:0] for b in boxes], image_shapes)
        return _RoIAlignSeparableGrad.apply(features[0], _rois(boxes), self.output_size, self.scales[0],
                                            self.sampling_ratio)
