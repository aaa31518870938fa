"""Evaluation metrics.

* :func:`legacy_map` - the author's per-image segmentation "mAP" (paper comparison only).
* :func:`coco_map` - pycocotools COCO mask and box AP (the conformant number to report).

pycocotools is imported lazily, inside :func:`coco_map`.
"""

from ctlesion.metrics.coco import coco_map
from ctlesion.metrics.legacy import legacy_map

__all__ = ["coco_map", "legacy_map"]
