"""Synthetic chest-CT phantoms with exact lesion labels, for tests and smoke runs.

A phantom is one axial slice in Hounsfield units: air around an elliptical body (soft
tissue with a thin subcutaneous fat layer, ribs, sternum, a vertebra at the back, the
patient table below), two lungs with faint vessels, the heart and descending aorta
between them, and lesions drawn from the slice class:

* ``normal``: no lesions.
* ``cp`` (common pneumonia): 1-2 lesions in one lung, mostly consolidation, anywhere in
  the lung (central lesions allowed).
* ``covid``: 3-6 lesions in both lungs, peripheral (subpleural), mostly ground-glass
  opacity (at most one consolidation).

Ground-glass opacities are faint (lung + 250..400 HU), large and soft-edged with an
irregular outline; consolidations are dense (-90..+20 HU), compact and sharp-edged.
Lesions are clipped to the lung, kept to one connected piece each and never touch each
other, so every lesion becomes exactly one instance in every mask type.

Sizes are given in units of the image half-width, so lesions scale with ``size``: at
128 px a lesion covers roughly 40-250 px, at 512 px roughly 600-4000 px (above the
default ``min_area=100`` of :func:`~ctlesion.data.masks.extract_instances`; pass a
smaller ``min_area`` for tiny phantoms, e.g. 20 at 128 px, 5 at 64 px).

Everything is deterministic from the seed (``numpy.random.default_rng``) and never
touches the global numpy / torch random state.

Image sides: ``side`` is the *image* side ("left" = columns < size / 2). In the
radiological convention that is the patient's right lung.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage as ndi
from torch.utils.data import Dataset

from ..errors import DataError
from .masks import CONSOLIDATION, GGO, LUNG, MaskType, extract_instances, get_mask_type
from .sample import Sample
from .windowing import apply_window, resolve_window

__all__ = ["SLICE_CLASSES", "PhantomSlice", "make_phantom", "PhantomDataset"]

SLICE_CLASSES = ("normal", "cp", "covid")  # class index 0, 1, 2 (the papers' order)

_CLASS_ALIASES = {
    "normal": "normal", "cp": "cp", "covid": "covid", "covid-19": "covid", "covid19": "covid",
    "ncp": "covid", "pneumonia": "cp",
}

# Hounsfield units of the tissues drawn.
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_LUNG = -850.0
HU_BONE_CANCELLOUS = 380.0
HU_BONE_CORTEX = 700.0

# Lesion radii (mean radius, units of the half-width) and placement tries.
_GGO_RADIUS = (0.075, 0.125)
_C_RADIUS_CP = (0.06, 0.09)
_C_RADIUS_COVID = (0.06, 0.08)  # smaller than GGO, so covid slices stay mostly GGO by area
_TRIES_PER_SCALE = 40
_SCALES = (1.0, 0.9, 0.8, 0.7, 0.6)


@dataclass
class PhantomSlice:
    """One synthetic axial slice.

    Attributes:
        hu: float32 ``[H, W]`` Hounsfield units (air -1000, lung about -850).
        codes: uint8 ``[H, W]`` canonical codes: 0 background, 1 lung, 2 GGO, 3 C.
        slice_class: one of :data:`SLICE_CLASSES`.
        label: index of ``slice_class`` in :data:`SLICE_CLASSES`.
        lesions: one dict per lesion: ``kind`` ("GGO"/"C"), ``centre`` (row, col) px,
            ``radii`` (row, col) px of the generating ellipse before its angle,
            ``angle`` (radians), ``side`` ("left"/"right" image side), ``area`` (labelled
            pixels).
        lungs: uint8 ``[H, W]``: 0 outside the lungs, 1 image-left lung, 2 image-right
            lung (lesion pixels included). ``codes > 0`` equals ``lungs > 0``.
    """

    hu: np.ndarray
    codes: np.ndarray
    slice_class: str
    label: int
    lesions: list[dict] = field(default_factory=list)
    lungs: np.ndarray | None = None


def _canonical_class(slice_class: str) -> str:
    try:
        return _CLASS_ALIASES[str(slice_class).lower()]
    except KeyError:
        raise DataError(
            f"unknown slice class {slice_class!r}; choose one of {SLICE_CLASSES}"
        ) from None


def _ellipse(u, v, cx, cy, ax, ay, angle=0.0):
    """Normalised elliptical radius (1 on the boundary) on the grid ``u, v``."""
    x, y = u - cx, v - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        x, y = c * x + s * y, -s * x + c * y
    return np.sqrt((x / ax) ** 2 + (y / ay) ** 2)


def _wobble(rng, phi, amplitude, orders=(2, 3, 4, 5)):
    """A smooth random radial perturbation ``sum a_k cos(k phi + p_k)`` of a contour."""
    out = np.zeros_like(phi)
    for k in orders:
        out += (amplitude / k) * rng.uniform(0.3, 1.0) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return out


def _smooth_noise(rng, shape, sigma):
    """Gaussian-smoothed white noise scaled to unit standard deviation."""
    field_ = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="reflect")
    sd = float(field_.std())
    return field_ / sd if sd > 0 else field_


def _box(size, cx, cy, reach):
    """Row/column slices of the pixels within ``reach`` grid units of ``(cx, cy)``."""
    half = size / 2.0

    def span(c):
        lo = int(math.floor((c - reach + 1.0) * half)) - 1
        hi = int(math.ceil((c + reach + 1.0) * half)) + 1
        return slice(min(max(lo, 0), size), min(max(hi, 0), size))

    return span(cy), span(cx)


def _largest_component(mask):
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _anatomy(rng, size):
    """Draw the lesion-free slice. Returns ``(hu, lungs, geometry)``."""
    half = size / 2.0
    px = 1.0 / half  # one pixel in grid units
    coords = (np.arange(size, dtype=np.float32) + 0.5) / half - 1.0
    v, u = np.meshgrid(coords, coords, indexing="ij")  # v: rows (anterior -> posterior)

    hu = np.full((size, size), HU_AIR, dtype=np.float32)

    # Body: a wide ellipse with a wobbly outline, flattened at the back (lying on the table).
    bcx, bcy = rng.uniform(-0.02, 0.02), rng.uniform(0.0, 0.04)
    bax, bay = rng.uniform(0.82, 0.9), rng.uniform(0.58, 0.64)
    phi_b = np.arctan2(v - bcy, u - bcx)
    wob_b = _wobble(rng, phi_b, 0.03)
    back = bcy + 0.93 * bay
    d_body = _ellipse(u, v, bcx, bcy, bax, bay)
    body = (d_body <= 1.0 + wob_b) & (v <= back)
    fat_t = rng.uniform(0.035, 0.06) + px  # thin subcutaneous fat, at least ~1 px
    inner = (_ellipse(u, v, bcx, bcy, bax - fat_t, bay - fat_t) <= 1.0 + wob_b) & (v <= back - fat_t)
    hu[body] = HU_SOFT + 8.0 * _smooth_noise(rng, (size, size), max(1.0, size / 200))[body]
    hu[body & ~inner] = HU_FAT

    # Patient table: a thin curved band below the back.
    t_top = back + 0.05 + 0.06 * u**2
    t_thick = max(0.025, 1.2 * px)
    table = (v >= t_top) & (v <= t_top + t_thick) & (np.abs(u) <= 0.92)
    hu[table] = 120.0

    solid = np.zeros((size, size), bool)  # everything the lungs must avoid

    # Heart (tilted to the patient's left = image right) with a pericardial fat rim.
    hcx, hcy = rng.uniform(0.03, 0.09), rng.uniform(0.04, 0.12)
    hax, hay, hang = rng.uniform(0.19, 0.23), rng.uniform(0.16, 0.2), rng.uniform(-0.45, -0.2)
    d_heart = _ellipse(u, v, hcx, hcy, hax, hay, hang)
    rim = 1.0 + max(0.02, 1.0 * px) / min(hax, hay)
    hu[d_heart <= rim] = HU_FAT
    hu[d_heart <= 1.0] = 42.0
    solid |= d_heart <= rim

    # Descending aorta: left of the spine from the patient's view (image right).
    scy = rng.uniform(0.3, 0.36)  # vertebral body centre
    acx, acy, ar = rng.uniform(0.1, 0.13), scy - rng.uniform(0.06, 0.1), rng.uniform(0.045, 0.055)
    d_aorta = _ellipse(u, v, acx, acy, ar, ar)
    hu[d_aorta <= 1.0] = 45.0
    solid |= d_aorta <= 1.0 + 0.25

    # Vertebra: body (cancellous + cortex), canal, arch, transverse and spinous processes.
    sr = rng.uniform(0.075, 0.09)
    cortex_t = max(0.012, 1.0 * px)
    d_vb = _ellipse(u, v, 0.0, scy, sr * 1.05, sr)
    hu[d_vb <= 1.0] = HU_BONE_CORTEX
    hu[d_vb <= 1.0 - cortex_t / sr] = HU_BONE_CANCELLOUS
    ccy, cr = scy + sr + 0.04, 0.035
    d_arch = _ellipse(u, v, 0.0, ccy, cr + 0.025, cr + 0.02)
    hu[d_arch <= 1.0] = 600.0
    hu[_ellipse(u, v, 0.0, ccy, cr, cr * 0.85) <= 1.0] = 20.0  # canal (CSF / cord)
    for sgn in (-1.0, 1.0):
        hu[_ellipse(u, v, sgn * 0.08, ccy - 0.01, 0.045, 0.016, sgn * 0.35) <= 1.0] = 600.0
    hu[_ellipse(u, v, 0.0, ccy + cr + 0.055, 0.018, 0.05) <= 1.0] = 600.0
    solid |= _ellipse(u, v, 0.0, scy + 0.03, sr * 1.7, sr * 1.8) <= 1.0

    # Sternum at the front.
    st = _ellipse(u, v, 0.0, bcy - bay + fat_t + 0.06, 0.06, 0.025)
    hu[st <= 1.0] = 500.0
    solid |= st <= 1.6

    # Ribs: small oval bones around the chest wall, mirrored left/right.
    rib_a, rib_b = bax - 0.075, bay - 0.07
    n_ribs = int(rng.integers(5, 8))
    for phi in np.linspace(math.radians(118), math.radians(250), n_ribs):
        phi += rng.uniform(-0.06, 0.06)
        for sgn in (1.0, -1.0):  # sgn -1 mirrors the rib to the image right
            p = phi if sgn > 0 else math.pi - phi
            rx, ry = bcx + rib_a * math.cos(p), bcy + rib_b * math.sin(p)
            tang = math.atan2(rib_b * math.cos(p), -rib_a * math.sin(p))
            rax, rby = max(0.036, 1.5 * px), max(0.017, 1.0 * px)
            box = _box(size, rx, ry, 1.7 * rax)  # ribs are small: draw in a local box
            d_rib = _ellipse(u[box], v[box], rx, ry, rax, rby, tang)
            hu[box][d_rib <= 1.0] = 650.0
            hu[box][d_rib <= 0.55] = 280.0
            solid[box] |= d_rib <= 1.6

    # Lungs: wobbly ellipses kept inside the chest wall and out of the mediastinum.
    wall = _ellipse(u, v, bcx, bcy, bax - 0.115, bay - 0.1) <= 1.0 + wob_b
    lungs = np.zeros((size, size), np.uint8)
    geometry = {"px": px, "u": u, "v": v, "lung": {}}
    for side, sgn in (("left", -1.0), ("right", 1.0)):
        lcx, lcy = sgn * rng.uniform(0.38, 0.42), rng.uniform(-0.06, 0.0)
        lax, lay = rng.uniform(0.3, 0.34), rng.uniform(0.42, 0.48)
        phi_l = np.arctan2(v - lcy, u - lcx)
        shape = _ellipse(u, v, lcx, lcy, lax, lay) <= 1.0 + _wobble(rng, phi_l, 0.05)
        lung = shape & wall & ~solid & (sgn * u > 0.07) & (v < back - 0.1)
        lung = ndi.binary_fill_holes(_largest_component(lung))
        lungs[lung] = 1 if side == "left" else 2
        geometry["lung"][side] = (lcx, lcy, lax, lay)

    # Parenchyma: -850 HU, denser towards the back (gravity-dependent), faint texture.
    in_lung = lungs > 0
    top, bottom = float(v[in_lung].min()), float(v[in_lung].max())
    depend = np.clip((v - top) / max(bottom - top, 1e-6), 0.0, 1.0) ** 2
    tex = _smooth_noise(rng, (size, size), max(1.0, size / 250))
    base = HU_LUNG + rng.uniform(-20.0, 20.0)
    hu[in_lung] = (base + 70.0 * depend + 12.0 * tex)[in_lung]
    return hu, lungs, geometry


def _lesion_mask(rng, shape, centre, radii, angle, irregularity):
    """An irregular ellipse (thresholded ellipse radius + smooth noise) in a local patch.

    Returns ``(mask_patch, (r0, r1, c0, c1))`` with the patch clipped to the image.
    """
    cy, cx = centre
    ry, rx = radii
    reach = 1.0 + 2.5 * irregularity
    ext = int(math.ceil(max(ry, rx) * reach)) + 2
    r0, r1 = max(0, int(cy) - ext), min(shape[0], int(cy) + ext + 1)
    c0, c1 = max(0, int(cx) - ext), min(shape[1], int(cx) + ext + 1)
    rr, cc = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    d = _ellipse(cc + 0.5, rr + 0.5, cx, cy, rx, ry, angle)
    noise = _smooth_noise(rng, d.shape, max(0.6, 0.35 * min(ry, rx)))
    return d + irregularity * noise < 1.0, (r0, r1, c0, c1)


def _place_lesions(rng, plan, hu, lungs, geometry, size):
    """Draw the planned lesions into ``hu``; return ``(codes_of_lesions, records)``."""
    half = size / 2.0
    u, v = geometry["u"], geometry["v"]
    lesion_codes = np.zeros(lungs.shape, np.uint8)
    blocked = np.zeros(lungs.shape, bool)  # lesions grown by a gap: keeps instances apart
    gap = max(2, int(round(0.012 * half)))
    sides = sorted({side for _, side, _, _ in plan})
    dist = {s: ndi.distance_transform_edt(lungs == (1 if s == "left" else 2)) for s in sides}
    records = []
    for kind, side, peripheral, radius_range in plan:
        lung = lungs == (1 if side == "left" else 2)
        lcx, lcy, lax, lay = geometry["lung"][side]
        sgn = -1.0 if side == "left" else 1.0
        # Shrinking helps a crowded lung, but no lesion may end up tiny (instances!).
        floor = 0.7 * math.pi * (radius_range[0] * half) ** 2
        placed = None
        for scale in _SCALES:
            for _ in range(_TRIES_PER_SCALE):
                r = rng.uniform(*radius_range) * half * scale
                aspect = rng.uniform(0.6, 1.0)
                ry, rx = r * math.sqrt(aspect), r / math.sqrt(aspect)
                angle = rng.uniform(0.0, math.pi)
                if peripheral:
                    # Subpleural: close to the lateral or posterior lung edge.
                    outward = (sgn * (u - lcx) > -0.05) | (v > lcy + 0.2)
                    ok = lung & outward & (dist[side] >= 0.35 * r) & (dist[side] <= 1.0 * r)
                else:
                    ok = lung & (dist[side] >= 0.5 * r)
                ok &= ~blocked
                cand = np.flatnonzero(ok)
                if cand.size == 0:
                    continue
                idx = int(cand[rng.integers(cand.size)])
                cy, cx = divmod(idx, size)
                cy, cx = cy + rng.uniform(0, 1), cx + rng.uniform(0, 1)
                irr = 0.3 if kind == "GGO" else 0.08
                patch, (r0, r1, c0, c1) = _lesion_mask(rng, lungs.shape, (cy, cx), (ry, rx), angle, irr)
                patch &= lung[r0:r1, c0:c1]
                if not patch.any():
                    continue
                patch = ndi.binary_fill_holes(_largest_component(patch)) & lung[r0:r1, c0:c1]
                area = int(patch.sum())
                if area < max(0.55 * math.pi * ry * rx, floor) or (patch & blocked[r0:r1, c0:c1]).any():
                    continue
                placed = (patch, (r0, r1, c0, c1), (cy, cx), (ry, rx), angle, area)
                break
            if placed is not None:
                break
        if placed is None:  # lungs too crowded; never seen with the sizes above
            continue
        patch, (r0, r1, c0, c1), centre, radii, angle, area = placed
        full = np.zeros(lungs.shape, bool)
        full[r0:r1, c0:c1] = patch
        _draw_lesion(rng, hu, full, lungs > 0, kind, radii)
        lesion_codes[full] = GGO if kind == "GGO" else CONSOLIDATION
        g0, g1 = max(0, r0 - gap), min(size, r1 + gap)
        h0, h1 = max(0, c0 - gap), min(size, c1 + gap)
        blocked[g0:g1, h0:h1] |= ndi.binary_dilation(full[g0:g1, h0:h1], np.ones((3, 3), bool), iterations=gap)
        records.append({
            "kind": kind, "centre": (float(centre[0]), float(centre[1])),
            "radii": (float(radii[0]), float(radii[1])), "angle": float(angle),
            "side": side, "area": area,
        })
    return lesion_codes, records


def _draw_lesion(rng, hu, mask, lung, kind, radii):
    """Paint one lesion's HU: soft additive haze for GGO, dense flat fill for C."""
    r = float(min(radii))
    rows, cols = np.nonzero(mask)
    pad = int(math.ceil(max(radii) * 0.6)) + 3
    r0, r1 = max(0, rows.min() - pad), min(mask.shape[0], rows.max() + pad + 1)
    c0, c1 = max(0, cols.min() - pad), min(mask.shape[1], cols.max() + pad + 1)
    m = mask[r0:r1, c0:c1]
    mottle = _smooth_noise(rng, m.shape, max(0.7, 0.25 * r))
    if kind == "GGO":
        # Soft edge: haze fades out past the labelled outline, but stays inside the lung.
        soft = ndi.gaussian_filter(m.astype(np.float32), max(0.6, 0.2 * r))
        soft = np.maximum(soft, 0.85 * m)  # keep the labelled core clearly above lung
        delta = rng.uniform(250.0, 400.0)
        hu[r0:r1, c0:c1] += (delta * (1.0 + 0.15 * mottle) * soft * lung[r0:r1, c0:c1]).astype(np.float32)
    else:
        base = rng.uniform(-90.0, 20.0)
        fill = base + 20.0 * mottle
        hu[r0:r1, c0:c1] = np.where(m, fill, hu[r0:r1, c0:c1]).astype(np.float32)


def _draw_vessels(rng, hu, lungs, geometry, size):
    """Faint pulmonary vessels (unlabelled): round and short elongated Gaussian blobs,
    denser near the hila."""
    half = size / 2.0
    u, v = geometry["u"], geometry["v"]
    in_lung = lungs > 0
    for side, code, sgn in (("left", 1, -1.0), ("right", 2, 1.0)):
        idx = np.flatnonzero(lungs.ravel() == code)
        if idx.size == 0:
            continue
        hilum_d = np.hypot(u.ravel()[idx] - sgn * 0.17, v.ravel()[idx] - 0.02)
        weight = 0.4 + np.exp(-hilum_d / 0.15)
        weight /= weight.sum()
        n = int(rng.integers(25, 40))
        for centre in rng.choice(idx, size=n, replace=True, p=weight):
            cy, cx = divmod(int(centre), size)
            near = float(np.exp(-np.hypot(u.flat[centre] - sgn * 0.17, v.flat[centre] - 0.02) / 0.2))
            true_sig = rng.uniform(0.003, 0.006) * half * (1.0 + 1.5 * near)
            sig = max(0.6, true_sig)
            amp = (true_sig / sig) ** 2  # partial volume: sub-pixel vessels look fainter
            elong = rng.uniform(1.0, 2.5)
            angle = rng.uniform(0.0, math.pi)
            peak = rng.uniform(-250.0, 0.0)
            ext = int(math.ceil(3 * sig * elong)) + 1
            r0, r1 = max(0, cy - ext), min(size, cy + ext + 1)
            c0, c1 = max(0, cx - ext), min(size, cx + ext + 1)
            rr, cc = np.mgrid[r0:r1, c0:c1].astype(np.float32)
            y, x = rr - cy, cc - cx
            a, b = math.cos(angle), math.sin(angle)
            xr, yr = a * x + b * y, -b * x + a * y
            g = amp * np.exp(-0.5 * ((xr / (sig * elong)) ** 2 + (yr / sig) ** 2)) * in_lung[r0:r1, c0:c1]
            patch = hu[r0:r1, c0:c1]
            hu[r0:r1, c0:c1] = np.where(g > 0, patch + (np.maximum(peak, patch) - patch) * g, patch)


def _lesion_plan(rng, slice_class):
    """``[(kind, side, peripheral, radius_range), ...]`` for the class."""
    if slice_class == "normal":
        return []
    if slice_class == "cp":
        side = "left" if rng.random() < 0.5 else "right"
        n = int(rng.integers(1, 3))
        kinds = ["C"] + ["C" if rng.random() < 0.6 else "GGO" for _ in range(n - 1)]
        return [(k, side, rng.random() < 0.3, _C_RADIUS_CP if k == "C" else _GGO_RADIUS) for k in kinds]
    n = int(rng.integers(3, 7))
    sides = ["left", "right"] + ["left" if rng.random() < 0.5 else "right" for _ in range(n - 2)]
    rng.shuffle(sides)
    kinds = ["GGO"] * n
    if rng.random() < 0.4:
        kinds[int(rng.integers(n))] = "C"
    return [(k, s, True, _GGO_RADIUS if k == "GGO" else _C_RADIUS_COVID) for k, s in zip(kinds, sides)]


def make_phantom(size: int, slice_class: str, seed: int) -> PhantomSlice:
    """Draw one synthetic axial chest-CT slice of ``size x size`` pixels in HU.

    Deterministic in ``(size, slice_class, seed)``; never touches global RNG state.
    Lesions follow ``slice_class`` (see the module docstring) and lie inside the lungs.
    """
    slice_class = _canonical_class(slice_class)
    size = int(size)
    if size < 32:
        raise DataError(f"phantom size must be at least 32 px, got {size}")
    rng = np.random.default_rng(seed)
    hu, lungs, geometry = _anatomy(rng, size)
    plan = _lesion_plan(rng, slice_class)
    lesion_codes, records = _place_lesions(rng, plan, hu, lungs, geometry, size)
    _draw_vessels(rng, hu, lungs, geometry, size)
    # Scanner look: slight blur (partial volume) then quantum noise.
    hu = ndi.gaussian_filter(hu, 0.5)
    hu += rng.normal(0.0, rng.uniform(10.0, 20.0), hu.shape).astype(np.float32)
    codes = np.where(lungs > 0, LUNG, 0).astype(np.uint8)
    codes[lesion_codes > 0] = lesion_codes[lesion_codes > 0]
    return PhantomSlice(
        hu=hu.astype(np.float32), codes=codes, slice_class=slice_class,
        label=SLICE_CLASSES.index(slice_class), lesions=records, lungs=lungs,
    )


class PhantomDataset(Dataset):
    """A lazily drawn set of phantom slices as :class:`~ctlesion.data.sample.Sample`.

    Sample ``i`` has class ``classes[i % len(classes)]`` and its own seed derived from
    ``(seed, i)``, so different ``seed`` values give unrelated sets. Images are windowed
    (``window``: a :mod:`~ctlesion.data.windowing` preset for HU data, ``"auto"`` = lung,
    W1500/L-600, or ``"W:L"``) into
    ``[0, 1]``; targets come from :func:`extract_instances` with ``mask_type`` and
    ``min_area`` (lesion sizes scale with ``size``: keep the default 100 at 512 px, use
    about 20 at 128 px). Nothing is cached.
    """

    def __init__(
        self,
        num_samples: int = 64,
        size: int = 512,
        seed: int = 0,
        classes: tuple[str, ...] = SLICE_CLASSES,
        mask_type: str | MaskType = "merge",
        min_area: int = 100,
        window: str = "lung",
    ) -> None:
        if num_samples < 0:
            raise DataError("num_samples must be >= 0")
        if not classes:
            raise DataError("classes must not be empty")
        self.num_samples = int(num_samples)
        self.size = int(size)
        self.seed = int(seed)
        self.classes = tuple(_canonical_class(c) for c in classes)
        self.mask_type = get_mask_type(mask_type) if isinstance(mask_type, str) else mask_type
        self.min_area = int(min_area)
        self.window = resolve_window(window, "HU", source="phantom")  # validate early

    @property
    def class_names(self) -> tuple[str, ...]:
        """Detector class names of the mask type (index i is class id i + 1)."""
        return self.mask_type.class_names

    @property
    def slice_class_names(self) -> tuple[str, ...]:
        """Names of the slice labels (``Sample.label`` indexes :data:`SLICE_CLASSES`,
        whichever subset ``classes`` draws)."""
        return SLICE_CLASSES

    def __len__(self) -> int:
        return self.num_samples

    @property
    def labels(self) -> list[int]:
        """The slice label of every sample, without drawing any phantom."""
        return [SLICE_CLASSES.index(self.classes[i % len(self.classes)]) for i in range(self.num_samples)]

    def sample_seed(self, index: int) -> int:
        """The seed of sample ``index``, derived from ``(seed, index)``."""
        return int(np.random.SeedSequence([self.seed, int(index)]).generate_state(1)[0])

    def _index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return index

    def phantom(self, index: int) -> PhantomSlice:
        """The raw phantom (HU, codes, lesion records) behind sample ``index``."""
        index = self._index(index)
        return make_phantom(self.size, self.classes[index % len(self.classes)], self.sample_seed(index))

    def __getitem__(self, index: int) -> Sample:
        index = self._index(index)
        ph = self.phantom(index)
        image = torch.from_numpy(apply_window(ph.hu, self.window, "HU", source="phantom")[None])
        mm = 0.7 * 512 / self.size  # a 512 px slice at 0.7 mm pixels, whatever the size
        return Sample(
            image=image,
            target=extract_instances(ph.codes, self.mask_type, self.min_area),
            sample_id=f"phantom-{self.seed}-{index:05d}-{ph.slice_class}",
            source="phantom",
            spacing=(mm, mm),
            slice_index=index,
            label=ph.label,
            meta={"slice_class": ph.slice_class, "lesions": ph.lesions},
        )
