"""Windows must fit the data's stated units; values are never used to guess them."""

from __future__ import annotations

import numpy as np
import pytest

from ctlesion.data.windowing import WINDOWS, apply_window, describe_window, resolve_window


@pytest.mark.parametrize(
    "spec, units, expected",
    [
        ("auto", "stored", "as_stored"),
        ("auto", "HU", (1500.0, -600.0)),
        ("as_stored", "stored", "as_stored"),
        ("lung", "HU", (1500.0, -600.0)),
        ("mediastinum", "HU", (350.0, 50.0)),
        ("400:40", "HU", (400.0, 40.0)),
        ("1500:-600", "HU", (1500.0, -600.0)),
        (" 80:35.5 ", "HU", (80.0, 35.5)),
    ],
)
def test_resolve_window(spec, units, expected):
    assert resolve_window(spec, units) == expected


@pytest.mark.parametrize(
    "spec, units, match",
    [
        ("lung", "stored", "already windowed"),
        ("400:40", "stored", "already windowed"),
        ("as_stored", "HU", "Hounsfield"),
        ("bone", "HU", "unknown window 'bone'.*lung.*mediastinum"),
        ("400", "HU", "unknown window"),
        ("a:b", "HU", "W:L"),
        ("0:40", "HU", "width > 0"),
        ("-10:40", "HU", "width > 0"),
        ("1:2:3", "HU", "W:L"),
        ("lung", "uint8", "unknown intensity units"),
    ],
)
def test_resolve_window_errors(spec, units, match):
    with pytest.raises(ValueError, match=match):
        resolve_window(spec, units)


def test_mismatch_error_names_the_source():
    with pytest.raises(ValueError, match=r"scan_17\.png"):
        apply_window(np.zeros((2, 2), np.uint8), "lung", "stored", "scan_17.png")


@pytest.mark.parametrize("name", sorted(WINDOWS))
def test_preset_maps_lower_edge_to_0_and_upper_edge_to_1(name):
    width, level = WINDOWS[name]
    hu = np.array([level - width / 2, level, level + width / 2, -5000.0, 5000.0], np.float32)
    out = apply_window(hu, name, "HU", "x")
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 0.0, 1.0], atol=1e-6)
    assert out.dtype == np.float32


def test_explicit_window_formula():
    hu = np.array([[-160.0, 40.0], [100.0, 240.0]], np.float32)
    out = apply_window(hu, "400:40", "HU")
    np.testing.assert_allclose(out, [[0.0, 0.5], [0.65, 1.0]], atol=1e-6)


def test_as_stored_divides_by_255_and_clips():
    stored = np.array([0, 51, 255, 300], np.int32)
    out = apply_window(stored, "auto", "stored")
    np.testing.assert_allclose(out, [0.0, 0.2, 1.0, 1.0], atol=1e-6)
    assert out.dtype == np.float32


def test_units_not_guessed_from_values():
    """Values in 0..255 stated as HU are soft tissue (bright in the lung window), not x/255."""
    out = apply_window(np.array([0.0, 255.0], np.float32), "auto", "HU")
    np.testing.assert_allclose(out, [0.9, 1.0], atol=1e-6)


def test_resolved_tuple_accepted_and_rejected_on_stored():
    np.testing.assert_allclose(apply_window(np.array([-600.0]), (1500.0, -600.0), "HU"), [0.5])
    with pytest.raises(ValueError, match="8-bit"):
        apply_window(np.array([1]), (1500.0, -600.0), "stored", "f.png")


def test_nan_rejected():
    with pytest.raises(ValueError, match="vol.nii.*NaN"):
        apply_window(np.array([np.nan, 0.0]), "lung", "HU", "vol.nii")


@pytest.mark.parametrize("window, text", [("as_stored", "as_stored"), ((1500.0, -600.0), "W1500:L-600")])
def test_describe_window(window, text):
    assert describe_window(window) == text
