"""Atomic file writes: a crash or a full disk never leaves a half-written file in place."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable

from ..builtin import file_sha256
from ..config import to_dict

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "sha256_file", "write_json", "save_config",
           "safe_filename"]


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then fsync and ``os.replace`` the temp file onto ``path``.

    The temporary file lives in the destination folder so the rename never crosses
    file systems. Permissions are reset to the umask default (``mkstemp`` uses 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (the built-in catalogue's function, which
    sits below the engine so that it needs no torch)."""
    return file_sha256(path)


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically; NaN/inf become ``null`` (undefined)."""
    import json
    import math

    def clean(obj):
        if isinstance(obj, float) and not math.isfinite(obj):
            return None  # JSON has no NaN; null means "undefined" (e.g. COCO AP without positives)
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    atomic_write_text(path, json.dumps(clean(data), indent=2) + "\n")


def save_config(cfg, path: str | Path) -> None:
    """Write a resolved config dataclass as YAML (atomically)."""
    import yaml


    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def safe_filename(text: str) -> str:
    """A sample id or stem as a portable file name (``P001#0003`` -> ``P001_0003``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "slice"
