"""Slice class names and class maps: the label conventions the classification data share."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import DataError

__all__ = ["CLASS_NAMES", "CLASS_FOLDER_ALIASES", "resolve_class_map"]

#: Source class order of COVIDx-CT, the author's names and COVID-CT-MD (spec §1.2).
CLASS_NAMES = ("normal", "cp", "covid")

# Folder names that make a folder of subfolders an unambiguous ``class_folders`` root
# (auto-detection only; the dataset itself accepts any names).
CLASS_FOLDER_ALIASES = frozenset({
    "normal", "control", "negative", "noncovid", "non-covid", "non_covid",
    "cp", "cap", "pneumonia",
    "covid", "covid-19", "covid19", "covid_19", "ncp", "positive",
})


def resolve_class_map(
    class_map: Sequence[int] | None, source_names: Sequence[str]
) -> tuple[list[int], tuple[str, ...]]:
    """Source index -> model index (``-1`` drops), and the model's class names.

    Without a map, model classes are the source classes. With one, model class ``k`` is
    named after the source classes mapped to it, joined by ``+`` (``"unused"`` when none).
    """
    n = len(source_names)
    if class_map is None:
        return list(range(n)), tuple(source_names)
    values = list(class_map)
    if len(values) != n:
        raise DataError(
            f"class_map {values} has {len(values)} entries but the source has {n} classes "
            f"({', '.join(f'{i} {name}' for i, name in enumerate(source_names))}); give one model "
            "index (or -1 to drop) per source class"
        )
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < -1:
            raise DataError(f"class_map {values}: entries must be integers >= 0, or -1 to drop, got {v!r}")
    kept = [int(v) for v in values if v >= 0]
    if not kept:
        raise DataError(f"class_map {values} drops every class")
    names = []
    for k in range(max(kept) + 1):
        sources = [source_names[i] for i, v in enumerate(values) if v == k]
        names.append("+".join(sources) if sources else "unused")
    return [int(v) for v in values], tuple(names)
