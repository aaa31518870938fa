"""The contract every whole-slice classifier meets (CTM, SSM, mask-feature models, CNNs).

One engine trains and scores all of them, so they share this small interface:

* ``forward(images)`` takes a list of ``[C, H, W]`` float tensors in ``[0, 1]`` (C = 1 or 3)
  and returns a :class:`ClassifierOutput` with ``logits`` ``[B, num_classes]``. It is the
  classification path in both train and eval mode; which sub-modules use batch statistics
  is set by :meth:`SliceClassifier.classification_mode`, not by ``forward``.
* ``segmentation_losses(images, targets)`` (joint models only, ``has_segmentation``) is the
  stock Mask R-CNN training forward of the segmentation branch.
* ``parameter_groups()`` names the parameters each update rule may touch.
* ``copy_segmentation_branch()`` copies the segmentation RoI branch into the separate
  classification branch (weight-copy models); it returns False when there is none.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

from torch import Tensor, nn
from ..errors import ConfigError

__all__ = ["ClassifierOutput", "SliceClassifier", "UPDATE_RULES", "trainable_names", "bn_parameter_names"]

UPDATE_RULES = ("s_only", "s_bn", "s_backbone", "full")


@dataclass
class ClassifierOutput:
    """What a classifier returns for a batch of images.

    ``logits``: ``[B, num_classes]``. ``detections``: per image, the detector's eval-mode
    output (``boxes``, ``labels``, ``scores``, ``masks``) in input-image coordinates, or None
    for models without a detector (or in train mode). ``rois``: per image, the RoIs the
    head read, in input-image coordinates: ``boxes`` ``[n, 4]``, ``scores`` ``[n]`` and
    ``weights`` ``[n]`` (the weight the head gave each RoI, or None when it has none).
    """

    logits: Tensor
    detections: list[dict[str, Tensor]] | None = None
    rois: list[dict[str, Tensor | None]] | None = field(default=None)


class SliceClassifier(nn.Module):
    """Base class: class names, config, and the hooks the training engine calls."""

    has_segmentation: bool = False
    #: Random source of the RoI-batch padding (spec §10 #29), set by evaluation; models
    #: without a RoI batch (the CNNs) never read it.
    padding_generator = None

    def __init__(self, class_names, config) -> None:
        super().__init__()
        self.class_names = tuple(class_names)
        self.config = config

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def segmentation_losses(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no segmentation branch")

    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names by role: ``head`` (always trained by the classification loss),
        ``backbone`` (body + FPN), ``backbone_bn`` (affine weights of every backbone BN),
        ``backbone_bn_code`` (only those whose name contains ``bn``, the original filter)."""
        raise NotImplementedError

    def copy_segmentation_branch(self) -> bool:
        return False

    def classification_mode(self, cls_bn: str = "eval") -> None:
        """Put sub-modules in the modes the classification step uses: everything in eval
        mode (running BN statistics) except the head; ``cls_bn="batch"`` also puts the
        backbone in train mode (single-image BN statistics, LSTM code)."""
        self.eval()

    @contextlib.contextmanager
    def inference(self, cls_bn: str = "eval") -> Iterator[None]:
        """Modes for scoring and prediction (eval), restored on exit."""
        was_training = {m: m.training for m in self.modules()}
        self.eval()
        try:
            yield
        finally:
            for m, training in was_training.items():
                m.training = training


def trainable_names(model: SliceClassifier, rule: str, bn_params: str = "all") -> set[str]:
    """Names of the parameters the classification loss may update under ``rule``."""
    if rule not in UPDATE_RULES:
        raise ConfigError(f"train.update_rule must be one of {UPDATE_RULES}, not {rule!r}")
    if bn_params not in ("all", "code"):
        raise ConfigError(f"train.bn_params must be 'all' or 'code', not {bn_params!r}")
    if rule == "full":
        return {n for n, _ in model.named_parameters()}
    groups = model.parameter_groups()
    names = set(groups["head"])
    if rule == "s_backbone":
        names |= set(groups["backbone"])
    elif rule == "s_bn":
        names |= set(groups["backbone_bn" if bn_params == "all" else "backbone_bn_code"])
    return names


def bn_parameter_names(module: nn.Module, prefix: str) -> tuple[list[str], list[str]]:
    """(all BN affine names, names that pass the original ``"bn" in name`` filter) under ``module``."""
    every, code = [], []
    for mod_name, mod in module.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            for p_name, _ in mod.named_parameters(recurse=False):
                full = f"{prefix}.{mod_name}.{p_name}" if mod_name else f"{prefix}.{p_name}"
                every.append(full)
                if "bn" in full:
                    code.append(full)
    return every, code

