"""Checkpoints as folders that load without unpickling anything.

Layout of a checkpoint folder::

    model.safetensors   weights (safetensors: no code can run on load)
    config.yaml         the resolved ExperimentConfig, enough to rebuild the model
    train_state.pt      optimizer state, position in training, RNG states (resume only;
                        loaded with ``weights_only=True``)
    meta.json           written last: format version, model name, class names, epoch,
                        and the SHA-256 of every other file

A checkpoint is built in a temporary sibling folder and swapped in by renames, so a
crash leaves either the old or the new checkpoint. ``meta.json``'s hashes catch a
folder whose files were damaged or mixed afterwards.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..config import ExperimentConfig
from ..errors import CheckpointError
from ..experiment import experiment_from_dict
from ..registry import create_model, get_entry
from .io import atomic_write_text, save_config, sha256_file

__all__ = [
    "CheckpointError", "save_checkpoint", "load_checkpoint", "load_model", "load_train_state", "read_meta",
    "CheckpointMeta", "FORMAT_VERSION",
]

FORMAT_VERSION = 1
WEIGHTS, CONFIG, STATE, META = "model.safetensors", "config.yaml", "train_state.pt", "meta.json"


@dataclass
class CheckpointMeta:
    model_name: str
    class_names: list[str]
    epoch: int
    step: int
    task: str
    version: str
    files: dict[str, str]


def _state_dict_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone makes each tensor its own.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    path: str | Path, model: nn.Module, config: ExperimentConfig, *, epoch: int, step: int,
    train_state: dict[str, Any] | None = None, task: str | None = None, source: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder at ``path`` atomically (replacing any previous one).

    ``task`` (``segmentation``, ``classification``, ``joint``) defaults to the registry's
    for ``config.model.name``.

    ``source`` (converted checkpoints) is recorded in ``meta.json``: the original file's
    name, SHA-256 and format."""
    task = task or get_entry(config.model.name).task
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{time.time_ns()}"
    tmp.mkdir()
    try:
        save_file(_state_dict_for_safetensors(model), str(tmp / WEIGHTS))
        save_config(config, tmp / CONFIG)
        files = [WEIGHTS, CONFIG]
        if train_state is not None:
            torch.save(train_state, tmp / STATE)
            files.append(STATE)
        meta = {
            "format_version": FORMAT_VERSION,
            "version": __version__,
            "model_name": config.model.name,
            "class_names": list(getattr(model, "class_names", [])),
            "epoch": int(epoch),
            "step": int(step),
            "task": task,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {name: sha256_file(tmp / name) for name in files},
        }
        if source is not None:
            meta["source"] = source
        atomic_write_text(tmp / META, json.dumps(meta, indent=2))
        old = path.parent / f".{path.name}.old-{time.time_ns()}"
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: Path, verify: bool = True) -> dict:
    """``meta.json`` of checkpoint folder ``path``, each file checked against its SHA-256."""
    if not path.is_dir():
        hint = ""
        olds = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        if olds:
            hint = f"; an interrupted save left the previous checkpoint at {olds[-1]}"
        raise CheckpointError(f"checkpoint folder not found: {path}{hint}")
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no {META}; the checkpoint is incomplete (interrupted save?)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')} is not supported")
    if verify:
        for name, digest in meta["files"].items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{path}: {name} is missing")
            if sha256_file(file) != digest:
                raise CheckpointError(f"{path}: {name} does not match its SHA-256 in {META} (corrupted)")
    return meta


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ExperimentConfig, dict]:
    """Rebuild the model from a checkpoint folder: ``(model, config, meta)``.

    Nothing is unpickled: weights come from safetensors, the config from YAML.
    """
    path = Path(path)
    meta = read_meta(path)
    cfg = experiment_from_dict(yaml.safe_load((path / CONFIG).read_text()))
    model = create_model(cfg.model)
    state = load_file(str(path / WEIGHTS), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit model {cfg.model.name!r} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model, cfg, meta


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    return load_checkpoint(path, map_location)[0]


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The resume state (optimizer, epoch, RNG); ``weights_only=True``, verified by hash."""
    path = Path(path)
    meta = read_meta(path)
    if STATE not in meta["files"]:
        raise CheckpointError(f"{path}: holds weights only (no {STATE}); it cannot be resumed")
    return torch.load(path / STATE, map_location="cpu", weights_only=True)
