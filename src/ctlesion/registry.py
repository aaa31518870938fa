"""One registry: every model is created by name (timm-style ``create_model``).

A registry entry pairs a *default config factory* (the paper's hyper-parameters) with a
*builder* that turns a resolved :class:`~ctlesion.config.ModelConfig` into a module.
YAML presets under ``configs/`` name an entry and override only what differs.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from typing import Callable

from torch import nn

from .config import BackboneConfig, ClassifierConfig, DetectorConfig, ModelConfig
from .errors import ConfigError
from .models.cnn import build_cnn_classifier
from .models.ctm import build_ctm
from .models.mask_feature_model import build_mask_feature_model
from .models.maskrcnn import build_maskrcnn
from .models.ssm import build_ssm
from .models.stock import build_stock_maskrcnn

__all__ = [
    "ModelEntry", "register_model", "list_models", "get_entry", "default_model_config",
    "create_model", "count_parameters", "model_table", "SHORT_ARCHS", "ssm_detector",
]

SHORT_ARCHS = {
    "r18": "resnet18",
    "r34": "resnet34",
    "r50": "resnet50",
    "x50": "resnext50_32x4d",
    "x101": "resnext101_32x8d",
}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    task: str
    default_config: Callable[[], ModelConfig]
    builder: Callable[[ModelConfig], nn.Module]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str, builder: Callable[[ModelConfig], nn.Module],
                   task: str = "segmentation"):
    """Decorator for a zero-argument function returning the entry's default config."""

    def wrap(factory: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, description, task, factory, builder)
        return factory

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = [n for n in _REGISTRY if name.split("-")[0] in n][:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; `ctlesion models` lists them") from None


def default_model_config(name: str) -> ModelConfig:
    cfg = get_entry(name).default_config()
    cfg.name = name
    return cfg


def create_model(name_or_config: str | ModelConfig) -> nn.Module:
    """Build a model from a registered name (paper defaults) or a resolved config."""
    cfg = default_model_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return get_entry(cfg.name).builder(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_table(pattern: str = "*") -> list[dict]:
    """``[{"name", "params", "description", "task"}]`` for matching models (builds each)."""
    rows = []
    for name in list_models(pattern):
        entry = get_entry(name)
        rows.append({
            "name": name,
            "params": count_parameters(create_model(name)),
            "description": entry.description,
            "task": entry.task,
        })
    return rows


# ------------------------------------------------------------------ segmentation models


def _register_segmentation() -> None:

    @register_model(
        "maskrcnn-r50-fpn",
        "COVID-CT-Mask-Net full segmentation model: ResNet50, 4-level FPN (no max-pool level), "
        "4x256 mask head, 128-wide box head (paper 002)",
        build_maskrcnn,
    )
    def _r50_fpn() -> ModelConfig:
        return ModelConfig(
            backbone=BackboneConfig(arch="resnet50", stages=4, fpn="full"),
            detector=DetectorConfig(mask_head_layers=[256, 256, 256, 256], mask_predictor_width=256),
        )

    @register_model(
        "torchvision-maskrcnn-r50-fpn",
        "Baseline, not a paper model: stock torchvision maskrcnn_resnet50_fpn from random weights "
        "(torchvision's anchors, heads and sampling)",
        build_stock_maskrcnn,
    )
    def _stock() -> ModelConfig:
        return ModelConfig(backbone=BackboneConfig(arch="resnet50", stages=4, fpn="full"),
                           detector=DetectorConfig(mask_head_layers=[256, 256, 256, 256], mask_predictor_width=256))

    for short, arch in SHORT_ARCHS.items():
        for stages in (2, 3, 4):
            def lightweight(arch=arch, stages=stages) -> ModelConfig:
                return ModelConfig(backbone=BackboneConfig(arch=arch, stages=stages))

            register_model(
                f"maskrcnn-{short}-s{stages}",
                f"Lightweight Mask R-CNN: {arch} cut after layer{stages}, single-level FPN, "
                "1x128 mask head, CTM segmentation hyper-parameters (paper 002 README)",
                build_maskrcnn,
            )(lightweight)

    # The SSM detector: same architecture, the SSM code's sampling settings (spec §3.2, #6).
    for short in ("r18", "r34"):
        for stages in (2, 3):
            def ssm(arch=SHORT_ARCHS[short], stages=stages) -> ModelConfig:
                return ModelConfig(backbone=BackboneConfig(arch=arch, stages=stages), detector=ssm_detector())

            register_model(
                f"ssm-detector-{short}-s{stages}",
                f"Single-Shot Model segmentation branch: {SHORT_ARCHS[short]} cut after layer{stages}, "
                "single-level FPN, SSM code's RPN/RoI sampling (papers 001/003)",
                build_maskrcnn,
            )(ssm)


def ssm_detector() -> DetectorConfig:
    """The SSM code's detector settings: torchvision's sampling defaults, RPN 2000/1000,
    segmentation output at score 0.75 with up to 128 detections (spec §3.2, §10 #6)."""
    return replace(
        DetectorConfig(),
        rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=2000,
        rpn_post_nms_top_n_train=1000, rpn_post_nms_top_n_test=1000,
        rpn_positive_fraction=0.5,
        box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5,
        box_batch_size_per_image=512, box_positive_fraction=0.25,
        box_score_thresh=0.75, box_detections_per_img=128,
    )


def mask_feature_detector(mask_type: str, **changes) -> DetectorConfig:
    """The AFF/LSTM code's detector (spec §3.2): 512 px, per-image standardisation, RPN
    400/200, RPN positive fraction 0.75, RoI 0.75/0.5 with 256 sampled, one-conv 256-wide
    mask head and 256-wide predictor."""
    settings = dict(
        mask_type=mask_type, min_size=512, max_size=512, normalization="per_image",
        image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
        rpn_pre_nms_top_n_train=400, rpn_pre_nms_top_n_test=400,
        rpn_post_nms_top_n_train=200, rpn_post_nms_top_n_test=200,
        rpn_positive_fraction=0.75, box_fg_iou_thresh=0.75, box_bg_iou_thresh=0.5,
        box_batch_size_per_image=256, box_positive_fraction=0.75,
        mask_head_layers=[256], mask_predictor_width=256,
    )
    settings.update(changes)
    return replace(DetectorConfig(), **settings)


_register_segmentation()


# ------------------------------------------------------------------ slice classifiers


def _register_classifiers() -> None:

    # COVID-CT-Mask-Net stage 2 (spec §4): N=256, F=1024 for the ResNet50 model; the
    # README's lightweight models use N=128, F=512. CTM keeps every box of positive area.
    @register_model(
        "ctm-r50-fpn",
        "COVID-CT-Mask-Net classifier: ResNet50 4-level FPN detector (no mask branch) + "
        "module S over the top-256 RoIs (paper 002)",
        build_ctm, task="classification",
    )
    def _ctm_r50() -> ModelConfig:
        return ModelConfig(
            backbone=BackboneConfig(arch="resnet50", stages=4, fpn="full"),
            detector=DetectorConfig(mask_head_layers=[256, 256, 256, 256], mask_predictor_width=256),
            classifier=ClassifierConfig(kind="ctm", rois=256, s_features=1024, roi_min_area=0.0),
        )

    for short in ("r18", "r34"):
        for stages in (2, 3):
            def ctm(arch=SHORT_ARCHS[short], stages=stages) -> ModelConfig:
                return ModelConfig(
                    backbone=BackboneConfig(arch=arch, stages=stages),
                    classifier=ClassifierConfig(kind="ctm", rois=128, s_features=512, roi_min_area=0.0),
                )

            register_model(
                f"ctm-{short}-s{stages}",
                f"COVID-CT-Mask-Net classifier: {SHORT_ARCHS[short]} cut after layer{stages} "
                "(lightweight detector, no mask branch) + module S over the top-128 RoIs (paper 002 README)",
                build_ctm, task="classification",
            )(ctm)

    # Single-Shot Model (spec §5): N=128, F=512, the SSM code's detector settings.
    for short in ("r18", "r34"):
        for stages in (2, 3):
            for branch, prefix, what in (("shared", "ssm", "single RoI branch"),
                                         ("separate", "ssm-2branch", "second, weight-copied RoI branch")):
                def ssm(arch=SHORT_ARCHS[short], stages=stages, branch=branch) -> ModelConfig:
                    return ModelConfig(
                        backbone=BackboneConfig(arch=arch, stages=stages),
                        detector=ssm_detector(),
                        classifier=ClassifierConfig(kind="ssm", branch=branch, rois=128, s_features=512),
                    )

                register_model(
                    f"{prefix}-{short}-s{stages}",
                    f"Single-Shot Model, {what}: {SHORT_ARCHS[short]} cut after layer{stages}, "
                    "Mask R-CNN + module S trained jointly (papers 001/003)",
                    build_ssm, task="joint",
                )(ssm)

    # Mask-feature models (spec §6-§7): RoI mask features of beta selected RoIs -> head.

    for short, arch in SHORT_ARCHS.items():
        @register_model(
            f"affinity-{short}",
            f"Affinity model: {arch} cut after layer3 (as the AFF code for every arch), single-level FPN, "
            "beta=8 RoI mask features -> 3 refinement blocks -> affinity matrix (C*=16) and vector (paper 000)",
            build_mask_feature_model, task="joint",
        )
        def _affinity(arch=arch) -> ModelConfig:
            return ModelConfig(
                backbone=BackboneConfig(arch=arch, stages=3),
                detector=mask_feature_detector(mask_type="merge"),
                classifier=ClassifierConfig(kind="affinity", branch="separate", rois=8, roi_nms_thresh=0.25,
                                            affinity_dim=16, refinement_blocks=3, roi_order="confidence"),
            )

        for family, title in (("attention", "Attention model (Eqs. 1-8)"), ("lstm1", "LSTM-1 (Eqs. 9-17)"),
                              ("lstm2", "LSTM-2: two LSTM+attention branches, logits subtracted")):
            def lstm(arch=arch, family=family) -> ModelConfig:
                return ModelConfig(
                    backbone=BackboneConfig(arch=arch, stages=4),
                    detector=mask_feature_detector(mask_type="separate", box_positive_fraction=0.5),
                    classifier=ClassifierConfig(kind=family, branch="separate", rois=16, roi_nms_thresh=0.25,
                                                refinement_blocks=1, hidden_size=256, roi_order="distance"),
                )

            register_model(
                f"{family}-{short}",
                f"{title}: full-depth {arch}, single-level FPN on layer4, 4-class detector (lungs a class), "
                "beta=16 RoIs ordered by distance from the image origin (paper 004)",
                build_mask_feature_model, task="joint",
            )(lstm)

    # The papers' benchmark whole-slice CNNs (papers 003/004): plain torchvision classifiers.

    for short, arch in (("resnet18", "resnet18"), ("resnext50", "resnext50_32x4d"),
                        ("resnext101", "resnext101_32x8d"), ("densenet121", "densenet121"),
                        ("densenet169", "densenet169")):
        def cnn(arch=arch) -> ModelConfig:
            return ModelConfig(classifier=ClassifierConfig(kind="cnn", cnn_arch=arch))

        register_model(
            f"cnn-{short}",
            f"Benchmark whole-slice classifier: torchvision {arch}, grey slice replicated to 3 "
            "channels, resized to 512, ImageNet normalisation (papers 003/004)",
            build_cnn_classifier, task="classification",
        )(cnn)


_register_classifiers()
