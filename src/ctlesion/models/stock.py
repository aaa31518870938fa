"""Stock torchvision Mask R-CNN (``maskrcnn_resnet50_fpn``) as a baseline, not a paper model.

Everything is torchvision's default (5-level FPN with the max-pool level, 3 x 5 anchors,
1024-wide box head, 4 x 256 mask head, trainable BatchNorm since no pretrained weights are
loaded); from the config only the class set (``detector.mask_type``), the input scaling
(``min_size``, ``max_size``, ``image_mean``, ``image_std``) and the detection filter
(``box_score_thresh``, ``box_nms_thresh``, ``box_detections_per_img``) are taken. Grey
``[1, H, W]`` input is broadcast to 3 channels by the transform's normalisation, as for
ctlesion's own detectors.
"""

from __future__ import annotations

from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn

from ..config import ModelConfig
from ..data.masks import get_mask_type

__all__ = ["build_stock_maskrcnn"]


def build_stock_maskrcnn(cfg: ModelConfig) -> MaskRCNN:
    """torchvision's ``maskrcnn_resnet50_fpn`` from random weights, carrying ``class_names`` and ``config``."""
    d = cfg.detector
    class_names = get_mask_type(d.mask_type).class_names
    model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=len(class_names) + 1,
        min_size=d.min_size, max_size=d.max_size, image_mean=list(d.image_mean), image_std=list(d.image_std),
        box_score_thresh=d.box_score_thresh, box_nms_thresh=d.box_nms_thresh,
        box_detections_per_img=d.box_detections_per_img,
    )
    model.class_names = tuple(class_names)
    model.config = cfg
    return model
