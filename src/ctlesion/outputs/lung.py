"""A classical lung mask from Hounsfield units (no model).

Method (:func:`lung_mask`), on the whole ``[S, H, W]`` HU volume:

1. air-like voxels: ``HU < -320`` (aerated lung is about -900..-500 HU; soft tissue,
   vessels walls and consolidation are above);
2. 3-D connected components (6-connectivity); components touching the in-plane border
   of the image (air around the patient, the scanner's field-of-view padding) are dropped;
3. the largest remaining component is kept, and the second largest too if it is at least
   10 % of its size (the other lung, when the lungs are not joined through the airways);
4. holes are filled slice by slice (vessels, nodules, and lesions enclosed by aerated lung).

Lesions that touch the pleura are not always enclosed, so :func:`~.burden.lesion_burden`
adds the detected lesion voxels to the lung mask. The trachea and main bronchi are
included (they are air inside the body and joined to the lungs). For models with a lung
class (mask type ``separate``) the detector's own lung segmentation is used instead.

:class:`LungSlices` computes the same mask from the air masks of the slices, one slice at
a time (:class:`~.components.Components3D`), so the HU volume is never held whole.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from .components import Components3D

__all__ = ["lung_mask", "air_mask", "LungSlices", "LUNG_HU_THRESHOLD", "LUNG_METHOD"]

LUNG_HU_THRESHOLD = -320.0
_SECOND_COMPONENT_SHARE = 0.10
LUNG_METHOD = (f"HU < {LUNG_HU_THRESHOLD:g}, 3-D connected components not touching the image border "
               f"(the largest, and the second if >= {_SECOND_COMPONENT_SHARE:.0%} of it), holes filled per slice")


def air_mask(hu: np.ndarray, threshold: float = LUNG_HU_THRESHOLD) -> np.ndarray:
    """Step 1: air-like voxels of a slice (or volume) in HU."""
    return np.asarray(hu) < threshold


class LungSlices:
    """The lung mask of a volume from its slices' air masks (:func:`air_mask`).

    Construction is pass 1 (``read_air(s)`` for every slice, in order): the 3-D components
    and the ones kept. :meth:`slice` is pass 2: the lung mask of one slice.
    """

    def __init__(self, read_air: Callable[[int], np.ndarray], num_slices: int, shape2d) -> None:
        self._components = Components3D(*shape2d, connectivity=6)  # scipy's default
        for s in range(int(num_slices)):
            self._components.add(read_air(s))
        comps = self._components.finish()
        sizes = comps.sizes.copy()
        sizes[comps.touches_border] = 0
        self.keep = np.zeros(0, dtype=np.int64)
        if comps.count and sizes.max() > 0:
            keep = np.nonzero(sizes >= _SECOND_COMPONENT_SHARE * sizes.max())[0]
            self.keep = keep[np.argsort(sizes[keep])[::-1][:2]]

    def slice(self, s: int, air: np.ndarray) -> np.ndarray:
        """Lung mask ``[H, W]`` of slice ``s`` (``air``: the same air mask pass 1 was given)."""
        if not self.keep.size:
            return np.zeros(np.shape(air), dtype=bool)
        mask = np.isin(self._components.labels(s, air), self.keep)
        return ndimage.binary_fill_holes(mask) if mask.any() else mask


def lung_mask(hu: np.ndarray, threshold: float = LUNG_HU_THRESHOLD) -> np.ndarray:
    """Boolean lung mask ``[S, H, W]`` of a CT volume in HU (see the module docstring)."""
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"lung_mask needs an [S, H, W] volume, got shape {hu.shape}")
    air = air_mask(hu, threshold)
    lung = LungSlices(lambda s: air[s], hu.shape[0], hu.shape[1:])
    mask = np.zeros(hu.shape, dtype=bool)
    for s in range(hu.shape[0]):
        mask[s] = lung.slice(s, air[s])
    return mask
