"""Per-volume outputs of ``predict``: ``DIR/<volume>/`` and ``DIR/report.html``.

For each DICOM series or NIfTI input, :class:`VolumeOutputWriter` writes (each can be
switched off with :class:`VolumeOutputOptions`):

* ``lesions.nii.gz``: class labels on the input grid (0 background, then the model's classes);
* ``instances.nii.gz``: one id per 3-D lesion (:class:`~.burden.InstanceSlices`);
* ``seg.dcm``: DICOM-SEG, one segment per class (DICOM input only);
* ``summary.json``: burden, 3-D lesions, per-slice areas and probabilities, verdict, limits;
* ``thumbnails/NNNN.jpg``: the few slice overlays the report shows (with the report);

and always ``predictions.jsonl`` (this volume's lines of the combined file) and, written
last, ``complete.json`` (the input's identity, the model, the options, the summary). After
the last volume, ``report.html`` over all of them.

Atomic folders: a volume is written into ``DIR/.<volume>.partial/`` and renamed to
``DIR/<volume>/`` only when every file is in it, so a folder under its own name is
complete; a killed run leaves at most a ``.partial`` folder, which the next run redoes.
:meth:`VolumeOutputWriter.completed` tells whether a folder was made from the same input
(file names, sizes and modification times), model (weights hash and settings) and options,
which is what ``predict --skip-existing`` skips.

Everything is computed slice by slice from the label file the assembler wrote (two
passes for the 3-D lesions and the lung mask), except DICOM-SEG: highdicom builds the
segmentation in memory (``S x H x W x classes`` bytes, plus its frames).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data.readers import is_image, path_stem
from ..engine.io import atomic_write_bytes, atomic_write_text, safe_filename
from .assemble import LUNG_CLASS, VolumeAssembly
from .burden import BurdenCounter, InstanceSlices
from .lung import LUNG_METHOD, LungSlices

__all__ = ["VolumeOutputOptions", "VolumeOutputWriter", "volume_limits", "input_identity", "COMPLETE"]

COMPLETE = "complete.json"  # written last into a volume's folder
_FORMAT = 1


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


def input_identity(path: str | Path) -> dict:
    """What an input was when it was predicted: its files (a series folder's visible files,
    or the one file) by name, size and modification time, hashed. Pixels are not read."""
    path = Path(path)
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")) \
        if path.is_dir() else [path]
    digest, total = hashlib.sha256(), 0
    for f in files:
        st = f.stat()
        total += st.st_size
        digest.update(f"{f.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return {"path": str(path.resolve()), "files": len(files), "bytes": total, "sha256": digest.hexdigest()}


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
        inputs: the inputs in order; each DICOM/NIfTI input gets its folder name from its
            stem (``_2``, ``_3``... for repeats) by its place here, so names do not depend
            on which volumes a resumed run writes.
    """

    def __init__(self, out_dir: str | Path, options: VolumeOutputOptions, model_info: dict,
                 version: str = "", inputs=()) -> None:
        self.out_dir = Path(out_dir)
        self.options = options
        self.model_info = dict(model_info)
        self.version = version
        self.volumes: list[dict] = []  # summaries written by this writer, in order
        self._records: dict[str, dict] = {}  # source -> complete.json (written or found complete)
        self._names: dict[str, str] = {}
        self._taken: set[str] = set()
        for path in inputs:
            if not is_image(path):
                self._folder_name(str(path))

    def _folder_name(self, source: str) -> str:
        if source not in self._names:
            base = safe_filename(path_stem(source))
            name, n = base, 2
            while name in self._taken:
                name, n = f"{base}_{n}", n + 1
            self._taken.add(name)
            self._names[source] = name
        return self._names[source]

    def folder(self, source: str) -> Path:
        """Where ``source``'s outputs are (once complete)."""
        return self.out_dir / self._folder_name(str(source))

    def _partial(self, source: str) -> Path:
        return self.out_dir / f".{self._folder_name(str(source))}.partial"

    def _expected(self, source: str) -> dict:
        return {"input": input_identity(source),
                "model": {k: self.model_info.get(k) for k in ("name", "checkpoint_sha256", "settings")},
                "options": asdict(self.options)}

    def completed(self, source: str) -> dict | None:
        """``source``'s ``complete.json`` when its folder is complete and was made from the
        same input, model and options; else ``None``, with a warning saying why when a
        folder is there but cannot be reused."""
        source = str(source)
        folder = self.folder(source)
        if not folder.is_dir():
            return None
        try:
            record = json.loads((folder / COMPLETE).read_text())
        except (OSError, ValueError):
            warnings.warn(f"{folder}: no readable {COMPLETE} (not written by a complete run of this "
                          "version); predicting it again", stacklevel=2)
            return None
        expected = self._expected(source)
        changed = [what for what in ("input", "model", "options")
                   if json.dumps(record.get(what), sort_keys=True) != json.dumps(expected[what], sort_keys=True)]
        if record.get("format") != _FORMAT or record.get("source") != source:
            changed.append("format" if record.get("format") != _FORMAT else "source")
        if changed:
            what = {"input": "the input files changed (names, sizes or times)", "model": "another model or settings",
                    "options": "other output options", "format": "another output format",
                    "source": "another input path"}
            warnings.warn(f"{folder}: made from {'; '.join(what[c] for c in changed)}; predicting it again",
                          stacklevel=2)
            return None
        return record

    def skip(self, source: str, record: dict) -> None:
        """Count ``source`` as done (its ``record`` from :meth:`completed`) for the report."""
        self._records[str(source)] = record

    def record(self, source: str) -> dict | None:
        """The ``complete.json`` of a volume written or skipped by this writer."""
        return self._records.get(str(source))

    def begin(self, source: str) -> Path:
        """An empty temporary folder for ``source``'s outputs (a leftover one is removed)."""
        partial = self._partial(str(source))
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        return partial

    def write(self, assembly: VolumeAssembly, verdict: dict | None = None) -> dict:
        """Write one volume's files and put its folder in place; returns its summary."""
        from .dicom_seg import write_dicom_seg
        from .nifti import write_label_nifti_slices

        folder, final = assembly.folder, self.folder(assembly.source)
        geometry, names = assembly.geometry, assembly.class_names
        num_slices = geometry.shape[0]
        read = assembly.label_file.read
        found = InstanceSlices(read, geometry.shape, names)  # pass 1 over the label file
        if LUNG_CLASS in names:
            lung_id, lung_method = names.index(LUNG_CLASS) + 1, "the detector's lung class"
            lung_of = lambda s, labels: labels == lung_id  # noqa: E731
        else:
            air = assembly.air_file
            lung, lung_method = LungSlices(air.read, num_slices, geometry.shape[1:]), LUNG_METHOD
            lung_of = lambda s, labels: lung.slice(s, air.read(s))  # noqa: E731
        counter = BurdenCounter(names, found.table)

        def instance_slices():  # pass 2: lesion ids and the burden, slice by slice
            for s in range(num_slices):
                labels = read(s)
                ids = found.slice(s, labels)
                counter.add(labels, ids, lung_of(s, labels))
                yield ids

        files = {}
        if self.options.instances and names:
            write_label_nifti_slices(folder / "instances.nii.gz", instance_slices(), geometry, found.dtype,
                                     "ctlesion 3-D lesion ids")
            files["instances"] = "instances.nii.gz"
        else:
            for _ in instance_slices():
                pass
        burden = counter.result(geometry.voxel_ml, lung_method)
        if names and self.options.labels:  # a whole-slice classifier has no lesion masks to write
            write_label_nifti_slices(folder / "lesions.nii.gz", (read(s) for s in range(num_slices)), geometry,
                                     np.uint8, "ctlesion class labels")
            files["lesions"] = "lesions.nii.gz"
        if self.options.dicom_seg and geometry.kind == "dicom" and names:
            try:
                write_dicom_seg(folder / "seg.dcm", assembly.labels, assembly.volume.slice_sources, names,
                                model_name=self.model_info.get("name", "ctlesion"), version=self.version)
                files["dicom_seg"] = "seg.dcm"
            except ValueError as exc:
                warnings.warn(f"no DICOM-SEG for {assembly.source}: {exc}", stacklevel=2)
        assembly.discard_scratch()
        files["predictions"] = "predictions.jsonl"
        if self.options.report:
            for s, jpeg in assembly.thumbnails.items():
                atomic_write_bytes(folder / "thumbnails" / f"{s:04d}.jpg", jpeg)
        summary = self._summary(assembly, burden, found.table, files, verdict, final)
        if self.options.summary:
            atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
        record = {"format": _FORMAT, "source": assembly.source, "folder": final.name, **self._expected(assembly.source),
                  "version": self.version, "records": assembly.records, "summary": summary}
        atomic_write_text(folder / COMPLETE, json.dumps(record, indent=2) + "\n")  # last: the folder is complete
        self._publish(folder, final)
        self.volumes.append(summary)
        self._records[assembly.source] = record
        return summary

    @staticmethod
    def _publish(partial: Path, final: Path) -> None:
        """Rename the complete temporary folder into place (an outdated one is replaced)."""
        if final.exists():
            old = final.parent / f".{final.name}.old"
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
            partial.rename(final)
            shutil.rmtree(old)
        else:
            partial.rename(final)

    def _summary(self, assembly, burden, lesions, files, verdict, folder) -> dict:
        geometry, names = assembly.geometry, assembly.class_names
        row_mm, col_mm, _ = geometry.spacing_mm
        lesion_names = [n for n in names if n != LUNG_CLASS]
        per_slice_px = assembly.lesion_px
        slices = []
        for s in range(geometry.shape[0]):
            entry = {"index": s, "lesion_area_mm2": {
                n: round(float(per_slice_px[s, k]) * row_mm * col_mm, 2) for k, n in enumerate(lesion_names)}}
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

    def finish(self, sources=None) -> Path | None:
        """Write ``report.html`` over the volumes of ``sources`` (in that order; default: the
        volumes written or skipped) that are complete (``None`` when off or no volume).
        Thumbnails are read back from each folder."""
        if not self.options.report:
            return None
        order = [str(s) for s in sources] if sources is not None else list(self._records)
        records = [self._records[s] for s in order if s in self._records]
        if not records:
            return None
        from .report import render_report

        summaries, thumbnails = [], []
        for record in records:
            summary = record["summary"]
            folder = self.out_dir / record["folder"]
            thumbs = [None] * len(summary["slices"])
            for f in sorted((folder / "thumbnails").glob("*.jpg")):
                if f.stem.isdigit() and int(f.stem) < len(thumbs):
                    thumbs[int(f.stem)] = f.read_bytes()
            summaries.append(summary)
            thumbnails.append(thumbs)
        path = self.out_dir / "report.html"
        atomic_write_text(path, render_report(summaries, thumbnails, self.model_info))
        return path
