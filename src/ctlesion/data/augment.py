"""Training-time augmentation with ``torchvision.transforms.v2`` (``data.augment``).

Image, boxes and instance masks go through one v2 pipeline as ``tv_tensors``, so every
geometric change moves all three together. Boxes are then re-derived from the transformed
masks (a rotated box is looser than the rotated lesion) in the readers' convention
(``x2``/``y2`` exclusive), and instances left with ``min_area`` pixels or fewer are dropped,
as the readers drop them.

Determinism: each sample's draw is made under its own torch seed, a pure function of
``(seed, epoch, index)`` (:func:`augment_seed`), inside :func:`torch.random.fork_rng`, so the
global RNG the training loop saves for exact resume is left as it was.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..config import AugmentConfig, check_augment
from .sample import Sample
from .wrappers import DatasetWrapper

__all__ = ["AugmentedDataset", "augment_seed", "build_augmentation", "RandomGamma"]


class RandomGamma(v2.Transform):
    """Gamma correction ``x ** g`` of the image with ``g`` uniform in ``[low, high]``
    (v2 has the function, ``adjust_gamma``, but no random transform)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = float(low), float(high)

    def make_params(self, flat_inputs: list) -> dict:
        return {"gamma": float(torch.empty(1).uniform_(self.low, self.high))}

    def transform(self, inpt, params: dict):
        return F.adjust_gamma(inpt, params["gamma"])

    # torchvision < 0.21 called these _get_params / _transform.
    _get_params = make_params
    _transform = transform


def build_augmentation(cfg: AugmentConfig) -> v2.Compose:
    """The v2 pipeline ``cfg`` describes (geometry first, then intensity, then a clamp to [0, 1])."""
    check_augment(cfg)
    steps: list = []
    if cfg.flip:
        steps += [v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5)]
    if cfg.rot90:   # exact for multiples of 90° (a pixel permutation), expand keeps the whole slice
        steps.append(v2.RandomChoice([v2.RandomRotation((a, a), expand=True) for a in (0, 90, 180, 270)]))
    if cfg.affine_p > 0 and (cfg.degrees > 0 or cfg.translate > 0 or cfg.scale[0] != 1 or cfg.scale[1] != 1):
        affine = v2.RandomAffine(degrees=cfg.degrees, translate=(cfg.translate, cfg.translate),
                                 scale=tuple(cfg.scale), interpolation=v2.InterpolationMode.BILINEAR, fill=0)
        steps.append(v2.RandomApply([affine], p=cfg.affine_p))
    if cfg.contrast > 0:
        steps.append(v2.ColorJitter(contrast=cfg.contrast))
    if cfg.gamma[0] != 1 or cfg.gamma[1] != 1:
        steps.append(RandomGamma(*cfg.gamma))
    if cfg.noise_std > 0:
        steps.append(v2.GaussianNoise(mean=0.0, sigma=cfg.noise_std, clip=True))
    steps.append(v2.Lambda(lambda x: x.clamp_(0.0, 1.0), tv_tensors.Image))
    return v2.Compose(steps)


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed of sample ``index`` in epoch ``epoch``: a pure function of the three."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class AugmentedDataset(DatasetWrapper):
    """``dataset`` with each sample augmented; the draw depends on ``(seed, epoch, index)``.

    The training loop calls :meth:`set_epoch` before each epoch; :meth:`draw` takes the key
    explicitly (the joint models' segmentation images are keyed by their draw number). The
    wrapped samples are never changed in place (a cache below stays clean).
    """

    def __init__(self, dataset: Dataset, cfg: AugmentConfig, seed: int, min_area: int = 0) -> None:
        self.dataset = dataset
        self.transform = build_augmentation(cfg)
        self.seed = int(seed)
        self.min_area = int(min_area)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> Sample:
        return self.draw(index, self.epoch)

    def draw(self, index: int, epoch: int) -> Sample:
        sample = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augment_seed(self.seed, epoch, index))
            return self._augment(sample)

    def _augment(self, sample: Sample) -> Sample:
        height, width = sample.image.shape[-2:]
        image = tv_tensors.Image(sample.image)
        if sample.target is None:
            return replace(sample, image=self.transform(image).as_subclass(torch.Tensor).contiguous())
        target = sample.target
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))
        image, boxes, masks = self.transform(image, boxes, tv_tensors.Mask(target["masks"]))
        masks = masks.as_subclass(torch.Tensor)
        keep = masks.flatten(1).sum(1) > self.min_area
        masks = masks[keep].contiguous()
        boxes = torch.zeros((0, 4), dtype=torch.float32)
        if len(masks):   # masks_to_boxes gives the last covered pixel; the readers' x2/y2 are exclusive
            boxes = masks_to_boxes(masks).to(torch.float32) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        new_target = {**target, "masks": masks, "labels": target["labels"][keep], "boxes": boxes}
        return replace(sample, image=image.as_subclass(torch.Tensor).contiguous(), target=new_target)

