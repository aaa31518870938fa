"""Label maps to instance targets, with fixed value -> class tables (spec §1.1).

Every reader first converts its own mask convention to the *canonical* semantic codes
below (the CNCB convention). A mask type then maps canonical codes to class ids with a
fixed table, so a class id never depends on which values happen to occur in an image
(the original code's label-shift bug: a consolidation-only slice became "GGO").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.measure import label as cc_label
from skimage.measure import regionprops

from ..errors import DataError
from .sample import empty_target

__all__ = [
    "BACKGROUND", "LUNG", "GGO", "CONSOLIDATION", "MaskType", "MASK_TYPES",
    "get_mask_type", "extract_instances",
]

# Canonical semantic codes (CNCB-NCOV lesion masks use exactly these pixel values).
BACKGROUND, LUNG, GGO, CONSOLIDATION = 0, 1, 2, 3


@dataclass(frozen=True)
class MaskType:
    """A fixed mapping from canonical codes to detector class ids (0 = background)."""

    name: str
    code_to_class: dict[int, int]
    class_names: tuple[str, ...]  # index i is class id i + 1

    @property
    def num_classes(self) -> int:
        """Classes including background, as torchvision counts them."""
        return len(self.class_names) + 1


MASK_TYPES: dict[str, MaskType] = {
    # GGO and C become one "lesion" class: CTM default, SSM, Affinity.
    "merge": MaskType("merge", {GGO: 1, CONSOLIDATION: 1}, ("lesion",)),
    # GGO and C as two classes: CTM "two classes" models.
    "both": MaskType("both", {GGO: 1, CONSOLIDATION: 2}, ("GGO", "C")),
    # Consolidation thrown into background: CTM option.
    "ggo": MaskType("ggo", {GGO: 1}, ("GGO",)),
    # Lungs kept as a class: the LSTM/Attention repository.
    "separate": MaskType("separate", {LUNG: 1, GGO: 2, CONSOLIDATION: 3}, ("lung", "GGO", "C")),
}


def get_mask_type(name: str) -> MaskType:
    try:
        return MASK_TYPES[name]
    except KeyError:
        raise DataError(f"unknown mask type {name!r}; choose one of {sorted(MASK_TYPES)}") from None


def extract_instances(
    codes: np.ndarray, mask_type: str | MaskType, min_area: int = 100
) -> dict[str, torch.Tensor]:
    """Turn a canonical label map ``[H, W]`` into torchvision instance targets.

    For each class id in ascending order, pixels of that class are split into
    8-connected components (``skimage.measure.label``, connectivity 2, as the original
    code); components with ``area > min_area`` pixels are kept (the original
    ``ignore_small`` rule, strict inequality). Boxes are regionprops bounding boxes
    ``(min_col, min_row, max_col, max_row)``, whose max is exclusive, so every box has
    positive width and height. Unknown codes raise ``ValueError``.
    """
    mt = get_mask_type(mask_type) if isinstance(mask_type, str) else mask_type
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise DataError(f"label map must be 2-D, got shape {codes.shape}")
    present = np.unique(codes)
    unknown = [int(v) for v in present if int(v) not in (BACKGROUND, LUNG, GGO, CONSOLIDATION)]
    if unknown:
        raise DataError(f"label map has values {unknown} outside the canonical codes 0..3")
    class_map = np.zeros(codes.shape, dtype=np.int64)
    for code, cls in mt.code_to_class.items():
        class_map[codes == code] = cls
    height, width = codes.shape
    boxes, labels, masks = [], [], []
    for cls in range(1, mt.num_classes):
        binary = class_map == cls
        if not binary.any():
            continue
        components = cc_label(binary, connectivity=2)
        for region in regionprops(components):
            if region.area <= min_area:
                continue
            min_row, min_col, max_row, max_col = region.bbox
            boxes.append([min_col, min_row, max_col, max_row])
            labels.append(cls)
            masks.append(components == region.label)
    if not boxes:
        return empty_target(height, width)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)),
    }
