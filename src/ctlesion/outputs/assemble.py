"""Gather the slice predictions of one input volume back into a label volume, on disk.

:class:`VolumeAssembler` receives the slices in dataset order (``predict`` runs them in
order) and hands back a finished :class:`VolumeAssembly` whenever a volume is complete.
Detection masks are painted onto the input's own grid: a model that ran on resized
slices gets its masks resized back (nearest neighbour); where detections overlap, the
higher score wins (a lung class, if the model has one, is painted first, under lesions).

What is held per volume while it is predicted: one painted slice at a time (the label map
goes to a uint8 file, :class:`SliceFile`, in the volume's temporary output folder, and so
does the air mask the lung method needs), the per-slice lesion areas and class
probabilities (a few numbers per slice), and at most :data:`MAX_THUMBNAILS` JPEG overlays
for the report (the slices with the largest lesion area; the middle ones when there is none).
"""

from __future__ import annotations

import heapq
import io
import json
import os
import signal
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sample import Sample
from .geometry import GeometryError, VolumeGeometry, volume_geometry

__all__ = ["VolumeAssembly", "VolumeAssembler", "SliceFile", "paint_detections", "LUNG_CLASS", "MAX_THUMBNAILS"]

LUNG_CLASS = "lung"
THUMBNAIL_SIDE = 384
MAX_THUMBNAILS = 32  # JPEG overlays kept per volume for the report's slice browser
LABELS_FILE, AIR_FILE = ".labels.u8", ".air.u8"  # scratch files in the volume's temporary folder


class SliceFile:
    """A ``[S, H, W]`` uint8 array in a file, written and read one slice at a time
    (plain reads and writes, so only the slice asked for is in memory)."""

    def __init__(self, path: str | Path, shape: tuple[int, int, int]) -> None:
        self.path, self.shape = Path(path), tuple(int(n) for n in shape)
        self._bytes = self.shape[1] * self.shape[2]
        self._fh = open(self.path, "w+b")
        self._fh.truncate(self.shape[0] * self._bytes)  # zeros (sparse where the file system allows)

    def write(self, s: int, image: np.ndarray) -> None:
        self._fh.seek(s * self._bytes)
        self._fh.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())

    def read(self, s: int) -> np.ndarray:
        self._fh.seek(s * self._bytes)
        return np.frombuffer(self._fh.read(self._bytes), dtype=np.uint8).reshape(self.shape[1:])

    def array(self) -> np.ndarray:
        """The whole array, memory-mapped read-only (reading all of it brings it all in)."""
        self._fh.flush()
        if not self._bytes * self.shape[0]:
            return np.zeros(self.shape, dtype=np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)

    def delete(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)


@dataclass
class VolumeAssembly:
    """One input volume after prediction.

    ``label_file`` holds the labels ``[S, H, W]`` uint8 on the input grid: 0 background,
    class id ``c`` is ``class_names[c - 1]`` (the detector's ids); ``air_file`` the air mask
    of the HU slices (models without a lung class). ``lesion_px`` ``[S, classes]``: lesion
    pixels per slice and class. ``probabilities`` is ``[S, C]`` (slice classifiers) or
    ``None``; ``thumbnails`` maps a slice to its JPEG overlay (the few the report keeps).
    ``folder`` is where the files are written (the writer's temporary folder).
    """

    volume: object  # a data.readers.LazyVolume (or Volume)
    geometry: VolumeGeometry
    class_names: tuple[str, ...]
    folder: Path
    label_file: SliceFile
    air_file: SliceFile | None = None
    probability_names: tuple[str, ...] | None = None
    probabilities: list[list[float]] | None = None
    thumbnails: dict[int, bytes] = field(default_factory=dict)
    detections: int = 0
    lesion_px: np.ndarray | None = None
    records: int = 0  # lines in folder/predictions.jsonl

    @property
    def source(self) -> str:
        return self.volume.source

    @property
    def labels(self) -> np.ndarray:
        """The label volume (memory-mapped; DICOM-SEG needs all of it at once)."""
        return self.label_file.array()

    def discard_scratch(self) -> None:
        for f in (self.label_file, self.air_file):
            if f is not None:
                f.delete()


def paint_detections(pred: dict | None, class_names, shape: tuple[int, int]) -> np.ndarray:
    """One slice's detections (binary masks ``[K, h, w]``) as a class map ``[H, W]`` uint8."""
    out = np.zeros(shape, dtype=np.uint8)
    if pred is None or len(pred["masks"]) == 0:
        return out
    masks = torch.as_tensor(pred["masks"])
    if masks.ndim == 4:
        masks = masks[:, 0]
    masks = masks.bool()
    if tuple(masks.shape[-2:]) != tuple(shape):
        masks = F.interpolate(masks[:, None].float(), size=shape, mode="nearest-exact")[:, 0] > 0.5
    labels = torch.as_tensor(pred["labels"]).tolist()
    scores = torch.as_tensor(pred["scores"]).tolist() if "scores" in pred else [1.0] * len(labels)
    lung = {i + 1 for i, n in enumerate(class_names) if n == LUNG_CLASS}
    # Lung first, then lesions by ascending score: the last painted (highest score) wins.
    order = sorted(range(len(labels)), key=lambda k: (labels[k] not in lung, scores[k]))
    masks = masks.numpy()
    for k in order:
        out[masks[k]] = labels[k]
    return out


def _thumbnail(tile) -> bytes:
    tile = tile.convert("RGB")
    scale = THUMBNAIL_SIDE / max(tile.size)
    if scale < 1:
        tile = tile.resize((round(tile.width * scale), round(tile.height * scale)))
    buf = io.BytesIO()
    tile.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _test_kill_point() -> None:
    """Fault-injection hook for the resume test: with ``CTLESION_TEST_KILL_AFTER_SLICES=k``
    the process SIGKILLs itself when the (k+1)-th slice reaches the assembler (no cleanup)."""
    target = os.environ.get("CTLESION_TEST_KILL_AFTER_SLICES")
    if target is not None:
        _KILL["count"] += 1
        if _KILL["count"] > int(target):
            os.kill(os.getpid(), signal.SIGKILL)


_KILL = {"count": 0}


class VolumeAssembler:
    """Collects consecutive slices of a :class:`~ctlesion.data.datasets.VolumeDataset` per volume.

    Args:
        dataset: the dataset being predicted (its ``inputs`` and ``open_volume(v)`` give each
            volume's geometry and, for the lung mask, its HU slices: a handle of the
            assembler's own, since the dataset may already be reading the next volume).
        class_names: detector class names (label value ``i`` is ``class_names[i - 1]``).
        probability_names: slice-classifier class names, or ``None`` for a detector.
        thumbnails: keep JPEG overlays (at most :data:`MAX_THUMBNAILS`) for the report.
        begin: ``begin(source)`` gives the (empty) folder a volume's files are written to,
            or ``None`` for no outputs for it; default: a new temporary folder.

    Inputs without a voxel grid (PNG/JPG slices, DICOM without position tags) are skipped
    with one warning each.
    """

    def __init__(self, dataset, class_names, probability_names=None, thumbnails: bool = True, begin=None) -> None:
        self.dataset = dataset
        self.class_names = tuple(class_names)
        self.probability_names = tuple(probability_names) if probability_names is not None else None
        self.thumbnails = thumbnails
        self.begin = begin or (lambda source: Path(tempfile.mkdtemp(prefix="ctlesion-volume-")))
        self._index = {str(p): v for v, p in enumerate(getattr(dataset, "inputs", []))}
        self._lesion_ids = [c for c, n in enumerate(self.class_names, start=1) if n != LUNG_CLASS]
        self._current: VolumeAssembly | None = None
        self._skipped: set[str] = set()
        self._records = None
        self._heap: list = []
        self._next_slice = 0

    def _start(self, key: str) -> VolumeAssembly | None:
        v = self._index.get(key)
        if v is None or not hasattr(self.dataset, "open_volume"):
            return None
        volume = self.dataset.open_volume(v)
        try:
            geometry = volume_geometry(volume)
        except GeometryError as exc:
            volume.close()
            if volume.units == "HU":  # PNG/JPG slices have no grid, by design: no warning
                warnings.warn(f"no volume outputs for {key}: {exc}", stacklevel=3)
            self._skipped.add(key)
            return None
        folder = self.begin(key)
        if folder is None:
            volume.close()
            self._skipped.add(key)
            return None
        folder = Path(folder)
        shape = geometry.shape
        self._records = open(folder / "predictions.jsonl", "w")
        self._heap, self._next_slice = [], 0
        return VolumeAssembly(
            volume=volume, geometry=geometry, class_names=self.class_names, folder=folder,
            label_file=SliceFile(folder / LABELS_FILE, shape),
            air_file=None if LUNG_CLASS in self.class_names else SliceFile(folder / AIR_FILE, shape),
            probability_names=self.probability_names,
            probabilities=[] if self.probability_names is not None else None,
            lesion_px=np.zeros((shape[0], len(self._lesion_ids)), dtype=np.int64),
        )

    def _air_until(self, current: VolumeAssembly, stop: int) -> None:
        """The air mask of the slices not yet seen, up to ``stop`` (read from the volume)."""
        from .lung import air_mask

        if current.air_file is not None:
            for s in range(self._next_slice, stop):
                current.air_file.write(s, air_mask(current.volume.slice(s)))
        self._next_slice = max(self._next_slice, stop)

    def add(self, sample: Sample, detections: dict | None = None, probabilities=None,
            tile=None, record: dict | None = None) -> VolumeAssembly | None:
        """Add one slice; returns the previous volume when this slice starts a new one.

        ``tile``: the slice's overlay (PIL image, or a function drawing it, called only if
        the report keeps this slice); ``record``: its ``predictions.jsonl`` line, also
        written to the volume's own ``predictions.jsonl``.
        """
        _test_kill_point()
        key = str(sample.meta.get("volume", sample.source))
        finished = None
        if self._current is None or self._current.source != key:
            finished = self.close()
            if key not in self._skipped:
                self._current = self._start(key)
        current = self._current
        if current is None or current.source != key:
            return finished
        s = int(sample.slice_index)
        if s < self._next_slice:
            raise ValueError(f"{key}: slice {s} came after slice {self._next_slice - 1}; predict runs slices in order")
        self._air_until(current, s)
        painted = paint_detections(detections, self.class_names, current.geometry.shape[1:])
        current.label_file.write(s, painted)
        self._air_until(current, s + 1)
        current.lesion_px[s] = [int((painted == c).sum()) for c in self._lesion_ids]
        current.detections += 0 if detections is None else len(detections["labels"])
        if current.probabilities is not None and probabilities is not None:
            current.probabilities.append([float(p) for p in probabilities])
        if record is not None:
            self._records.write(json.dumps(record) + "\n")
            current.records += 1
        if self.thumbnails and tile is not None:
            self._keep_thumbnail(current, s, tile)
        return finished

    def _keep_thumbnail(self, current: VolumeAssembly, s: int, tile) -> None:
        """Keep the slices with the largest lesion area (ties: the first), else those
        nearest the middle: the report opens at the largest, or the middle one."""
        area = int(current.lesion_px[s].sum())
        priority = (1, area, -s) if area else (0, -abs(s - current.geometry.shape[0] // 2), -s)
        if len(self._heap) >= MAX_THUMBNAILS and priority <= self._heap[0][0]:
            return
        jpeg = _thumbnail(tile() if callable(tile) else tile)
        entry = (priority, s, jpeg)
        if len(self._heap) < MAX_THUMBNAILS:
            heapq.heappush(self._heap, entry)
        else:
            heapq.heapreplace(self._heap, entry)

    def close(self) -> VolumeAssembly | None:
        """The volume being collected, finished (``None`` when there is none)."""
        finished, self._current = self._current, None
        if finished is not None:
            self._air_until(finished, finished.geometry.shape[0])
            finished.volume.close()
            self._records.close()
            finished.thumbnails = {s: jpeg for _, s, jpeg in sorted(self._heap, key=lambda e: e[1])}
            self._heap = []
        return finished
