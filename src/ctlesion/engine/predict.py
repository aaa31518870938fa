"""Run a trained detector on new scans: PNG/JPG slices, DICOM files or series, NIfTI volumes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data.sample import Sample, collate_samples
from ..models.maskrcnn import set_detection_settings
from ..viz import draw_overlay
from .evaluate import run_detector
from .io import safe_filename

__all__ = ["PredictSummary", "prediction_record", "predict_inputs", "safe_filename", "volume_hooks"]


@dataclass
class PredictSummary:
    slices: int
    slices_with_lesions: int
    detections: int
    predictions_file: Path
    overlay_dir: Path | None
    volumes: list[dict] = field(default_factory=list)  # summary.json of each volume written
    report: Path | None = None


def prediction_record(sample: Sample, pred: dict[str, torch.Tensor], class_names: tuple[str, ...]) -> dict:
    """One JSON line: where the slice came from and what was found on it."""
    areas_px = pred["masks"].flatten(1).sum(1).tolist() if len(pred["masks"]) else []
    if sample.spacing is not None:
        pixel_mm2 = float(sample.spacing[0]) * float(sample.spacing[1])
        areas_mm2 = [round(a * pixel_mm2, 3) for a in areas_px]
    else:
        areas_mm2 = None
    labels = pred["labels"].tolist()
    return {
        "source": str(sample.source),
        "sample_id": sample.sample_id,
        "slice_index": int(sample.slice_index),
        "image_size": list(sample.image.shape[-2:]),
        "spacing_mm": list(sample.spacing) if sample.spacing is not None else None,
        "boxes": [[round(float(c), 2) for c in box] for box in pred["boxes"].tolist()],
        "scores": [round(float(s), 4) for s in pred["scores"].tolist()],
        "labels": labels,
        "classes": [class_names[i - 1] if 0 < i <= len(class_names) else str(i) for i in labels],
        "areas_px": [int(a) for a in areas_px],
        "areas_mm2": areas_mm2,
    }


def predict_inputs(
    model: torch.nn.Module, dataset, out_dir: str | Path, device: torch.device, *,
    score_thresh: float | None = None, overlays: str = "all", progress: bool = True,
    batch_size: int = 1, volume_outputs=None, model_info: dict | None = None,
) -> PredictSummary:
    """Write ``out_dir/predictions.jsonl`` (one line per slice) and ``out_dir/overlays/*.png``.

    ``overlays``: ``all`` slices, only slices ``lesions`` were found on, or ``none``.
    ``score_thresh`` overrides the checkpoint's detection threshold.
    ``volume_outputs`` (:class:`~ctlesion.outputs.writer.VolumeOutputOptions`, ``None``:
    none): per DICOM series / NIfTI volume, ``out_dir/<volume>/`` (label and instance
    NIfTI, DICOM-SEG, ``summary.json``) and ``out_dir/report.html``; ``model_info`` is
    recorded in them.
    """
    if overlays not in ("all", "lesions", "none"):
        raise ValueError(f"overlays must be all, lesions or none, not {overlays!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overlay_dir = out_dir / "overlays" if overlays != "none" else None
    if score_thresh is not None:
        set_detection_settings(model, score_thresh=score_thresh)
    class_names = tuple(getattr(model, "class_names", ("lesion",)))
    draw_thresh = float(model.roi_heads.score_thresh)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_samples, generator=torch.Generator())
    slices = with_lesions = detections = 0
    pred_path = out_dir / "predictions.jsonl"
    tmp_path = out_dir / ".predictions.jsonl.partial"
    assembler, writer = volume_hooks(dataset, class_names, None, out_dir, volume_outputs, model_info)
    with open(tmp_path, "w") as fh:
        for sample, pred in run_detector(model, loader, device, 0.5, progress, len(loader)):
            record = prediction_record(sample, pred, class_names)
            fh.write(json.dumps(record) + "\n")
            slices += 1
            detections += len(record["scores"])
            with_lesions += int(bool(record["scores"]))
            draw = overlay_dir is not None and (overlays == "all" or record["scores"])
            tile = None
            if draw or writer is not None:
                tile = draw_overlay(sample.image, prediction=pred, class_names=class_names,
                                    score_threshold=draw_thresh,
                                    title=f"{sample.sample_id}  slice {sample.slice_index}")
            if draw:
                name = safe_filename(Path(str(sample.source)).stem)
                if sample.sample_id != Path(str(sample.source)).stem:
                    name = safe_filename(sample.sample_id)
                overlay_dir.mkdir(parents=True, exist_ok=True)
                tile.save(overlay_dir / f"{name}.png", format="PNG")
            if assembler is not None and (done := assembler.add(sample, pred, tile=tile)) is not None:
                writer.write(done)
    tmp_path.replace(pred_path)
    report = None
    if assembler is not None:
        if (done := assembler.close()) is not None:
            writer.write(done)
        report = writer.finish()
    return PredictSummary(slices, with_lesions, detections, pred_path, overlay_dir,
                          writer.volumes if writer is not None else [], report)


def volume_hooks(dataset, class_names, probability_names, out_dir, options, model_info):
    """The per-volume collector and writer, or ``(None, None)`` when volume outputs are off."""
    if options is None or not options.any:
        return None, None
    from .. import __version__
    from ..outputs.assemble import VolumeAssembler
    from ..outputs.writer import VolumeOutputWriter

    assembler = VolumeAssembler(dataset, class_names, probability_names, thumbnails=options.report)
    return assembler, VolumeOutputWriter(out_dir, options, model_info or {}, version=__version__)
