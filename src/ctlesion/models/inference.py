"""Inference-time settings that change speed, not the model: memory format and precision
(``docs/benchmarks.md`` has what each one gives).

* :func:`channels_last`: 4-D weights in channels-last layout for the block (oneDNN's fast
  convolution path on CPU; the values are the same, convolutions may round differently in
  the last bits), restored afterwards.
* :func:`inference_precision`: ``fp32`` (default) or opt-in ``bf16`` autocast.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["PRECISIONS", "channels_last", "inference_precision"]

PRECISIONS = ("fp32", "bf16")


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


def inference_precision(device: torch.device | str, precision: str = "fp32"):
    """``fp32``: nothing changes; ``bf16``: autocast to bfloat16 on ``device`` (opt-in;
    convolutions and matrix products in bf16, RoI Align and the rest as autocast decides)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
