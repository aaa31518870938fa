"""Patient-level verdicts from slice-level class probabilities.

The classifiers of this project (spec §1.2, §4–§7) label single slices; a CT study is a stack
of slices. :func:`patient_verdict` turns the ``[S, C]`` softmax probabilities of one patient's
slices into one verdict, and :func:`group_by_patient` collects the slice indices of each
patient from file names or records.

A slice is called **abnormal** when its argmax is not the normal class; every verdict reports
how many slices were abnormal, whatever the method. Ties in an argmax go to the lower class
index (numpy's ``argmax``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np

from .arrays import as_numpy
from .classification import validate_class_names

__all__ = ["patient_verdict", "group_by_patient", "PATIENT_METHODS"]

#: Aggregation methods accepted by :func:`patient_verdict`.
PATIENT_METHODS: tuple[str, ...] = ("mean", "abnormal_fraction", "max")

#: Tolerance of the probability checks (values in [0, 1], rows summing to 1); loose enough for
#: float16 softmax outputs, tight enough to reject logits.
_PROB_TOL = 1e-2


def _normal_index(normal_class: int | str, names: list[str]) -> int:
    if isinstance(normal_class, str):
        if normal_class not in names:
            raise ValueError(f"normal_class {normal_class!r} is not one of {names}")
        return names.index(normal_class)
    if isinstance(normal_class, bool) or not isinstance(normal_class, (int, np.integer)):
        raise ValueError(f"normal_class must be a class index or name, got {normal_class!r}")
    k = int(normal_class)
    if not 0 <= k < len(names):
        raise ValueError(f"normal_class {k} is out of range for {len(names)} classes")
    return k


def patient_verdict(
    probabilities: Any,
    class_names: Sequence[str],
    method: str = "mean",
    normal_class: int | str = 0,
    min_abnormal_fraction: float = 0.1,
) -> dict[str, Any]:
    """One verdict for a patient from the softmax probabilities of its slices.

    Methods:

    ``"mean"`` (the default)
        Argmax of the mean slice probabilities; ``probabilities`` = that mean (sums to 1).
        Simple and calibrated for a set of *selected* slices (e.g. the COVIDx-CT slices, which
        were chosen to show the finding), but biased to Normal on a whole volume: most slices
        of a sick patient's CT (apices, bases, slices between lesions) look normal, and they
        outvote the few lesion slices.

    ``"abnormal_fraction"`` (the one to use for whole CT volumes)
        Counts the abnormal slices ``k`` (argmax not the normal class). If ``k == 0`` or
        ``k / S < min_abnormal_fraction`` the patient is Normal and ``probabilities`` = the
        mean over **all** slices. Otherwise the mean is taken over the ``k`` abnormal slices
        only, the normal class is dropped and the remaining entries are renormalised to sum to
        1; the verdict is their argmax and ``probabilities`` = those renormalised values, with
        0.0 for the normal class. Why: the question "which disease" is answered by the slices
        that show disease, while the fraction threshold keeps a few isolated false-positive
        slices (noise, motion, a vessel mistaken for a GGO) from making every patient sick.
        Dropping the normal class makes the reported probabilities agree with the verdict
        (a mean over abnormal slices can still have Normal as its largest entry when the
        abnormal slices split between diseases). The boundary ``k / S == min_abnormal_fraction``
        counts as abnormal.

    ``"max"``
        For each non-normal class the maximum slice probability; the patient gets the class
        with the largest such maximum if it is **strictly above 0.5**, else Normal.
        ``probabilities`` = the per-class maxima over slices (the normal class included, for
        information); they do **not** sum to 1. Why: the most sensitive rule (one confident
        slice is enough, as a radiologist needs one lesion), and 0.5 is the natural cut for a
        softmax output: above it the class outweighs all others together, so the deciding
        slice's own argmax is that class. Expect more false positives than the other methods.

    Args:
        probabilities: ``[S, C]`` softmax probabilities of the patient's ``S`` slices (array
            or tensor); a single ``[C]`` vector is taken as one slice. Values must lie in
            [0, 1] and rows must sum to 1 (to within 0.01), which rejects raw logits.
        class_names: ``C`` distinct names in class-index order (2 or more), e.g.
            ``["Normal", "CP", "COVID-19"]`` or ``["negative", "covid"]``.
        method: ``"mean"``, ``"abnormal_fraction"`` or ``"max"``.
        normal_class: index or name of the normal (negative) class.
        min_abnormal_fraction: ``"abnormal_fraction"`` only; in [0, 1].

    Returns:
        ``{"class": name, "class_index": i, "probabilities": {name: p}, "method": method,
        "num_slices": S, "abnormal_slices": k, "abnormal_fraction": k / S}``, plain Python
        types throughout.

    Raises:
        ValueError: empty input, a width that differs from ``len(class_names)``, NaN/inf,
            values that are not probabilities, an unknown method, a bad ``normal_class`` or
            ``min_abnormal_fraction``.
    """
    names = validate_class_names(class_names)
    c = len(names)
    if method not in PATIENT_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {PATIENT_METHODS}")
    normal = _normal_index(normal_class, names)
    frac_min = float(min_abnormal_fraction)
    if not 0.0 <= frac_min <= 1.0:
        raise ValueError(f"min_abnormal_fraction must be in [0, 1], got {min_abnormal_fraction}")

    p = as_numpy(probabilities)
    if p.ndim == 1 and p.size:
        p = p[None, :]
    if p.ndim != 2:
        raise ValueError(f"probabilities must be [S, C], got shape {tuple(p.shape)}")
    if p.shape[0] == 0:
        raise ValueError("empty input: no slice probabilities")
    if p.shape[1] != c:
        raise ValueError(
            f"probabilities have {p.shape[1]} columns but there are {c} class names {names}"
        )
    if not (np.issubdtype(p.dtype, np.number) or p.dtype == np.bool_):
        raise ValueError(f"probabilities must be numeric, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or infinite values")
    if p.min() < -_PROB_TOL or p.max() > 1.0 + _PROB_TOL:
        raise ValueError(
            "probabilities must lie in [0, 1] (softmax outputs, not logits); "
            f"got range [{p.min():.4g}, {p.max():.4g}]"
        )
    row_sums = p.sum(axis=1)
    if np.any(np.abs(row_sums - 1.0) > _PROB_TOL):
        i = int(np.argmax(np.abs(row_sums - 1.0)))
        raise ValueError(f"slice {i} probabilities sum to {row_sums[i]:.4g}, expected 1")

    s = int(p.shape[0])
    abnormal = p.argmax(axis=1) != normal
    k = int(abnormal.sum())
    others = [j for j in range(c) if j != normal]

    if method == "mean":
        probs = p.mean(axis=0)
        verdict = int(np.argmax(probs))
    elif method == "abnormal_fraction":
        if k == 0 or k / s < frac_min:
            probs = p.mean(axis=0)
            verdict = normal
        else:
            sub = p[abnormal].mean(axis=0)[others]
            total = float(sub.sum())
            # Abnormal slices have their largest entry off the normal class, and rows sum to ~1,
            # so ``total`` >= 1/C > 0; guarded anyway.
            sub = sub / total if total > 0 else np.full(len(others), 1.0 / len(others))
            probs = np.zeros(c)
            probs[others] = sub
            verdict = others[int(np.argmax(sub))]
    else:  # "max"
        probs = p.max(axis=0)
        best = others[int(np.argmax(probs[others]))]
        verdict = best if probs[best] > 0.5 else normal

    return {
        "class": names[verdict],
        "class_index": int(verdict),
        "probabilities": {name: float(v) for name, v in zip(names, probs)},
        "method": method,
        "num_slices": s,
        "abnormal_slices": k,
        "abnormal_fraction": k / s,
    }


def _patient_from_name(name: str) -> str:
    """``<class>_<patient>_<scan>_<slice>.png`` (author's names, COVIDx-CT ``NCP_96_1328_0032``)
    -> ``<patient>``."""
    stem = PurePath(name).name
    parts = stem.split("_")
    if len(parts) < 4:
        raise ValueError(
            f"cannot read a patient id from {name!r}: expected "
            "'<class>_<patient>_<scan>_<slice>.<ext>'"
        )
    return parts[1]


def group_by_patient(
    records: Iterable[Any], key: Callable[[Any], Hashable] | str | None = None
) -> dict[Hashable, list[int]]:
    """Indices of ``records`` grouped by patient, in first-seen patient order.

    ``key`` picks the patient of a record: a callable, or the name of a mapping key. Without
    it, a mapping record uses ``"patient_id"`` (else ``"patient"``), and a string/path record
    is parsed as ``<class>_<patient>_<scan>_<slice>.<ext>`` (the author's renamed files and
    the COVIDx-CT names), giving the second token. Slices of several scans of one patient are
    grouped together (a patient-level verdict). Raises ``ValueError`` when a record carries no
    usable patient id.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, rec in enumerate(records):
        if callable(key):
            pid = key(rec)
        elif isinstance(key, str):
            if not isinstance(rec, Mapping) or key not in rec:
                raise ValueError(f"record {i} has no {key!r} entry")
            pid = rec[key]
        elif isinstance(rec, Mapping):
            pid = rec.get("patient_id", rec.get("patient"))
        elif isinstance(rec, (str, PurePath)):
            pid = _patient_from_name(str(rec))
        else:
            raise ValueError(
                f"record {i} ({type(rec).__name__}) is neither a file name nor a mapping; pass key="
            )
        if pid is None or pid == "":
            raise ValueError(f"record {i} has no patient id")
        groups.setdefault(pid, []).append(i)
    return groups
