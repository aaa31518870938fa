"""COVID-CT-Mask-Net stage 2 (paper 002, spec §4): module S over the ranked RoI batch.

Stage 1 is the segmentation Mask R-CNN (:mod:`ctlesion.models.maskrcnn`). Stage 2 keeps its
backbone, RPN and box branch, drops the mask branch (a Faster R-CNN), and adds module S,
which reads the detector's top-N (score, class-specific deltas) rows and outputs three
logits. The detector is always in inference mode: RPN test settings, no detection losses.
Training modes (``train.update_rule``): ``s_only``, ``s_bn`` (S + backbone BatchNorm
affine, running statistics frozen) and ``full``; see :mod:`ctlesion.engine.steps`.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ModelConfig
from .maskrcnn import build_maskrcnn
from .rcnn_classifier import RCNNSliceClassifier
from .roi_batch import RoIBatch

__all__ = ["ModuleS", "build_ctm"]


class ModuleS(nn.Module):
    """Module S (spec §4.3): flatten the ``N x 5`` batch row-major, then
    ``Linear(5N, F) -> ReLU -> Linear(F, F) -> ReLU -> Linear(F, C)``.

    Weights Kaiming-normal (fan_out, relu), biases PyTorch's default, as the original.
    With N=128, F=512 it has 0.592M parameters; N=256, F=1024 gives 2.36M.
    """

    def __init__(self, num_rois: int = 128, features: int = 512, num_classes: int = 3) -> None:
        super().__init__()
        self.num_rois = num_rois
        self.layers = nn.Sequential(
            nn.Linear(5 * num_rois, features), nn.ReLU(inplace=True),
            nn.Linear(features, features), nn.ReLU(inplace=True),
            nn.Linear(features, num_classes),
        )
        for m in self.layers:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, batch: RoIBatch | Tensor) -> tuple[Tensor, None]:
        rows = batch.rows if isinstance(batch, RoIBatch) else batch
        if rows.shape != (self.num_rois, 5):
            raise ValueError(f"module S expects a [{self.num_rois}, 5] RoI batch, got {tuple(rows.shape)}")
        return self.layers(rows.reshape(-1)), None


def build_ctm(cfg: ModelConfig) -> RCNNSliceClassifier:
    """COVID-CT-Mask-Net classifier: the segmentation detector without its mask branch + S."""
    c = cfg.classifier
    detector = build_maskrcnn(cfg)
    heads = detector.roi_heads
    heads.mask_roi_pool = heads.mask_head = heads.mask_predictor = None
    head = ModuleS(c.rois, c.s_features, len(c.class_names))
    return RCNNSliceClassifier(
        detector, head, c.class_names, cfg, num_rois=c.rois, nms_thresh=c.roi_nms_thresh,
        min_area=c.roi_min_area, segmentation=False,
    )
