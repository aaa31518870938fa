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
    """Load a local ImageNet state dict (``.safetensors`` or ``.pth``) into a ResNet.

    ImageNet weights cannot be downloaded here, so users pass a file. ``.pth`` files are
    read with ``weights_only=True``: an untrusted file never executes code. The ``fc``
    layer is ignored; any other missing or unexpected key is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k for k in resnet.state_dict() if not k.startswith("fc.")}
    missing, unexpected = own - set(state), set(state) - own
    if missing or unexpected:
        raise ValueError(
            f"{path}: not a state dict for this architecture "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    resnet.load_state_dict(state, strict=False)


def build_backbone(cfg: BackboneConfig) -> CtBackbone:
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown backbone arch {cfg.arch!r}; choose one of {sorted(ARCHS)}")
    if cfg.stages not in (2, 3, 4):
        raise ValueError(f"backbone.stages must be 2, 3 or 4, got {cfg.stages}")
    if cfg.fpn not in ("single", "full"):
        raise ValueError(f"backbone.fpn must be 'single' or 'full', got {cfg.fpn!r}")
    if cfg.fpn == "full" and cfg.stages != 4:
        raise ValueError("backbone.fpn='full' uses layer1..layer4, so it needs stages=4")
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
