"""``ctlesion export CKPT --format onnx --out F``: the detector as an ONNX graph, verified
against PyTorch with onnxruntime (as MONAI's ``convert_to_onnx(verify=True)`` does).

The graph takes one grey slice ``image`` float32 ``[1, H, W]`` in ``[0, 1]`` (the model's
input range) and returns torchvision's eval outputs ``boxes [K, 4]``, ``labels [K]``,
``scores [K]``, ``masks [K, 1, H, W]`` (pasted probabilities; for ``mask_paste: logits``
checkpoints the CTM scores, ``> 0.5`` where the pasted logit is above the threshold).
The detection settings (score threshold, NMS IoU, cap) of the checkpoint are fixed in the
graph. For joint models (SSM, Affinity, LSTM) the segmentation branch is exported; the
slice-classification head is not (its RoI batch padding draws random numbers).

Export uses torch's TorchScript-based exporter (``dynamo=False``), torchvision's own ONNX
path (its traced mask pasting), opset 17. Needs the ``onnx`` extra
(``pip install ctlesion[onnx]``: onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.phantom import make_phantom
from ..data.windowing import apply_window
from ..errors import ConfigError
from .checkpoint import load_checkpoint
from .io import atomic_write

__all__ = ["OUTPUT_NAMES", "export_onnx", "verify_onnx", "DEFAULT_TOLERANCE"]

OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")
# Measured against PyTorch on CPU (docs/benchmarks.md): boxes/scores/masks differ in the
# float32 rounding of the convolutions only; these bounds leave a margin.
DEFAULT_TOLERANCE = {"boxes": 1e-3, "scores": 1e-4, "masks": 1e-3}


class _SingleSlice(nn.Module):
    """``image [1, H, W]`` -> the detector's four eval outputs, as a tuple (ONNX has no dicts)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor):
        out = self.detector([image])[0]
        return out["boxes"], out["labels"], out["scores"], out["masks"]


def _require_onnx():
    import importlib

    try:
        importlib.import_module("onnx")
        onnxruntime = importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs the onnx extra (pip install 'ctlesion[onnx]'): {exc}") from None
    return onnxruntime


def verification_slice(size: int, seed: int = 0) -> torch.Tensor:
    """A synthetic CT slice (phantom, lung window) ``[1, size, size]`` in ``[0, 1]``."""
    hu = make_phantom(size, "covid", seed).hu
    return torch.from_numpy(apply_window(hu, "lung", "HU"))[None]


def _detector(model: nn.Module) -> nn.Module:
    det = getattr(model, "detector", model)
    if getattr(det, "roi_heads", None) is None or not det.roi_heads.has_mask():
        raise ConfigError("ONNX export: this model has no Mask R-CNN segmentation branch to export")
    return det


def export_model_onnx(model: nn.Module, out: str | Path, *, size: int = 512, opset: int = 17) -> Path:
    """Export ``model``'s detector (eval mode) to ``out`` atomically; returns ``out``."""
    _require_onnx()
    wrapper = _SingleSlice(_detector(model)).eval()
    example = verification_slice(size, seed=1)
    dynamic = {"image": {1: "height", 2: "width"}, "boxes": {0: "detections"}, "labels": {0: "detections"},
               "scores": {0: "detections"}, "masks": {0: "detections", 2: "height", 3: "width"}}

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # the tracer's notes on torchvision's graph
            torch.onnx.export(wrapper, (example,), tmp, opset_version=opset, dynamo=False,
                              input_names=["image"], output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic)

    atomic_write(out, write)
    return Path(out)


def verify_onnx(model: nn.Module, path: str | Path, image: torch.Tensor, tolerance: dict | None = None) -> dict:
    """Run the ONNX graph (onnxruntime, CPU) and the PyTorch detector on ``image``; returns
    the detection counts, max abs differences and ``ok`` (same count, same labels, every
    difference within ``tolerance``; default :data:`DEFAULT_TOLERANCE`)."""
    ort = _require_onnx()
    tolerance = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    t = time.perf_counter()
    got = dict(zip(OUTPUT_NAMES, session.run(None, {"image": image.numpy()})))
    ort_s = time.perf_counter() - t
    with torch.inference_mode():
        t = time.perf_counter()
        ref = _detector(model).eval()([image])[0]
        torch_s = time.perf_counter() - t
    result = {"detections": int(len(ref["scores"])), "onnx_detections": int(len(got["scores"])),
              "onnxruntime_s": round(ort_s, 3), "pytorch_s": round(torch_s, 3), "tolerance": tolerance}
    same_count = result["detections"] == result["onnx_detections"]
    result["labels_equal"] = bool(same_count and np.array_equal(got["labels"], ref["labels"].numpy()))
    diffs = {}
    for key in ("boxes", "scores", "masks"):
        diffs[key] = float(np.abs(got[key] - ref[key].numpy()).max()) if same_count and len(got[key]) else 0.0
    result["max_abs_diff"] = diffs
    result["ok"] = bool(same_count and result["labels_equal"] and all(diffs[k] <= tolerance[k] for k in diffs))
    return result


def export_onnx(checkpoint: str | Path, out: str | Path, *, size: int | None = None, opset: int = 17,
                verify: bool = True, tolerance: dict | None = None) -> dict:
    """Export ``checkpoint``'s detector to ``out`` and (``verify``) check it against PyTorch
    on a synthetic slice of the model's size. Returns what was done and the verification."""
    model, cfg, meta = load_checkpoint(checkpoint)
    model.eval()
    size = size or cfg.data.size or cfg.model.detector.min_size
    path = export_model_onnx(model, out, size=size, opset=opset)
    result = {"checkpoint": str(checkpoint), "model": cfg.model.name, "task": meta.get("task", "segmentation"),
              "onnx": str(path), "opset": opset, "size": size}
    if meta.get("task", "segmentation") != "segmentation":
        result["note"] = "segmentation branch only; the slice-classification head is not exported"
    if verify:
        result["verify"] = verify_onnx(model, path, verification_slice(size), tolerance)
    return result
