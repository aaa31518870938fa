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
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models

from ..config import ModelConfig
from .classifier import ClassifierOutput, SliceClassifier, bn_parameter_names

__all__ = [
    "CNN_ARCHS", "IMAGENET_MEAN", "IMAGENET_STD", "CNNClassifier", "build_cnn_classifier",
    "load_cnn_weights",
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

# torchvision's released DenseNet files use the old key layout
# ("denselayer1.norm.1.weight"); the current modules are named "norm1" (torchvision
# remaps them the same way in ``densenet._load_state_dict``).
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    out = {}
    for key, value in state.items():
        if key.startswith("module."):  # saved from nn.DataParallel
            key = key[len("module."):]
        match = _OLD_DENSENET_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        out[key] = value
    return out


def load_cnn_weights(net: nn.Module, path: str | Path, head: str) -> list[str]:
    """Load a local ImageNet state dict into the torchvision classifier ``net``.

    Keys of the final layer ``head`` whose shape differs from the model's are skipped (and
    returned, so callers can say so); every other key must be present with the right
    shape. ``num_batches_tracked`` buffers missing from old checkpoints are tolerated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CNN weights file not found: {path}")
    state = _read_state_dict(path)
    own = net.state_dict()
    head_prefix = head + "."
    skipped = sorted(
        k for k, v in state.items()
        if k.startswith(head_prefix) and k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = {
        k for k in own
        if k not in state and not k.startswith(head_prefix) and not k.endswith("num_batches_tracked")
    }
    unexpected = set(state) - set(own)
    bad_shape = sorted(
        k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{path}: not a state dict for this architecture "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}, "
            f"wrong shape {bad_shape[:5]})"
        )
    net.load_state_dict(state, strict=False)
    if skipped:
        log.info("%s: skipped %s (shape differs from this model's last layer)", path, skipped)
    return skipped


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
            raise ValueError(f"unknown CNN arch {arch!r}; choose one of {sorted(CNN_ARCHS)}")
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"a classifier needs at least two distinct class names, got {list(self.class_names)}")
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 32:
            raise ValueError(f"classifier.input_size must be an integer >= 32, got {input_size!r}")
        builder, head = CNN_ARCHS[arch]
        self.arch = arch
        self.input_size = input_size
        self.head_name = head
        self.net = builder(weights=None, num_classes=self.num_classes)
        self.skipped_weight_keys: list[str] = []
        if weights:
            self.skipped_weight_keys = load_cnn_weights(self.net, weights, head)
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

    def forward(self, images: list[Tensor]) -> ClassifierOutput:
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
            raise ValueError(f"train.cls_bn must be 'eval' or 'batch', not {cls_bn!r}")

    def extra_repr(self) -> str:
        return f"arch={self.arch}, input_size={self.input_size}, classes={list(self.class_names)}"


def build_cnn_classifier(cfg: ModelConfig) -> CNNClassifier:
    """Build the benchmark CNN that ``cfg.classifier`` describes (``kind`` must be ``cnn``)."""
    c = cfg.classifier
    if c.kind != "cnn":
        raise ValueError(f"build_cnn_classifier needs classifier.kind='cnn', got {c.kind!r}")
    return CNNClassifier(
        c.class_names, arch=c.cnn_arch, input_size=c.input_size, weights=c.cnn_weights, config=cfg
    )
