"""Single-Shot Model (papers 001/003, spec §5): segmentation and classification in one model.

A lightweight Mask R-CNN (segmentation branch) plus module S (:class:`~ctlesion.models.ctm.ModuleS`)
over the ranked RoI batch. ``classifier.branch``:

* ``shared``: single branch; the segmentation box head and predictor also build the
  classification batch (001 "SSM", 003 "base");
* ``separate``: a second ``TwoMLPHead`` + ``FastRCNNPredictor`` of the same shape (1.62M
  more parameters for the R18 models), filled by copying the segmentation branch. When it
  is copied is training configuration (``train.copy_rule``): ``once`` for the pretrained
  two-branch model (001 "SSM²"), ``running_min`` for the from-scratch model (001 "SSM^S",
  003 "augmented", the released code).

Segmentation steps use the stock Mask R-CNN losses; the classification step runs the
model in eval mode with S in train mode (spec §5.2). See
:mod:`ctlesion.engine.steps` for the joint loop.
"""

from __future__ import annotations

import copy

from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .ctm import ModuleS
from .maskrcnn import build_maskrcnn
from .rcnn_classifier import RCNNSliceClassifier

__all__ = ["build_ssm"]


def build_ssm(cfg: ModelConfig) -> RCNNSliceClassifier:
    c = cfg.classifier
    if c.branch not in ("shared", "separate"):
        raise ConfigError(f"classifier.branch must be 'shared' or 'separate', not {c.branch!r}")
    detector = build_maskrcnn(cfg)
    cls_branch = None
    if c.branch == "separate":
        heads = detector.roi_heads
        # Same shapes as the segmentation branch; the weights arrive by copy_segmentation_branch().
        cls_branch = nn.ModuleDict({
            "box_head": copy.deepcopy(heads.box_head),
            "box_predictor": copy.deepcopy(heads.box_predictor),
        })
    head = ModuleS(c.rois, c.s_features, len(c.class_names))
    return RCNNSliceClassifier(
        detector, head, c.class_names, cfg, cls_branch=cls_branch, num_rois=c.rois,
        nms_thresh=c.roi_nms_thresh, min_area=c.roi_min_area, segmentation=True,
    )
