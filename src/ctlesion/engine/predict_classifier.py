"""Run a slice classifier on new scans: class probabilities per slice, a verdict per volume.

Outputs in ``out_dir``:

* ``predictions.jsonl``: one line per slice: source, slice index, class probabilities
  (softmax of the logits), the predicted class; for detector-based models also the
  lesions found (boxes, scores, classes, areas); for mask-feature models the RoIs the
  head read and the weight each one got.
* ``patients.json``: one verdict per input volume (DICOM series, NIfTI, or a folder of
  slices of one patient), aggregated from its slices by
  :func:`ctlesion.metrics.patient_verdict` (default ``abnormal_fraction``: most slices of a
  sick patient's scan look normal, so the mean probability would be biased to Normal).
* ``overlays/*.png``: the slice with its detections and the predicted class in the title.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ..metrics import patient_verdict
from ..models.maskrcnn import set_detection_settings
from ..viz import draw_overlay, draw_roi_weights
from .evaluate import compact_prediction
from .evaluate_classifier import run_classifier, slice_record
from .io import safe_filename, write_json
from .predict import PredictionLines, prediction_loader, prediction_record, skip_completed, volume_hooks

__all__ = ["ClassifyPredictSummary", "predict_classification"]


@dataclass
class ClassifyPredictSummary:
    slices: int
    class_counts: dict[str, int]
    patients: dict[str, dict]
    predictions_file: Path
    patients_file: Path
    overlay_dir: Path | None
    volumes: list[dict] = field(default_factory=list)  # summary.json of each volume written
    report: Path | None = None
    skipped: list[str] = field(default_factory=list)  # volumes already done (--skip-existing)


def _slice_prediction(sample, probs, rois, det, names, lesion_names) -> tuple[dict, dict | None]:
    """One line of ``predictions.jsonl`` (with the lesions of a detector-based model) and the
    compact lesions."""
    record = slice_record(sample, probs, names, rois)
    record.pop("label")
    record["volume"] = sample.meta.get("volume", str(sample.source))  # the key of patients.json
    lesions = None
    if det is not None:
        lesions = compact_prediction(det, 0.5)
        found = prediction_record(sample, lesions, lesion_names)
        record["lesions"] = {k: found[k] for k in ("boxes", "scores", "classes", "areas_px", "areas_mm2")}
    return record, lesions


def _tile(sample, record, lesions, rois, lesion_names, draw_thresh):
    """The overlay of one slice: its lesions, or the RoIs a mask-feature head weighted."""
    p = record["probabilities"][record["predicted_class"]]
    title = f"{sample.sample_id}: {record['predicted_class']} {p:.2f}"
    if rois is not None and rois.get("weights") is not None:
        return draw_roi_weights(sample.image, rois["boxes"], rois["weights"], title=title)
    return draw_overlay(sample.image, prediction=lesions, class_names=lesion_names or ("lesion",),
                        score_threshold=draw_thresh, title=title)


def _reseeded_per_volume(model, loader, seed: int):
    """The batches of ``loader``; the RoI-batch padding generator restarts from ``seed`` at the
    first slice of each volume, so a volume's predictions do not depend on which volumes came
    before it in the run (a run resumed with ``skip_existing`` equals an uninterrupted one)."""
    current = None
    for batch in loader:
        key = str(batch[0].meta.get("volume", batch[0].source))
        if key != current:
            current = key
            if getattr(model, "padding_generator", None) is not None:
                model.padding_generator.manual_seed(seed)
        yield batch


def predict_classification(
    model, dataset, out_dir: str | Path, device: torch.device, *, cls_bn: str = "eval",
    overlays: str = "all", method: str = "abnormal_fraction", min_abnormal_fraction: float = 0.1,
    score_thresh: float | None = None, seed: int = 0, progress: bool = True,
    volume_outputs=None, model_info: dict | None = None, skip_existing: bool = False,
) -> ClassifyPredictSummary:
    """Classify every slice of ``dataset`` and aggregate per source volume.

    ``overlays``: ``all`` slices, ``abnormal`` (slices not predicted as the first class,
    or with lesions), or ``none``. ``score_thresh`` overrides the detector's threshold for
    the lesions listed and drawn. The RoI-batch padding is seeded by ``seed`` at each volume's
    first slice. ``volume_outputs`` / ``model_info``: as for
    :func:`~ctlesion.engine.predict.predict_inputs`; each volume's ``summary.json`` also
    holds its per-slice probabilities and the verdict of ``patients.json``. ``skip_existing``:
    as for :func:`~ctlesion.engine.predict.predict_inputs`; a skipped volume's verdict comes
    from its folder.
    """

    if overlays not in ("all", "abnormal", "none"):
        raise ValueError(f"overlays must be all, abnormal or none, not {overlays!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overlay_dir = out_dir / "overlays" if overlays != "none" else None
    names = list(model.class_names)
    detector = getattr(model, "detector", None)
    has_masks = detector is not None and detector.roi_heads.has_mask()
    if has_masks and score_thresh is not None:
        set_detection_settings(detector, score_thresh=score_thresh)
    lesion_names = tuple(getattr(detector, "class_names", ())) if detector is not None else ()
    draw_thresh = float(detector.roi_heads.score_thresh) if has_masks else 0.5

    assembler, writer = volume_hooks(dataset, lesion_names, names, out_dir, volume_outputs, model_info)
    skipped = skip_completed(dataset, writer, skip_existing)
    loader = prediction_loader(dataset, skipped)
    by_volume: "OrderedDict[str, list[list[float]]]" = OrderedDict()
    counts = {n: 0 for n in names}
    slices = 0

    def count(record: dict) -> None:
        nonlocal slices
        slices += 1
        counts[record["predicted_class"]] += 1

    def verdict_of(probs) -> dict:
        return patient_verdict(torch.tensor(probs).numpy(), names, method=method,
                               min_abnormal_fraction=min_abnormal_fraction)

    def write_volume(done) -> None:
        writer.write(done, verdict=verdict_of(done.probabilities) if done.probabilities else None)

    # Mask images only where something draws or assembles them; the lines need the areas only.
    frames = overlay_dir is not None or assembler is not None
    with PredictionLines(out_dir, dataset) as lines:
        for sample, probs, rois, det in run_classifier(model, _reseeded_per_volume(model, loader, seed), device,
                                                       cls_bn=cls_bn, seed=seed,
                                                       with_detections=has_masks, progress=progress,
                                                       total=len(loader), frames=frames):
            record, lesions = _slice_prediction(sample, probs, rois, det, names, lesion_names)
            lines.add(sample, record)
            count(record)
            by_volume.setdefault(record["volume"], []).append(probs.tolist())
            abnormal = record["predicted"] != 0 or bool(lesions is not None and len(lesions["scores"]))
            draw = overlay_dir is not None and (overlays == "all" or abnormal)

            def tile(sample=sample, record=record, lesions=lesions, rois=rois):
                return _tile(sample, record, lesions, rois, lesion_names, draw_thresh)

            if draw:
                tile = tile()
                overlay_dir.mkdir(parents=True, exist_ok=True)
                tile.save(overlay_dir / f"{safe_filename(sample.sample_id)}.png")
            if assembler is not None and (done := assembler.add(sample, lesions, probs, tile=tile,
                                                               record=record)) is not None:
                write_volume(done)
        if assembler is not None and (done := assembler.close()) is not None:
            write_volume(done)
        pred_path = lines.finish(writer, skipped, count)
    if hasattr(dataset, "close"):
        dataset.close()
    report = writer.finish(getattr(dataset, "inputs", None)) if writer is not None else None

    patients = {}
    inputs = [str(p) for p in getattr(dataset, "inputs", [])]
    for v, source in enumerate(inputs):
        if v in skipped and (verdict := writer.record(source)["summary"].get("verdict")) is not None:
            patients[source] = verdict
    for source, probs in by_volume.items():
        patients[source] = verdict_of(probs)
    order = {s: i for i, s in enumerate(inputs)}
    patients = dict(sorted(patients.items(), key=lambda kv: order.get(kv[0], len(order))))
    patients_path = out_dir / "patients.json"

    write_json(patients_path, {"method": method, "min_abnormal_fraction": min_abnormal_fraction,
                               "volumes": patients})
    return ClassifyPredictSummary(slices, counts, patients, pred_path, patients_path, overlay_dir,
                                  writer.volumes if writer is not None else [], report,
                                  [inputs[v] for v in sorted(skipped)])
