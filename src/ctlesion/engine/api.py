"""Scoring and running a checkpoint as ``ctlesion evaluate`` and ``predict`` do, as library
functions (the CLI only parses arguments and prints what these return).

The rules of what evaluation inherits from training live here, once:

* the data's preprocessing (minimum instance area, slice size) comes from the checkpoint's
  training data unless overridden; the window is the input's own (``auto``) unless given,
  because a phantom-trained checkpoint's HU window would not fit 8-bit inputs;
* a classifier scored on data of its training format keeps its ``class_map``;
* the segmentation branch of a joint model is scored on ``seg_data`` with the preprocessing
  of the training ``seg_data``;
* batch-statistics BatchNorm at scoring time follows the training config (``cls_bn``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..config import DataConfig, EvalConfig, ExperimentConfig
from ..data.datasets import VolumeDataset
from ..data.factory import build_dataset, parse_data_spec
from ..errors import ConfigError
from ..models.inference import speed_options
from ..viz import save_overlay
from .builtin_weights import resolve_checkpoint
from .checkpoint import load_checkpoint
from .evaluate import evaluate_segmentation
from .evaluate_classifier import evaluate_classifier, write_classification_outputs
from .io import safe_filename, write_json
from .loop import resolve_device
from .predict import predict_inputs
from .predict_classifier import predict_classification

__all__ = ["evaluation_data", "scoring_cls_bn", "evaluate_checkpoint", "predict_checkpoint", "model_info"]


def evaluation_data(spec: str | DataConfig, trained: DataConfig | None, *, min_area: int | None = None,
                    size: int | None = None, window: str | None = None, split: str | None = None) -> DataConfig:
    """The ``--data`` string as a :class:`DataConfig`, inheriting ``trained``'s preprocessing
    (minimum area, size) unless given. A :class:`DataConfig` is taken as it is."""
    if isinstance(spec, DataConfig):
        return spec
    data = parse_data_spec(spec)
    trained = trained or DataConfig()
    data.min_area = min_area if min_area is not None else trained.min_area
    data.size = size if size is not None else trained.size
    if window is not None:
        data.window = window
    if split:
        data.split = split
    return data


def scoring_cls_bn(cfg: ExperimentConfig) -> str:
    """BatchNorm mode of the classification path when scoring: the training setting (``auto`` = eval)."""
    return cfg.train.cls_bn if cfg.train.cls_bn != "auto" else "eval"


def _label(data: str | DataConfig) -> str:
    """How ``metrics.json`` names the data: the ``--data`` string, or format and root."""
    if isinstance(data, str):
        return data
    return f"phantom:n={data.num_samples},size={data.phantom_size},seed={data.seed}" if data.format == "phantom" \
        else f"{data.format}:{data.root}"


def _eval_settings(cfg: ExperimentConfig, **overrides) -> EvalConfig:
    return replace(cfg.eval, **{k: v for k, v in overrides.items() if v is not None})


def evaluate_checkpoint(
    checkpoint: str | Path, data: str | DataConfig, out: str | Path, *, seg_data: str | DataConfig | None = None,
    split: str | None = None,
    min_area: int | None = None, size: int | None = None, window: str | None = None,
    score_thresh: float | None = None, nms_thresh: float | None = None, max_detections: int | None = None,
    f1_weights=None, overlays: int = 8, device: str = "auto", progress: bool = True, title: str | None = None,
    precision: str = "fp32", channels_last: bool = True, torch_compile: bool = False, roi_align: str = "gather",
) -> dict:
    """Score ``checkpoint`` on ``data`` (a ``--data`` string, or a :class:`DataConfig` used as
    it is) and write the outputs to ``out``.

    Detectors: ``metrics.json`` (legacy + COCO) and overlays of the first ``overlays``
    images (``overlay_files`` in the result). Classifiers: ``metrics.json``,
    ``confusion_matrix.png``, ``predictions.jsonl``; joint models also score their
    segmentation branch on ``seg_data``; ``title`` heads the confusion matrix (``{n}``: the
    slice count). ``precision``: ``fp32``, opt-in ``bf16-mask`` (the mask branch in bfloat16) or
    ``bf16`` (autocast over the whole forward); ``channels_last``: channels-last weights
    for the run (default; faster convolutions, float32 rounding changes); ``torch_compile``: opt-in
    ``torch.compile`` of the backbone (compiles at the first slice; rounding changes);
    ``roi_align``: the fast path's RoI Align, ``gather`` (default) or ``torchvision``
    (bitwise stock pooling; ``gather`` moves boxes and scores by float32 summation order,
    ~1e-6; ``channels_last=False, roi_align="torchvision"`` gives torchvision's detections
    bitwise). Returns
    the metrics (with ``task``). ``checkpoint`` is a folder or a built-in model name
    (verified against its SHA-256).
    """
    dev = resolve_device(device)
    metrics = _evaluate_checkpoint(checkpoint, data, out, seg_data=seg_data, split=split, min_area=min_area,
                                   size=size, window=window, score_thresh=score_thresh, nms_thresh=nms_thresh,
                                   max_detections=max_detections, f1_weights=f1_weights, overlays=overlays,
                                   dev=dev, progress=progress, title=title, channels_last=channels_last,
                                   precision=precision, torch_compile=torch_compile, roi_align=roi_align)
    if precision != "fp32" or not channels_last or torch_compile or roi_align != "gather":
        metrics["speed_options"] = {"precision": precision, "channels_last": channels_last,
                                    "torch_compile": torch_compile, "roi_align": roi_align}
    return metrics


def _evaluate_checkpoint(checkpoint, data, out, *, seg_data, split, min_area, size, window, score_thresh,
                         nms_thresh, max_detections, f1_weights, overlays, dev, progress, title,
                         channels_last=True, precision="fp32", torch_compile=False, roi_align="gather") -> dict:
    model, cfg, meta = load_checkpoint(resolve_checkpoint(checkpoint))
    with speed_options(model, dev, precision, channels_last, torch_compile, roi_align):
        return _evaluate_model(model, cfg, meta, checkpoint, data, out, seg_data=seg_data, split=split,
                               min_area=min_area, size=size, window=window, score_thresh=score_thresh,
                               nms_thresh=nms_thresh, max_detections=max_detections, f1_weights=f1_weights,
                               overlays=overlays, dev=dev, progress=progress, title=title)


def _evaluate_model(model, cfg, meta, checkpoint, data, out, *, seg_data, split, min_area, size, window,
                    score_thresh, nms_thresh, max_detections, f1_weights, overlays, dev, progress, title) -> dict:
    task = meta.get("task", "segmentation")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seg_eval = _eval_settings(cfg, score_thresh=score_thresh, nms_thresh=nms_thresh,
                              detections_per_img=max_detections)
    data_cfg = evaluation_data(data, cfg.data, min_area=min_area, size=size, window=window, split=split)
    if task == "segmentation":
        metrics, kept = evaluate_segmentation(model, build_dataset(data_cfg, cfg.model.detector.mask_type), seg_eval,
                                              dev, progress=progress, keep=overlays)
        metrics.update(checkpoint=str(checkpoint), data=_label(data), task=task)
        write_json(out / "metrics.json", metrics)
        files = [out / "overlays" / f"{safe_filename(sample.sample_id)}.png" for sample, _ in kept]
        for path, (sample, pred) in zip(files, kept):
            save_overlay(path, sample.image, prediction=pred, class_names=model.class_names, target=sample.target,
                         score_threshold=seg_eval.score_thresh, title=sample.sample_id)
        return {**metrics, "overlay_files": files}
    if data_cfg.format == cfg.data.format and data_cfg.class_map is None:
        data_cfg.class_map = cfg.data.class_map  # same naming scheme as in training
    metrics, records = evaluate_classifier(model, build_dataset(data_cfg, cfg.model.detector.mask_type), dev,
                                           eval_cfg=replace(cfg.eval, f1_weights=f1_weights),
                                           cls_bn=scoring_cls_bn(cfg), progress=progress)
    metrics.update(checkpoint=str(checkpoint), data=_label(data), task=task)
    if seg_data:
        if not model.has_segmentation:
            raise ConfigError(f"--seg-data: {cfg.model.name} has no segmentation branch")
        if cfg.seg_data is not None:    # as the segmentation steps saw it
            seg_cfg = evaluation_data(seg_data, cfg.seg_data, size=size, window=window, split=split)
        else:                           # trained without seg_data: the slices as given
            seg_cfg = evaluation_data(seg_data, replace(cfg.data, size=None), min_area=min_area, size=size,
                                      window=window, split=split)
        seg_metrics, _ = evaluate_segmentation(model.detector, build_dataset(seg_cfg, cfg.model.detector.mask_type),
                                               seg_eval, dev, progress=progress)
        seg_metrics["data"] = _label(seg_data)
        metrics["segmentation"] = seg_metrics
    title = title or f"{cfg.model.name}: {metrics['num_samples']} slices"
    write_classification_outputs(out, metrics, records, title=title.format(n=metrics["num_samples"]))
    return metrics


def model_info(checkpoint: str | Path, model, cfg: ExperimentConfig, meta: dict, dataset,
               score_thresh: float | None = None, aggregate: dict | None = None) -> dict:
    """What the report and every ``summary.json`` say about the model that made them."""
    roi = getattr(getattr(model, "detector", model), "roi_heads", None)
    settings = {"task": meta.get("task", "segmentation"), "mask_type": cfg.model.detector.mask_type,
                "window": dataset.window, "size": dataset.size}
    if roi is not None and hasattr(roi, "score_thresh"):
        settings.update(score_thresh=score_thresh if score_thresh is not None else float(roi.score_thresh),
                        nms_thresh=float(roi.nms_thresh), detections_per_img=int(roi.detections_per_img))
    settings.update(aggregate or {})
    return {"name": cfg.model.name, "checkpoint": str(Path(checkpoint).resolve()),
            "checkpoint_sha256": meta.get("files", {}).get("model.safetensors"), "settings": settings}


def predict_checkpoint(
    checkpoint: str | Path, inputs: list[str | Path], out: str | Path, *, window: str | None = None,
    size: int | None = None, score_thresh: float | None = None, overlays: str = "all", volume_outputs=None,
    aggregate: str = "abnormal_fraction", min_abnormal_fraction: float = 0.1, device: str = "auto",
    progress: bool = True, skip_existing: bool = False, batch_size: int = 1, precision: str = "fp32",
    channels_last: bool = True, torch_compile: bool = False, roi_align: str = "gather",
):
    """Run ``checkpoint`` on PNG/JPG slices, DICOM files or series and NIfTI volumes; outputs
    in ``out`` (see ``ctlesion predict``). The window is the inputs' own (``auto``) unless
    given; the slice size is the training data's unless given. ``overlays``: ``all``,
    ``lesions``/``abnormal`` (slices with findings), ``none``. ``skip_existing``: volumes
    whose folder in ``out`` is complete and made from the same input, model and options are
    not predicted again (a resumed batch job; ``skipped`` in the summary lists them).
    ``batch_size``: slices per forward pass (detectors; classifiers run one slice at a time).
    Returns the summary
    (:class:`~ctlesion.engine.predict.PredictSummary` for detectors,
    :class:`~ctlesion.engine.predict_classifier.ClassifyPredictSummary` for classifiers).
    ``precision``, ``channels_last``, ``torch_compile`` and ``roi_align``: speed levers (see
    :func:`evaluate_checkpoint`). ``checkpoint`` is a folder or a
    built-in model name (verified against its SHA-256)."""
    checkpoint = resolve_checkpoint(checkpoint)
    model, cfg, meta = load_checkpoint(checkpoint)
    with speed_options(model, resolve_device(device), precision, channels_last, torch_compile, roi_align):
        return _predict_model(model, cfg, meta, checkpoint, inputs, out, window=window, size=size,
                              score_thresh=score_thresh, overlays=overlays, volume_outputs=volume_outputs,
                              aggregate=aggregate, min_abnormal_fraction=min_abnormal_fraction, device=device,
                              progress=progress, skip_existing=skip_existing, batch_size=batch_size)


def _predict_model(model, cfg, meta, checkpoint, inputs, out, *, window, size, score_thresh, overlays,
                   volume_outputs, aggregate, min_abnormal_fraction, device, progress, skip_existing, batch_size):
    dataset = VolumeDataset(inputs, window=window or "auto", mask_type=cfg.model.detector.mask_type,
                            size=size if size is not None else cfg.data.size)
    dev = resolve_device(device)
    if meta.get("task", "segmentation") == "segmentation":
        info = model_info(checkpoint, model, cfg, meta, dataset, score_thresh)
        return predict_inputs(model, dataset, out, dev, score_thresh=score_thresh,
                              overlays={"abnormal": "lesions"}.get(overlays, overlays), progress=progress,
                              volume_outputs=volume_outputs, model_info=info, skip_existing=skip_existing,
                              batch_size=batch_size)
    info = model_info(checkpoint, model, cfg, meta, dataset, score_thresh,
                      {"aggregate": aggregate, "min_abnormal_fraction": min_abnormal_fraction})
    return predict_classification(
        model, dataset, out, dev, cls_bn=scoring_cls_bn(cfg), overlays={"lesions": "abnormal"}.get(overlays, overlays),
        method=aggregate, min_abnormal_fraction=min_abnormal_fraction, score_thresh=score_thresh,
        progress=progress, volume_outputs=volume_outputs, model_info=info, skip_existing=skip_existing)
