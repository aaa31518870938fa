"""3-D lesions and the lesion burden of one volume.

* :func:`instance_volume`: slice detections joined into 3-D lesions: per class, the 3-D
  connected components (``scipy.ndimage.label``, 26-connectivity) of that class's voxels,
  so a lesion found on neighbouring slices whose masks overlap (or touch, diagonals
  included) is one lesion. Ids run 1..N over all classes, ordered by class then size.
* :func:`lesion_burden`: per class the volume in mL (voxels x row spacing x column spacing
  x slice step / 1000), the number of 3-D lesions and the largest; the lung volume and
  the percentage of the lung that the lesions in it (all classes together) occupy.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .assemble import LUNG_CLASS

__all__ = ["instance_volume", "lesion_burden"]

_FULL_3D = np.ones((3, 3, 3), dtype=bool)


def instance_volume(labels: np.ndarray, class_names) -> tuple[np.ndarray, list[dict]]:
    """3-D lesion ids ``[S, H, W]`` (uint16/uint32, 0 = none) and one row per lesion:
    ``{"id", "class", "class_id", "voxels", "slices": [first, last], "centroid_zyx"}``.
    A lung class (4-class models) is not a lesion and gets no id."""
    instances = np.zeros(labels.shape, dtype=np.uint32)
    table: list[dict] = []
    next_id = 1
    for c, name in enumerate(class_names, start=1):
        if name == LUNG_CLASS:
            continue
        components, count = ndimage.label(labels == c, structure=_FULL_3D)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
        objects = ndimage.find_objects(components)
        centroids = ndimage.center_of_mass(components > 0, components, range(1, count + 1))
        lut = np.zeros(count + 1, dtype=np.uint32)
        for k in np.argsort(-sizes, kind="stable"):
            lut[k + 1] = next_id
            zs = objects[k][0]
            table.append({
                "id": next_id, "class": name, "class_id": c, "voxels": int(sizes[k]),
                "slices": [int(zs.start), int(zs.stop - 1)],
                "centroid_zyx": [round(float(v), 1) for v in centroids[k]],
            })
            next_id += 1
        inside = components > 0
        instances[inside] = lut[components[inside]]
    dtype = np.uint16 if next_id <= np.iinfo(np.uint16).max else np.uint32
    return instances.astype(dtype), table


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
    classes = {}
    for c, name in enumerate(class_names, start=1):
        if name == LUNG_CLASS:
            continue
        voxels = int((labels == c).sum())
        rows = [r for r in lesions if r["class_id"] == c]
        largest = max((r["voxels"] for r in rows), default=0)
        classes[name] = {
            "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 3), "lesions": len(rows),
            "largest_ml": round(largest * voxel_ml, 3),
        }
    lung = np.asarray(lung, dtype=bool)
    touching = np.unique(instances[ndimage.binary_dilation(lung, structure=_FULL_3D)]) if lesions else []
    in_lung = np.isin(instances, [i for i in touching if i > 0])
    lung_all = lung | in_lung
    lung_voxels = int(lung_all.sum())
    total, inside = int((instances > 0).sum()), int(in_lung.sum())
    return {
        "classes": classes,
        "all_lesions": {"voxels": total, "volume_ml": round(total * voxel_ml, 3), "lesions": len(lesions),
                        "in_lung_voxels": inside, "outside_lung_ml": round((total - inside) * voxel_ml, 3)},
        "lung": {"voxels": lung_voxels, "volume_ml": round(lung_voxels * voxel_ml, 3), "method": lung_method,
                 "mask_ml": round(int(lung.sum()) * voxel_ml, 3)},  # the mask alone, before lesions join
        "percent_lung_affected": round(100.0 * inside / lung_voxels, 3) if lung_voxels else None,
        "voxel_ml": voxel_ml,
    }
