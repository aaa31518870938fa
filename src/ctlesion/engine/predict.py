"""Run a trained detector on new scans: PNG/JPG slices, DICOM files or series, NIfTI volumes.

Slices stream through: one batch of slices is in memory at a time (see
:class:`~ctlesion.data.datasets.VolumeDataset`), and each volume's outputs are collected on
disk (:mod:`ctlesion.outputs.assemble`). ``predictions.jsonl`` is written at the end from
this run's lines and, with ``skip_existing``, the lines of the volumes skipped (kept in their
folders), in input order, so a resumed run ends with the file an uninterrupted one writes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data.readers import is_image
from ..data.sample import Sample, collate_samples
from ..errors import ConfigError
from ..models.maskrcnn import set_detection_settings
from ..viz import draw_overlay
from .evaluate import mask_areas, run_detector
from .io import safe_filename

__all__ = ["PredictSummary", "prediction_record", "predict_inputs", "safe_filename", "volume_hooks",
           "skip_completed", "PredictionLines", "prediction_loader"]


@dataclass
class PredictSummary:
    slices: int
    slices_with_lesions: int
    detections: int
    predictions_file: Path
    overlay_dir: Path | None
    volumes: list[dict] = field(default_factory=list)  # summary.json of each volume written
    report: Path | None = None
    skipped: list[str] = field(default_factory=list)  # volumes already done (--skip-existing)


def prediction_record(sample: Sample, pred: dict[str, torch.Tensor], class_names: tuple[str, ...]) -> dict:
    """One JSON line: where the slice came from and what was found on it."""
    # The fast path counted the pixels while pasting (``mask_areas``; without frames, only
    # that); otherwise count them here.
    areas = pred.get("mask_areas")
    areas_px = (areas if areas is not None else mask_areas(pred["masks"])).tolist() if len(pred["scores"]) else []
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
    batch_size: int = 1, volume_outputs=None, model_info: dict | None = None, skip_existing: bool = False,
) -> PredictSummary:
    """Write ``out_dir/predictions.jsonl`` (one line per slice) and ``out_dir/overlays/*.png``.

    ``overlays``: ``all`` slices, only slices ``lesions`` were found on, or ``none``.
    ``score_thresh`` overrides the checkpoint's detection threshold.
    ``volume_outputs`` (:class:`~ctlesion.outputs.writer.VolumeOutputOptions`, ``None``:
    none): per DICOM series / NIfTI volume, ``out_dir/<volume>/`` (label and instance
    NIfTI, DICOM-SEG, ``summary.json``), each put in place whole when complete, and
    ``out_dir/report.html``; ``model_info`` is recorded in them. ``skip_existing``: volumes
    whose folder is complete and was made from the same input, model and options are not
    predicted again (see :func:`skip_completed`); the combined outputs still cover them.
    """
    if overlays not in ("all", "lesions", "none"):
        raise ValueError(f"overlays must be all, lesions or none, not {overlays!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, not {batch_size!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overlay_dir = out_dir / "overlays" if overlays != "none" else None
    if score_thresh is not None:
        set_detection_settings(model, score_thresh=score_thresh)
    class_names = tuple(getattr(model, "class_names", ("lesion",)))
    draw_thresh = float(model.roi_heads.score_thresh)
    assembler, writer = volume_hooks(dataset, class_names, None, out_dir, volume_outputs, model_info)
    skipped = skip_completed(dataset, writer, skip_existing)
    loader = prediction_loader(dataset, skipped, batch_size)
    counts = {"slices": 0, "with_lesions": 0, "detections": 0}

    def count(record: dict) -> None:
        counts["slices"] += 1
        counts["detections"] += len(record["scores"])
        counts["with_lesions"] += int(bool(record["scores"]))

    # Mask images only where something draws or assembles them; the lines need the areas only.
    frames = overlay_dir is not None or assembler is not None
    with PredictionLines(out_dir, dataset) as lines:
        for sample, pred in run_detector(model, loader, device, 0.5, progress, len(loader), frames=frames):
            record = prediction_record(sample, pred, class_names)
            lines.add(sample, record)
            count(record)
            draw = overlay_dir is not None and (overlays == "all" or record["scores"])

            def tile(sample=sample, pred=pred):
                return draw_overlay(sample.image, prediction=pred, class_names=class_names,
                                    score_threshold=draw_thresh,
                                    title=f"{sample.sample_id}  slice {sample.slice_index}")

            if draw:
                tile = tile()
                name = safe_filename(Path(str(sample.source)).stem)
                if sample.sample_id != Path(str(sample.source)).stem:
                    name = safe_filename(sample.sample_id)
                overlay_dir.mkdir(parents=True, exist_ok=True)
                tile.save(overlay_dir / f"{name}.png", format="PNG")
            if assembler is not None and (done := assembler.add(sample, pred, tile=tile, record=record)) is not None:
                writer.write(done)
        if assembler is not None and (done := assembler.close()) is not None:
            writer.write(done)
        pred_path = lines.finish(writer, skipped, count)
    close = getattr(dataset, "close", None)
    if close is not None:
        close()
    report = writer.finish(getattr(dataset, "inputs", None)) if writer is not None else None
    return PredictSummary(counts["slices"], counts["with_lesions"], counts["detections"], pred_path, overlay_dir,
                          writer.volumes if writer is not None else [], report,
                          [str(dataset.inputs[v]) for v in sorted(skipped)])


def volume_hooks(dataset, class_names, probability_names, out_dir, options, model_info):
    """The per-volume collector and writer, or ``(None, None)`` when volume outputs are off."""
    if options is None or not options.any:
        return None, None
    from .. import __version__
    from ..outputs.assemble import VolumeAssembler
    from ..outputs.writer import VolumeOutputWriter

    writer = VolumeOutputWriter(out_dir, options, model_info or {}, version=__version__,
                                inputs=getattr(dataset, "inputs", ()))
    assembler = VolumeAssembler(dataset, class_names, probability_names, thumbnails=options.report,
                                begin=writer.begin)
    return assembler, writer


def skip_completed(dataset, writer, skip_existing: bool) -> set[int]:
    """The inputs (numbers in ``dataset.inputs``) whose volume folder is complete and made from
    the same input, model and options (:meth:`~ctlesion.outputs.writer.VolumeOutputWriter.completed`;
    a folder that differs is warned about and predicted again). Empty unless ``skip_existing``."""
    if not skip_existing:
        return set()
    if writer is None:
        raise ConfigError("--skip-existing resumes from the per-volume folders, but volume outputs are off "
                          "(--no-volume-outputs): nothing could tell which volumes are done")
    done = set()
    for v, path in enumerate(getattr(dataset, "inputs", [])):
        if is_image(path):
            continue
        record = writer.completed(str(path))
        if record is not None:
            writer.skip(str(path), record)
            done.add(v)
    return done


def prediction_loader(dataset, skipped: set[int], batch_size: int = 1) -> DataLoader:
    """Slices in dataset order, leaving out the inputs in ``skipped``."""
    sampler = dataset.indices_of(set(range(len(dataset.inputs))) - skipped) if skipped else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_samples,
                      generator=torch.Generator())


class PredictionLines:
    """``predictions.jsonl``: this run's lines go to a temporary file; :meth:`finish` puts
    the file in place, with the lines of skipped volumes (from their folders) merged in at
    their inputs' places."""

    def __init__(self, out_dir: Path, dataset) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "predictions.jsonl"
        self.tmp = self.out_dir / ".predictions.jsonl.partial"
        self._input = {str(p): v for v, p in enumerate(getattr(dataset, "inputs", []))}
        self._inputs = list(getattr(dataset, "inputs", []))
        self._runs: list[list] = []  # [input number, lines], in the order written

    def __enter__(self) -> "PredictionLines":
        self._fh = open(self.tmp, "w")
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()

    def add(self, sample: Sample, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        v = self._input.get(str(sample.meta.get("volume", sample.source)))
        if self._runs and self._runs[-1][0] == v:
            self._runs[-1][1] += 1
        else:
            self._runs.append([v, 1])

    def finish(self, writer, skipped: set[int], on_skipped_line) -> Path:
        """Put ``predictions.jsonl`` in place; ``on_skipped_line(record)`` for each line of a
        skipped volume (to count it)."""
        self._fh.close()
        if not skipped:
            self.tmp.replace(self.path)
            return self.path
        merged = self.out_dir / ".predictions.jsonl.merge"
        with open(self.tmp) as src, open(merged, "w") as dst:
            runs = iter(self._runs)
            run = next(runs, None)
            for v, path in enumerate(self._inputs):
                if v in skipped:
                    with open(writer.folder(str(path)) / "predictions.jsonl") as fh:
                        for line in fh:
                            on_skipped_line(json.loads(line))
                            dst.write(line)
                while run is not None and run[0] == v:
                    for _ in range(run[1]):
                        dst.write(src.readline())
                    run = next(runs, None)
            shutil.copyfileobj(src, dst)  # lines of no input (none expected)
            dst.flush()
            os.fsync(dst.fileno())
        merged.replace(self.path)
        self.tmp.unlink()
        return self.path
