"""Gather the slice predictions of one input volume back into a label volume.

:class:`VolumeAssembler` receives the slices in dataset order (``predict`` runs them in
order) and hands back a finished :class:`VolumeAssembly` whenever a volume is complete.
Detection masks are painted onto the input's own grid: a model that ran on resized
slices gets its masks resized back (nearest neighbour); where detections overlap, the
higher score wins (a lung class, if the model has one, is painted first, under lesions).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..data.readers import Volume
from ..data.sample import Sample
from .geometry import GeometryError, VolumeGeometry, volume_geometry

__all__ = ["VolumeAssembly", "VolumeAssembler", "paint_detections", "LUNG_CLASS"]

LUNG_CLASS = "lung"
THUMBNAIL_SIDE = 384


@dataclass
class VolumeAssembly:
    """One input volume after prediction.

    ``labels`` is ``[S, H, W]`` uint8 on the input grid: 0 background, class id ``c`` is
    ``class_names[c - 1]`` (the detector's ids). ``probabilities`` is ``[S, C]`` (slice
    classifiers) or ``None``; ``thumbnails`` are JPEG overlays per slice (for the report).
    """

    volume: Volume
    geometry: VolumeGeometry
    class_names: tuple[str, ...]
    labels: np.ndarray
    probability_names: tuple[str, ...] | None = None
    probabilities: list[list[float]] | None = None
    thumbnails: list[bytes | None] = field(default_factory=list)
    detections: int = 0

    @property
    def source(self) -> str:
        return self.volume.source


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


class VolumeAssembler:
    """Collects consecutive slices of a :class:`~ctlesion.data.datasets.VolumeDataset` per volume.

    Args:
        dataset: the dataset being predicted (its ``inputs`` and ``volume(v)`` give each
            volume's pixels and geometry; the volume it has cached is reused).
        class_names: detector class names (label value ``i`` is ``class_names[i - 1]``).
        probability_names: slice-classifier class names, or ``None`` for a detector.
        thumbnails: keep a JPEG overlay per slice for the report.

    Inputs without a voxel grid (PNG/JPG slices, DICOM without position tags) are skipped
    with one warning each.
    """

    def __init__(self, dataset, class_names, probability_names=None, thumbnails: bool = True) -> None:
        self.dataset = dataset
        self.class_names = tuple(class_names)
        self.probability_names = tuple(probability_names) if probability_names is not None else None
        self.thumbnails = thumbnails
        self._index = {str(p): v for v, p in enumerate(getattr(dataset, "inputs", []))}
        self._current: VolumeAssembly | None = None
        self._skipped: set[str] = set()

    def _start(self, key: str) -> VolumeAssembly | None:
        v = self._index.get(key)
        if v is None or not hasattr(self.dataset, "volume"):
            return None
        volume = self.dataset.volume(v)
        try:
            geometry = volume_geometry(volume)
        except GeometryError as exc:
            if volume.units == "HU":  # PNG/JPG slices have no grid, by design: no warning
                warnings.warn(f"no volume outputs for {key}: {exc}", stacklevel=3)
            self._skipped.add(key)
            return None
        return VolumeAssembly(
            volume=volume, geometry=geometry, class_names=self.class_names,
            labels=np.zeros(volume.array.shape, dtype=np.uint8), probability_names=self.probability_names,
            probabilities=[] if self.probability_names is not None else None,
            thumbnails=[None] * volume.num_slices,
        )

    def add(self, sample: Sample, detections: dict | None = None, probabilities=None,
            tile=None) -> VolumeAssembly | None:
        """Add one slice; returns the previous volume when this slice starts a new one.

        ``tile``: the slice's overlay (PIL image), kept as a thumbnail for the report.
        """
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
        current.labels[s] = paint_detections(detections, self.class_names, current.labels.shape[1:])
        current.detections += 0 if detections is None else len(detections["labels"])
        if current.probabilities is not None and probabilities is not None:
            current.probabilities.append([float(p) for p in probabilities])
        if self.thumbnails and tile is not None:
            current.thumbnails[s] = _thumbnail(tile)
        return finished

    def close(self) -> VolumeAssembly | None:
        """The volume being collected, finished (``None`` when there is none)."""
        finished, self._current = self._current, None
        return finished
