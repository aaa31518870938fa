"""Building blocks shared by the mask-feature classifiers (Affinity, Attention, LSTM-1/2).

Spec §6.1, §6.2 and §7.1:

* :class:`MaskFeatureBranch`: the mask part of the classification RoI branch. It turns
  14x14 RoIAligned features ``[beta, C, 14, 14]`` into mask features
  ``[beta, width, 28, 28]`` (3x3 conv + ReLU, ConvTranspose 2x2/2, ReLU). Its two layers
  are weight-copied from the segmentation branch (:meth:`MaskFeatureBranch.copy_from`).
  ``extra_conv=True`` inserts the original code's frozen, random 3x3 ``conv_reduce``
  before the last ReLU (spec §10 #16).
* :class:`Refinement` (N x :class:`RefinementBlock`) and :class:`Vectorisation`: the
  front of the affinity/attention layer, ``[beta, C, 28, 28] -> [beta, C]`` (spec §6.2
  steps 1-2).
* :class:`ImageClassifier`: Linear(C->128) -> ReLU -> Linear(128->128) -> ReLU ->
  Linear(128->K) (spec §6.2 step 5).
* :class:`MaskFeatureHead`: the base class of the heads (``affinity.py``,
  ``attention.py``): ``forward(R) = from_vectors(features(R))``.
* :func:`init_layer`: the original code's init of the affinity/attention layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MASK_FEATURE_SIZE",
    "LAYER_BIAS",
    "MaskFeatureBranch",
    "RefinementBlock",
    "Refinement",
    "Vectorisation",
    "ImageClassifier",
    "MaskFeatureHead",
    "init_layer",
]

MASK_FEATURE_SIZE = 28   # mask features (and the vectorisation input) are 28 x 28
LAYER_BIAS = 0.01        # every bias in the affinity / attention layer (original code)


def init_layer(module: nn.Module) -> None:
    """Original-code init of an affinity/attention layer (spec §6.2, §7.4).

    Weights of every ``Conv2d`` / ``ConvTranspose2d`` under ``module``: Kaiming-normal
    (fan_out, ReLU gain). Every parameter named ``bias`` or ``bias_*`` (conv, BatchNorm,
    LSTM, Linear): 0.01. BatchNorm, LSTM and Linear weights keep the PyTorch defaults;
    bare ``nn.Parameter`` tensors (the affinity matrix/vector) are not touched.
    """
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            for name, p in mod.named_parameters(recurse=False):
                if name == "bias" or name.startswith("bias_"):
                    nn.init.constant_(p, LAYER_BIAS)


# --------------------------------------------------------------------------------------
# Classification branch, mask part (spec §6.1)
# --------------------------------------------------------------------------------------


class MaskFeatureBranch(nn.Module):
    """MaskHead(C) + MaskPrediction(C): ``[beta, C, 14, 14] -> [beta, width, 28, 28]``.

    ``mask_fcn1``: Conv2d(C -> width, 3x3, pad 1) + ReLU, the same shape as the single conv
    of torchvision ``MaskRCNNHeads(C, [width], 1)`` (there at ``mask_head[0][0]``).
    ``conv5_mask``: ConvTranspose2d(width -> width, 2, stride 2), same name and shape as in
    torchvision ``MaskRCNNPredictor(width, width, K)``. Then ReLU. Both are meant to be
    copied from the segmentation branch (:meth:`copy_from`), not trained.

    ``extra_conv=True`` (code-faithful, spec §6.1 / §10 #16) adds ``conv_reduce``,
    Conv2d(width -> width, 3x3, pad 1), between ``conv5_mask`` and the ReLU. It is never
    copied nor trained: a fixed random projection (Kaiming-normal fan_out weights, bias
    0.01 as in the original code, ``requires_grad=False``). ``conv_reduce`` is ``None``
    by default (paper).
    """

    def __init__(self, in_channels: int = 256, width: int = 256, extra_conv: bool = False) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.width = int(width)
        self.mask_fcn1 = nn.Conv2d(self.in_channels, self.width, 3, stride=1, padding=1)
        self.conv5_mask = nn.ConvTranspose2d(self.width, self.width, 2, stride=2, padding=0)
        # torchvision's init of the two layers (they are overwritten by copy_from anyway)
        nn.init.kaiming_normal_(self.mask_fcn1.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.mask_fcn1.bias)
        nn.init.kaiming_normal_(self.conv5_mask.weight, mode="fan_out", nonlinearity="relu")
        self.conv_reduce: nn.Conv2d | None = None
        if extra_conv:
            conv = nn.Conv2d(self.width, self.width, 3, stride=1, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(conv.bias, LAYER_BIAS)
            conv.requires_grad_(False)
            self.conv_reduce = conv

    @property
    def extra_conv(self) -> bool:
        return self.conv_reduce is not None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MaskFeatureBranch expects [beta, {self.in_channels}, H, W] RoI features, "
                f"got {tuple(x.shape)}"
            )
        x = F.relu(self.mask_fcn1(x))
        x = self.conv5_mask(x)
        if self.conv_reduce is not None:
            x = self.conv_reduce(x)
        return F.relu(x)

    @torch.no_grad()
    def copy_from(self, mask_head: nn.Module, mask_predictor: nn.Module) -> None:
        """Copy the segmentation branch into this one, in place (spec §6.1, §11.9).

        ``mask_head``: torchvision ``MaskRCNNHeads`` with exactly one conv layer (its
        ``[0][0]``); a bare ``nn.Conv2d`` is accepted too. ``mask_predictor``: torchvision
        ``MaskRCNNPredictor`` (its ``conv5_mask``) or a bare ``nn.ConvTranspose2d``.
        ``conv_reduce`` has no counterpart and is left alone.
        """
        convs = [mask_head] if isinstance(mask_head, nn.Conv2d) else [
            m for m in mask_head.modules() if isinstance(m, nn.Conv2d)
        ]
        if len(convs) != 1:
            raise ValueError(
                f"mask_head must hold exactly one conv layer (AFF/LSTM head), found {len(convs)}"
            )
        norms = [m for m in mask_head.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))]
        if norms:
            raise ValueError("mask_head has a normalisation layer; MaskFeatureBranch has none")
        if isinstance(mask_predictor, nn.ConvTranspose2d):
            upconv = mask_predictor
        else:
            upconv = getattr(mask_predictor, "conv5_mask", None)
            if not isinstance(upconv, nn.ConvTranspose2d):
                raise ValueError("mask_predictor has no ConvTranspose2d 'conv5_mask'")
        for src, dst, name in ((convs[0], self.mask_fcn1, "mask_fcn1"), (upconv, self.conv5_mask, "conv5_mask")):
            if src.weight.shape != dst.weight.shape or (src.bias is None) != (dst.bias is None):
                raise ValueError(
                    f"cannot copy {name}: source weight {tuple(src.weight.shape)}, "
                    f"target {tuple(dst.weight.shape)}"
                )
            if (getattr(src, "stride", None), getattr(src, "padding", None)) != (dst.stride, dst.padding):
                raise ValueError(f"cannot copy {name}: stride/padding differ")
            dst.weight.copy_(src.weight)
            if dst.bias is not None:
                dst.bias.copy_(src.bias)


# --------------------------------------------------------------------------------------
# Refinement and vectorisation (spec §6.2 steps 1-2)
# --------------------------------------------------------------------------------------


class RefinementBlock(nn.Module):
    """Conv2d(C -> C/2, 2x2, s2) -> BN(C/2) -> ReLU -> ConvTranspose2d(C/2 -> C, 2x2, s2).

    ``[beta, C, H, W] -> [beta, C, H, W]`` (H, W even). Conv weights Kaiming-normal
    (fan_out), every bias (convs and BN) 0.01, BN weight 1.
    """

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(f"RefinementBlock needs an even channel count >= 2, got {channels}")
        half = channels // 2
        self.conv_down = nn.Conv2d(channels, half, 2, stride=2, padding=0)
        self.bn = nn.BatchNorm2d(half)
        self.conv_up = nn.ConvTranspose2d(half, channels, 2, stride=2, padding=0)
        init_layer(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_up(F.relu(self.bn(self.conv_down(x))))


class Refinement(nn.Module):
    """N refinement blocks (spec §6.2 step 1, §10 #15).

    ``shared=False`` (paper): ``blocks`` independent blocks, each applied once.
    ``shared=True`` (original code): ONE block whose weights are applied
    ``blocks ** 2`` times (the code puts one instance N times in a Sequential and runs the
    Sequential N times). For N = 1 the two are the same.
    """

    def __init__(self, channels: int = 256, blocks: int = 3, shared: bool = False) -> None:
        super().__init__()
        if blocks < 0:
            raise ValueError(f"refinement blocks must be >= 0, got {blocks}")
        self.num_blocks = int(blocks)
        self.shared = bool(shared)
        n_instances = min(1, self.num_blocks) if self.shared else self.num_blocks
        self.blocks = nn.ModuleList(RefinementBlock(channels) for _ in range(n_instances))

    @property
    def applications(self) -> int:
        """How many times a block is applied in one forward pass."""
        return self.num_blocks ** 2 if self.shared else self.num_blocks

    def forward(self, x: Tensor) -> Tensor:
        if self.shared:
            for _ in range(self.applications):
                x = self.blocks[0](x)
            return x
        for block in self.blocks:
            x = block(x)
        return x


class Vectorisation(nn.Module):
    """``[beta, C, 28, 28] -> X [beta, C]`` (spec §6.2 step 2).

    conv_d1: Conv2d(C -> C, 2x2, s2) -> ReLU -> bn1 (28 -> 14); conv_d2: same with bn2
    (14 -> 7); conv_d_final: Conv2d(C -> C, 7x7) -> ReLU -> bn3 (7 -> 1). Conv weights
    Kaiming-normal (fan_out), every bias 0.01 (original code).
    """

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        self.channels = int(channels)
        self.conv_d1 = nn.Conv2d(channels, channels, 2, stride=2, padding=0)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv_d2 = nn.Conv2d(channels, channels, 2, stride=2, padding=0)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv_d_final = nn.Conv2d(channels, channels, 7, stride=1, padding=0)
        self.bn3 = nn.BatchNorm2d(channels)
        init_layer(self)

    def forward(self, x: Tensor) -> Tensor:
        size = MASK_FEATURE_SIZE
        if x.dim() != 4 or x.shape[1] != self.channels or tuple(x.shape[-2:]) != (size, size):
            raise ValueError(
                f"Vectorisation expects [beta, {self.channels}, {size}, {size}] mask features, "
                f"got {tuple(x.shape)}"
            )
        x = self.bn1(F.relu(self.conv_d1(x)))
        x = self.bn2(F.relu(self.conv_d2(x)))
        x = self.bn3(F.relu(self.conv_d_final(x)))
        return x.flatten(1)


class ImageClassifier(nn.Module):
    """Linear(in -> 128) -> ReLU -> Linear(128 -> 128) -> ReLU -> Linear(128 -> K).

    PyTorch default init (spec §7.4). Accepts ``[..., in_features]``.
    """

    def __init__(self, in_features: int = 256, num_classes: int = 3, hidden: int = 128) -> None:
        super().__init__()
        self.fc_l1 = nn.Linear(in_features, hidden)
        self.fc_l2 = nn.Linear(hidden, hidden)
        self.class_predict_logits = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc_l1(x))
        x = F.relu(self.fc_l2(x))
        return self.class_predict_logits(x)


# --------------------------------------------------------------------------------------
# Head base class
# --------------------------------------------------------------------------------------


class MaskFeatureHead(nn.Module):
    """Base of the mask-feature heads: ``forward(R) -> (logits, roi_weights)``.

    ``R``: ``[beta, C, 28, 28]`` mask features of ONE image, rows in the order the head
    expects (confidence rank for Affinity, distance order for Attention/LSTM).
    ``logits``: ``[num_classes]``. ``roi_weights``: ``[beta]``, the weight the head gives
    each RoI (for explainability).

    Parameter layout, the same in every head: ``layer`` holds the whole
    affinity/attention layer (``layer.refinement``, ``layer.vectorisation`` and the
    head's own parameters); the image classifier(s) are ``classifier`` (or
    ``classifier_pos`` / ``classifier_neg``). All of them are trained by the
    classification loss.

    The layer's BatchNorms normalise over the beta RoIs of the image when in train mode,
    which the original code also uses at test time (spec §6.2, §10 #17); the caller sets
    module modes. With batch statistics, beta must be > 1 (repetition padding ensures it).
    """

    layer: nn.Module
    channels: int

    def features(self, R: Tensor) -> Tensor:
        """Refinement + vectorisation: ``[beta, C, 28, 28] -> X [beta, C]``."""
        if R.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects [beta, C, 28, 28] for one image, got {tuple(R.shape)}")
        size = MASK_FEATURE_SIZE
        if R.shape[1] != self.channels or tuple(R.shape[-2:]) != (size, size):
            raise ValueError(
                f"{type(self).__name__} expects [beta, {self.channels}, {size}, {size}] mask features, "
                f"got {tuple(R.shape)}"
            )
        return self.layer.vectorisation(self.layer.refinement(R))

    def from_vectors(self, X: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, R: Tensor) -> tuple[Tensor, Tensor]:
        return self.from_vectors(self.features(R))

    def _check_vectors(self, X: Tensor, rois: int | None) -> None:
        if X.dim() != 2 or X.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__} expects X [beta, {self.channels}], got {tuple(X.shape)}")
        if rois is not None and X.shape[0] != rois:
            raise ValueError(
                f"{type(self).__name__} was built for beta={rois} RoIs per image, got {X.shape[0]}"
            )
        if X.shape[0] < 1:
            raise ValueError(f"{type(self).__name__} needs at least one RoI")
