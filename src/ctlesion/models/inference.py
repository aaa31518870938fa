"""Inference-time settings that change speed, not the model: memory format and precision
(``docs/benchmarks.md`` has what each one gives).

* :func:`channels_last`: 4-D weights in channels-last layout for the block (oneDNN's fast
  convolution path on CPU; the values are the same, convolutions may round differently in
  the last bits), restored afterwards. On by default in ``predict`` / ``evaluate`` /
  ``benchmark`` (``--no-channels-last`` turns it off).
* :func:`inference_precision`: ``fp32`` (default), opt-in ``bf16-mask`` (only the mask
  branch in bfloat16: boxes, scores, labels and class logits stay float32 and unchanged, the
  masks change by rounding) or opt-in ``bf16`` (autocast over the whole forward: re-ranks the
  low-score detections, experimental).
* :func:`compiled_backbone`: opt-in ``torch.compile`` of the convolutional backbone (the
  one stage of a fixed shape per slice size; compiled once per model and kept), falling back
  to eager with a warning where compilation fails.
* :func:`speed_options`: the three together with the fast path's RoI Align kernel
  (:func:`~ctlesion.models.rcnn_parts.roi_align_kernel`: ``gather``, the default, or
  ``torchvision``, bitwise stock pooling), as ``predict``, ``evaluate`` and ``benchmark``
  apply them.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import nn

from ..config import INFERENCE_PRECISIONS
from ..errors import ConfigError
from .rcnn_parts import ROI_ALIGN_KERNELS, mask_branch_precision, roi_align_kernel

__all__ = ["COMPILED_ATTR", "PRECISIONS", "ROI_ALIGN_KERNELS", "CompiledModule", "channels_last", "compiled_backbone", "inference_precision",
           "speed_options"]

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


class CompiledModule(nn.Module):
    """``module`` run through ``torch.compile`` (TorchInductor), compiled at the first call.

    If compiling or running the compiled code raises (no C++ compiler, an op Inductor does
    not lower), the error is given once as a warning naming it, and ``module`` runs eagerly
    from then on: a genuine error in the module itself then surfaces from the eager call.
    Holds no parameters of its own besides ``module``'s (the compiled callable is not a
    submodule, so they are not listed twice).
    """

    def __init__(self, module: nn.Module, what: str = "backbone") -> None:
        super().__init__()
        self.module = module
        self.what = what
        object.__setattr__(self, "_compiled", torch.compile(module))
        self.failure: str | None = None

    def forward(self, *args, **kwargs):
        if self.failure is None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as err:        # noqa: BLE001 - any compile failure falls back to eager
                first_line = (str(err).strip().splitlines() or [""])[0]
                self.failure = f"{type(err).__name__}: {first_line}"
                warnings.warn(f"torch.compile of the {self.what} failed ({self.failure}); running it eagerly",
                              RuntimeWarning, stacklevel=2)
        return self.module(*args, **kwargs)


# The compiled wrapper is kept on the model (not as a submodule: the state dict stays the
# model's own), so the next block (the next predict call, benchmark round) reuses its code.
COMPILED_ATTR = "_ctlesion_compiled_backbone"


@contextlib.contextmanager
def compiled_backbone(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, the backbone of ``model`` (an R-CNN's ``backbone``, or that of the
    ``detector`` it holds) runs through ``torch.compile``: convolutions with batch norm,
    ReLU and the residual additions fused (outputs change by float32 rounding, ~1e-5 on the
    features; ``docs/benchmarks.md``). The first forward per input shape compiles (seconds
    to a minute on a CPU). Models without such a backbone, or ``enabled=False``, are left as
    they are. The state dict is the model's own again after the block."""
    holder = getattr(model, "detector", model)
    backbone = getattr(holder, "backbone", None)
    if not enabled or not isinstance(backbone, nn.Module) or isinstance(backbone, CompiledModule):
        yield model
        return
    wrapper = holder.__dict__.get(COMPILED_ATTR)
    if wrapper is None or wrapper.module is not backbone:
        wrapper = CompiledModule(backbone)
        object.__setattr__(holder, COMPILED_ATTR, wrapper)
    holder.backbone = wrapper
    try:
        yield model
    finally:
        holder.backbone = backbone


@contextlib.contextmanager
def speed_options(model: nn.Module, device: torch.device | str, precision: str = "fp32",
                  channels_last_weights: bool = True, torch_compile: bool = False,
                  roi_align: str = ROI_ALIGN_KERNELS[0]) -> Iterator[nn.Module]:
    """The inference levers around ``model`` for the block: the opt-in ``precision`` (see
    :func:`inference_precision`) and ``torch.compile`` of the backbone
    (:func:`compiled_backbone`), channels-last weights (:func:`channels_last`; on by
    default) and the fast path's RoI Align kernel
    (:func:`~ctlesion.models.rcnn_parts.roi_align_kernel`; the gather by default). With
    ``channels_last_weights=False, roi_align="torchvision"`` the detections are bitwise
    torchvision's."""
    kernel = roi_align_kernel(model, roi_align)           # checks the name before anything changes
    layout = channels_last(model) if channels_last_weights else contextlib.nullcontext()
    with inference_precision(device, precision, model), layout, compiled_backbone(model, torch_compile), kernel:
        yield model
