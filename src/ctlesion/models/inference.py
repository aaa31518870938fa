"""Inference-time settings that change speed, not the model: memory format and precision
(``docs/benchmarks.md`` has what each one gives).

* :func:`channels_last`: 4-D weights in channels-last layout for the block (oneDNN's fast
  convolution path on CPU; the values are the same, convolutions may round differently in
  the last bits), restored afterwards.
* :func:`inference_precision`: ``fp32`` (default), opt-in ``bf16-mask`` (only the mask
  branch in bfloat16: boxes, scores, labels and class logits stay float32 and unchanged, the
  masks change by rounding) or opt-in ``bf16`` (autocast over the whole forward: re-ranks the
  low-score detections, experimental).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..config import INFERENCE_PRECISIONS
from ..errors import ConfigError
from .rcnn_parts import mask_branch_precision

__all__ = ["PRECISIONS", "channels_last", "inference_precision"]

PRECISIONS = INFERENCE_PRECISIONS


@contextlib.contextmanager
def channels_last(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model``'s 4-D parameters and buffers are channels-last; their
    previous layout is restored afterwards (same values throughout)."""
    saved = [(t, t.data) for t in [*model.parameters(), *model.buffers()]
             if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last)]
    for t, data in saved:
        t.data = data.contiguous(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        for t, data in saved:
            t.data = data


def inference_precision(device: torch.device | str, precision: str = "fp32", model: nn.Module | None = None):
    """``fp32``: nothing changes; ``bf16-mask``: the mask branch of ``model`` under bfloat16
    autocast (needs ``model``; models without a Mask R-CNN mask branch are unchanged);
    ``bf16``: autocast to bfloat16 on ``device`` over everything (convolutions and matrix
    products in bf16, RoI Align and the rest as autocast decides)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16-mask":
        if model is None:
            raise ValueError("precision 'bf16-mask' needs the model whose mask branch it changes")
        return mask_branch_precision(model, torch.bfloat16)
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
