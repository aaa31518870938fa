"""``ctlesion benchmark``: inference time per slice against stock torchvision, interleaved.

What is timed (``docs/benchmarks.md``):

* **ctlesion**: what ``predict`` runs per batch on its default path: the model's forward
  plus the compact prediction (CPU, boolean masks; joint models: class probabilities, the
  RoI batch and the detections), via :func:`~ctlesion.engine.evaluate.detect_batch` /
  :func:`~ctlesion.engine.evaluate_classifier.classify_batch`.
* **stock**: a torchvision ``MaskRCNN`` of the same shape built from stock classes only
  (:func:`stock_reference`): stock transform, RPN, ``RoIHeads`` and mask pasting; its
  forward is timed (detection only, float masks as torchvision returns them).

Both get the same random 512x512 slices; each round times every ctlesion model and every
distinct stock reference once, one after the other, so load changes hit both; the ratio is
the median of the per-round ratios. ``--detections N`` forces N masked detections: score
threshold 0, NMS IoU 1.0 (nothing is suppressed) and at most N per image, on both sides.
Weights are random (speed does not depend on them once the detection count is fixed).

The volume mode writes (or reads) a DICOM series and times ``predict`` end to end (decode,
model, JSON lines; no overlays, no volume outputs) against stock's detection-only time over
the same slices held in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..config import ExperimentConfig, ModelConfig
from ..data.masks import get_mask_type
from ..errors import ConfigError
from ..models.backbones import ARCHS
from ..models.inference import speed_options
from ..models.maskrcnn import set_detection_settings
from ..registry import create_model, default_model_config, get_entry
from .evaluate import compact_prediction, detect_batch
from .evaluate_classifier import classify_batch
from .io import write_json

__all__ = ["DEFAULT_MODELS", "stock_reference", "force_detections", "run_benchmark", "format_table",
           "volume_benchmark", "format_volume", "write_ct_series", "machine_info"]

DEFAULT_MODELS = ("maskrcnn-r18-s2", "ssm-detector-r18-s3", "ssm-r18-s3", "ssm-2branch-r18-s3", "ctm-r50-fpn",
                  "affinity-r18", "lstm2-r18")


def machine_info(device: torch.device) -> dict:
    """Torch versions, CPU, threads and load average: recorded with every number."""
    import torchvision

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------- models


def stock_reference(cfg: ModelConfig) -> tuple[str, nn.Module]:
    """The stock torchvision Mask R-CNN a ctlesion model is compared with: ``(name, model)``.

    ResNet50 4-level FPN models: ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)``
    (torchvision's default heads and anchors) at the model's ``min_size``/``max_size``.
    Truncated single-level models ("r18t3": ResNet18 to layer3): torchvision's
    ``BackboneWithFPN`` (with its max-pool level) on the same ResNet stages, the model's
    anchors on both levels, its RPN top-n, box-head and mask-head widths, from the stock
    ``TwoMLPHead`` / ``MaskRCNNHeads`` / ``MaskRCNNPredictor`` classes: the same shape, stock code.
    """
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    d, b = cfg.detector, cfg.backbone
    num_classes = len(get_mask_type(d.mask_type).class_names) + 1
    if b.fpn == "full":
        if b.arch != "resnet50":
            raise ConfigError(f"no stock reference for a {b.arch} 4-level FPN model (only resnet50)")
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                      min_size=d.min_size, max_size=d.max_size)
        return f"stock maskrcnn_resnet50_fpn ({num_classes} cls)", model
    constructor, channels = ARCHS[b.arch]
    short = {"resnet18": "r18", "resnet34": "r34", "resnet50": "r50"}.get(b.arch, b.arch)
    body = constructor(weights=None)
    backbone = BackboneWithFPN(body, {f"layer{b.stages}": "0"}, [channels[b.stages - 1]], b.out_channels)
    anchors = AnchorGenerator((tuple(d.anchor_sizes),) * 2, (tuple(d.aspect_ratios),) * 2)
    c, width = b.out_channels, d.mask_head_layers[-1]
    model = MaskRCNN(
        backbone, num_classes=None, min_size=d.min_size, max_size=d.max_size,
        image_mean=list(d.image_mean), image_std=list(d.image_std), rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_test=d.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=d.rpn_post_nms_top_n_test,
        rpn_nms_thresh=d.rpn_nms_thresh,
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(c * 49, d.representation_size),
        box_predictor=FastRCNNPredictor(d.representation_size, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2), mask_head=MaskRCNNHeads(c, list(d.mask_head_layers), 1),
        mask_predictor=MaskRCNNPredictor(width, d.mask_predictor_width, num_classes),
    )
    heads = "x".join(str(w) for w in d.mask_head_layers)
    name = (f"stock {short}t{b.stages} (box {d.representation_size}, mask {heads}, "
            f"RPN {d.rpn_pre_nms_top_n_test}/{d.rpn_post_nms_top_n_test}, {num_classes} cls)")
    return name, model


def force_detections(model: nn.Module, detections: int) -> None:
    """Exactly ``detections`` masked detections per image where the candidates allow:
    score threshold 0, NMS IoU 1.0 (nothing suppressed), cap ``detections``."""
    det = getattr(model, "detector", model)
    if getattr(det, "roi_heads", None) is not None:
        set_detection_settings(det, score_thresh=0.0, nms_thresh=1.0, detections_per_img=detections)


def _ctlesion_call(model: nn.Module, task: str) -> Callable[[list[torch.Tensor]], object]:
    """The per-batch work of ``predict`` for this model (see the module docstring)."""
    if task == "segmentation":
        return lambda images: detect_batch(model, images, 0.5)
    det = getattr(model, "detector", None)
    with_detections = det is not None and det.roi_heads.has_mask()

    def call(images):
        results = classify_batch(model, images, with_detections)
        return [(probs, rois, None if d is None else compact_prediction(d, 0.5)) for probs, rois, d in results]

    return call


@contextlib.contextmanager
def _inference_modes(model: nn.Module, task: str):
    """What ``predict`` sets up around a classifier's forward (eval inference, the boolean
    mask fast path, seeded RoI padding); detectors need nothing here (``detect_batch`` does it)."""
    from ..models.rcnn_parts import binary_masks

    if task == "segmentation":
        yield
        return
    model.padding_generator = torch.Generator().manual_seed(0)
    try:
        with model.inference("eval"), binary_masks(model, 0.5):
            yield
    finally:
        model.padding_generator = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _summary(seconds: list[float], batch: int) -> dict:
    ms = [1000.0 * s / batch for s in seconds]
    median = statistics.median(ms)
    return {"median_ms": round(median, 2), "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2),
            "slices_per_s": round(1000.0 / median, 3), "runs": len(ms)}


@dataclass
class _Entry:
    name: str
    task: str
    model: nn.Module
    call: Callable
    stock: str


def run_benchmark(models=DEFAULT_MODELS, *, device: str | torch.device = "cpu", threads: int | None = None,
                  batch: int = 1, detections: int = 128, repeats: int = 5, warmup: int = 1, size: int = 512,
                  precision: str = "fp32", channels_last: bool = True, torch_compile: bool = False,
                  roi_align: str = "gather", progress: bool = True, seed: int = 0) -> dict:
    """Time every model and its stock reference, interleaved; returns the JSON-ready result.

    ``detections`` 0 keeps every model's own thresholds (random weights: arbitrary counts).
    ``precision`` and ``torch_compile`` (opt-in), ``channels_last`` (default on) and
    ``roi_align`` (the fast path's RoI Align kernel) apply to the ctlesion models only; stock runs in float32,
    contiguous, eager, with torchvision's RoI Align. With ``torch_compile`` the
    warm-up rounds include the compilation (``compile_s`` in the rows: the first call's time).
    """
    device = torch.device(device)
    if threads:
        torch.set_num_threads(int(threads))
    info = machine_info(device)
    torch.manual_seed(seed)
    images = [torch.rand((1, size, size), generator=torch.Generator().manual_seed(seed + i)).to(device)
              for i in range(batch)]
    stocks: dict[str, nn.Module] = {}
    entries: list[_Entry] = []
    for name in models:
        cfg = default_model_config(name)
        task = get_entry(name).task
        if task not in ("segmentation", "joint", "classification") or getattr(cfg.classifier, "kind", "") == "cnn":
            raise ConfigError(f"benchmark: {name} is not a detector-based model")
        model = create_model(cfg).eval().to(device)
        stock_name, stock = stock_reference(cfg)
        stocks.setdefault(stock_name, stock.eval().to(device))
        if detections:
            force_detections(model, detections)
            force_detections(stocks[stock_name], detections)
        entries.append(_Entry(name, task, model, _ctlesion_call(model, task), stock_name))
    times = {e.name: [] for e in entries}
    stock_times = {n: [] for n in stocks}
    counts: dict[str, int] = {}
    first: dict[str, float] = {}
    log = print if progress else (lambda *a, **k: None)
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            timed_stock = set()
            for e in entries:
                # speed_options outside: binary_masks (in _inference_modes) reads its RoI Align kernel
                with speed_options(e.model, device, precision, channels_last, torch_compile, roi_align), \
                        _inference_modes(e.model, e.task):
                    t = _time(lambda: e.call(images), device)
                if round_ == 0:
                    first[e.name] = t
                if round_ >= warmup:
                    times[e.name].append(t)
                if e.stock not in timed_stock:
                    ts = _time(lambda: stocks[e.stock](images), device)
                    timed_stock.add(e.stock)
                    if round_ >= warmup:
                        stock_times[e.stock].append(ts)
                log(f"round {round_ + 1}/{warmup + repeats} {e.name}: {1000 * t / batch:.0f} ms/slice"
                    + ("" if round_ >= warmup else " (warm-up)"), flush=True)
            if round_ == 0:
                counts = _detection_counts(entries, stocks, images, device, precision, channels_last, torch_compile,
                                           roi_align)
    rows = []
    for e in entries:
        paired = [a / b for a, b in zip(times[e.name], stock_times[e.stock])]
        ours, ref = _summary(times[e.name], batch), _summary(stock_times[e.stock], batch)
        rows.append({"model": e.name, "task": e.task, "stock": e.stock, "ctlesion": ours, "stock_time": ref,
                     "ratio": round(statistics.median(paired), 3),
                     "ratio_of_medians": round(ours["median_ms"] / ref["median_ms"], 3),
                     "detections": counts.get(e.name), "stock_detections": counts.get(e.stock),
                     **({"compile_s": round(first[e.name], 1)} if torch_compile else {})})
    info["loadavg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"machine": info, "settings": {"batch": batch, "detections": detections, "repeats": repeats,
                                          "warmup": warmup, "size": size, "precision": precision,
                                          "channels_last": channels_last, "torch_compile": torch_compile,
                                          "roi_align": roi_align, "models": list(models)}, "rows": rows}


def _detection_counts(entries, stocks, images, device, precision, memory_format, compiled, roi_align) -> dict[str, int]:
    """Detections of the first image, to show the forced count held."""
    counts = {}
    for e in entries:
        with speed_options(e.model, device, precision, memory_format, compiled, roi_align), \
                _inference_modes(e.model, e.task):
            out = e.call(images)[0]
        det = out if e.task == "segmentation" else out[2]
        counts[e.name] = None if det is None else int(len(det["scores"]))
    for name, stock in stocks.items():
        counts[name] = int(len(stock(images)[0]["scores"]))
    return counts


def format_table(result: dict) -> str:
    """The benchmark as a plain-text table."""
    m, s = result["machine"], result["settings"]
    lines = [f"torch {m['torch']}, torchvision {m['torchvision']}, {m['cpu']}, {m['threads']} threads, "
             f"device {m['device']}, load {m['loadavg']} -> {m.get('loadavg_after')}",
             f"{s['size']}x{s['size']}, batch {s['batch']}, detections {s['detections'] or 'as configured'}, "
             f"{s['precision']}{'' if s.get('channels_last', True) else ', contiguous weights'}"
             f"{', torch.compile' if s.get('torch_compile') else ''}"
             f"{', RoI Align ' + s['roi_align'] if s.get('roi_align', 'gather') != 'gather' else ''}, {s['repeats']} repeats after {s['warmup']} warm-up",
             f"{'model':<22} {'median':>8} {'min':>8} {'max':>8} {'sl/s':>7} {'stock med':>9} {'ratio':>6}  "
             f"dets  stock reference"]
    for r in result["rows"]:
        c, t = r["ctlesion"], r["stock_time"]
        lines.append(f"{r['model']:<22} {c['median_ms']:>8.1f} {c['min_ms']:>8.1f} {c['max_ms']:>8.1f} "
                     f"{c['slices_per_s']:>7.2f} {t['median_ms']:>9.1f} {r['ratio']:>5.2f}x  "
                     f"{r['detections'] if r['detections'] is not None else '-':>4}  {r['stock']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- volume mode


def write_ct_series(folder: str | Path, num_slices: int, size: int = 512, seed: int = 0) -> Path:
    """A synthetic CT DICOM series (phantom slices, 12-bit, 0.8 mm pixels, 2 mm apart)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    from ..data.phantom import make_phantom

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    classes = ("covid", "cp", "normal")
    for i in range(num_slices):
        hu = make_phantom(size, classes[i % 3], seed + i).hu
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{i:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = "CT", series, study, frame
        ds.PatientID, ds.PatientName, ds.StudyID, ds.SeriesNumber = "bench", "Bench^Mark", "1", 1
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20200101", "120000", "", ""
        ds.PatientBirthDate, ds.PatientSex, ds.SliceThickness = "", "O", 2.0
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelSpacing, ds.ImageOrientationPatient = [0.8, 0.8], [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient, ds.InstanceNumber = [0, 0, -2.0 * i], i + 1
        ds.PixelData = np.clip(np.asarray(hu) + 1024, 0, 4095).astype(np.uint16).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
    return folder


def _benchmark_checkpoint(name: str, folder: Path, detections: int) -> Path:
    """A random-weight checkpoint of ``name`` whose saved detector settings force
    ``detections`` masked detections (0: the model's own settings)."""
    from .checkpoint import save_checkpoint

    cfg = default_model_config(name)
    if detections:
        cfg.detector = replace(cfg.detector, box_score_thresh=0.0, box_nms_thresh=1.0,
                               box_detections_per_img=int(detections))
    torch.manual_seed(0)
    model = create_model(cfg)
    return save_checkpoint(folder / "checkpoint", model, ExperimentConfig(model=cfg), epoch=0, step=0)


def volume_benchmark(model_name: str = "ssm-2branch-r18-s3", *, series: str | Path | None = None,
                     num_slices: int = 30, size: int = 512, detections: int = 128, device: str = "cpu",
                     threads: int | None = None, repeats: int = 1, precision: str = "fp32",
                     channels_last: bool = True, torch_compile: bool = False, roi_align: str = "gather",
                     work_dir: str | Path | None = None, progress: bool = True) -> dict:
    """``predict`` end to end on a DICOM series (written here unless ``series`` is given):
    seconds per volume and slices/s, against the stock reference's detection-only time over
    the same slices held in memory (interleaved: predict, stock, predict, ...)."""
    from ..data.datasets import VolumeDataset
    from .api import predict_checkpoint

    dev = torch.device(device)
    if threads:
        torch.set_num_threads(int(threads))
    info = machine_info(dev)
    log = print if progress else (lambda *a, **k: None)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tmp = Path(tmp)
        if series is None:
            log(f"writing a {num_slices}-slice {size}x{size} DICOM series ...", flush=True)
            series = write_ct_series(tmp / "series", num_slices, size)
        checkpoint = _benchmark_checkpoint(model_name, tmp, detections)
        slices = [s.image for s in VolumeDataset([series], window="auto")]
        cfg = default_model_config(model_name)
        stock_name, stock = stock_reference(cfg)
        stock = stock.eval().to(dev)
        if detections:
            force_detections(stock, detections)
        predict_s, stock_s = [], []
        for r in range(repeats):
            t = time.perf_counter()
            summary = predict_checkpoint(checkpoint, [series], tmp / f"out{r}", overlays="none",
                                         volume_outputs=None, device=str(dev), progress=False, precision=precision,
                                         channels_last=channels_last, torch_compile=torch_compile,
                                         roi_align=roi_align)
            predict_s.append(time.perf_counter() - t)
            with torch.inference_mode():
                total = 0.0
                for image in slices:
                    x = [image.to(dev)]
                    total += _time(lambda: stock(x), dev)
                stock_s.append(total)
            log(f"repeat {r + 1}/{repeats}: predict {predict_s[-1]:.1f} s, stock detection-only {total:.1f} s "
                f"({len(slices)} slices)", flush=True)
        lines = (tmp / "out0" / "predictions.jsonl").read_text().splitlines()
        dets = [len(json.loads(line).get("lesions", json.loads(line)).get("scores", [])) for line in lines]
    n = len(slices)
    p, s = statistics.median(predict_s), statistics.median(stock_s)
    info["loadavg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"machine": info, "settings": {"model": model_name, "slices": n, "size": size, "detections": detections,
                                          "precision": precision, "channels_last": channels_last,
                                          "torch_compile": torch_compile, "roi_align": roi_align, "repeats": repeats,
                                          "series": "synthetic" if series is None or str(series).startswith(str(tmp))
                                          else str(series)},
            "predict_s": round(p, 2), "predict_runs_s": [round(v, 2) for v in predict_s],
            "predict_slices_per_s": round(n / p, 3), "stock": stock_name, "stock_detection_only_s": round(s, 2),
            "stock_runs_s": [round(v, 2) for v in stock_s], "ratio": round(p / s, 3),
            "slices_written": summary.slices, "detections_per_slice": sorted(set(dets)),
            "seconds_per_300_slices": round(300 * p / n, 1)}


def format_volume(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    return (f"torch {m['torch']}, {m['cpu']}, {m['threads']} threads, load {m['loadavg']} -> {m.get('loadavg_after')}\n"
            f"predict {s['model']} on a {s['slices']}-slice {s['size']}x{s['size']} series ({s['precision']}, "
            f"detections per slice {result['detections_per_slice']}): {result['predict_s']:.1f} s "
            f"({result['predict_slices_per_s']:.2f} slices/s; {result['seconds_per_300_slices']:.0f} s per 300 slices)\n"
            f"{result['stock']} detection-only over the same slices in memory: {result['stock_detection_only_s']:.1f} s"
            f"\nratio {result['ratio']:.2f}x")


def save_result(path: str | Path, result: dict) -> None:
    write_json(Path(path), result)
