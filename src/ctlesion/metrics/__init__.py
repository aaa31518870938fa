"""Evaluation metrics.

* :func:`legacy_map` - the author's per-image segmentation "mAP" (paper comparison only).
* :func:`coco_map` - pycocotools COCO mask and box AP (the conformant number to report).
* :func:`classification_report` / :func:`format_report` - confusion matrix, sensitivity, PPV,
  accuracy and the papers' class-adjusted F1 for slice classification (scikit-learn).
* :func:`patient_verdict` - one patient-level verdict from slice probabilities.

pycocotools is imported lazily, inside :func:`coco_map`; scikit-learn inside
:func:`classification_report`.
"""

from ctlesion.metrics.classification import classification_report, format_report
from ctlesion.metrics.coco import coco_map
from ctlesion.metrics.legacy import legacy_map
from ctlesion.metrics.patient import group_by_patient, patient_verdict

__all__ = [
    "classification_report",
    "coco_map",
    "format_report",
    "group_by_patient",
    "legacy_map",
    "patient_verdict",
]
