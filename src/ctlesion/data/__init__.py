"""Data: readers, windowing, masks, datasets (segmentation and classification), phantoms.

The names below are importable from ``ctlesion.data`` directly; they are loaded on first
use (PEP 562), so ``import ctlesion.data.windowing`` stays light and import order between
the submodules does not matter.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Sample": "sample",
    "collate_samples": "sample",
    "LesionFolderDataset": "datasets",
    "VolumeDataset": "datasets",
    "CachedDataset": "wrappers",
    "ClassMappedDataset": "wrappers",
    "build_dataset": "factory",
    "parse_data_spec": "factory",
    "FORMATS": "factory",
    "discover_inputs": "discovery",
    "CLASS_NAMES": "labels",
    "ClassificationFolderDataset": "classification",
    "CovidCtMdDataset": "classification",
    "covidx_patient_id": "classification",
    "patient_labels": "classification",
    "patient_split": "classification",
    "split_indices": "classification",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
