"""Built-in weights: trained models shipped inside the package, run by name (``--model NAME``).

This package is data. ``catalogue.json`` names each built-in model::

    {"format_version": 1,
     "models": {"NAME": {"folder": "NAME", "model": "maskrcnn-r18-s3", "task": "segmentation",
                         "sha256": "<SHA-256 of FOLDER/model.safetensors>", "size_bytes": 1234567,
                         "weights_dtype": "float16"}}}

and each ``FOLDER/`` is a ctlesion checkpoint folder (``model.safetensors`` in fp16,
``config.yaml``, ``meta.json``) with its model card ``card.json`` (and ``card.md``, the
same card rendered for reading). ``scripts/make_builtin.py`` writes both.

This module only reads the catalogue and checks files (no torch, no engine):
:func:`builtin_weights` returns a verified folder; loading it is
:func:`ctlesion.engine.builtin_weights.resolve_checkpoint`'s job. The root is this
package's folder unless ``CTLESION_BUILTIN_DIR`` (or a ``root`` argument) says otherwise.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ConfigError

__all__ = [
    "CATALOGUE", "CARD", "CARD_MD", "WEIGHTS_FILE", "DISCLAIMER", "CARD_FIELDS", "BuiltinEntry",
    "builtin_root", "read_catalogue", "builtin_names", "builtin_entry", "builtin_for_model",
    "builtin_weights", "read_card", "render_card", "file_sha256",
]

CATALOGUE, CARD, CARD_MD, WEIGHTS_FILE = "catalogue.json", "card.json", "card.md", "model.safetensors"
CATALOGUE_FORMAT = 1
DISCLAIMER = ("Research software, not a medical device: not validated for clinical use, "
              "not for diagnosis or treatment decisions.")
# The fields a card must give (scripts/make_builtin.py checks them), in the order it is printed.
CARD_FIELDS = ("summary", "training_data", "licence", "preprocessing", "window", "metrics", "intended_use",
               "limits")


@dataclass(frozen=True)
class BuiltinEntry:
    name: str
    folder: Path          # absolute
    model: str            # the registry name
    task: str
    sha256: str
    size_bytes: int
    weights_dtype: str

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS_FILE


def builtin_root(root: str | Path | None = None) -> Path:
    """Where the catalogue lives: ``root``, else ``$CTLESION_BUILTIN_DIR``, else this package."""
    if root is not None:
        return Path(root)
    env = os.environ.get("CTLESION_BUILTIN_DIR")
    return Path(env) if env else Path(__file__).resolve().parent


def read_catalogue(root: str | Path | None = None) -> dict[str, BuiltinEntry]:
    """Every catalogue entry by name; a missing catalogue is an empty one."""
    root = builtin_root(root)
    path = root / CATALOGUE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: unreadable built-in catalogue ({exc})") from None
    if not isinstance(data, dict) or data.get("format_version") != CATALOGUE_FORMAT:
        raise CheckpointError(f"{path}: built-in catalogue format {data.get('format_version') if isinstance(data, dict) else None!r} "
                              f"is not supported (expected {CATALOGUE_FORMAT})")
    entries = {}
    for name, item in (data.get("models") or {}).items():
        try:
            entries[name] = BuiltinEntry(name, (root / item["folder"]).resolve(), item["model"], item["task"],
                                         item["sha256"], int(item["size_bytes"]), item.get("weights_dtype", "float32"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: entry {name!r} is incomplete ({exc!r})") from None
    return entries


def builtin_names(root: str | Path | None = None) -> list[str]:
    return sorted(read_catalogue(root))


def builtin_for_model(root: str | Path | None = None) -> dict[str, list[str]]:
    """Registry model name -> the built-in names holding weights for it."""
    found: dict[str, list[str]] = {}
    for entry in read_catalogue(root).values():
        found.setdefault(entry.model, []).append(entry.name)
    return {model: sorted(names) for model, names in found.items()}


def builtin_entry(name: str, root: str | Path | None = None, registry_names=()) -> BuiltinEntry:
    """The entry ``name`` names: a built-in name, or a registry model with exactly one built-in.

    ``registry_names`` (the registered models, passed by the caller) lets the error for a
    model without built-in weights say so instead of "unknown"."""
    catalogue = read_catalogue(root)
    if name in catalogue:
        return catalogue[name]
    by_model = [e for e in catalogue.values() if e.model == name]
    if len(by_model) == 1:
        return by_model[0]
    available = ", ".join(sorted(catalogue)) or "none are installed"
    if by_model:
        raise ConfigError(f"model {name!r} has {len(by_model)} built-in weights "
                          f"({', '.join(sorted(e.name for e in by_model))}); name one of them")
    if name in set(registry_names):
        raise ConfigError(f"{name!r} is a registered model without built-in weights (built-in: {available}); "
                          "train it (`ctlesion train`) and pass --checkpoint")
    close = difflib.get_close_matches(name, list(catalogue) + sorted({e.model for e in catalogue.values()}), n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"no built-in model {name!r} (built-in: {available}){hint}")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def builtin_weights(name: str, root: str | Path | None = None, registry_names=()) -> BuiltinEntry:
    """The entry of ``name`` after checking its weights file against the catalogue's SHA-256
    and size (a :class:`CheckpointError` naming the file when it differs or is missing)."""
    entry = builtin_entry(name, root, registry_names)
    weights = entry.weights
    if not weights.is_file():
        raise CheckpointError(f"built-in model {entry.name!r}: {weights} is missing (reinstall ctlesion)")
    size = weights.stat().st_size
    if size != entry.size_bytes:
        raise CheckpointError(f"built-in model {entry.name!r}: {weights} has {size} bytes, the catalogue says "
                              f"{entry.size_bytes} (damaged or replaced; reinstall ctlesion)")
    digest = file_sha256(weights)
    if digest != entry.sha256:
        raise CheckpointError(f"built-in model {entry.name!r}: {weights} does not match its SHA-256 in the "
                              f"catalogue ({digest[:12]}... != {entry.sha256[:12]}...; damaged or replaced)")
    return entry


def read_card(name: str, root: str | Path | None = None, registry_names=()) -> dict:
    """The model card of built-in ``name`` (``card.json``)."""
    entry = builtin_entry(name, root, registry_names)
    path = entry.folder / CARD
    if not path.is_file():
        raise CheckpointError(f"built-in model {entry.name!r} has no model card ({path} is missing)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: unreadable model card ({exc})") from None


def _metric_line(name: str, value) -> str:
    if isinstance(value, dict) and "mean" in value:
        text = f"{value['mean']:.4f} ± {value.get('std', float('nan')):.4f}"
        if value.get("folds"):
            text += " (folds: " + ", ".join(f"{v:.4f}" for v in value["folds"]) + ")"
        return f"- {name}: {text}"
    return f"- {name}: {value}"


def render_card(card: dict) -> str:
    """The card as Markdown (what ``ctlesion models --card`` prints and ``card.md`` holds)."""
    lines = [f"# {card.get('name', '?')}: {card.get('summary', '')}".rstrip(": "), "",
             f"**{card.get('disclaimer', DISCLAIMER)}**", "",
             f"- registry model: `{card.get('model')}` (task: {card.get('task')})",
             f"- classes: {', '.join(card.get('class_names') or []) or 'n/a'}",
             f"- weights: `{WEIGHTS_FILE}`, {card.get('weights_dtype', '?')}, "
             f"{card.get('size_bytes', 0) / 1e6:.2f} MB ({card.get('size_bytes', '?')} bytes), "
             f"{card.get('parameters', '?')} parameters",
             f"- SHA-256: `{card.get('sha256')}`", ""]
    titles = {"training_data": "Training data", "licence": "Licence", "preprocessing": "Preprocessing",
              "window": "Window", "intended_use": "Intended use", "limits": "Limits"}
    for key in CARD_FIELDS:
        if key == "summary":
            continue
        if key == "metrics":
            metrics = card.get("metrics") or {}
            lines += ["## Metrics", ""]
            if metrics.get("protocol"):
                lines += [str(metrics["protocol"]), ""]
            lines += [_metric_line(k, v) for k, v in (metrics.get("values") or {}).items()] + [""]
            continue
        value = card.get(key)
        lines += [f"## {titles[key]}", ""]
        lines += ([f"- {v}" for v in value] if isinstance(value, list) else [str(value)]) + [""]
    for key, value in (card.get("extra") or {}).items():
        lines += [f"## {key}", "", str(value), ""]
    if card.get("source"):
        src = card["source"]
        lines += ["## Provenance", "", f"converted from `{src.get('file')}` (SHA-256 `{src.get('sha256')}`), "
                  f"epoch {src.get('epoch')}, step {src.get('step')}, ctlesion {card.get('ctlesion_version')}", ""]
    return "\n".join(lines).rstrip() + "\n"
