"""Built-in weights in the engine: a name becomes a verified checkpoint folder, and a trained
checkpoint becomes a built-in (``scripts/make_builtin.py``).

* :func:`resolve_checkpoint` turns ``--checkpoint PATH``, ``--model NAME`` or
  ``train.init_from`` (a path or a built-in name) into a checkpoint folder; a built-in
  one is first checked against the catalogue's SHA-256.
* :func:`make_builtin` converts a checkpoint into an fp16 built-in folder with its model
  card and adds it to the catalogue (see :mod:`ctlesion.builtin`).
* :func:`check_catalogue` verifies and loads every catalogue entry (the test that guards
  what is shipped).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from .. import __version__
from ..builtin import (CARD, CARD_FIELDS, CARD_MD, CATALOGUE, CATALOGUE_FORMAT, DISCLAIMER, WEIGHTS_FILE,
                       builtin_names, builtin_root, builtin_weights, read_catalogue, render_card)
from ..errors import CheckpointError, ConfigError
from ..registry import count_parameters, list_models
from .checkpoint import load_checkpoint, read_meta, save_checkpoint
from .io import atomic_write_text, sha256_file

__all__ = ["resolve_checkpoint", "builtin_checkpoint", "make_builtin", "read_card_input", "check_catalogue",
           "remove_builtin"]


def builtin_checkpoint(name: str, root: str | Path | None = None) -> Path:
    """The folder of built-in model ``name`` (a built-in name, or a registry model with one
    built-in), its weights verified against the catalogue's SHA-256."""
    return builtin_weights(name, root, registry_names=list_models()).folder


def resolve_checkpoint(name_or_path: str | Path, root: str | Path | None = None) -> Path:
    """A checkpoint folder from a path or a built-in name: a :class:`~pathlib.Path` or an
    existing path is taken as it is; otherwise a name in the built-in catalogue (or a
    registry model with one built-in) is its verified folder. A string that is neither is a
    :class:`CheckpointError` listing the built-in names."""
    path = Path(name_or_path)
    if isinstance(name_or_path, Path) or path.exists():
        return path
    text = str(name_or_path)
    catalogue = read_catalogue(root)
    if text in catalogue or any(e.model == text for e in catalogue.values()):
        return builtin_checkpoint(text, root)
    try:
        read_meta(path, verify=False)   # a folder an interrupted save left missing is recovered here
    except CheckpointError:
        names = ", ".join(builtin_names(root)) or "none are installed"
        raise CheckpointError(f"{text}: neither a checkpoint folder nor a built-in model name "
                              f"(built-in: {names})") from None
    return path


# ------------------------------------------------------------------ making a built-in


def read_card_input(path: str | Path) -> dict:
    """A model card written by hand (YAML or JSON), its fields checked; errors name the file."""
    path = Path(path)
    try:
        card = yaml.safe_load(path.read_text())   # JSON is YAML too
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: unreadable model card ({exc})") from None
    if not isinstance(card, dict):
        raise ConfigError(f"{path}: a model card is a mapping of fields, not {type(card).__name__}")
    missing = [k for k in CARD_FIELDS if card.get(k) in (None, "", [], {})]
    if missing:
        raise ConfigError(f"{path}: the model card lacks {', '.join(missing)} (it needs {', '.join(CARD_FIELDS)})")
    metrics = card["metrics"]
    if not isinstance(metrics, dict) or not isinstance(metrics.get("values"), dict) or not metrics["values"]:
        raise ConfigError(f"{path}: metrics must be a mapping with 'protocol' (how they were measured) and "
                          "'values' (metric name -> {mean, std, folds})")
    if not metrics.get("protocol"):
        raise ConfigError(f"{path}: metrics.protocol is missing (say how the metrics were measured, e.g. "
                          "'5-fold cross-validation on the 50 COVID-SemiSeg slices')")
    for name, value in metrics["values"].items():
        if not isinstance(value, dict) or not all(isinstance(value.get(k), (int, float)) for k in ("mean", "std")):
            raise ConfigError(f"{path}: metrics.values.{name} needs a numeric 'mean' and 'std' (the CV spread)")
        folds = value.get("folds")
        if folds is not None and (not isinstance(folds, list) or not all(isinstance(v, (int, float)) for v in folds)):
            raise ConfigError(f"{path}: metrics.values.{name}.folds must be a list of per-fold numbers, not {folds!r}")
    text = json.dumps(card).lower()
    if "semiseg" in text and "non-commercial" not in str(card["licence"]).lower():
        raise ConfigError(f"{path}: the model was trained on COVID-SemiSeg, which is licensed for non-commercial "
                          "research only; the licence field must say 'non-commercial'")
    unknown = set(card) - set(CARD_FIELDS) - {"extra", "title"}
    if unknown:
        raise ConfigError(f"{path}: unknown card fields {sorted(unknown)} (put free-form sections under 'extra')")
    return card


def _write_catalogue(root: Path, entries: dict[str, dict]) -> None:
    data = {"format_version": CATALOGUE_FORMAT, "models": dict(sorted(entries.items()))}
    atomic_write_text(root / CATALOGUE, json.dumps(data, indent=2) + "\n")


def make_builtin(checkpoint: str | Path, name: str, card: str | Path | dict, *, root: str | Path | None = None,
                 replace: bool = False, weights_dtype: str = "float16") -> dict:
    """Convert ``checkpoint`` into built-in model ``name`` under the built-in root: an fp16
    checkpoint folder ``NAME/`` (weights only), ``card.json`` + ``card.md`` and the
    catalogue entry. ``card`` is a card file (YAML/JSON, see :func:`read_card_input`) or
    its mapping. Returns the catalogue entry."""
    if not name or name != name.strip() or "/" in name or name.startswith("."):
        raise ConfigError(f"built-in name {name!r}: use letters, digits and dashes")
    if name in list_models():
        raise ConfigError(f"built-in name {name!r} is a registry model name; name the weights, e.g. "
                          f"'{name}-semiseg'")
    root = builtin_root(root)
    fields = read_card_input(card) if not isinstance(card, dict) else card
    catalogue = {n: _entry_dict(e, root) for n, e in read_catalogue(root).items()}
    if name in catalogue and not replace:
        raise ConfigError(f"built-in model {name!r} exists in {root / CATALOGUE}; pass --replace to overwrite it")
    checkpoint = Path(checkpoint)
    model, cfg, meta = load_checkpoint(checkpoint)
    folder = root / name
    save_checkpoint(folder, model, cfg, epoch=meta.get("epoch", 0), step=meta.get("step", 0), task=meta.get("task"),
                    weights_dtype=weights_dtype,
                    source={"file": str(checkpoint), "sha256": meta["files"]["model.safetensors"],
                            "format": f"ctlesion checkpoint ({meta.get('weights_dtype', 'float32')})",
                            "epoch": meta.get("epoch"), "step": meta.get("step")})
    written = read_meta(folder)
    weights = folder / WEIGHTS_FILE
    entry = {"folder": name, "model": cfg.model.name, "task": written["task"],
             "sha256": sha256_file(weights), "size_bytes": weights.stat().st_size, "weights_dtype": weights_dtype}
    full = {"name": name, **{k: fields[k] for k in fields if k != "title"},
            "disclaimer": DISCLAIMER, "model": cfg.model.name, "task": written["task"],
            "class_names": written.get("class_names", []), "parameters": count_parameters(model),
            "weights_dtype": weights_dtype, "sha256": entry["sha256"], "size_bytes": entry["size_bytes"],
            "source": written["source"], "ctlesion_version": __version__}
    if fields.get("title"):
        full["title"] = fields["title"]
    atomic_write_text(folder / CARD, json.dumps(full, indent=2) + "\n")
    atomic_write_text(folder / CARD_MD, render_card(full))
    _readable(folder)
    catalogue[name] = entry
    _write_catalogue(root, catalogue)
    return entry


def _readable(folder: Path) -> None:
    """Package files get the umask's default permissions (safetensors may write 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.iterdir():
        os.chmod(file, 0o666 & ~umask)


def _entry_dict(entry, root: Path) -> dict:
    folder = entry.folder.relative_to(root.resolve()) if entry.folder.is_relative_to(root.resolve()) else entry.folder
    return {"folder": str(folder), "model": entry.model, "task": entry.task, "sha256": entry.sha256,
            "size_bytes": entry.size_bytes, "weights_dtype": entry.weights_dtype}


def remove_builtin(name: str, root: str | Path | None = None) -> None:
    """Take built-in ``name`` out of the catalogue and delete its folder."""
    root = builtin_root(root)
    catalogue = read_catalogue(root)
    if name not in catalogue:
        raise ConfigError(f"no built-in model {name!r} in {root / CATALOGUE}")
    folder = catalogue.pop(name).folder
    _write_catalogue(root, {n: _entry_dict(e, root) for n, e in catalogue.items()})
    shutil.rmtree(folder, ignore_errors=True)


def check_catalogue(root: str | Path | None = None) -> list[dict]:
    """Verify (SHA-256, size) and load every catalogue entry; each must be the model and
    task the catalogue says, and have a card. Returns one ``{name, model, task,
    parameters}`` per entry; raises on the first that fails."""
    checked = []
    for name, entry in sorted(read_catalogue(root).items()):
        folder = builtin_checkpoint(name, root)
        model, cfg, meta = load_checkpoint(folder)
        if cfg.model.name != entry.model or meta.get("task") != entry.task:
            raise CheckpointError(f"built-in model {name!r}: {folder} holds {cfg.model.name} ({meta.get('task')}), "
                                  f"the catalogue says {entry.model} ({entry.task})")
        if not (folder / CARD).is_file():
            raise CheckpointError(f"built-in model {name!r}: {folder / CARD} is missing")
        if json.loads((folder / CARD).read_text()).get("sha256") != entry.sha256:
            raise CheckpointError(f"built-in model {name!r}: {folder / CARD} gives another SHA-256 than the catalogue")
        checked.append({"name": name, "model": entry.model, "task": entry.task,
                        "parameters": count_parameters(model)})
    return checked
