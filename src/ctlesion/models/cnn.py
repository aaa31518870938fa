"""The papers' benchmark whole-slice CNN classifiers (spec §2.1 last bullets, §1.4).

Papers 003/004 compare their models with stand-alone torchvision classifiers: ResNet18,
ResNeXt50-32x4d, ResNeXt101-32x8d, DenseNet121 and DenseNet169. They have no detector.
Each is the stock torchvision definition with its last layer sized to the label set,
behind the :class:`~ctlesion.models.classifier.SliceClassifier` contract:

* input: a list of ``[C, H, W]`` tensors in ``[0, 1]`` (C = 1 or 3). A grey slice is
  replicated to 3 channels, every image is resized to ``input_size`` x ``input_size``
  (bilinear, ``align_corners=False``, no antialiasing: the papers' 512 x 512) when its size
  differs, and normalised with the ImageNet mean/std inside the model (as CTM/SSM do);
* output: ``ClassifierOutput(logits=[B, num_classes])``, no detections, no RoIs;
* ``parameter_groups()``: ``head`` is the last layer (ResNet/ResNeXt ``fc``, DenseNet
  ``classifier``), ``backbone`` everything else.

ImageNet weights cannot be downloaded here: ``classifier.cnn_weights`` names a local
``.safetensors`` or ``.pth`` file (read with ``weights_only=True``). The last layer is
skipped when its shape differs from the model's (1000 ImageNet classes vs the label set);
any other missing, unexpected or mis-shaped key is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models

from ..config import ModelConfig
from ..errors import ConfigError
from .classifier import ClassifierOutput, SliceClassifier, bn_parameter_names
from .weights import load_local_weights

__all__ = [
    "CNN_ARCHS", "IMAGENET_MEAN", "IMAGENET_STD", "CNNClassifier", "build_cnn_classifier",
]

log = logging.getLogger(__name__)

# name -> (torchvision builder, name of the final classification layer)
CNN_ARCHS: dict[str, tuple] = {
    "resnet18": (models.resnet18, "fc"),
    "resnext50_32x4d": (models.resnext50_32x4d, "fc"),
    "resnext101_32x8d": (models.resnext101_32x8d, "fc"),
    "densenet121": (models.densenet121, "classifier"),
    "densenet169": (models.densenet169, "classifier"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

class CNNClassifier(SliceClassifier):
    """A torchvision classification CNN behind the :class:`SliceClassifier` contract.

    The torchvision model is ``self.net`` (parameter names ``net.*``). ``skipped_weight_keys``
    lists the keys of ``weights`` that were not loaded (the mismatched last layer).
    """

    has_segmentation = False

    def __init__(
        self,
        class_names,
        arch: str = "resnet18",
        input_size: int = 512,
        weights: str | Path | None = None,
        config=None,
    ) -> None:
        super().__init__(class_names, config)
        if arch not in CNN_ARCHS:
            raise ConfigError(f"unknown CNN arch {arch!r}; choose one of {sorted(CNN_ARCHS)}")
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"a classifier needs at least two distinct class names, got {list(self.class_names)}")
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 32:
            raise ConfigError(f"classifier.input_size must be an integer >= 32, got {input_size!r}")
        builder, head = CNN_ARCHS[arch]
        self.arch = arch
        self.input_size = input_size
        self.head_name = head
        self.net = builder(weights=None, num_classes=self.num_classes)
        self.skipped_weight_keys: list[str] = []
        if weights:
            self.skipped_weight_keys = load_local_weights(self.net, weights, head, keep_head=True)
            if self.skipped_weight_keys:
                log.info("%s: skipped %s (shape differs from this model's last layer)", weights,
                         self.skipped_weight_keys)
        # Not persistent: constants, kept out of checkpoints.
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def head(self) -> nn.Linear:
        return getattr(self.net, self.head_name)

    def preprocess(self, images: list[Tensor]) -> Tensor:
        """Validate, replicate grey to RGB, resize and normalise: ``[B, 3, S, S]``."""
        if isinstance(images, Tensor):
            images = list(images) if images.dim() == 4 else [images]
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise ValueError("CNNClassifier needs a non-empty list of [C, H, W] images")
        size = self.input_size
        device, dtype = self.image_mean.device, self.image_mean.dtype
        batch = []
        for i, img in enumerate(images):
            if not isinstance(img, Tensor):
                raise ValueError(f"image {i} is a {type(img).__name__}, not a tensor")
            if img.dim() != 3 or img.shape[0] not in (1, 3):
                raise ValueError(f"image {i} has shape {tuple(img.shape)}; expected [C, H, W] with C = 1 or 3")
            if img.shape[1] < 1 or img.shape[2] < 1:
                raise ValueError(f"image {i} is empty: shape {tuple(img.shape)}")
            if not img.is_floating_point():
                raise ValueError(f"image {i} has dtype {img.dtype}; expected a float tensor in [0, 1]")
            if not torch.isfinite(img).all():
                raise ValueError(f"image {i} contains NaN or infinite values")
            img = img.to(device=device, dtype=dtype)
            if img.shape[0] == 1:
                img = img.expand(3, -1, -1)
            img = img.unsqueeze(0)
            if img.shape[-2:] != (size, size):
                img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
            batch.append(img)
        x = torch.cat(batch, dim=0)
        return (x - self.image_mean) / self.image_std

    def forward(self, images: list[Tensor], with_detections: bool = False) -> ClassifierOutput:
        # with_detections: the SliceClassifier signature; a CNN has no detector, so no detections
        return ClassifierOutput(logits=self.net(self.preprocess(images)))

    def parameter_groups(self) -> dict[str, list[str]]:
        prefix = f"net.{self.head_name}."
        names = [n for n, _ in self.named_parameters()]
        head = [n for n in names if n.startswith(prefix)]
        backbone = [n for n in names if not n.startswith(prefix)]
        bn_all, bn_code = bn_parameter_names(self.net, "net")
        bn_all = [n for n in bn_all if not n.startswith(prefix)]
        bn_code = [n for n in bn_code if not n.startswith(prefix)]
        return {"head": head, "backbone": backbone, "backbone_bn": bn_all, "backbone_bn_code": bn_code}

    def classification_mode(self, cls_bn: str = "eval") -> None:
        """``eval``: running BN statistics everywhere; ``batch``: the whole CNN in train mode
        (batch BN statistics, running statistics updated: ordinary CNN training)."""
        if cls_bn == "eval":
            self.eval()
        elif cls_bn == "batch":
            self.train()
        else:
            raise ConfigError(f"train.cls_bn must be 'eval' or 'batch', not {cls_bn!r}")

    def extra_repr(self) -> str:
        return f"arch={self.arch}, input_size={self.input_size}, classes={list(self.class_names)}"


def build_cnn_classifier(cfg: ModelConfig) -> CNNClassifier:
    """Build the benchmark CNN that ``cfg.classifier`` describes (``kind`` must be ``cnn``)."""
    c = cfg.classifier
    if c.kind != "cnn":
        raise ConfigError(f"build_cnn_classifier needs classifier.kind='cnn', got {c.kind!r}")
    return CNNClassifier(
        c.class_names, arch=c.cnn_arch, input_size=c.input_size, weights=c.cnn_weights, config=cfg
    )
