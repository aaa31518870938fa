"""Synthetic chest-CT phantoms: determinism, anatomy, lesion placement by class, dataset."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from ctlesion.data.masks import CONSOLIDATION, GGO, LUNG
from ctlesion.data.masks import extract_instances
from ctlesion.data.phantom import SLICE_CLASSES, PhantomDataset, make_phantom

SIZES = (64, 128, 512)
# Lesion areas scale with size; these min_area values keep every lesion an instance.
MIN_AREA = {64: 4, 128: 20, 512: 100}
SEEDS = {64: (0, 1, 2, 3), 128: (0, 1, 2, 3), 512: (0,)}
CASES = [(size, cls) for size in SIZES for cls in SLICE_CLASSES]


@functools.lru_cache(maxsize=None)
def phantom(size, cls, seed):
    return make_phantom(size, cls, seed)


def phantoms(size, cls):
    return [phantom(size, cls, seed) for seed in SEEDS[size]]


@pytest.mark.parametrize("size,cls", CASES)
def test_deterministic_by_seed(size, cls):
    a, b = phantom(size, cls, 0), make_phantom(size, cls, 0)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.codes, b.codes)
    assert a.lesions == b.lesions
    c = make_phantom(size, cls, 12345)
    assert not np.array_equal(a.hu, c.hu)


@pytest.mark.parametrize("size,cls", CASES)
def test_types_and_anatomy(size, cls):
    for p in phantoms(size, cls):
        assert p.hu.shape == p.codes.shape == (size, size)
        assert p.hu.dtype == np.float32 and p.codes.dtype == np.uint8
        assert p.slice_class == cls and p.label == SLICE_CLASSES.index(cls)
        assert set(np.unique(p.codes)) <= {0, LUNG, GGO, CONSOLIDATION}
        # Two lungs, one per image half, each a sizeable share of the slice.
        for code, half in ((1, slice(0, size // 2)), (2, slice(size // 2, size))):
            lung = p.lungs == code
            assert lung.sum() > 0.06 * size * size
            assert lung[:, half].sum() == lung.sum()
        # Lesions never leak: labelled lung + lesion pixels are exactly the lung shapes.
        assert np.array_equal(p.codes > 0, p.lungs > 0)
        # Air around the body, bone somewhere (vertebra, ribs).
        corner = p.hu[: size // 10, : size // 10]
        assert abs(float(corner.mean()) + 1000) < 10
        assert float(p.hu.max()) > 300


@pytest.mark.parametrize("size", SIZES)
def test_normal_has_no_lesions(size):
    for p in phantoms(size, "normal"):
        assert p.lesions == []
        assert not np.isin(p.codes, (GGO, CONSOLIDATION)).any()
        assert (p.codes == LUNG).sum() > 0.15 * size * size


@pytest.mark.parametrize("size", SIZES)
def test_cp_lesions_in_one_lung_mostly_consolidation(size):
    n_c = n_all = 0
    for p in phantoms(size, "cp"):
        assert 1 <= len(p.lesions) <= 2
        lesion = p.codes >= GGO
        assert lesion.any()
        assert len(np.unique(p.lungs[lesion])) == 1  # one lung only
        assert len({rec["side"] for rec in p.lesions}) == 1
        n_c += sum(rec["kind"] == "C" for rec in p.lesions)
        n_all += len(p.lesions)
        assert p.lesions[0]["kind"] == "C"
    assert n_c / n_all >= 0.5


@pytest.mark.parametrize("size", SIZES)
def test_covid_lesions_bilateral_peripheral_mostly_ggo(size):
    for p in phantoms(size, "covid"):
        assert 3 <= len(p.lesions) <= 6
        lesion = p.codes >= GGO
        assert set(np.unique(p.lungs[lesion])) == {1, 2}  # both lungs
        assert (p.codes == GGO).sum() > (p.codes == CONSOLIDATION).sum()
        assert sum(rec["kind"] == "C" for rec in p.lesions) <= 1
        # Peripheral: every lesion reaches to within half its radius of the lung edge.
        edge_dist = ndi.distance_transform_edt(p.lungs > 0)
        labels, n = ndi.label(lesion, structure=np.ones((3, 3)))
        assert n == len(p.lesions)
        for k in range(1, n + 1):
            radius = np.sqrt((labels == k).sum() / np.pi)
            assert edge_dist[labels == k].min() <= 1 + 0.5 * radius


@pytest.mark.parametrize("size,cls", [c for c in CASES if c[1] != "normal"])
def test_lesion_records_sizes_and_instances(size, cls):
    for p in phantoms(size, cls):
        assert sum(rec["area"] for rec in p.lesions) == int((p.codes >= GGO).sum())
        for rec in p.lesions:
            assert rec["kind"] in ("GGO", "C") and rec["side"] in ("left", "right")
            assert rec["area"] > MIN_AREA[size]
            r, c = (int(x) for x in rec["centre"])
            assert 0 <= r < size and 0 <= c < size
        # Lesions are separate: one instance per lesion in merge and in both modes.
        for mode in ("merge", "both"):
            target = extract_instances(p.codes, mode, MIN_AREA[size])
            assert len(target["labels"]) == len(p.lesions)
    if size >= 128:
        assert min(rec["area"] for p in phantoms(size, cls) for rec in p.lesions) > 1.5 * MIN_AREA[size]


@pytest.mark.parametrize("size", SIZES)
def test_hu_ranges(size):
    means = {LUNG: [], GGO: [], CONSOLIDATION: []}
    for cls in SLICE_CLASSES:
        for p in phantoms(size, cls):
            lung = float(p.hu[p.codes == LUNG].mean())
            assert -900 < lung < -700  # GGO haze spills a little past the label
            means[LUNG].append(lung)
            for code in (GGO, CONSOLIDATION):
                if (p.codes == code).any():
                    means[code].append(float(p.hu[p.codes == code].mean()))
    ggo, cons = np.mean(means[GGO]), np.mean(means[CONSOLIDATION])
    assert np.mean(means[LUNG]) + 150 < ggo < cons - 150
    assert -700 < ggo < -350
    assert -200 < cons < 80


def test_independent_of_global_rng():
    np.random.seed(1)
    torch.manual_seed(1)
    state = np.random.get_state()[1].copy()
    a = make_phantom(64, "covid", 5)
    assert np.array_equal(np.random.get_state()[1], state)  # global state untouched
    np.random.seed(2)
    torch.manual_seed(2)
    b = make_phantom(64, "covid", 5)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.codes, b.codes)


def test_unknown_class_and_tiny_size_raise():
    with pytest.raises(ValueError):
        make_phantom(64, "flu", 0)
    with pytest.raises(ValueError):
        make_phantom(16, "normal", 0)


def test_dataset_samples():
    ds = PhantomDataset(num_samples=6, size=128, seed=0, min_area=20)
    assert len(ds) == 6
    assert [ds[i].label for i in range(6)] == [0, 1, 2, 0, 1, 2]
    s = ds[2]
    assert s.image.shape == (1, 128, 128) and s.image.dtype == torch.float32
    assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0
    assert s.sample_id == "phantom-0-00002-covid" and s.source == "phantom"
    assert s.slice_index == 2 and s.label == 2
    assert s.spacing == pytest.approx((2.8, 2.8))
    t = s.target
    n = len(t["labels"])
    assert n >= 3 and n == len(s.meta["lesions"])
    assert t["boxes"].shape == (n, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].dtype == torch.int64 and set(t["labels"].tolist()) == {1}
    assert t["masks"].shape == (n, 128, 128) and t["masks"].dtype == torch.uint8
    # Lung window W1500/L-600 through the shared windowing module.
    hu = ds.phantom(2).hu
    assert torch.allclose(s.image[0], torch.from_numpy(np.clip((hu + 1350) / 1500, 0, 1)))
    # Normal sample: negative target.
    assert len(ds[0].target["labels"]) == 0
    assert ds[-1].sample_id == ds[5].sample_id
    with pytest.raises(IndexError):
        ds[6]


def test_dataset_seeds_mask_types_and_classes():
    a = PhantomDataset(3, size=64, seed=0, min_area=4)
    b = PhantomDataset(3, size=64, seed=1, min_area=4)
    assert not torch.equal(a[0].image, b[0].image)
    assert torch.equal(a[1].image, PhantomDataset(3, size=64, seed=0)[1].image)
    both = PhantomDataset(3, size=128, seed=0, mask_type="both", min_area=20)
    assert set(both[1].target["labels"].tolist()) <= {1, 2} and both.class_names == ("GGO", "C")
    sep = PhantomDataset(3, size=128, seed=0, mask_type="separate", min_area=20)
    assert 1 in sep[0].target["labels"].tolist()  # lungs are instances in "separate"
    only = PhantomDataset(4, size=64, seed=0, classes=("covid",), min_area=4)
    assert {only[i].label for i in range(4)} == {2}
