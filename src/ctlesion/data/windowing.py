"""Intensity windows: CT values to the model's ``[0, 1]`` input range.

Every reader states the *units* of the array it returns, and the window must fit them:

* ``"HU"``: Hounsfield units (DICOM after ``RescaleSlope/Intercept``, NIfTI CT volumes).
  Windows: the presets in :data:`WINDOWS` or an explicit ``"W:L"`` string in HU.
* ``"stored"``: data that was windowed to 8 bits before we saw it (PNG/JPG slices such
  as CNCB-NCOV or COVID-SemiSeg). The HU are lost, so the only honest window is
  ``"as_stored"`` (``x / 255``).

Units are never guessed from the value range (COVIDNet-CT's ``ensure_uint8`` does that;
a lung-windowed 8-bit slice and a dark HU slice can have the same range). A window that
does not fit the units is an error that names the source.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

__all__ = ["WINDOWS", "UNITS", "resolve_window", "apply_window", "describe_window"]

#: Named windows as ``(width, level)`` in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 50.0),
}

#: Units a reader may report.
UNITS = ("HU", "stored")

_PRESETS = sorted([*WINDOWS, "as_stored", "auto"])


def _check_units(units: str, source: str) -> None:
    if units not in UNITS:
        raise DataError(f"{source}: unknown intensity units {units!r}; expected one of {list(UNITS)}")


def resolve_window(spec: str, units: str, source: str = "<input>") -> str | tuple[float, float]:
    """Resolve a window name against the data's units.

    Args:
        spec: ``"auto"``, ``"as_stored"``, a preset name from :data:`WINDOWS`, or
            ``"W:L"`` (width and level in HU, e.g. ``"400:40"`` or ``"1500:-600"``).
        units: ``"HU"`` or ``"stored"``, as reported by the reader.
        source: file named in error messages.

    Returns:
        ``"as_stored"`` or a ``(width, level)`` tuple in HU. ``"auto"`` becomes
        ``"as_stored"`` for stored data and the lung window for HU data.

    Raises:
        ValueError: unknown window, malformed ``W:L``, non-positive width, or a window
            that does not fit the units (an HU window on 8-bit data, ``as_stored`` on HU).
    """
    _check_units(units, source)
    if not isinstance(spec, str):
        raise DataError(f"{source}: window must be a string, got {spec!r}")
    name = spec.strip()
    if name == "auto":
        return "as_stored" if units == "stored" else WINDOWS["lung"]
    if name == "as_stored":
        if units != "stored":
            raise DataError(
                f"{source}: window 'as_stored' needs 8-bit stored data, but this input is in "
                f"Hounsfield units; pick an HU window ({', '.join(sorted(WINDOWS))} or 'W:L') or 'auto'"
            )
        return "as_stored"
    if name in WINDOWS:
        window = WINDOWS[name]
    elif ":" in name:
        try:
            width, level = (float(part) for part in name.split(":"))
        except ValueError:
            raise DataError(
                f"{source}: window {spec!r} is not of the form 'W:L' (width:level in HU, e.g. '400:40')"
            ) from None
        if not np.isfinite(width) or not np.isfinite(level) or width <= 0:
            raise DataError(f"{source}: window {spec!r} needs a finite width > 0 and a finite level")
        window = (width, level)
    else:
        raise DataError(
            f"{source}: unknown window {spec!r}; choose one of {_PRESETS} or 'W:L' in HU (e.g. '400:40')"
        )
    if units != "HU":
        raise DataError(
            f"{source}: window {spec!r} is in Hounsfield units, but this input holds 8-bit values "
            "that were already windowed when the image was saved (HU are lost); use 'as_stored' or 'auto'"
        )
    return window


def describe_window(window: str | tuple[float, float]) -> str:
    """A resolved window as text (``"as_stored"`` or ``"W1500:L-600"``), for logs and metadata."""
    if isinstance(window, str):
        return window
    width, level = window
    return f"W{width:g}:L{level:g}"


def apply_window(array: np.ndarray, window: str, units: str, source: str = "<input>") -> np.ndarray:
    """Map an intensity array to float32 in ``[0, 1]``.

    HU windows: ``lower = L - W/2``, ``(x - lower) / W`` clipped to ``[0, 1]``.
    ``as_stored``: ``x / 255`` clipped to ``[0, 1]``.

    Args:
        array: any-shape numeric array in ``units``.
        window: a window spec (see :func:`resolve_window`); a resolved tuple is accepted too.
        units: ``"HU"`` or ``"stored"``.
        source: file named in error messages.

    Returns:
        float32 array of the same shape, values in ``[0, 1]``.

    Raises:
        ValueError: the window does not fit the units, or the array holds NaN/Inf.
    """
    if isinstance(window, tuple):
        _check_units(units, source)
        if units != "HU":
            raise DataError(f"{source}: an HU window {window} cannot be applied to 8-bit stored data")
        resolved: str | tuple[float, float] = (float(window[0]), float(window[1]))
    else:
        resolved = resolve_window(window, units, source)
    x = np.asarray(array, dtype=np.float32)
    if x.size and not np.isfinite(x).all():
        raise DataError(f"{source}: image holds NaN or infinite values")
    if resolved == "as_stored":
        out = x / np.float32(255.0)
    else:
        width, level = resolved
        lower = level - width / 2.0
        out = (x - np.float32(lower)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)
