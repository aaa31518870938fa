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
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["lung_mask", "LUNG_HU_THRESHOLD", "LUNG_METHOD"]

LUNG_HU_THRESHOLD = -320.0
_SECOND_COMPONENT_SHARE = 0.10
LUNG_METHOD = (f"HU < {LUNG_HU_THRESHOLD:g}, 3-D connected components not touching the image border "
               f"(the largest, and the second if >= {_SECOND_COMPONENT_SHARE:.0%} of it), holes filled per slice")


def lung_mask(hu: np.ndarray, threshold: float = LUNG_HU_THRESHOLD) -> np.ndarray:
    """Boolean lung mask ``[S, H, W]`` of a CT volume in HU (see the module docstring)."""
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"lung_mask needs an [S, H, W] volume, got shape {hu.shape}")
    air = hu < threshold
    components, count = ndimage.label(air)
    if count == 0:
        return np.zeros(hu.shape, dtype=bool)
    border = np.unique(np.concatenate([
        components[:, 0, :].ravel(), components[:, -1, :].ravel(),
        components[:, :, 0].ravel(), components[:, :, -1].ravel(),
    ]))
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    sizes[border] = 0
    if sizes.max() == 0:
        return np.zeros(hu.shape, dtype=bool)
    keep = np.nonzero(sizes >= _SECOND_COMPONENT_SHARE * sizes.max())[0]
    keep = keep[np.argsort(sizes[keep])[::-1][:2]]
    mask = np.isin(components, keep)
    for s in range(mask.shape[0]):
        if mask[s].any():
            mask[s] = ndimage.binary_fill_holes(mask[s])
    return mask
