"""RoI Align as one weighted gather, for CPU inference (issue 11, ``docs/benchmarks.md``).

With ``aligned=False`` and a fixed ``sampling_ratio`` ``s``, every output bin of torchvision's
RoI Align is a weighted sum of at most ``(2s)^2`` feature pixels: along each axis a bin
averages ``s`` samples, each read bilinearly from two rows (columns), so a bin's weight
over the feature map is the outer product of a row part with at most ``2s`` taps and a
column part with at most ``2s`` taps (the same separable form as
:mod:`~ctlesion.models.roi_align_grad`, with torchvision's border rules). Over the features
as a channels-last table ``T`` (``[pixels, C]``), a bin is

    out[bin] = sum_k w[bin, k] * T[i[bin, k]],    k < (2s)^2,

which is what ``torch.nn.functional.embedding_bag(i, T, mode="sum", per_sample_weights=w)``
computes: one ATen kernel, vectorised over the channels and parallel over the bins on all
intra-op threads. torchvision's CPU kernel runs one core per call and recomputes the
bilinear weights for every channel; on 2 threads the gather pools the 1,000 proposals of a
512² slice several times faster (``docs/benchmarks.md``, fifth pass). The result differs
from torchvision's by float32 summation order (``~1e-6``, tested).

:class:`GatherRoIAlign` wraps a :class:`~torchvision.ops.MultiScaleRoIAlign` (its scales,
level mapper, output size and sampling ratio; no parameters, the state dict is unchanged)
and pools every level at once (one table holds all levels' pixels). It defers to
``fallback`` wherever it does not apply: off the CPU, features other than float32 (or,
under CPU autocast, the autocast dtype), an adaptive ``sampling_ratio``, autograd through
the features (training keeps :class:`~ctlesion.models.roi_align_grad.SeparableGradRoIAlign`),
tracing (ONNX export, ``torch.compile``). Under autocast (opt-in ``--precision bf16``) the
features arrive in bfloat16 and the gather pools them in bfloat16 (the table as it is, the
tap weights rounded to it; the kernel accumulates in float32), where torchvision's autocast
RoI Align pools in float32 and rounds once: results within one bfloat16 step of the
largest feature (tested), for 5-6x less time (the float32 pool writes twice the bytes,
then is cast; ``docs/benchmarks.md``, seventh pass). Float32 features under autocast pool
in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

__all__ = ["GatherRoIAlign", "axis_taps", "gather_roi_align"]


def axis_taps(start: Tensor, end: Tensor, bins: int, length: Tensor | int,
              sampling_ratio: int) -> tuple[Tensor, Tensor]:
    """Along one axis, for each RoI spanning ``[start, end)`` (feature coordinates,
    ``aligned=False``; ``length``: the axis's size, a number or one per RoI) and each of its
    ``bins``: the feature rows (columns) its samples read, ``[R, bins, 2 * sampling_ratio]``
    int64, and their weights (bilinear, averaged over the bin's samples) as float. Border
    rules as torchvision's ``pre_calc_for_bilinear_interpolate``: a sample beyond
    ``[-1, length]`` weighs zero, one in ``[-1, 0]`` is read at 0, one past the last row
    reads the last row."""
    length = torch.as_tensor(length, dtype=start.dtype, device=start.device)
    if length.dim():
        length = length.reshape(-1, 1, 1)
    size = (end - start).clamp_min(1.0)
    bin_size = size / bins
    offsets = torch.arange(bins, dtype=start.dtype, device=start.device)
    samples = torch.arange(sampling_ratio, dtype=start.dtype, device=start.device) + 0.5
    # The same expression as torchvision's: start + p * bin + (i + .5) * bin / grid.
    coord = (start[:, None, None] + offsets[None, :, None] * bin_size[:, None, None]
             + samples[None, None, :] * bin_size[:, None, None] / sampling_ratio)        # [R, bins, samples]
    inside = ((coord >= -1.0) & (coord <= length)).to(start.dtype)
    coord = coord.clamp_min(0.0)
    low = torch.minimum(coord.floor(), length - 1)
    coord = torch.where(low >= length - 1, low, coord)
    high = torch.minimum(low + 1, length - 1)
    frac = coord - low
    index = torch.cat([low, high], 2).long()
    weight = torch.cat([(1 - frac) * inside, frac * inside], 2) / sampling_ratio
    return index, weight


def _table(features: list[Tensor]) -> tuple[Tensor, list[int]]:
    """All levels' pixels as one ``[pixels, C]`` table (image-major, then row, column), and
    the row where each level starts. Free for one channels-last level; a contiguous
    (``NCHW``) level is transposed (the gather reads whole rows, so they must be dense)."""
    rows = [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).contiguous() for f in features]
    starts = [0]
    for r in rows[:-1]:
        starts.append(starts[-1] + len(r))
    return (rows[0] if len(rows) == 1 else torch.cat(rows)), starts


def gather_roi_align(features: list[Tensor], rois: Tensor, output_size: tuple[int, int], scales: list[float],
                     sampling_ratio: int, levels: Tensor | None = None) -> Tensor:
    """torchvision's ``roi_align(..., aligned=False)`` of ``rois`` (``[R, 5]``: image index,
    box in image coordinates), each on the level ``levels[r]`` of ``features`` (``[B, C, H, W]``
    each; ``levels`` ``None``: one level) at that level's scale, as one weighted gather.
    Returns ``[R, C, P, Q]`` in channels-last strides, in the features' dtype (the taps are
    placed in ``rois``' dtype, float32, and their weights rounded to the features' dtype)."""
    if sampling_ratio <= 0:
        raise ValueError(f"gather_roi_align needs a fixed sampling_ratio > 0, got {sampling_ratio}")
    table, starts = _table(features)
    device, dtype = table.device, rois.dtype
    pooled_h, pooled_w = output_size
    level = (torch.zeros(len(rois), dtype=torch.long, device=device) if levels is None
             else levels.to(device=device, dtype=torch.long))
    per_level = torch.tensor([[s, f.shape[2], f.shape[3], start] for s, f, start in zip(scales, features, starts)],
                             dtype=torch.float64, device=device)[level]       # [R, 4]
    scale = per_level[:, 0].to(dtype)
    height, width = per_level[:, 1].to(dtype), per_level[:, 2].to(dtype)
    base = (per_level[:, 3].long() + rois[:, 0].long() * (per_level[:, 1] * per_level[:, 2]).long())
    boxes = rois[:, 1:] * scale[:, None]
    iy, wy = axis_taps(boxes[:, 1], boxes[:, 3], pooled_h, height, sampling_ratio)     # [R, P, T]
    ix, wx = axis_taps(boxes[:, 0], boxes[:, 2], pooled_w, width, sampling_ratio)      # [R, Q, T]
    taps = iy.shape[-1] * ix.shape[-1]
    index = (base[:, None, None, None, None] + iy[:, :, None, :, None] * width.long()[:, None, None, None, None]
             + ix[:, None, :, None, :]).reshape(-1, taps)
    weight = (wy[:, :, None, :, None] * wx[:, None, :, None, :]).reshape(-1, taps).to(table.dtype)
    out = F.embedding_bag(index, table, mode="sum", per_sample_weights=weight)       # [R*P*Q, C]
    return out.view(len(rois), pooled_h, pooled_w, table.shape[1]).permute(0, 3, 1, 2)


def _rois(boxes: list[Tensor]) -> Tensor:
    """torchvision's ``[K, 5]`` RoI format: image index, then the box."""
    index = torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)])
    return torch.cat([index, torch.cat(boxes)], 1)


def _tracing() -> bool:
    """Under TorchScript tracing, ONNX export or ``torch.compile``: the graph must hold
    torchvision's ops, not a Python function with threads or blocks."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


class GatherRoIAlign(nn.Module):
    """``pool`` (torchvision's :class:`MultiScaleRoIAlign`) computed by
    :func:`gather_roi_align` where that applies (see the module docstring), else
    ``fallback`` (default: ``pool`` itself)."""

    def __init__(self, pool: MultiScaleRoIAlign, fallback: nn.Module | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.fallback = pool if fallback is None else fallback

    def applies(self, features: list[Tensor]) -> bool:
        """Whether the gather computes this call (else ``fallback``)."""
        dtypes = {torch.float32}
        if torch.is_autocast_enabled("cpu"):
            dtypes.add(torch.get_autocast_dtype("cpu"))
        return (bool(features) and all(f.device.type == "cpu" and f.dtype in dtypes for f in features)
                and self.pool.sampling_ratio > 0
                and not (torch.is_grad_enabled() and any(f.requires_grad for f in features))
                and not _tracing())

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes) -> Tensor:
        levels = [features[k] for k in self.pool.featmap_names if k in features]
        if not self.applies(levels):
            return self.fallback(features, boxes, image_shapes)
        pool = self.pool
        if pool.scales is None or pool.map_levels is None:
            # torchvision infers the scales at its first call and keeps them: let it, on no boxes.
            pool(features, [b[:0] for b in boxes], image_shapes)
        mapped = pool.map_levels(boxes) if len(levels) > 1 else None
        # Pooled in the levels' common dtype (float32, or under autocast bfloat16), else in
        # float32; the boxes' arithmetic in float32 either way; returned in the first level's
        # dtype, as torchvision's pooler does.
        dtype = levels[0].dtype if all(f.dtype == levels[0].dtype for f in levels) else torch.float32
        with torch.autocast("cpu", enabled=False):
            out = gather_roi_align([f.to(dtype) for f in levels], _rois(boxes).float(), tuple(pool.output_size),
                                   list(pool.scales), pool.sampling_ratio, mapped)
        return out.to(levels[0].dtype)
