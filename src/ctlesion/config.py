"""Typed configuration schema: dataclasses, type-checked updates from YAML mappings and
dotted ``--set`` overrides. Fixed sets of strings are ``Literal`` types, checked when the
config loads (the key named, the closest choice suggested).

This module imports nothing else of ctlesion but its error types: resolving a run's
config (registry defaults <- YAML <- ``--set``), versions and upgrades live in
:mod:`ctlesion.experiment`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

__all__ = [
    "INFERENCE_PRECISIONS", "INFERENCE_ROI_ALIGN_KERNELS",
    "AugmentConfig", "BackboneConfig", "DetectorConfig", "ClassifierConfig", "ModelConfig", "DataConfig", "TrainConfig",
    "EvalConfig", "ExperimentConfig", "ConfigError", "CONFIG_VERSION", "check_augment", "update_dataclass", "apply_overrides",
    "read_yaml", "to_dict",
]


# Inference precisions of predict / evaluate / benchmark (models/inference.py applies them):
# fp32; bf16-mask, the mask branch only in bfloat16; bf16, autocast over the whole forward.
INFERENCE_PRECISIONS = ("fp32", "bf16-mask", "bf16")
# The inference fast path's RoI Align: one weighted gather (the default), or torchvision's
# kernel (bitwise the stock pooling).
INFERENCE_ROI_ALIGN_KERNELS = ("gather", "torchvision")

@dataclass
class BackboneConfig:
    """ResNet/ResNeXt body (torchvision definitions, trainable BatchNorm) plus FPN (spec §2).

    ``stages`` counts the residual stages kept (``layer1..layer{stages}``); later stages
    are not built. ``fpn="single"`` is one 1x1 lateral + one 3x3 conv on the last kept
    stage, without the extra max-pool level; ``fpn="full"`` is the 4-level FPN on
    layer1..layer4 (the CTM ResNet50 model), also without the max-pool level.
    """

    arch: Literal["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "resnext101_32x8d"] = "resnet18"
    stages: int = 3
    fpn: Literal["single", "full"] = "single"
    out_channels: int = 256
    # Local ImageNet state-dict file (.pth/.safetensors); None = random (Kaiming) init.
    weights: str | None = None


@dataclass
class DetectorConfig:
    """Mask R-CNN hyper-parameters (spec §3). Defaults are the CTM lightweight model's."""

    mask_type: Literal["merge", "both", "ggo", "separate"] = "merge"
    min_size: int = 512
    max_size: int = 1024
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # "imagenet": (x - image_mean) / image_std (CTM/SSM code); "per_image": subtract each
    # image's own mean and divide by its own std (Affinity/LSTM code, spec §1.4).
    normalization: Literal["imagenet", "per_image"] = "imagenet"
    anchor_sizes: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0, 1.5, 2.0])
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.75
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.75
    box_fg_iou_thresh: float = 0.75
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 256
    box_positive_fraction: float = 0.75
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    representation_size: int = 128
    # Widths of the 3x3 convs in the mask head; [128] is the lightweight head,
    # [256, 256, 256, 256] torchvision's default head (CTM ResNet50).
    mask_head_layers: list[int] = field(default_factory=lambda: [128])
    mask_predictor_width: int = 128
    # Inference behaviours where the original code (a torchvision 0.3 fork) differs from
    # torchvision; the defaults are torchvision's, converted author checkpoints set the
    # author's (see ctlesion.models.rcnn_parts and docs/faithfulness.md).
    # RPN: proposals with a side below this are removed (torchvision 1e-3; author 0).
    rpn_min_size: float = 1e-3
    # RPN NMS and post-NMS cap rank by the objectness "probability" (torchvision) or "logit" (author).
    rpn_nms_score: Literal["probability", "logit"] = "probability"
    # Detections kept before NMS: "min_side" (both sides >= 1e-2, torchvision), "positive_area"
    # (area > 0, CTM code), "none" (SSM, Affinity, LSTM code).
    detection_filter: Literal["min_side", "positive_area", "none"] = "min_side"
    # "probabilities": paste sigmoid masks (torchvision; SSM/AFF/LSTM code); "logits": paste
    # the mask logits and threshold them at mask_logit_threshold (CTM code).
    mask_paste: Literal["probabilities", "logits"] = "probabilities"
    mask_logit_threshold: float = 0.5
    # Training speed only: "separable" computes the CPU gradient of single-level RoI Align as
    # two matrix products (the same values up to float32 rounding, several times faster than
    # torchvision's one-core kernel; ctlesion.models.roi_align_grad); "torchvision": its own.
    roi_align_backward: Literal["separable", "torchvision"] = "separable"


@dataclass
class ClassifierConfig:
    """Whole-slice classifier on top of the detector (spec §4-§7); ``kind="none"`` = detector only.

    ``kind``: ``ctm`` (COVID-CT-Mask-Net stage 2), ``ssm`` (Single-Shot Model), ``affinity``,
    ``attention``, ``lstm1``, ``lstm2`` (mask-feature models), ``cnn`` (benchmark CNN).
    """

    kind: Literal["none", "ctm", "ssm", "affinity", "attention", "lstm1", "lstm2", "cnn"] = "none"
    class_names: list[str] = field(default_factory=lambda: ["normal", "cp", "covid"])
    # "shared": the segmentation RoI branch also builds the classification RoI batch (single
    # branch); "separate": a second, weight-copied RoI branch does (spec §5.1, §6.1).
    branch: Literal["shared", "separate"] = "shared"
    # RoIs per image fed to the head: N (CTM 256 / 128, SSM 128) or beta (Affinity 8, LSTM 16).
    rois: int = 128
    roi_nms_thresh: float = 0.75
    # Candidates whose decoded box area is <= this are dropped (CTM 0, SSM/AFF/LSTM 1e-5).
    roi_min_area: float = 1e-5
    # Module S hidden width F (spec §4.3).
    s_features: int = 512
    # Mask-feature models (spec §6-§7).
    extra_conv: bool = False          # code-faithful frozen random 3x3 conv in MaskPrediction(C)
    refinement_blocks: int = 3        # N refinement blocks (Affinity 3, LSTM 1)
    shared_refinement: bool = False   # code: one shared block applied N^2 times
    affinity_dim: int = 16            # C*
    hidden_size: int = 256            # LSTM hidden / attention width
    eq16_linear: bool = True          # LSTM-2: paper Eq. 16 Linear (False = code-faithful)
    # "confidence", "distance" (LSTM/Attention, spec §7.1; stable, exact ties) or "distance_code"
    # (the LSTM code's float32 sqrt and unstable sort: what converted LSTM checkpoints use).
    roi_order: Literal["confidence", "distance", "distance_code"] = "confidence"
    head_batch_stats: bool = True     # head BN uses RoI-batch statistics at test time (spec §6.2)
    # Benchmark CNN (kind "cnn"): torchvision classifier name and optional local weights.
    cnn_arch: Literal["resnet18", "resnext50_32x4d", "resnext101_32x8d", "densenet121", "densenet169"] = "resnet18"
    cnn_weights: str | None = None
    input_size: int = 512             # CNN input is resized to input_size x input_size


@dataclass
class ModelConfig:
    name: str = "maskrcnn-r18-s3"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


@dataclass
class AugmentConfig:
    """Training-time augmentation (``data.augment``; off unless given), done with
    ``torchvision.transforms.v2`` on image, boxes and masks together (boxes are then
    re-derived from the transformed masks). Each sample's draw is a pure function of
    ``(train.seed, epoch, sample index)``, so a resumed run sees the same images.

    Geometry: horizontal and vertical flips (``flip``), a random multiple of 90° (``rot90``:
    the model must not learn one dataset's orientation; COVID-SemiSeg is rotated by 90°
    against DICOM), with probability ``affine_p`` a small rotation (±``degrees``), scaling
    (``scale`` range) and shift (``translate``, a fraction of the side). Intensity, in the
    model's ``[0, 1]`` input range: contrast (factor in ``1 ± contrast``), gamma (``gamma``
    range), Gaussian noise (``noise_std``). A value of 0 (or ``[1, 1]``) turns one off.
    """

    flip: bool = True
    rot90: bool = True
    affine_p: float = 0.5
    degrees: float = 10.0
    scale: list[float] = field(default_factory=lambda: [0.85, 1.15])
    translate: float = 0.05
    contrast: float = 0.2
    gamma: list[float] = field(default_factory=lambda: [0.8, 1.25])
    noise_std: float = 0.01


@dataclass
class DataConfig:
    """Where slices come from and how they become model input.

    ``format``: ``phantom`` (built-in synthetic CT), ``cncb`` (``imgs/*.jpg`` +
    ``masks/*.png``, values 0 bg / 1 lung / 2 GGO / 3 C), ``semiseg`` (``Imgs/*.jpg`` +
    ``GT/*.png``, values 0 bg / 1 GGO / 2 C), ``images`` (unlabelled PNG/JPG),
    ``dicom`` (file or series folder), ``nifti`` (volume, optional ``labels`` volume).

    ``window``: ``auto`` picks by the format's known units (never by value range):
    ``as_stored`` for 8-bit images, ``lung`` (W1500/L-600) for HU volumes. Or name a
    preset (``lung``, ``mediastinum``, ``as_stored``) or ``W:L`` in HU.
    """

    format: Literal["phantom", "cncb", "semiseg", "images", "dicom", "nifti", "covidx", "classfirst",
                    "class_folders", "covid-ct-md"] = "phantom"
    root: str | None = None
    split: str | None = None
    labels: str | None = None
    window: str = "auto"
    min_area: int = 100
    # Resize every slice to size x size (bilinear image, nearest mask); None keeps it.
    size: int | None = None
    # Keep every decoded sample in memory after its first use (small sets, many epochs).
    cache: bool = False
    # Phantom options.
    num_samples: int = 64
    phantom_size: int = 512
    phantom_classes: list[str] = field(default_factory=lambda: ["normal", "cp", "covid"])
    seed: int = 0
    # Classification data (formats ``covidx``, ``classfirst``, ``class_folders``, ``covid-ct-md``).
    # Source class index -> model class index, -1 drops the slice (e.g. iCTCF 0/2 -> 0/1: [0, -1, 1]).
    class_map: list[int] | None = None
    # COVID-CT-MD: which slice-level infection labels ("updated", "original") and whether
    # COVID/CAP slices without visible infection are left out (as COVIDx-CT does).
    slice_labels: Literal["updated", "original"] = "updated"
    exclude_uninfected: bool = True
    # Keep only these patient ids (see ``ctlesion.data.patient_split``); None = all.
    patients: list[str] | None = None
    # Training-time augmentation (AugmentConfig); None = none (the papers used none).
    # Applies to ``data`` and ``seg_data`` only: scoring data is never augmented.
    augment: AugmentConfig | None = None


@dataclass
class TrainConfig:
    """Optimisation (spec §4.1, §8): Adam, lr 1e-5, weight decay 1e-3, batch 1."""

    epochs: int = 100
    lr: float = 1e-5
    weight_decay: float = 1e-3
    # "constant" (the papers) or "cosine" (decay to lr * min_lr_ratio over the run).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.01
    batch_size: int = 1
    seed: int = 0
    save_every: int = 10
    # Score ``val_data`` (legacy + COCO mAP) every N epochs and at the end; None = never.
    eval_every: int | None = None
    # The papers skip lesion-free slices in segmentation training (no loss, no step).
    skip_negatives: bool = True
    num_workers: int = 0
    device: str = "auto"
    # Stop after this many optimiser steps per epoch (None = the whole epoch).
    max_steps_per_epoch: int | None = None
    # Stop the run after this many seconds (checked between steps); None = no limit.
    time_limit_s: float | None = None
    deterministic: bool = False
    # --- classification and joint training (spec §4.5, §5.2, §6.3, §7.5) ---
    # Which parameters the classification loss may update: "s_only" (the head), "s_bn"
    # (head + backbone BatchNorm affine), "s_backbone" (head + backbone and FPN; SSM rule 2),
    # "full" (everything the loss reaches). All others get grad=None: no Adam step at all.
    # "auto" picks the original's choice for the model family (resolved into config.yaml).
    update_rule: Literal["auto", "s_only", "s_bn", "s_backbone", "full"] = "auto"
    # For s_bn: "all" BN layers of the backbone, or "code" (names containing "bn": the
    # original filter, which leaves out the downsample BNs), spec §10 #12.
    bn_params: Literal["all", "code"] = "all"
    # When the segmentation branch is copied into a separate classification branch:
    # "none", "once" (before training), "running_min" (SSM code: L_SEG below its running
    # minimum), "previous" (LSTM code: below the previous iteration's L_SEG), "every", or "auto".
    copy_rule: Literal["auto", "none", "once", "running_min", "previous", "every"] = "auto"
    # Backbone BatchNorm in the classification step: "eval" (running statistics; CTM/SSM)
    # or "batch" (train mode, single-image statistics; LSTM code, spec §7.5), or "auto".
    cls_bn: Literal["auto", "eval", "batch"] = "auto"
    # Initialise from a checkpoint folder or a built-in model name (`ctlesion models` marks
    # them; resolved in engine/steps.py): every weight whose name and shape match is copied
    # (a segmentation checkpoint fills the detector; a classifier with another label set
    # keeps its new last layer: fine-tuning).
    init_from: str | None = None
    # Joint models: run a segmentation step (one image from seg_data) before each
    # classification step.
    joint: bool = True
    # --- speed and scale (engine/distributed.py) ---
    # Mixed precision of the forward passes: "off", "bf16" (CPU and GPU) or "fp16" (GradScaler,
    # its state saved with the checkpoint).
    amp: Literal["off", "bf16", "fp16"] = "off"
    # Convolutions in channels-last memory format (faster on most GPUs and recent CPUs).
    channels_last: bool = False
    # Under torchrun: BatchNorm statistics over the global batch (CUDA only); per rank otherwise.
    sync_bn: bool = False
    # Also log every loss term, the lr and validation metrics (and a few overlays) to TensorBoard
    # (OUT/tensorboard/; needs the `tensorboard` package).
    tensorboard: bool = False


@dataclass
class EvalConfig:
    """Settings used when scoring (always reported next to the numbers)."""

    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    mask_thresh: float = 0.5
    # Pixel metrics (Dice, sensitivity, specificity of the lesion mask): detections scoring
    # at least this form the predicted mask (and at least ``score_thresh``, which filters first).
    pixel_score_thresh: float = 0.5
    # Classification: weights of the class-weighted F1. None = the test set's class shares;
    # the papers' code uses fixed (0.45, 0.35, 0.20) for (Normal, CP, COVID) (spec §9.2).
    f1_weights: list[float] | None = None
    # Seed of the RoI-batch padding at test time (spec §10 #29).
    seed: int = 0


def check_augment(cfg: AugmentConfig, key: str = "data.augment") -> None:
    """Raise :class:`ConfigError` naming the key when an augmentation setting is out of range."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"{key}.{what}")

    need(0.0 <= cfg.affine_p <= 1.0, f"affine_p must be in [0, 1], not {cfg.affine_p}")
    need(0.0 <= cfg.degrees <= 180.0, f"degrees must be in [0, 180], not {cfg.degrees}")
    need(len(cfg.scale) == 2 and 0 < cfg.scale[0] <= cfg.scale[1],
         f"scale must be [low, high] with 0 < low <= high, not {cfg.scale}")
    need(0.0 <= cfg.translate < 1.0, f"translate must be in [0, 1), not {cfg.translate}")
    need(0.0 <= cfg.contrast < 1.0, f"contrast must be in [0, 1), not {cfg.contrast}")
    need(len(cfg.gamma) == 2 and 0 < cfg.gamma[0] <= cfg.gamma[1],
         f"gamma must be [low, high] with 0 < low <= high, not {cfg.gamma}")
    need(cfg.noise_std >= 0.0, f"noise_std must be >= 0, not {cfg.noise_std}")


CONFIG_VERSION = 1


@dataclass
class ExperimentConfig:
    # Schema version of a saved config.yaml; ctlesion.experiment.upgrade_config brings older
    # files up to date (a config without the key is version 1).
    version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    val_data: DataConfig | None = None
    # Joint models (SSM, Affinity, LSTM): segmentation images for the segmentation step.
    seg_data: DataConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- helpers


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (lists and scalars only), YAML/JSON safe."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return update_dataclass(tp(), value, key)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _choice(value, typing.get_args(tp), key)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-5" (no dot) as a string; accept what is plainly a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _choice(value: Any, choices: tuple, key: str) -> Any:
    """``value`` if it is one of ``choices``, else a ConfigError naming the key and the closest choice."""
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}{hint}")


def update_dataclass(obj: Any, values: dict, prefix: str = "") -> Any:
    """Set fields of ``obj`` from ``values`` (nested), type-checked; unknown keys raise."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; known keys: {sorted(names)}")
        current = getattr(obj, key)
        tp, _ = _strip_optional(hints[key])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            base = current if current is not None else tp()
            setattr(obj, key, update_dataclass(base, value, path))
        else:
            setattr(obj, key, _coerce(value, hints[key], path))
    return obj


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (``1e-4``, ``[1,2]``, ``null``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        # YAML reads "1e-4" as a string; accept numeric strings where numbers are expected.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        nested: dict = {}
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        update_dataclass(cfg, nested)
    return cfg


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data
