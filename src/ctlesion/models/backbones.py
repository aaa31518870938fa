"""ResNet/ResNeXt bodies cut to 2, 3 or 4 stages, with the papers' FPN variants (spec §2).

torchvision's ``BackboneWithFPN`` adds a ``LastLevelMaxPool`` level and its resnet
helpers default to ``FrozenBatchNorm2d``; the papers use neither (spec §11.1). So the
body is an ``IntermediateLayerGetter`` over a stock torchvision ResNet built with
ordinary, trainable ``nn.BatchNorm2d``, and the FPN is torchvision's
``FeaturePyramidNetwork`` with ``extra_blocks=None``. Stages after the last kept one
are dropped by ``IntermediateLayerGetter``, so they are neither run nor counted.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork

from ..config import BackboneConfig
from ..errors import ConfigError
from .weights import load_local_weights

__all__ = ["ARCHS", "CtBackbone", "build_backbone", "load_imagenet_weights"]

# name -> (torchvision constructor, output channels of layer1..layer4)
ARCHS: dict[str, tuple] = {
    "resnet18": (models.resnet18, (64, 128, 256, 512)),
    "resnet34": (models.resnet34, (64, 128, 256, 512)),
    "resnet50": (models.resnet50, (256, 512, 1024, 2048)),
    "resnext50_32x4d": (models.resnext50_32x4d, (256, 512, 1024, 2048)),
    "resnext101_32x8d": (models.resnext101_32x8d, (256, 512, 1024, 2048)),
}


class CtBackbone(nn.Module):
    """Truncated ResNet body + FPN. Returns an ``OrderedDict`` of 256-channel maps.

    ``fpn="single"``: one level, key ``'0'``, on the last kept stage (stride 8/16/32 for
    2/3/4 stages). ``fpn="full"``: four levels ``'0'..'3'`` at strides 4/8/16/32
    (needs ``stages=4``). ``out_channels`` is what torchvision's detectors read.
    """

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=None)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def load_imagenet_weights(resnet: nn.Module, path: str | Path) -> None:
    """Load a local ImageNet state dict (``.safetensors`` or ``.pth``, read with
    ``weights_only=True``) into a ResNet; its ``fc`` layer is ignored, any other missing or
    unexpected key is an error (:func:`~ctlesion.models.weights.load_local_weights`)."""
    load_local_weights(resnet, path, "fc", keep_head=False)


def build_backbone(cfg: BackboneConfig) -> CtBackbone:
    if cfg.arch not in ARCHS:
        raise ConfigError(f"unknown backbone arch {cfg.arch!r}; choose one of {sorted(ARCHS)}")
    if cfg.stages not in (2, 3, 4):
        raise ConfigError(f"backbone.stages must be 2, 3 or 4, got {cfg.stages}")
    if cfg.fpn not in ("single", "full"):
        raise ConfigError(f"backbone.fpn must be 'single' or 'full', got {cfg.fpn!r}")
    if cfg.fpn == "full" and cfg.stages != 4:
        raise ConfigError("backbone.fpn='full' uses layer1..layer4, so it needs stages=4")
    constructor, channels = ARCHS[cfg.arch]
    resnet = constructor(weights=None, norm_layer=nn.BatchNorm2d)
    if cfg.weights:
        load_imagenet_weights(resnet, cfg.weights)
    if cfg.fpn == "single":
        return_layers = {f"layer{cfg.stages}": "0"}
        in_channels = [channels[cfg.stages - 1]]
    else:
        return_layers = {f"layer{i}": str(i - 1) for i in range(1, 5)}
        in_channels = list(channels)
    body = IntermediateLayerGetter(resnet, return_layers=return_layers)
    return CtBackbone(body, in_channels, cfg.out_channels)
