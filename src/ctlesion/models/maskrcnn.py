"""Mask R-CNN lesion segmentation (COVID-CT-Mask-Net stage 1, the SSM detector), spec §3.

The model is torchvision's ``MaskRCNN`` assembled by constructor injection from stock
modules; only the pieces the papers change are passed in:

* anchors: sizes (2, 4, 8, 16, 32) x ratios (0.1, 0.25, 0.5, 1, 1.5, 2) = 30 per
  location, on every feature level;
* box head: ``TwoMLPHead(256*7*7 -> 128 -> 128)`` instead of 1024 wide;
* mask head: one 3x3 conv 256->128 and a 128-wide predictor (lightweight models), or
  torchvision's 4 x 256 head (the CTM ResNet50 model).

Input contract (torchvision's): a list of ``[C, H, W]`` float tensors in ``[0, 1]``;
``C`` may be 1 (grey CT): the transform's per-channel normalisation broadcasts it to
3 channels, as the original code relied on (spec §1.4). Training returns a dict of the
five loss terms; eval returns one dict per image with ``boxes``, ``labels``, ``scores``
and ``masks`` (``[K, 1, H, W]`` probabilities).

Known differences from torchvision 0.3 that we keep (spec §11.4): RPN and RoI box losses
are smooth-L1 with beta 1/9 rather than L1 / beta 1. The inference differences (zero-size
proposals and detections, NMS on logits, logit mask pasting) are configuration
(``DetectorConfig.rpn_min_size`` ... ``mask_paste``, see :mod:`ctlesion.models.rcnn_parts`):
the registry keeps torchvision's behaviour, converted author checkpoints the author's.
The RoI poolers are torchvision's ``MultiScaleRoIAlign`` with, by default, a faster CPU
gradient (:mod:`ctlesion.models.roi_align_grad`; ``detector.roi_align_backward``).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from ..config import DetectorConfig, ModelConfig
from ..data.masks import get_mask_type
from ..errors import ConfigError
from .backbones import build_backbone
from .rcnn_parts import LesionBoxHead, LesionMaskPredictor, LesionRoIHeads, LesionRPN, LesionTransform
from .roi_align_grad import SeparableGradRoIAlign

__all__ = ["LesionMaskRCNN", "build_maskrcnn", "set_detection_settings"]


class LesionMaskRCNN(MaskRCNN):
    """``torchvision`` Mask R-CNN that also carries its class names and config."""

    def __init__(self, backbone: nn.Module, class_names: tuple[str, ...], config: ModelConfig, **kwargs):
        # num_classes stays None: the injected predictors already fix it.
        super().__init__(backbone, num_classes=None, **kwargs)
        self.class_names = tuple(class_names)
        self.config = config


def set_detection_settings(
    model: MaskRCNN, score_thresh: float | None = None, nms_thresh: float | None = None,
    detections_per_img: int | None = None,
) -> None:
    """Change the eval-time detection filter (score threshold, NMS IoU, cap) in place."""
    heads = model.roi_heads
    if score_thresh is not None:
        heads.score_thresh = float(score_thresh)
    if nms_thresh is not None:
        heads.nms_thresh = float(nms_thresh)
    if detections_per_img is not None:
        heads.detections_per_img = int(detections_per_img)


def _heads_kwargs(d: DetectorConfig, num_levels: int, out_channels: int, num_classes: int) -> dict:
    featmaps = [str(i) for i in range(num_levels)]
    anchors = AnchorGenerator(
        sizes=(tuple(d.anchor_sizes),) * num_levels,
        aspect_ratios=(tuple(d.aspect_ratios),) * num_levels,
    )
    num_anchors = len(d.anchor_sizes) * len(d.aspect_ratios)
    pooler = SeparableGradRoIAlign if d.roi_align_backward == "separable" else MultiScaleRoIAlign
    return dict(
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(out_channels, num_anchors),
        box_roi_pool=pooler(featmaps, output_size=7, sampling_ratio=2),
        box_head=LesionBoxHead(out_channels * 7 * 7, d.representation_size),
        box_predictor=FastRCNNPredictor(d.representation_size, num_classes),
        mask_roi_pool=pooler(featmaps, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(out_channels, list(d.mask_head_layers), 1),
        mask_predictor=LesionMaskPredictor(d.mask_head_layers[-1], d.mask_predictor_width, num_classes),
    )


def build_maskrcnn(cfg: ModelConfig) -> LesionMaskRCNN:
    """Build the detector described by ``cfg`` (random heads; backbone per ``cfg.backbone``)."""
    d = cfg.detector
    if not d.mask_head_layers:
        raise ConfigError("detector.mask_head_layers needs at least one conv width")
    class_names = get_mask_type(d.mask_type).class_names
    backbone = build_backbone(cfg.backbone)
    num_levels = 4 if cfg.backbone.fpn == "full" else 1
    model = LesionMaskRCNN(
        backbone,
        class_names,
        cfg,
        min_size=d.min_size,
        max_size=d.max_size,
        image_mean=list(d.image_mean),
        image_std=list(d.image_std),
        rpn_pre_nms_top_n_train=d.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=d.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=d.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=d.rpn_post_nms_top_n_test,
        rpn_nms_thresh=d.rpn_nms_thresh,
        rpn_fg_iou_thresh=d.rpn_fg_iou_thresh,
        rpn_bg_iou_thresh=d.rpn_bg_iou_thresh,
        rpn_batch_size_per_image=d.rpn_batch_size_per_image,
        rpn_positive_fraction=d.rpn_positive_fraction,
        box_score_thresh=d.box_score_thresh,
        box_nms_thresh=d.box_nms_thresh,
        box_detections_per_img=d.box_detections_per_img,
        box_fg_iou_thresh=d.box_fg_iou_thresh,
        box_bg_iou_thresh=d.box_bg_iou_thresh,
        box_batch_size_per_image=d.box_batch_size_per_image,
        box_positive_fraction=d.box_positive_fraction,
        **_heads_kwargs(d, num_levels, cfg.backbone.out_channels, len(class_names) + 1),
    )
    # The original code's behaviours where torchvision differs (rcnn_parts; defaults = torchvision).
    model.rpn = LesionRPN.like(model.rpn, min_size=d.rpn_min_size, nms_score=d.rpn_nms_score)
    model.roi_heads = LesionRoIHeads.like(model.roi_heads, detection_filter=d.detection_filter,
                                          mask_paste=d.mask_paste)
    t = model.transform
    model.transform = LesionTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                      per_image=d.normalization == "per_image",
                                      mask_logit_threshold=d.mask_logit_threshold)
    return model
