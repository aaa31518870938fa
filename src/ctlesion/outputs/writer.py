"""Per-volume outputs of ``predict``: ``DIR/<volume>/`` and ``DIR/report.html``.

For each DICOM series or NIfTI input, :class:`VolumeOutputWriter` writes (each can be
switched off with :class:`VolumeOutputOptions`):

* ``lesions.nii.gz``: class labels on the input grid (0 background, then the model's classes);
* ``instances.nii.gz``: one id per 3-D lesion (:func:`~.burden.instance_volume`);
* ``seg.dcm``: DICOM-SEG, one segment per class (DICOM input only);
* ``summary.json``: burden, 3-D lesions, per-slice areas and probabilities, verdict, limits;

and, after the last volume, ``report.html`` over all of them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.readers import path_stem
from ..engine.io import atomic_write_text, safe_filename
from .assemble import LUNG_CLASS, VolumeAssembly
from .burden import instance_volume, lesion_burden
from .lung import LUNG_METHOD, lung_mask

__all__ = ["VolumeOutputOptions", "VolumeOutputWriter", "volume_limits"]


@dataclass(frozen=True)
class VolumeOutputOptions:
    """Which volume outputs ``predict`` writes (all on by default)."""

    labels: bool = True
    instances: bool = True
    dicom_seg: bool = True
    summary: bool = True
    report: bool = True

    @property
    def any(self) -> bool:
        return any((self.labels, self.instances, self.dicom_seg, self.summary, self.report))


def volume_limits(assembly: VolumeAssembly) -> list[str]:
    """What the burden numbers of this volume cannot tell (slice thickness, gaps, method)."""
    meta, geometry = assembly.volume.meta, assembly.geometry
    step = geometry.spacing_mm[2]
    limits = [
        f"volumes = voxels x {geometry.spacing_mm[0]:.3f} x {geometry.spacing_mm[1]:.3f} mm x slice step "
        f"{step:.3f} mm: each slice stands for one slice step of tissue",
        "lesions come from a 2-D slice model; 3-D lesions join detections that touch on neighbouring "
        "slices (26-connectivity), so two lesions that touch count as one",
    ]
    thickness = meta.get("slice_thickness_mm")
    if thickness and abs(float(thickness) - step) > 0.01 * step:
        kind = "gaps between slices are not imaged" if thickness < step else "slices overlap"
        limits.append(f"slice thickness {float(thickness):g} mm differs from the slice step {step:.3f} mm: {kind}")
    median = meta.get("slice_spacing_mm")
    if median and abs(float(median) - step) > 0.01 * step:
        limits.append(f"uneven slice spacing: median gap {float(median):.3f} mm, mean step {step:.3f} mm "
                      "(missing slices?); volumes use the mean step")
    if LUNG_CLASS not in assembly.class_names:
        limits.append("the lung mask is a classical HU-threshold method (it includes the trachea and main "
                      "bronchi); lesions touching it are added to it, lesions wholly outside it are left out "
                      "of the percentage (all_lesions.outside_lung_ml)")
    limits.append("research software, not a medical device: not for diagnosis")
    return limits


class VolumeOutputWriter:
    """Writes the outputs of each finished :class:`VolumeAssembly`, then the report.

    Args:
        out_dir: the ``predict`` output folder.
        options: which outputs to write.
        model_info: ``name``, ``checkpoint``, ``checkpoint_sha256``, ``settings`` (shown in
            the report and stored in every ``summary.json``).
        version: ctlesion version (DICOM-SEG software version).
    """

    def __init__(self, out_dir: str | Path, options: VolumeOutputOptions, model_info: dict,
                 version: str = "") -> None:
        self.out_dir = Path(out_dir)
        self.options = options
        self.model_info = dict(model_info)
        self.version = version
        self.volumes: list[dict] = []  # summaries, in input order
        self._thumbnails: list[list[bytes | None]] = []
        self._names: set[str] = set()

    def _folder(self, source: str) -> Path:

        base = safe_filename(path_stem(source))
        name, n = base, 2
        while name in self._names:
            name, n = f"{base}_{n}", n + 1
        self._names.add(name)
        return self.out_dir / name

    def write(self, assembly: VolumeAssembly, verdict: dict | None = None) -> dict:
        """Write one volume's files; returns its summary (also kept for the report)."""
        from .dicom_seg import write_dicom_seg
        from .nifti import write_label_nifti

        folder = self._folder(assembly.source)
        folder.mkdir(parents=True, exist_ok=True)
        geometry, names = assembly.geometry, assembly.class_names
        instances, lesions = instance_volume(assembly.labels, names)
        if LUNG_CLASS in names:
            lung, lung_method = assembly.labels == names.index(LUNG_CLASS) + 1, "the detector's lung class"
        else:
            lung, lung_method = lung_mask(assembly.volume.array), LUNG_METHOD
        burden = lesion_burden(assembly.labels, instances, lesions, names, geometry.voxel_ml, lung, lung_method)
        files = {}
        if not names:  # a whole-slice classifier: probabilities only, no lesion masks to write
            pass
        elif self.options.labels:
            write_label_nifti(folder / "lesions.nii.gz", assembly.labels, geometry, "ctlesion class labels")
            files["lesions"] = "lesions.nii.gz"
        if self.options.instances and names:
            write_label_nifti(folder / "instances.nii.gz", instances, geometry, "ctlesion 3-D lesion ids")
            files["instances"] = "instances.nii.gz"
        if self.options.dicom_seg and geometry.kind == "dicom" and names:
            try:
                write_dicom_seg(folder / "seg.dcm", assembly.labels, assembly.volume.slice_sources, names,
                                model_name=self.model_info.get("name", "ctlesion"), version=self.version)
                files["dicom_seg"] = "seg.dcm"
            except ValueError as exc:
                warnings.warn(f"no DICOM-SEG for {assembly.source}: {exc}", stacklevel=2)
        summary = self._summary(assembly, burden, lesions, files, verdict, folder)
        if self.options.summary:
            atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.volumes.append(summary)
        self._thumbnails.append(assembly.thumbnails if self.options.report else [])
        return summary

    def _summary(self, assembly, burden, lesions, files, verdict, folder) -> dict:
        geometry, names = assembly.geometry, assembly.class_names
        row_mm, col_mm, _ = geometry.spacing_mm
        lesion_ids = [(c, n) for c, n in enumerate(names, start=1) if n != LUNG_CLASS]
        per_slice_px = np.stack([(assembly.labels == c).sum(axis=(1, 2)) for c, _ in lesion_ids], axis=1) \
            if lesion_ids else np.zeros((geometry.shape[0], 0), dtype=np.int64)
        slices = []
        for s in range(geometry.shape[0]):
            entry = {"index": s, "lesion_area_mm2": {
                n: round(float(per_slice_px[s, k]) * row_mm * col_mm, 2) for k, (_, n) in enumerate(lesion_ids)}}
            if assembly.probabilities is not None and s < len(assembly.probabilities):
                entry["probabilities"] = dict(zip(assembly.probability_names,
                                                  (round(p, 4) for p in assembly.probabilities[s])))
            slices.append(entry)
        return {
            "source": assembly.source,
            "folder": folder.name,
            "input_kind": geometry.kind,
            "shape_zyx": list(geometry.shape),
            "spacing_mm": {"row": row_mm, "col": col_mm, "slice": round(geometry.spacing_mm[2], 4)},
            "affine_ras": np.round(geometry.affine, 6).tolist(),
            "label_values": {"0": "background", **{str(c): n for c, n in enumerate(names, start=1)}},
            "files": files,
            "burden": burden,
            "lesions": [{**r, "volume_ml": round(r["voxels"] * geometry.voxel_ml, 3)} for r in lesions],
            "slices": slices,
            "verdict": verdict,
            "model": self.model_info,
            "limits": volume_limits(assembly),
        }

    def finish(self) -> Path | None:
        """Write ``report.html`` over every volume written (``None`` when off or no volume)."""
        if not self.options.report or not self.volumes:
            return None
        from .report import render_report

        path = self.out_dir / "report.html"
        atomic_write_text(path, render_report(self.volumes, self._thumbnails, self.model_info))
        return path
