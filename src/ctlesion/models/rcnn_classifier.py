"""Detector-based slice classifiers: the machinery COVID-CT-Mask-Net, the Single-Shot
Model and the mask-feature models share (spec §4-§7, §11.5-11.6).

An :class:`RCNNSliceClassifier` holds

* ``detector``: a stock torchvision Mask R-CNN (:class:`~ctlesion.models.maskrcnn.LesionMaskRCNN`;
  CTM drops its mask branch, which makes it a Faster R-CNN);
* ``cls_branch``: ``None`` (the segmentation RoI branch also builds the classification
  batch) or a second, weight-copied branch (``box_head``, ``box_predictor`` and, for the
  mask-feature models, ``mask_branch``);
* ``head``: module S, or an Affinity / Attention / LSTM head.

The classification path (``forward``) runs backbone -> RPN (test settings) -> the branch's
box head on every proposal -> :func:`~ctlesion.models.roi_batch.build_roi_batch` -> head.
Proposals are detached (torchvision's RPN does so), so the image loss never reaches the RPN.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .classifier import ClassifierOutput, SliceClassifier, bn_parameter_names
from .roi_batch import RoIBatch, build_roi_batch, distance_order

__all__ = ["RCNNSliceClassifier", "one_hot_bce", "ROI_ORDERS"]

# RoI order for the head: confidence rank, or distance of the top-left corner from the
# image origin (stable, exact ties), or the LSTM code's float32 expression and unstable sort.
ROI_ORDERS = ("confidence", "distance", "distance_code")


def one_hot_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-class binary cross-entropy on one-hot labels, mean over batch and classes
    (spec §4.4: the code's loss; paper 002's Eq. 2 keeps only the positive term)."""
    target = torch.nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)


class RCNNSliceClassifier(SliceClassifier):
    """Detector + (optional second RoI branch) + image head.

    Args:
        detector: a torchvision ``MaskRCNN``/``FasterRCNN`` (ours: ``LesionMaskRCNN``).
        head: maps one image's RoIs to ``(logits [C], roi_weights [N] or None)``; called as
            ``head(batch)`` for box-row heads, ``head(mask_features)`` when
            ``uses_mask_features`` (``[N, 256, 28, 28]``).
        class_names: slice classes, in logit order.
        config: the resolved ``ModelConfig``.
        cls_branch: ``None`` or a ``ModuleDict`` with ``box_head``, ``box_predictor`` (and
            ``mask_branch`` for mask-feature heads); its weights are copied from the
            segmentation branch by :meth:`copy_segmentation_branch`.
        num_rois, nms_thresh, min_area: the RoI batch (spec §4.2).
        roi_order: ``confidence``, ``distance`` (top-left corner from the image origin,
            spec §7.1) or ``distance_code`` (the same, the LSTM code's way), applied after selection.
        segmentation: whether the detector is trained jointly (SSM, mask-feature models).
    """

    def __init__(
        self, detector: nn.Module, head: nn.Module, class_names, config, *,
        cls_branch: nn.ModuleDict | None = None, num_rois: int = 128, nms_thresh: float = 0.75,
        min_area: float = 1e-5, uses_mask_features: bool = False, roi_order: str = "confidence",
        segmentation: bool = True, head_batch_stats: bool = False,
    ) -> None:
        super().__init__(class_names, config)
        if roi_order not in ROI_ORDERS:
            raise ConfigError(f"roi_order must be one of {ROI_ORDERS}, not {roi_order!r}")
        if uses_mask_features and (cls_branch is None or "mask_branch" not in cls_branch):
            raise ValueError("a mask-feature head needs a classification branch with a mask_branch")
        self.detector = detector
        self.cls_branch = cls_branch
        self.head = head
        self.num_rois = int(num_rois)
        self.nms_thresh = float(nms_thresh)
        self.min_area = float(min_area)
        self.uses_mask_features = uses_mask_features
        self.roi_order = roi_order
        self.has_segmentation = segmentation
        self.head_batch_stats = head_batch_stats
        # Padding run lengths are random (faithful, spec §10 #29); evaluation seeds this.
        self.padding_generator: torch.Generator | None = None

    # ------------------------------------------------------------------ parts

    @property
    def lesion_class_names(self) -> tuple[str, ...]:
        return tuple(getattr(self.detector, "class_names", ()))

    def _branch(self) -> tuple[nn.Module, nn.Module]:
        if self.cls_branch is not None:
            return self.cls_branch["box_head"], self.cls_branch["box_predictor"]
        heads = self.detector.roi_heads
        return heads.box_head, heads.box_predictor

    def parameter_groups(self) -> dict[str, list[str]]:
        names = [n for n, _ in self.named_parameters()]
        every_bn, code_bn = bn_parameter_names(self.detector.backbone, "detector.backbone")
        return {
            "head": [n for n in names if n.startswith("head.")],
            "backbone": [n for n in names if n.startswith("detector.backbone.")],
            "backbone_bn": every_bn,
            "backbone_bn_code": code_bn,
        }

    @torch.no_grad()
    def copy_segmentation_branch(self) -> bool:
        """Copy the segmentation RoI branch into the classification branch, in place
        (box head, box predictor and, for mask-feature models, mask conv and ConvT)."""
        if self.cls_branch is None:
            return False
        heads = self.detector.roi_heads
        self.cls_branch["box_head"].load_state_dict(heads.box_head.state_dict())
        self.cls_branch["box_predictor"].load_state_dict(heads.box_predictor.state_dict())
        if "mask_branch" in self.cls_branch:
            self.cls_branch["mask_branch"].copy_from(heads.mask_head, heads.mask_predictor)
        return True

    # ------------------------------------------------------------------ modes

    def classification_mode(self, cls_bn: str = "eval") -> None:
        if cls_bn not in ("eval", "batch"):
            raise ConfigError(f"train.cls_bn must be 'eval' or 'batch', not {cls_bn!r}")
        self.eval()
        self.head.train()
        if cls_bn == "batch":
            self.detector.backbone.train()

    @contextlib.contextmanager
    def inference(self, cls_bn: str = "eval") -> Iterator[None]:
        """Modes for scoring and prediction, restored afterwards.

        Everything is in eval mode, except, where the original did so at test time, the
        head (``head_batch_stats``: its BatchNorm normalises over the image's RoIs, spec
        §6.2) and the backbone (``cls_bn="batch"``, spec §7.5). Those BatchNorms use batch
        statistics but with momentum 0, so scoring never changes the stored statistics.
        """
        was_training = {m: m.training for m in self.modules()}
        self.eval()
        batch_stat_modules = []
        if self.head_batch_stats:
            batch_stat_modules.append(self.head)
        if cls_bn == "batch":
            batch_stat_modules.append(self.detector.backbone)
        saved = {}
        for module in batch_stat_modules:
            module.train()
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    tracked = None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
                    saved[m] = (m.momentum, tracked)
                    m.momentum = 0.0
        try:
            yield
        finally:
            for m, (momentum, tracked) in saved.items():
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)  # train mode counts batches even at momentum 0
            for m, training in was_training.items():
                m.training = training

    # ------------------------------------------------------------------ forward

    def segmentation_losses(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        """The stock Mask R-CNN training forward (segmentation branch only)."""
        if not self.has_segmentation:
            raise NotImplementedError(f"{type(self).__name__} ({self.config.name}) is not trained on segmentation")
        return self.detector(images, targets)

    def roi_batches(self, images: list[Tensor]):
        """Backbone, RPN and the branch's box head: per image the :class:`RoIBatch`, plus the
        transformed image list and features (for mask features and detections)."""
        return self._roi_pass(images)[:5]

    def _roi_pass(self, images: list[Tensor]):
        """:meth:`roi_batches`, plus the pooled box features and the branch's box outputs
        (so the detections can reuse them instead of pooling the proposals again)."""
        det = self.detector
        if det.rpn.training:
            raise RuntimeError(
                "the classification path runs the RPN with its test settings: call "
                "model.classification_mode() or use `with model.inference():` first"
            )
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, _ = det.transform(images)
        features = det.backbone(image_list.tensors)
        proposals, _ = det.rpn(image_list, features)
        box_head, box_predictor = self._branch()
        box_features = det.roi_heads.box_roi_pool(features, proposals, image_list.image_sizes)
        class_logits, box_regression = box_predictor(box_head(box_features))
        batches: list[RoIBatch] = []
        start = 0
        for props, size in zip(proposals, image_list.image_sizes):
            stop = start + len(props)
            batches.append(build_roi_batch(
                props, class_logits[start:stop], box_regression[start:stop], size,
                num_rois=self.num_rois, nms_thresh=self.nms_thresh, min_area=self.min_area,
                box_coder=det.roi_heads.box_coder, generator=self.padding_generator,
            ))
            start = stop
        return batches, image_list, features, proposals, original_sizes, box_features, (class_logits, box_regression)

    def _order(self, batch: RoIBatch) -> RoIBatch:
        if self.roi_order == "confidence":
            return batch
        idx = distance_order(batch.boxes, code=self.roi_order == "distance_code")
        return RoIBatch(batch.rows[idx], batch.boxes[idx], batch.labels[idx], batch.num_survivors)

    def forward(self, images: list[Tensor], with_detections: bool = False) -> ClassifierOutput:
        """Classify a batch of slices; ``with_detections`` also runs the segmentation
        branch's stock inference (eval mode only) and returns its detections."""
        batches, image_list, features, proposals, original_sizes, box_features, box_outputs = self._roi_pass(images)
        logits, rois = [], []
        for i, batch in enumerate(batches):
            batch = self._order(batch)
            if self.uses_mask_features:
                pooled = self.detector.roi_heads.mask_roi_pool(
                    {k: v[i:i + 1] for k, v in features.items()}, [batch.boxes], [image_list.image_sizes[i]])
                image_logits, weights = self.head(self.cls_branch["mask_branch"](pooled))
            else:
                image_logits, weights = self.head(batch)
            logits.append(image_logits)
            scale = self.detector.transform.postprocess(
                [{"boxes": batch.boxes.detach()}], [image_list.image_sizes[i]], [original_sizes[i]])[0]
            rois.append({
                "boxes": scale["boxes"], "scores": batch.scores.detach(), "labels": batch.labels,
                "weights": None if weights is None else weights.detach(),
                "num_survivors": batch.num_survivors,
            })
        detections = None
        if with_detections and not self.training and self.detector.roi_heads.has_mask():
            dets = self._detections(features, proposals, image_list.image_sizes, box_features, box_outputs)
            detections = self.detector.transform.postprocess(dets, image_list.image_sizes, original_sizes)
        return ClassifierOutput(logits=torch.stack(logits), detections=detections, rois=rois)

    def _detections(self, features, proposals, image_sizes, pooled: Tensor, box_outputs) -> list[dict]:
        """The segmentation branch's stock eval detections over the same proposals. The RoI
        pooling is shared with the classification pass, and with a single branch its box
        outputs too, so nothing runs twice (same values as ``roi_heads(features, proposals)``)."""
        heads = self.detector.roi_heads
        if not hasattr(heads, "detect"):       # a plain torchvision RoIHeads
            return heads(features, proposals, image_sizes)[0]
        if self.cls_branch is not None:        # the segmentation branch's own box head
            box_outputs = heads.box_predictor(heads.box_head(pooled))
        return heads.detect(features, proposals, image_sizes, *box_outputs)
