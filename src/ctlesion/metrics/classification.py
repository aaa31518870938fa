"""Whole-slice classification metrics as the Ter-Sarkisov papers report them (spec §9.2).

:func:`classification_report` builds the confusion matrix (rows = true class, columns =
predicted, ``labels = 0..C-1`` so that every class gets a row and a column even when it is
absent) and derives from it, with scikit-learn:

* **sensitivity** (recall) ``CM[c,c] / row sum`` and **PPV** (precision) ``CM[c,c] / column
  sum`` per class;
* **F1** per class, ``2·TP / (2·TP + FP + FN)`` (= ``2·Sens·PPV / (Sens + PPV)`` whenever both
  are defined; 0 for a class that has true samples but is never predicted, or is predicted
  but never true);
* **overall accuracy** ``trace / total``;
* the papers' **class-adjusted F1** ``Σ_c w_c · F1_c`` (``f1_weighted``). By default ``w`` are
  the test-class shares (``support / total``, i.e. scikit-learn's ``average="weighted"``).
  ``class_weights="paper"`` uses the weights hard-coded in the author's code,
  ``(0.45, 0.35, 0.20)`` for (Normal, CP, COVID-19); these reproduce the published numbers
  (the exact COVIDx-CT test shares are 0.4459/0.3490/0.2051). Any other weights may be given
  as a sequence, one per class. Weights are used **as given, not renormalised**: the paper's
  weights happen to sum to 1 but are not the test shares, and a user who passes weights that
  do not sum to 1 gets exactly ``Σ w_c F1_c``. The weights used are recorded in
  ``f1_weights``;
* ``f1_macro``, the unweighted mean of the defined per-class F1 values;
* with ``scores`` (``[n, C]`` class probabilities), one-vs-rest **ROC AUC** per class
  (``roc_auc_score(y_true == c, scores[:, c])``) and their mean ``roc_auc_macro``.

Undefined values are ``None``, never a silent 0 and never a crash (scikit-learn's
``UndefinedMetricWarning`` is not emitted: ``zero_division=nan`` is requested and mapped to
``None``):

* sensitivity of a class with no true samples (empty row);
* PPV of a class that is never predicted (empty column);
* F1 of a class that is neither true nor predicted anywhere (``TP + FP + FN = 0``); such a
  class is left out of ``f1_macro``, and contributes nothing to ``f1_weighted`` when its
  weight is 0 (always the case with share weights). If it has a non-zero explicit weight,
  ``f1_weighted`` itself is ``None`` (the sum is undefined);
* ROC AUC of a class when ``y_true == c`` is all true or all false (only one label value);
  ``roc_auc_macro`` averages the defined ones (``None`` if there are none).

The per-class OvR AUC is computed class by class rather than with
``roc_auc_score(multi_class="ovr")``, which refuses inputs with an absent class and requires
rows that sum to 1. Scores only need to be finite; for a meaningful OvR AUC they should be the
softmax probabilities (a per-class ranking of raw logits is not the same thing).

All returned values are plain Python types (lists, dicts, floats, ints, ``None``), so the
report can be written with :func:`json.dump` as it is. :func:`format_report` renders it as a
small text table.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from ..errors import ConfigError
from .arrays import as_numpy

__all__ = ["classification_report", "format_report", "PAPER_F1_WEIGHTS"]

#: F1 weights hard-coded in the author's code for (Normal, CP, COVID-19) (spec §1.2, §9.2).
PAPER_F1_WEIGHTS: tuple[float, float, float] = (0.45, 0.35, 0.20)


def _labels(values: Any, name: str, num_classes: int) -> np.ndarray:
    """1-D integer class indices in ``[0, num_classes)`` -> int64 array (ValueError otherwise)."""
    arr = as_numpy(values)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of class indices, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or infinite values")
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer class indices, got non-integral values")
    out = arr.astype(np.int64)
    bad = (out < 0) | (out >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name}[{i}] = {out[i]} is out of range for {num_classes} classes "
            f"(expected 0..{num_classes - 1})"
        )
    return out


def _resolve_weights(
    class_weights: Any, class_names: list[str], support: np.ndarray
) -> tuple[np.ndarray, str]:
    """-> (weights [C] float64, source) with source 'test shares', 'paper' or 'custom'."""
    c = len(class_names)
    if class_weights is None or (isinstance(class_weights, str) and class_weights == "shares"):
        return support.astype(np.float64) / float(support.sum()), "test shares"
    if isinstance(class_weights, str):
        if class_weights != "paper":
            raise ConfigError(
                f"class_weights must be None, 'shares', 'paper' or a sequence of {c} floats, "
                f"got {class_weights!r}"
            )
        if c != 3:
            raise ConfigError(
                f"class_weights='paper' means {PAPER_F1_WEIGHTS} for (Normal, CP, COVID-19) and "
                f"needs exactly 3 classes, got {c}"
            )
        return np.asarray(PAPER_F1_WEIGHTS, dtype=np.float64), "paper"
    w = as_numpy(class_weights)
    try:
        w = w.astype(np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"class_weights must be numbers, got {class_weights!r}") from exc
    if w.shape[0] != c:
        raise ConfigError(f"class_weights has {w.shape[0]} entries but there are {c} classes")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ConfigError(f"class_weights must be finite and non-negative, got {w.tolist()}")
    return w, "custom"


def _opt(x: float) -> float | None:
    """NaN -> None, else a plain float."""
    x = float(x)
    return None if math.isnan(x) else x


def validate_class_names(class_names) -> list[str]:
    """At least two distinct class names, as strings."""
    names = [str(n) for n in class_names]
    if len(names) < 2:
        raise ValueError(f"need at least 2 class names, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be distinct, got {names}")
    return names


def classification_report(
    y_true: Any,
    y_pred: Any,
    class_names: Sequence[str],
    class_weights: Sequence[float] | str | None = None,
    scores: Any = None,
) -> dict[str, Any]:
    """Confusion matrix and the papers' classification metrics (see the module docstring).

    Args:
        y_true: ``[n]`` true class indices in ``0..C-1`` (list, numpy array or tensor).
        y_pred: ``[n]`` predicted class indices (argmax of the logits).
        class_names: ``C`` distinct names, in class-index order (e.g. ``["Normal", "CP",
            "COVID-19"]``, or ``["negative", "covid"]`` for iCTCF with labels mapped
            {0→0, 2→1}).
        class_weights: weights of the class-adjusted F1. ``None`` (or ``"shares"``): the
            test-class shares; ``"paper"``: exactly ``(0.45, 0.35, 0.20)``, 3 classes only; or a
            sequence of ``C`` non-negative floats, used as given (not renormalised).
        scores: optional ``[n, C]`` class probabilities for the one-vs-rest ROC AUC.

    Returns:
        JSON-serialisable dict with ``class_names``, ``num_samples``, ``support``,
        ``confusion_matrix`` (rows true, columns predicted), ``sensitivity``, ``ppv``, ``f1``
        (dicts name -> float or None), ``overall_accuracy``, ``f1_weighted``, ``f1_weights``
        (name -> weight used), ``f1_weights_source`` (``"test shares"``, ``"paper"`` or
        ``"custom"``), ``f1_macro``, ``roc_auc`` (name -> float or None) and ``roc_auc_macro``
        (both ``None`` without ``scores``).

    Raises:
        ValueError: empty input, lengths that differ, labels out of range or non-integral,
            fewer than 2 or duplicate class names, bad weights, ``scores`` of the wrong shape or
            with NaN/inf.
    """
    from sklearn.metrics import (
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    names = validate_class_names(class_names)
    c = len(names)
    yt = _labels(y_true, "y_true", c)
    yp = _labels(y_pred, "y_pred", c)
    if yt.shape[0] != yp.shape[0]:
        raise ValueError(f"y_true has {yt.shape[0]} entries but y_pred has {yp.shape[0]}")
    n = int(yt.shape[0])
    if n == 0:
        raise ValueError("empty input: y_true and y_pred have no entries")

    probs = None
    if scores is not None:
        probs = as_numpy(scores)
        if probs.ndim != 2 or probs.shape != (n, c):
            raise ValueError(
                f"scores must have shape [n, C] = [{n}, {c}], got {tuple(probs.shape)}"
            )
        if not np.issubdtype(probs.dtype, np.number) and probs.dtype != np.bool_:
            raise ValueError(f"scores must be numeric, got dtype {probs.dtype}")
        probs = probs.astype(np.float64)
        if not np.all(np.isfinite(probs)):
            raise ValueError("scores contain NaN or infinite values")

    labels = list(range(c))
    cm = confusion_matrix(yt, yp, labels=labels)
    support = cm.sum(axis=1)
    with warnings.catch_warnings():
        # zero_division=nan does not warn in current scikit-learn; belt and braces for others.
        warnings.simplefilter("ignore")
        ppv, sens, _, _ = precision_recall_fscore_support(
            yt, yp, labels=labels, average=None, zero_division=np.nan
        )
        f1 = f1_score(yt, yp, labels=labels, average=None, zero_division=np.nan)
    f1 = np.asarray(f1, dtype=np.float64)

    weights, source = _resolve_weights(class_weights, names, support)
    defined = ~np.isnan(f1)
    if np.any(~defined & (weights != 0)):
        f1_weighted = None
    else:
        f1_weighted = float(np.sum(weights[defined] * f1[defined]))
    f1_macro = float(np.mean(f1[defined])) if defined.any() else None

    roc_auc: dict[str, float | None] | None = None
    roc_auc_macro = None
    if probs is not None:
        roc_auc = {}
        for k, name in enumerate(names):
            positive = yt == k
            if positive.all() or not positive.any():
                roc_auc[name] = None
            else:
                roc_auc[name] = float(roc_auc_score(positive.astype(np.int64), probs[:, k]))
        vals = [v for v in roc_auc.values() if v is not None]
        roc_auc_macro = float(np.mean(vals)) if vals else None

    return {
        "class_names": names,
        "num_samples": n,
        "support": {name: int(s) for name, s in zip(names, support)},
        "confusion_matrix": [[int(v) for v in row] for row in cm],
        "sensitivity": {name: _opt(v) for name, v in zip(names, sens)},
        "ppv": {name: _opt(v) for name, v in zip(names, ppv)},
        "f1": {name: _opt(v) for name, v in zip(names, f1)},
        "overall_accuracy": float(np.trace(cm)) / float(n),
        "f1_weighted": f1_weighted,
        "f1_weights": {name: float(w) for name, w in zip(names, weights)},
        "f1_weights_source": source,
        "f1_macro": f1_macro,
        "roc_auc": roc_auc,
        "roc_auc_macro": roc_auc_macro,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.2f}"


def format_report(report: dict[str, Any]) -> str:
    """A small text table of a :func:`classification_report` result (percentages).

    One row per class (support, sensitivity, PPV, F1, and OvR AUC when present), then overall
    accuracy, weighted F1 (with the weights used) and macro F1. Undefined values print as ``-``.
    """
    names = list(report["class_names"])
    has_auc = report.get("roc_auc") is not None
    width = max(8, *(len(n) for n in names))
    cols = ["support", "sens %", "PPV %", "F1 %"] + (["AUC"] if has_auc else [])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{h:>8}" for h in cols)]
    for name in names:
        cells = [
            f"{report['support'][name]:>8d}",
            f"{_pct(report['sensitivity'][name]):>8}",
            f"{_pct(report['ppv'][name]):>8}",
            f"{_pct(report['f1'][name]):>8}",
        ]
        if has_auc:
            auc = report["roc_auc"][name]
            cells.append(f"{'-' if auc is None else f'{auc:.4f}':>8}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    weights = ", ".join(f"{report['f1_weights'][n]:.4f}" for n in names)
    lines.append(f"samples: {report['num_samples']}")
    lines.append(f"overall accuracy: {_pct(report['overall_accuracy'])} %")
    lines.append(
        f"weighted F1: {_pct(report['f1_weighted'])} % "
        f"(weights {report.get('f1_weights_source', 'custom')}: {weights})"
    )
    lines.append(f"macro F1: {_pct(report['f1_macro'])} %")
    if has_auc:
        macro = report.get("roc_auc_macro")
        lines.append(f"macro OvR AUC: {'-' if macro is None else f'{macro:.4f}'}")
    return "\n".join(lines)
