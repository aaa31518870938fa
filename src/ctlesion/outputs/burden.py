"""3-D lesions and the lesion burden of one volume.

* :func:`instance_volume`: slice detections joined into 3-D lesions: per class, the 3-D
  connected components (``scipy.ndimage.label``, 26-connectivity) of that class's voxels,
  so a lesion found on neighbouring slices whose masks overlap (or touch, diagonals
  included) is one lesion. Ids run 1..N over all classes, ordered by class then size.
* :func:`lesion_burden`: per class the volume in mL (voxels x row spacing x column spacing
  x slice step / 1000), the number of 3-D lesions and the largest; the lung volume and
  the percentage of the lung that the lesions in it (all classes together) occupy.

Both are computed slice by slice (:class:`InstanceSlices`, :class:`BurdenCounter`, built
on :class:`~.components.Components3D`), so a long volume is never held whole; the array
functions run the same code over an array's slices.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from .assemble import LUNG_CLASS
from .components import Components3D

__all__ = ["instance_volume", "lesion_burden", "InstanceSlices", "BurdenCounter"]

_EIGHT = np.ones((3, 3), dtype=bool)


class InstanceSlices:
    """The 3-D lesions of a label volume ``[S, H, W]`` read one slice at a time.

    Construction is pass 1 (``read_labels(s)`` for every slice, in order): per lesion class,
    the 26-connected components of its voxels. ``table`` holds one row per lesion (see
    :func:`instance_volume`), ``dtype`` the id type (uint16, or uint32 past 65535 lesions);
    :meth:`slice` is pass 2: the lesion ids of one slice.
    """

    def __init__(self, read_labels: Callable[[int], np.ndarray], shape, class_names) -> None:
        self.class_names = tuple(class_names)
        num_slices, height, width = (int(n) for n in shape)
        self._classes = [(c, name) for c, name in enumerate(self.class_names, start=1) if name != LUNG_CLASS]
        self._components = {c: Components3D(height, width) for c, _ in self._classes}
        for s in range(num_slices):
            labels = np.asarray(read_labels(s))
            for c, comps in self._components.items():
                comps.add(labels == c)
        self.table: list[dict] = []
        self._luts: dict[int, np.ndarray] = {}
        next_id = 1
        for c, name in self._classes:
            comps = self._components[c].finish()
            lut = np.zeros(comps.count + 1, dtype=np.uint32)
            for k in np.argsort(-comps.sizes[1:], kind="stable") + 1:  # by size, then first voxel
                lut[k] = next_id
                self.table.append({
                    "id": next_id, "class": name, "class_id": c, "voxels": int(comps.sizes[k]),
                    "slices": [int(comps.first_slice[k]), int(comps.last_slice[k])],
                    "centroid_zyx": [round(float(v), 1) for v in comps.centroids[k]],
                })
                next_id += 1
            self._luts[c] = lut
        self.dtype = np.dtype(np.uint16 if next_id <= np.iinfo(np.uint16).max else np.uint32)

    def slice(self, s: int, labels: np.ndarray) -> np.ndarray:
        """Lesion ids ``[H, W]`` of slice ``s`` (``labels``: that slice's label map)."""
        labels = np.asarray(labels)
        out = np.zeros(labels.shape, dtype=self.dtype)
        for c, comps in self._components.items():
            if comps.count:
                ids = comps.labels(s, labels == c)
                inside = ids > 0
                out[inside] = self._luts[c][ids[inside]]
        return out


def instance_volume(labels: np.ndarray, class_names) -> tuple[np.ndarray, list[dict]]:
    """3-D lesion ids ``[S, H, W]`` (uint16/uint32, 0 = none) and one row per lesion:
    ``{"id", "class", "class_id", "voxels", "slices": [first, last], "centroid_zyx"}``.
    A lung class (4-class models) is not a lesion and gets no id."""
    labels = np.asarray(labels)
    found = InstanceSlices(lambda s: labels[s], labels.shape, class_names)
    instances = np.zeros(labels.shape, dtype=found.dtype)
    for s in range(labels.shape[0]):
        instances[s] = found.slice(s, labels[s])
    return instances, found.table


class BurdenCounter:
    """:func:`lesion_burden` over slices given in order: :meth:`add` each slice's labels,
    lesion ids and lung mask, then :meth:`result`. Holds the previous slice only (the
    lung is dilated by one voxel in 3-D to find the lesions touching it)."""

    def __init__(self, class_names, lesions: list[dict]) -> None:
        self.class_names = tuple(class_names)
        self.lesions = lesions
        self._voxels = {c: 0 for c, name in enumerate(self.class_names, start=1) if name != LUNG_CLASS}
        self._total = self._lung = 0
        self._overlap = np.zeros(len(lesions) + 1, dtype=np.int64)  # lesion voxels inside the lung mask
        self._touching: set[int] = set()
        self._prev: tuple[np.ndarray, np.ndarray] | None = None       # (ids, dilated lung) of slice s - 1

    def add(self, labels: np.ndarray, instances: np.ndarray, lung: np.ndarray) -> None:
        labels, instances, lung = np.asarray(labels), np.asarray(instances), np.asarray(lung, dtype=bool)
        for c in self._voxels:
            self._voxels[c] += int((labels == c).sum())
        self._total += int((instances > 0).sum())
        self._lung += int(lung.sum())
        if not self.lesions:
            return
        self._overlap += np.bincount(instances[lung].astype(np.int64), minlength=len(self._overlap))
        grown = ndimage.binary_dilation(lung, structure=_EIGHT)  # 3x3x3 = 3x3 on slices s-1, s, s+1
        self._touching.update(np.unique(instances[grown]).tolist())
        if self._prev is not None:
            prev_ids, prev_grown = self._prev
            self._touching.update(np.unique(prev_ids[grown]).tolist())
            self._touching.update(np.unique(instances[prev_grown]).tolist())
        self._prev = (instances, grown)

    def result(self, voxel_ml: float, lung_method: str) -> dict:
        classes = {}
        for c, name in enumerate(self.class_names, start=1):
            if name == LUNG_CLASS:
                continue
            voxels = self._voxels[c]
            rows = [r for r in self.lesions if r["class_id"] == c]
            largest = max((r["voxels"] for r in rows), default=0)
            classes[name] = {
                "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 3), "lesions": len(rows),
                "largest_ml": round(largest * voxel_ml, 3),
            }
        in_lung = [r for r in self.lesions if r["id"] in self._touching]
        inside = sum(r["voxels"] for r in in_lung)
        lung_voxels = self._lung + sum(r["voxels"] - int(self._overlap[r["id"]]) for r in in_lung)
        total = self._total
        return {
            "classes": classes,
            "all_lesions": {"voxels": total, "volume_ml": round(total * voxel_ml, 3), "lesions": len(self.lesions),
                            "in_lung_voxels": inside, "outside_lung_ml": round((total - inside) * voxel_ml, 3)},
            "lung": {"voxels": lung_voxels, "volume_ml": round(lung_voxels * voxel_ml, 3), "method": lung_method,
                     "mask_ml": round(self._lung * voxel_ml, 3)},  # the mask alone, before lesions join
            "percent_lung_affected": round(100.0 * inside / lung_voxels, 3) if lung_voxels else None,
            "voxel_ml": voxel_ml,
        }


def lesion_burden(labels: np.ndarray, instances: np.ndarray, lesions: list[dict], class_names,
                  voxel_ml: float, lung: np.ndarray, lung_method: str) -> dict:
    """Lesion volumes per class and as a share of the lung.

    ``lung`` is a boolean mask on the same grid. A 3-D lesion that overlaps or touches it
    (26-neighbourhood) is in the lung, and its voxels join the lung mask (a consolidation at
    the pleura may be missing from a threshold mask). A lesion wholly outside the lung (a
    false positive, or a lung mask that failed) still counts in its class volume, but not in
    ``percent_lung_affected``; ``all_lesions.outside_lung_ml`` says how much that is.
    ``percent_lung_affected`` is ``None`` for an empty lung.
    """
    counter = BurdenCounter(class_names, lesions)
    lung = np.asarray(lung, dtype=bool)
    for s in range(np.asarray(labels).shape[0]):
        counter.add(labels[s], instances[s], lung[s])
    return counter.result(voxel_ml, lung_method)
