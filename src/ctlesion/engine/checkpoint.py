"""Checkpoints as folders that load without unpickling anything.

Layout of a checkpoint folder::

    model.safetensors   weights (safetensors: no code can run on load)
    config.yaml         the resolved ExperimentConfig, enough to rebuild the model
    train_state.pt      optimizer state, position in training, RNG states (resume only;
                        loaded with ``weights_only=True``)
    meta.json           written last: format version, model name, class names, epoch,
                        and the SHA-256 of every other file

A checkpoint is built in a temporary sibling folder and swapped in by renames, so a
crash leaves either the old or the new checkpoint: a process killed between the two
renames leaves no folder at ``path`` but a complete ``.NAME.tmp-*`` (the new one) and the
``.NAME.old-*`` (the previous one); :func:`read_meta` puts the newest complete one back.
``meta.json`` is written last and its hashes catch a folder whose files were damaged or
mixed afterwards. Leftovers of interrupted saves are removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
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
    "load_weights", "CheckpointMeta", "FORMAT_VERSION", "WEIGHT_DTYPES",
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


WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _state_dict_for_safetensors(model: nn.Module, weights_dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The state dict as safetensors takes it. ``float16`` stores the floating-point
    *parameters* at half precision; buffers (BatchNorm running statistics, whose variances
    can sit below fp16's normal range, and integer counters) keep their own dtype."""
    # safetensors refuses shared or non-contiguous storage; clone makes each tensor its own.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if weights_dtype == "float32":
        return state
    dtype = WEIGHT_DTYPES[weights_dtype]
    limit = torch.finfo(dtype).max
    params = {name for name, _ in model.named_parameters()}
    for name in params & set(state):
        value = state[name]
        if value.is_floating_point():
            if bool((value.abs() > limit).any()):
                raise CheckpointError(f"parameter {name} has values beyond {weights_dtype}'s range "
                                      f"(|x| > {limit:g}); it cannot be stored as {weights_dtype}")
            state[name] = value.to(dtype)
    return state


def save_checkpoint(
    path: str | Path, model: nn.Module, config: ExperimentConfig, *, epoch: int, step: int,
    train_state: dict[str, Any] | None = None, task: str | None = None, source: dict[str, Any] | None = None,
    weights_dtype: str = "float32",
) -> Path:
    """Write a checkpoint folder at ``path`` atomically (replacing any previous one).

    ``task`` (``segmentation``, ``classification``, ``joint``) defaults to the registry's
    for ``config.model.name``.

    ``source`` (converted checkpoints) is recorded in ``meta.json``: the original file's
    name, SHA-256 and format.

    ``weights_dtype="float16"`` stores the parameters at half precision (built-in weights;
    recorded in ``meta.json``, cast back to fp32 by :func:`load_weights`)."""
    if weights_dtype not in WEIGHT_DTYPES:
        raise CheckpointError(f"weights dtype must be one of {sorted(WEIGHT_DTYPES)}, not {weights_dtype!r}")
    task = task or get_entry(config.model.name).task
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _recover(path)             # a save killed between its renames: the newest complete one back
    _remove_leftovers(path)
    tmp = path.parent / f".{path.name}.tmp-{time.time_ns()}"
    tmp.mkdir()
    try:
        save_file(_state_dict_for_safetensors(model, weights_dtype), str(tmp / WEIGHTS))
        _test_kill_point()
        save_config(config, tmp / CONFIG)
        files = [WEIGHTS, CONFIG]
        if train_state is not None:
            torch.save(train_state, tmp / STATE)
            _test_kill_point()
            files.append(STATE)
        meta = {
            "format_version": FORMAT_VERSION,
            "version": __version__,
            "model_name": config.model.name,
            "class_names": list(getattr(model, "class_names", [])),
            "epoch": int(epoch),
            "step": int(step),
            "task": task,
            "weights_dtype": weights_dtype,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {name: sha256_file(tmp / name) for name in files},
        }
        if source is not None:
            meta["source"] = source
        atomic_write_text(tmp / META, json.dumps(meta, indent=2))
        _test_kill_point()
        old = path.parent / f".{path.name}.old-{time.time_ns()}"
        if path.exists():
            path.rename(old)
            _test_kill_point()
        tmp.rename(path)
        _test_kill_point()
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


_KILL_POINTS = {"count": 0}


def _test_kill_point() -> None:
    """Fault-injection hook for the kill-during-save test: with ``CTLESION_TEST_KILL_AT=k``
    the process SIGKILLs itself at the k-th point of checkpoint writing (no cleanup runs)."""
    target = os.environ.get("CTLESION_TEST_KILL_AT")
    if target is not None:
        _KILL_POINTS["count"] += 1
        if _KILL_POINTS["count"] == int(target):
            os.kill(os.getpid(), signal.SIGKILL)


def _leftovers(path: Path, kind: str) -> list[Path]:
    """``.NAME.tmp-*`` / ``.NAME.old-*`` folders of interrupted saves, newest first."""
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.{kind}-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]),
                  reverse=True)


def _complete(folder: Path) -> bool:
    try:
        read_meta(folder)
        return True
    except CheckpointError:
        return False


def _recover(path: Path) -> Path | None:
    """Put back the newest complete checkpoint an interrupted save left beside ``path``: the
    new one (``tmp``, meta written) if complete, else the previous one (``old``)."""
    for candidate in _leftovers(path, "tmp") + _leftovers(path, "old"):
        if _complete(candidate):
            candidate.rename(path)
            return path
    return None


def _remove_leftovers(path: Path) -> None:
    for folder in _leftovers(path, "tmp") + _leftovers(path, "old"):
        shutil.rmtree(folder, ignore_errors=True)


def read_meta(path: Path, verify: bool = True) -> dict:
    """``meta.json`` of checkpoint folder ``path``, each file checked against its SHA-256.
    A folder an interrupted save left missing is first recovered from its leftovers."""
    if not path.is_dir() and _recover(path) is None:
        raise CheckpointError(f"checkpoint folder not found: {path}")
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
    state = load_weights(path, meta, map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit model {cfg.model.name!r} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model, cfg, meta


def load_weights(path: str | Path, meta: dict, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The weights of checkpoint folder ``path`` (``meta`` from :func:`read_meta`), every
    reduced-precision floating-point tensor cast back to fp32; integer tensors as stored."""
    state = load_file(str(Path(path) / WEIGHTS), device=str(map_location))
    if meta.get("weights_dtype", "float32") == "float32":
        return state
    return {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in state.items()}


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    return load_checkpoint(path, map_location)[0]


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The resume state (optimizer, epoch, RNG); ``weights_only=True``, verified by hash."""
    path = Path(path)
    meta = read_meta(path)
    if STATE not in meta["files"]:
        raise CheckpointError(f"{path}: holds weights only (no {STATE}); it cannot be resumed")
    return torch.load(path / STATE, map_location="cpu", weights_only=True)
