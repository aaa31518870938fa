"""Resolving a run's configuration: registry defaults <- YAML file <- ``--set`` overrides,
and reading saved configs of any version.

1. the registry's defaults for ``model.name`` (the paper's hyper-parameters);
2. the YAML file (only the keys it states);
3. ``--set key=value`` overrides (values parsed as YAML scalars).

The fully resolved config is written next to every output (``config.yaml``, with its
schema ``version``), so a checkpoint rebuilds its model without the YAML it came from. When
a field is renamed or its meaning changes, bump ``CONFIG_VERSION`` and add an upgrader to
:data:`UPGRADERS` (detectron2's ``config/compat.py`` idea): saved checkpoints keep loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml

from .config import (CONFIG_VERSION, ConfigError, ExperimentConfig, ModelConfig, apply_overrides, check_augment,
                     read_yaml, update_dataclass)
from .registry import default_model_config

__all__ = ["load_experiment", "experiment_from_dict", "upgrade_config", "check_experiment", "UPGRADERS"]

# version N -> a function turning a version-N mapping into a version-(N+1) mapping (in place).
UPGRADERS: dict[int, Callable[[dict], None]] = {}


def upgrade_config(data: dict, source: str = "config") -> dict:
    """Bring a saved config mapping up to :data:`CONFIG_VERSION` (a copy; no key = version 1)."""
    data = dict(data)
    version = int(data.get("version", 1))
    if version > CONFIG_VERSION:
        raise ConfigError(f"{source}: config version {version} is newer than this ctlesion's "
                          f"({CONFIG_VERSION}); upgrade ctlesion")
    while version < CONFIG_VERSION:
        if version not in UPGRADERS:
            raise ConfigError(f"{source}: no upgrade from config version {version}")
        UPGRADERS[version](data)
        version += 1
    data["version"] = CONFIG_VERSION
    return data


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Resolve registry defaults <- YAML file <- overrides into an :class:`ExperimentConfig`."""
    data = upgrade_config(read_yaml(path), str(path)) if path is not None else {}
    overrides = list(overrides or [])
    model_name = data.get("model", {}).get("name", ModelConfig().name)
    for item in overrides:
        if item.split("=", 1)[0].strip() == "model.name":
            model_name = yaml.safe_load(item.split("=", 1)[1])
    cfg = ExperimentConfig(model=default_model_config(model_name))
    try:
        update_dataclass(cfg, data)
        apply_overrides(cfg, overrides)
        check_experiment(cfg)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None
    return cfg


def experiment_from_dict(data: dict, source: str = "config") -> ExperimentConfig:
    """Rebuild a resolved config (e.g. a checkpoint's ``config.yaml``), upgrading old versions."""
    cfg = update_dataclass(ExperimentConfig(), upgrade_config(data, source))
    try:
        check_experiment(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def check_experiment(cfg: ExperimentConfig) -> None:
    """Rules across fields, checked when a config loads: augmentation settings in range,
    and none on scoring data (``val_data``), which must be seen as it is."""
    for key in ("data", "seg_data"):
        data = getattr(cfg, key)
        if data is not None and data.augment is not None:
            check_augment(data.augment, f"{key}.augment")
    if cfg.val_data is not None and cfg.val_data.augment is not None:
        raise ConfigError("val_data.augment: validation data is never augmented; "
                          "set augmentation under data (and seg_data)")
