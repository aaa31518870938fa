"""The mask-feature models (Affinity, Attention, LSTM-1, LSTM-2; spec §6.1, §7.1) assembled:
detector + weight-copied classification branch (box part and mask part) + the family's head."""

from __future__ import annotations

import copy

from torch import nn

from ..errors import ConfigError
from .affinity import AffinityHead
from .attention import AttentionHead, LSTM1Head, LSTM2Head
from .mask_features import MaskFeatureBranch
from .maskrcnn import build_maskrcnn
from .rcnn_classifier import RCNNSliceClassifier

__all__ = ["HEAD_KINDS", "build_mask_feature_model"]

HEAD_KINDS = ("affinity", "attention", "lstm1", "lstm2")


def build_mask_feature_model(cfg):
    """Detector + weight-copied classification branch (box part and mask part) + the
    family's head (spec §6.1, §7.1): the Affinity, Attention, LSTM-1 and LSTM-2 models.

    The classification branch selects ``classifier.rois`` RoIs (beta) from its own box
    predictions over all RPN proposals (class-wise NMS ``roi_nms_thresh``, top beta,
    repetition padding), RoIAligns their decoded boxes at 14x14 and runs the copied mask
    conv + ConvT (+ ReLU): ``[beta, 256, 28, 28]`` for the head.
    """
    c = cfg.classifier
    if c.kind not in HEAD_KINDS:
        raise ConfigError(f"classifier.kind must be one of {HEAD_KINDS} for a mask-feature model, not {c.kind!r}")
    d = cfg.detector
    if len(d.mask_head_layers) != 1 or d.mask_head_layers[0] != d.mask_predictor_width:
        raise ConfigError("mask-feature models need a one-conv mask head as wide as its predictor "
                         f"(e.g. [256] and 256), got {d.mask_head_layers} / {d.mask_predictor_width}")
    detector = build_maskrcnn(cfg)
    heads = detector.roi_heads
    channels = cfg.backbone.out_channels
    cls_branch = nn.ModuleDict({
        "box_head": copy.deepcopy(heads.box_head),
        "box_predictor": copy.deepcopy(heads.box_predictor),
        "mask_branch": MaskFeatureBranch(channels, d.mask_predictor_width, extra_conv=c.extra_conv),
    })
    num_classes = len(c.class_names)
    if c.kind == "affinity":
        head = AffinityHead(d.mask_predictor_width, c.rois, c.affinity_dim, num_classes, c.refinement_blocks,
                            c.shared_refinement)
    else:
        if c.kind == "attention":
            head = AttentionHead(d.mask_predictor_width, c.rois, num_classes, c.refinement_blocks,
                                 shared_refinement=c.shared_refinement)
        else:
            cls = LSTM1Head if c.kind == "lstm1" else LSTM2Head
            head = cls(d.mask_predictor_width, c.rois, c.hidden_size, num_classes, c.refinement_blocks,
                       eq16_linear=c.eq16_linear, shared_refinement=c.shared_refinement)
    model = RCNNSliceClassifier(
        detector, head, c.class_names, cfg, cls_branch=cls_branch, num_rois=c.rois,
        nms_thresh=c.roi_nms_thresh, min_area=c.roi_min_area, uses_mask_features=True,
        roi_order=c.roi_order, segmentation=True, head_batch_stats=c.head_batch_stats,
    )
    model.copy_segmentation_branch()  # the branch starts as the segmentation branch's twin
    return model
