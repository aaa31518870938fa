"""Small torchvision subclasses that make the original code's detection behaviours reachable
by configuration (``DetectorConfig``; the registry defaults keep torchvision's behaviour).

The author's code is a 2019 fork of torchvision 0.3. Measured against its forward passes
(``docs/faithfulness.md``), current torchvision differs in four places, each a switch here:

* :class:`LesionRPN` (``rpn_min_size``, ``rpn_nms_score``): torchvision's RPN removes
  proposals with a side under 1e-3 and runs its NMS on sigmoid probabilities; the author's
  RPN keeps zero-size proposals (``min_size`` 0) and ranks by the objectness **logit**, which
  decides the order of two proposals whose logits round to the same probability.
* :class:`LesionRoIHeads` (``detection_filter``): torchvision drops detections with a side
  under 1e-2; the CTM code drops only boxes of zero area (``positive_area``), the SSM,
  Affinity and LSTM code drop none (``none``).
* :class:`LesionRoIHeads` + :class:`LesionTransform` (``mask_paste``): torchvision pastes
  sigmoid probabilities into the image; the CTM code pastes the mask **logits** and
  thresholds them there (``logits``). The pasted ``masks`` are then
  ``sigmoid(pasted_logit - mask_logit_threshold)``, so that 0.5 is exactly the CTM
  decision boundary (pasted logit > threshold) for every consumer that thresholds at 0.5.

Every module keeps its stock state-dict keys, and with the default settings each method
defers to torchvision's own.

Inference speed (``docs/benchmarks.md``): :meth:`LesionRoIHeads.detect` runs the detection
tail from box-head outputs a caller already has (the joint models' classification pass
pools and scores the same proposals), and :func:`binary_masks` makes
:class:`LesionTransform` paste masks straight into boolean frames
(:func:`paste_masks_binary`: the stock values, thresholded box by box, without a float
``[K, H, W]`` image per detection; ``mask_areas``, the pixel count of each, is counted on
the way; with ``frames=False``, for callers that draw and assemble nothing, only counted:
:func:`pasted_mask_areas`), runs the mask branch on channels-last features and
RoI Align in threads (:class:`ThreadedRoIAlign`) or, opt-in, as one gather
(:class:`~ctlesion.models.roi_align_gather.GatherRoIAlign`); :func:`mask_branch_precision` puts only
the mask branch in bfloat16 (opt-in).
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (RoIHeads, expand_boxes, expand_masks, maskrcnn_inference,
                                                    paste_masks_in_image)
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from ..config import INFERENCE_ROI_ALIGN_KERNELS
from ..errors import ConfigError
from .roi_align_gather import GatherRoIAlign, _tracing

__all__ = ["LesionRPN", "LesionRoIHeads", "LesionBoxHead", "LesionMaskPredictor", "LesionTransform", "DETECTION_FILTERS", "keep_detections",
           "paste_masks_binary", "paste_masks_binary_with_areas", "pasted_mask_areas", "binary_masks", "mask_branch_precision", "roi_align_kernel", "check_roi_align_kernel",
           "ThreadedRoIAlign",
           "ROI_ALIGN_KERNELS"]

DETECTION_FILTERS = ("min_side", "positive_area", "none")
# The fast path's RoI Align: one weighted gather (GatherRoIAlign, the default), or
# torchvision's kernel in threads (ThreadedRoIAlign, bitwise stock pooling).
ROI_ALIGN_KERNELS = INFERENCE_ROI_ALIGN_KERNELS
TORCHVISION_RPN_MIN_SIZE = 1e-3
TORCHVISION_DETECTION_MIN_SIDE = 1e-2


class LesionRPN(RegionProposalNetwork):
    """torchvision's RPN with the proposal filter's minimum side and NMS score configurable.

    ``min_size``: proposals with a side below it are removed after clipping (torchvision
    1e-3; the author's code 0, which keeps zero-size proposals). ``nms_score``: what NMS
    and the post-NMS cap rank by, ``probability`` (torchvision) or ``logit`` (author).
    """

    def __init__(self, *args, min_size: float = TORCHVISION_RPN_MIN_SIZE, nms_score: str = "probability",
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if nms_score not in ("probability", "logit"):
            raise ValueError(f"nms_score must be 'probability' or 'logit', not {nms_score!r}")
        self.min_size = float(min_size)
        self.nms_score = nms_score

    @classmethod
    def like(cls, rpn: RegionProposalNetwork, **options) -> LesionRPN:
        """The same RPN (same head, anchors and settings) with ``options`` set."""
        return cls(
            rpn.anchor_generator, rpn.head,
            rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold,
            rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction,
            dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n), rpn.nms_thresh,
            score_thresh=rpn.score_thresh, **options,
        )

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes, num_anchors_per_level):
        if self.nms_score == "probability":
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        # The author's (torchvision 0.3) filter: top-n per level by logit, clip, drop small
        # boxes, NMS per level on the logits, post-NMS cap. Returns logits as scores.
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([
            torch.full((n,), idx, dtype=torch.int64, device=proposals.device)
            for idx, n in enumerate(num_anchors_per_level)
        ]).reshape(1, -1).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=proposals.device)[:, None]
        objectness, levels = objectness[batch_idx, top_n_idx], levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]
        final_boxes, final_scores = [], []
        for boxes, scores, lvl, img_shape in zip(proposals, objectness, levels, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, img_shape)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = box_ops.batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores


def keep_detections(boxes: Tensor, rule: str) -> Tensor:
    """Indices of the candidate boxes ``[n, 4]`` a detection filter keeps.

    ``min_side``: both sides >= 1e-2 (torchvision); ``positive_area``: area > 0 (CTM code);
    ``none``: every box (SSM, Affinity and LSTM code keep zero-size boxes).
    """
    if rule == "min_side":
        return box_ops.remove_small_boxes(boxes, TORCHVISION_DETECTION_MIN_SIDE)
    if rule == "positive_area":
        return torch.where(box_ops.box_area(boxes) > 0)[0]
    if rule == "none":
        return torch.arange(len(boxes), device=boxes.device)
    raise ValueError(f"detection filter must be one of {DETECTION_FILTERS}, not {rule!r}")


class LesionRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` with the detection filter and the mask output configurable.

    ``detection_filter``: see :func:`keep_detections`. ``mask_paste``: ``probabilities``
    (torchvision: ``masks`` = sigmoid of the labelled class at 28x28) or ``logits`` (CTM
    code: the labelled class's raw logits are returned as ``mask_logits``, which
    :class:`LesionTransform` pastes into the image and turns into ``masks``).
    """

    def __init__(self, *args, detection_filter: str = "min_side", mask_paste: str = "probabilities",
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if detection_filter not in DETECTION_FILTERS:
            raise ValueError(f"detection_filter must be one of {DETECTION_FILTERS}, not {detection_filter!r}")
        if mask_paste not in ("probabilities", "logits"):
            raise ValueError(f"mask_paste must be 'probabilities' or 'logits', not {mask_paste!r}")
        self.detection_filter = detection_filter
        self.mask_paste = mask_paste
        # Inference-only settings, not part of the model's configuration or state: the mask
        # branch's (see mask_logits), set by binary_masks() and mask_branch_precision(), and
        # the fast path's RoI Align kernel (binary_masks), set by roi_align_kernel().
        self.mask_channels_last = False
        self.mask_dtype: torch.dtype | None = None
        self.roi_align_kernel = ROI_ALIGN_KERNELS[0]

    @classmethod
    def like(cls, heads: RoIHeads, **options) -> LesionRoIHeads:
        """The same heads (same modules and settings) with ``options`` set."""
        return cls(
            heads.box_roi_pool, heads.box_head, heads.box_predictor,
            heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
            mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head, mask_predictor=heads.mask_predictor,
            **options,
        )

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        if self.detection_filter == "min_side":
            return super().postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        # torchvision's procedure with the small-box filter replaced (keep_detections).
        num_classes = class_logits.shape[-1]
        per_image = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(per_image, 0)
        pred_scores = F.softmax(class_logits, -1).split(per_image, 0)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_shape in zip(pred_boxes, pred_scores, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=class_logits.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            inds = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
            keep = keep_detections(boxes, self.detection_filter)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels

    def detect(self, features, proposals, image_shapes, class_logits: Tensor, box_regression: Tensor):
        """Eval-mode detections from box-head outputs over ``proposals`` the caller already
        computed (the same ops as :meth:`forward` from the box predictor on): postprocess,
        then the mask branch on the detections (``masks`` or, for ``logits``, ``mask_logits``)."""
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        result = [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels)]
        if not self.has_mask():
            return result
        self._attach_masks(features, image_shapes, result)
        return result

    def mask_logits(self, features, boxes: list[Tensor], image_shapes) -> Tensor:
        """The mask branch on ``boxes``: pooled features -> mask head -> predictor, float32
        logits ``[K, classes, 28, 28]``. Stock by default; within :func:`binary_masks` (the
        inference fast path) the pooled features are channels-last, and with
        ``mask_dtype`` = bfloat16 (opt-in ``--precision bf16-mask``) the head runs under
        autocast. Both change only the masks, by rounding (the boxes, scores and labels
        come before this branch)."""
        x = self.mask_roi_pool(features, boxes, image_shapes)
        if self.mask_channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(x.device.type, dtype=self.mask_dtype) if self.mask_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            logits = self.mask_predictor(self.mask_head(x))
        return logits.float().contiguous()

    def _attach_masks(self, features, image_shapes, result: list[dict]) -> None:
        """``masks`` (probabilities, torchvision's ``maskrcnn_inference``) or ``mask_logits``
        (the labelled class's raw logits) on each eval detection dict."""
        boxes = [r["boxes"] for r in result]
        logits = self.mask_logits(features, boxes, image_shapes)
        labels = [r["labels"] for r in result]
        if self.mask_paste == "probabilities":
            for probs, r in zip(maskrcnn_inference(logits, labels), result):
                r["masks"] = probs
            return
        flat = torch.cat(labels)
        picked = logits[torch.arange(len(flat), device=flat.device), flat][:, None]
        for r, m in zip(result, picked.split([len(b) for b in boxes], 0)):
            r["mask_logits"] = m

    def forward(self, features, proposals, image_shapes, targets=None):
        stock_masks = self.mask_paste == "probabilities" and not self.mask_channels_last and self.mask_dtype is None
        if self.training or stock_masks or not self.has_mask():
            return super().forward(features, proposals, image_shapes, targets)
        # torchvision's box inference (mask branch hidden), then the mask branch on the
        # detections (logit masks keep the labelled class's logits unsquashed).
        mask_roi_pool, self.mask_roi_pool = self.mask_roi_pool, None
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            self.mask_roi_pool = mask_roi_pool
        self._attach_masks(features, image_shapes, result)
        return result, losses


class LesionBoxHead(TwoMLPHead):
    """torchvision's ``TwoMLPHead`` (the same layers and state dict) that also takes pooled
    features in channels-last strides without copying them: :class:`GatherRoIAlign` returns
    its ``[R, C, 7, 7]`` that way, and ``flatten`` would transpose all of it (50 MB for the
    1,000 proposals of a 512² slice) for each head that reads it (the joint models have two).

    On such input ``fc6`` runs as what it is, a ``7x7`` convolution with no padding over each
    RoI (its weight viewed as ``[out, C, 7, 7]``, the order ``flatten`` gives), which oneDNN
    does on channels-last input in 18-19 ms against 23-26 ms for MKL's GEMM over the 1,000
    proposals of a 512² slice on the 2-core box (``docs/benchmarks.md``, seventh pass). Below
    :attr:`conv_min_rois` RoIs the convolution's set-up costs more than it saves, and ``fc6``
    reads the features in their memory order (``[R, 7*7*C]``) with its weight's columns
    permuted to match. Both are the same products summed in another order (~1e-6).
    Contiguous input takes torchvision's path."""

    conv_min_rois = 32

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        rois, channels, height, width = x.shape
        weight = self.fc6.weight.view(-1, channels, height, width)
        if rois >= self.conv_min_rois:
            x = F.relu(F.conv2d(x, weight, self.fc6.bias).flatten(1))
        else:
            weight = weight.permute(0, 2, 3, 1).reshape(self.fc6.out_features, -1)
            x = F.relu(F.linear(x.permute(0, 2, 3, 1).reshape(rois, -1), weight, self.fc6.bias))
        return F.relu(self.fc7(x))


class LesionMaskPredictor(MaskRCNNPredictor):
    """torchvision's ``MaskRCNNPredictor`` (the same layers and state dict: a 2x2 stride-2
    transposed convolution, ReLU, a 1x1 convolution to the class logits) with a faster CPU
    inference path for channels-last input (the fast path's mask branch).

    A 2x2 stride-2 transposed convolution writes each input pixel into its own 2x2 output
    block, so on the features as a ``[pixels, C]`` matrix it is one product with the weight
    as ``[C, 2*2*width]``; the ReLU and the 1x1 convolution act pixel by pixel, so they
    follow on that product directly, and only the ``classes``-channel logits are shuffled
    into the 2x-upsampled frame (not the ``width``-channel activations). Done in blocks of
    :attr:`block_rows` pixels, which keeps the intermediate in cache: on 128 RoIs at 14x14
    about half the time of oneDNN's transposed convolution (``docs/benchmarks.md``, fifth
    pass). The logits differ by float32 summation order (~1e-5, tested). Training, autograd,
    autocast, other dtypes and devices and contiguous input take torchvision's path."""

    block_rows = 1024

    def _fast(self, x: Tensor) -> bool:
        up = self.conv5_mask
        return (x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or up.weight.requires_grad))
                and not torch.is_autocast_enabled("cpu") and not _tracing()
                and up.kernel_size == (2, 2) and up.stride == (2, 2) and up.padding == (0, 0)
                and up.output_padding == (0, 0) and up.dilation == (1, 1) and up.groups == 1
                and up.bias is not None and self.mask_fcn_logits.bias is not None)

    def forward(self, x: Tensor) -> Tensor:
        if not self._fast(x):
            return super().forward(x)
        up, logits = self.conv5_mask, self.mask_fcn_logits
        rois, channels, height, width = x.shape
        inner, classes = up.out_channels, logits.out_channels
        weight = up.weight.permute(0, 2, 3, 1).reshape(channels, 4 * inner)        # [C, (a, b, width)]
        bias = up.bias.repeat(4)
        proj = logits.weight.view(classes, inner).t()
        pixels = x.permute(0, 2, 3, 1).reshape(-1, channels)                      # a view: channels-last
        out = x.new_empty((len(pixels) * 4, classes))
        step = self.block_rows
        for s in range(0, len(pixels), step):
            hidden = torch.addmm(bias, pixels[s:s + step], weight).view(-1, inner).relu_()
            torch.addmm(logits.bias, hidden, proj, out=out[4 * s:4 * (s + step)])
        # [(r, i, j, a, b), k] -> [r, k, 2i + a, 2j + b]
        return (out.view(rois, height, width, 2, 2, classes).permute(0, 5, 1, 3, 2, 4)
                .reshape(rois, classes, 2 * height, 2 * width))


class LesionTransform(GeneralizedRCNNTransform):
    """torchvision's transform with two options.

    ``per_image``: each image minus its own mean, divided by its own std instead of fixed
    constants (the Affinity/LSTM code, spec §1.4; grey is replicated to 3 channels first, so
    every channel gets the same statistics). ``mask_logit_threshold``: when the heads return
    ``mask_logits`` (CTM code), they are pasted into the image as logits and ``masks``
    becomes ``sigmoid(pasted - threshold)``, nudged so that ``masks > 0.5`` holds exactly
    where ``pasted > threshold``.
    """

    def __init__(self, *args, per_image: bool = False, mask_logit_threshold: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.per_image = per_image
        self.mask_logit_threshold = float(mask_logit_threshold)
        # Set by binary_masks(): eval ``masks`` come out as booleans ``stock masks > this``, and
        # without frames only their pixel counts (``mask_areas``, no ``masks``).
        self.binary_mask_threshold: float | None = None
        self.mask_frames = True

    def normalize(self, image: Tensor) -> Tensor:
        if not self.per_image:
            return super().normalize(image)
        channels = image.expand(3, -1, -1) if image.shape[0] == 1 else image
        # Channel by channel over the 2-D plane, as the author's normalize_img (unbiased std):
        # the same reduction, so the same float32 result. A constant slice stays finite.
        return torch.stack([(c - c.mean()) / c.std().clamp_min(1e-6) for c in channels])

    def postprocess(self, result, image_shapes, original_image_sizes):
        binary = None if self.training else self.binary_mask_threshold
        local = [pred.pop("masks", None) for pred in result] if binary is not None else [None] * len(result)
        result = super().postprocess(result, image_shapes, original_image_sizes)
        if self.training:
            return result
        for pred, size, probs in zip(result, original_image_sizes, local):
            if binary is not None and (probs is not None or "mask_logits" in pred):
                self._paste_binary(pred, probs, size, binary)
            elif "mask_logits" in pred:
                pasted = paste_masks_in_image(pred.pop("mask_logits"), pred["boxes"], size)
                pred["masks"] = logit_mask_scores(pasted, self.mask_logit_threshold)
        return result

    def _paste_binary(self, pred: dict, probs: Tensor | None, size: tuple[int, int], threshold: float) -> None:
        """``masks`` (boolean frames) and ``mask_areas`` of one eval prediction from its
        box-local mask probabilities (or, without them, its ``mask_logits``); only
        ``mask_areas`` when :attr:`mask_frames` is off."""
        masks, logit_threshold = probs, None
        if masks is None:
            masks, logit_threshold = pred.pop("mask_logits"), self.mask_logit_threshold
        if self.mask_frames:
            pred["masks"], pred["mask_areas"] = paste_masks_binary_with_areas(
                masks, pred["boxes"], size, threshold, logit_threshold=logit_threshold)
        else:
            pred["mask_areas"] = pasted_mask_areas(masks, pred["boxes"], size, threshold,
                                                   logit_threshold=logit_threshold)


def logit_mask_scores(pasted_logits: Tensor, threshold: float) -> Tensor:
    """``sigmoid(pasted - threshold)`` in [0, 1], with ``> 0.5`` exactly where ``pasted > threshold``
    (float32 sigmoid rounds to 0.5 for tiny positive arguments)."""
    above = pasted_logits > threshold
    scores = torch.sigmoid(pasted_logits - threshold)
    # float32 nextafter(0.5, 1) = 0.5 + 2**-24, a constant (ONNX has no nextafter).
    return torch.where(above, scores.clamp_min(0.5 + 2.0 ** -24), scores.clamp_max(0.5))


def paste_masks_binary(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float, *,
                       logit_threshold: float | None = None, padding: int = 1) -> Tensor:
    """Box-local masks ``[K, 1, M, M]`` pasted into boolean frames ``[K, 1, H, W]``.

    Exactly ``paste_masks_in_image(masks, boxes, image_size) > threshold`` (torchvision's
    padding, box expansion, integer box and bilinear resize, mask by mask), or with
    ``logit_threshold`` ``logit_mask_scores(pasted, logit_threshold) > threshold`` (the CTM
    code's logit pasting), but each mask is compared inside its own box and written as
    booleans: no float frame per detection, one host sync for all boxes.
    """
    return paste_masks_binary_with_areas(masks, boxes, image_size, threshold, logit_threshold=logit_threshold,
                                         padding=padding)[0]


def _pasted_background(masks: Tensor, threshold: float, logit_threshold: float | None) -> bool:
    """What ``paste_masks_in_image`` leaves outside every box (0), thresholded as the masks are."""
    zero = masks.new_zeros(())
    return bool((logit_mask_scores(zero, logit_threshold) if logit_threshold is not None else zero) > threshold)


def _pasted_regions(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float,
                    logit_threshold: float | None, padding: int):
    """Per box, ``(y0, y1, x0, x1, inside)``: the part of the frame the box covers and its
    thresholded pasted values there, or ``None`` where the box covers none of the image;
    torchvision's padding, box expansion, integer box and bilinear resize, mask by mask."""
    height, width = image_size
    padded, scale = expand_masks(masks, padding=padding)
    int_boxes = expand_boxes(boxes, scale).to(dtype=torch.int64).tolist()
    for mask, (x0b, y0b, x1b, y1b) in zip(padded, int_boxes):
        w, h = max(x1b - x0b + 1, 1), max(y1b - y0b + 1, 1)
        resized = F.interpolate(mask[0].expand((1, 1, -1, -1)), size=(h, w), mode="bilinear",
                                align_corners=False)[0][0]
        x0, x1, y0, y1 = max(x0b, 0), min(x1b + 1, width), max(y0b, 0), min(y1b + 1, height)
        if x1 <= x0 or y1 <= y0:
            yield None
            continue
        region = resized[y0 - y0b:y1 - y0b, x0 - x0b:x1 - x0b]
        if logit_threshold is not None:
            region = logit_mask_scores(region, logit_threshold)
        yield y0, y1, x0, x1, region > threshold


def _areas(regions, image_size: tuple[int, int], background: bool, like: Tensor) -> Tensor:
    """The pixel count of each pasted frame (int64 ``[K]``) from its box region (see
    :func:`_pasted_regions`): the region's pixels above the threshold, plus the frame outside
    it where the background is above it too."""
    height, width = image_size
    counts = [like.new_full((), height * width if background else 0, dtype=torch.int64) if r is None
              else r[4].sum() + (height * width - r[4].numel() if background else 0) for r in regions]
    return torch.stack(counts) if counts else torch.zeros(0, dtype=torch.int64, device=like.device)


def paste_masks_binary_with_areas(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float, *,
                                  logit_threshold: float | None = None, padding: int = 1) -> tuple[Tensor, Tensor]:
    """:func:`paste_masks_binary` and the pixel count of each pasted frame (int64 ``[K]``),
    counted inside each box while pasting (the frame outside the box is all background),
    so nothing has to sum the ``K`` full frames again."""
    background = _pasted_background(masks, threshold, logit_threshold)
    out = torch.full((len(masks), *image_size), background, dtype=torch.bool, device=masks.device)
    regions = list(_pasted_regions(masks, boxes, image_size, threshold, logit_threshold, padding))
    for frame, region in zip(out, regions):
        if region is not None:
            y0, y1, x0, x1, inside = region
            frame[y0:y1, x0:x1] = inside
    return out[:, None], _areas(regions, image_size, background, masks)


def pasted_mask_areas(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float, *,
                      logit_threshold: float | None = None, padding: int = 1) -> Tensor:
    """The areas of :func:`paste_masks_binary_with_areas` (int64 ``[K]``) without the frames:
    each mask is pasted and thresholded inside its own box only. For consumers that need the
    areas and not the masks (``predict`` with no overlays and no volume outputs: the
    ``[K, H, W]`` frames of a slice with 128 detections at 512² are 32 MiB to allocate and
    fill)."""
    return _areas(_pasted_regions(masks, boxes, image_size, threshold, logit_threshold, padding), image_size,
                  _pasted_background(masks, threshold, logit_threshold), masks)


# RoI Align parts smaller than this are not worth a thread hand-off.
MIN_BOXES_PER_THREAD = 32
_EXECUTOR_LOCK = threading.Lock()
_EXECUTORS: dict[int, ThreadPoolExecutor] = {}


def roi_parts(count: int, workers: int) -> int:
    """How many parts to split ``count`` RoIs into for ``workers`` threads (at least
    :data:`MIN_BOXES_PER_THREAD` per part; 1: no threads)."""
    return min(workers, max(count // MIN_BOXES_PER_THREAD, 1))


def _executor(workers: int) -> ThreadPoolExecutor:
    with _EXECUTOR_LOCK:
        if workers not in _EXECUTORS:
            _EXECUTORS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="ctlesion-roi-align")
        return _EXECUTORS[workers]


class ThreadedRoIAlign(nn.Module):
    """``pool`` (torchvision's :class:`MultiScaleRoIAlign`) run over parts of the boxes in
    parallel threads, for CPU inference.

    torchvision's CPU RoI Align kernel runs on one core (it ignores ``torch.set_num_threads``)
    and releases the GIL, so on a multi-core CPU the 1,000 proposals of an R-CNN forward
    can be pooled by ``workers`` threads at once. Each RoI's output depends only on its own
    box and image, and the parts are joined in the original order, so the result equals one
    ``pool`` call bitwise (tested). Every part is pooled with the whole batch's
    ``image_shapes``, which is all ``pool`` uses them for (the feature scales). Falls back to
    ``pool`` itself off the CPU, with one worker or with few boxes. No parameters: the state
    dict is unchanged.
    """

    def __init__(self, pool: MultiScaleRoIAlign, workers: int) -> None:
        super().__init__()
        self.pool = pool
        self.workers = int(workers)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes) -> Tensor:
        on_cpu = next(iter(features.values())).device.type == "cpu"
        # Autocast is per thread: under it (opt-in bf16) keep the one stock call.
        threaded = on_cpu and self.workers > 1 and not torch.is_autocast_enabled("cpu")
        jobs = []
        for i, image_boxes in enumerate(boxes if threaded else []):
            image_features = {k: v[i:i + 1] for k, v in features.items()}
            parts = roi_parts(len(image_boxes), self.workers)
            jobs += [(image_features, [part]) for part in image_boxes.tensor_split(parts) if len(part)]
        if len(jobs) < 2:
            return self.pool(features, boxes, image_shapes)
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()   # per thread too

        def run(job):
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return self.pool(job[0], job[1], image_shapes)

        return torch.cat(list(_executor(self.workers).map(run, jobs)))


def _fast_pools(heads: RoIHeads, workers: int, roi_align: str) -> list[tuple[str, nn.Module]]:
    """Swap ``heads``' RoI Align modules for the fast path's: :class:`GatherRoIAlign`
    (``roi_align="gather"``) falling back to, or only (``"torchvision"``),
    :class:`ThreadedRoIAlign`. Returns what to put back."""
    saved = []
    for name in ("box_roi_pool", "mask_roi_pool"):
        pool = getattr(heads, name, None)
        if isinstance(pool, MultiScaleRoIAlign):
            saved.append((name, pool))
            fast = ThreadedRoIAlign(pool, workers)
            setattr(heads, name, GatherRoIAlign(pool, fast) if roi_align == "gather" else fast)
    return saved


@contextlib.contextmanager
def binary_masks(model, threshold: float, roi_align: str | None = None, frames: bool = True) -> Iterator[None]:
    """The inference fast path. Within the block, the eval ``masks`` of ``model`` (a Mask
    R-CNN with a :class:`LesionTransform`, or a model holding one as ``detector``) are
    boolean ``[K, 1, H, W]``: the pasted masks ``> threshold``, pasted box by box
    (:func:`paste_masks_binary`), with their pixel counts as ``mask_areas`` (int64 ``[K]``);
    with ``frames=False`` a prediction has only ``mask_areas`` (no ``masks``:
    :func:`pasted_mask_areas`), for callers that need no mask images;
    the mask branch runs on channels-last features (:meth:`LesionRoIHeads.mask_logits`:
    oneDNN's faster convolution layout, and :class:`LesionMaskPredictor`'s blocked GEMMs);
    and RoI Align is ``roi_align`` (``None``: the heads' ``roi_align_kernel``, which
    :func:`roi_align_kernel` sets; ``"gather"`` unless set): ``"gather"``, one weighted
    gather on all threads (:class:`~ctlesion.models.roi_align_gather.GatherRoIAlign`, read
    by :class:`LesionBoxHead` without a transpose), or ``"torchvision"``, torchvision's
    kernel in ``torch.get_num_threads()`` threads (:class:`ThreadedRoIAlign`, bitwise the
    stock pooling). With the gather, box features, and so boxes, scores and class logits,
    change by float32 summation order (~1e-6; the issue's bound of 1e-4 is tested); with
    ``"torchvision"`` the boxes, scores and labels are bitwise stock (the author-equivalence
    tests hold at rtol 1e-5 with it). Mask logits change by rounding (~1e-5) either way.
    Other models are left as they are."""
    if roi_align is not None:
        check_roi_align_kernel(roi_align)
    det = getattr(model, "detector", model)
    transform = getattr(det, "transform", None)
    if not isinstance(transform, LesionTransform):
        yield
        return
    heads = getattr(det, "roi_heads", None)
    heads = heads if isinstance(heads, LesionRoIHeads) else None
    saved, transform.binary_mask_threshold = transform.binary_mask_threshold, float(threshold)
    saved_frames, transform.mask_frames = transform.mask_frames, bool(frames)
    saved_layout = heads.mask_channels_last if heads is not None else None
    pools = []
    if heads is not None:
        heads.mask_channels_last = True
        pools = _fast_pools(heads, torch.get_num_threads(), roi_align or heads.roi_align_kernel)
    try:
        yield
    finally:
        transform.binary_mask_threshold = saved
        transform.mask_frames = saved_frames
        if heads is not None:
            heads.mask_channels_last = saved_layout
            for name, pool in pools:
                setattr(heads, name, pool)


def check_roi_align_kernel(kernel: str) -> None:
    """A :class:`~ctlesion.errors.ConfigError` unless ``kernel`` is one of
    :data:`ROI_ALIGN_KERNELS`."""
    if kernel not in ROI_ALIGN_KERNELS:
        raise ConfigError(f"roi_align must be one of {ROI_ALIGN_KERNELS}, not {kernel!r}")


@contextlib.contextmanager
def _heads_setting(model, name: str, value) -> Iterator[None]:
    """Within the block, the inference-only setting ``name`` of ``model``'s
    :class:`LesionRoIHeads` (its own, or its ``detector``'s) is ``value``; restored after.
    Other models are left as they are."""
    heads = getattr(getattr(model, "detector", model), "roi_heads", None)
    if not isinstance(heads, LesionRoIHeads):
        yield
        return
    saved = getattr(heads, name)
    setattr(heads, name, value)
    try:
        yield
    finally:
        setattr(heads, name, saved)


def roi_align_kernel(model, kernel: str) -> contextlib.AbstractContextManager[None]:
    """Within the block, the fast path (:func:`binary_masks`) of ``model`` (a Mask R-CNN
    with :class:`LesionRoIHeads`, or a model holding one as ``detector``) pools with
    ``kernel`` (one of :data:`ROI_ALIGN_KERNELS`); :func:`binary_masks` reads it when it is
    entered, so enter this first. Other models are left as they are."""
    check_roi_align_kernel(kernel)
    return _heads_setting(model, "roi_align_kernel", kernel)


def mask_branch_precision(model, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    """Within the block, the mask branch of ``model`` (a Mask R-CNN with
    :class:`LesionRoIHeads`, or a model holding one as ``detector``) runs under autocast to
    ``dtype`` (``None``: float32); the rest of the model is untouched. Other models are
    left as they are."""
    return _heads_setting(model, "mask_dtype", dtype)
