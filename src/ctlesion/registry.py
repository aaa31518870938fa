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

from .config import BackboneConfig, DetectorConfig, ModelConfig

__all__ = [
    "ModelEntry", "register_model", "list_models", "get_entry", "default_model_config",
    "create_model", "count_parameters", "model_table", "SHORT_ARCHS",
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
        raise ValueError(f"unknown model {name!r}{hint}; `ctlesion models` lists them") from None


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
    from .models.maskrcnn import build_maskrcnn

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
                return ModelConfig(
                    backbone=BackboneConfig(arch=arch, stages=stages),
                    detector=replace(
                        DetectorConfig(),
                        rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=2000,
                        rpn_post_nms_top_n_train=1000, rpn_post_nms_top_n_test=1000,
                        rpn_positive_fraction=0.5,
                        box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5,
                        box_batch_size_per_image=512, box_positive_fraction=0.25,
                        box_score_thresh=0.75, box_detections_per_img=128,
                    ),
                )

            register_model(
                f"ssm-detector-{short}-s{stages}",
                f"Single-Shot Model segmentation branch: {SHORT_ARCHS[short]} cut after layer{stages}, "
                "single-level FPN, SSM code's RPN/RoI sampling (papers 001/003)",
                build_maskrcnn,
            )(ssm)


_register_segmentation()
