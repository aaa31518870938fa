"""Folder datasets (cncb, semiseg), volume datasets, build_dataset and parse_data_spec."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from ctlesion.config import DataConfig
from ctlesion.data.datasets import LesionFolderDataset, VolumeDataset
from ctlesion.data.discovery import discover_inputs
from ctlesion.data.factory import build_dataset, parse_data_spec
from ctlesion.data.sample import Sample

H, W = 24, 20
# palette with the Inf-Net colours: 0 black, 1 (128,0,0) GGO, 2 (0,128,0) C
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)


def grey(value: int, shape=(H, W)) -> Image.Image:
    return Image.fromarray(np.full(shape, value, np.uint8), mode="L")


def label_png(codes: np.ndarray, palette: bool = False) -> Image.Image:
    img = Image.fromarray(codes.astype(np.uint8), mode="L")
    if palette:
        img = img.convert("P")  # 'L' -> 'P' keeps values as indices with a grey palette
        img.putpalette(PALETTE)
    return img


@pytest.fixture
def cncb_root(tmp_path) -> Path:
    """Four slices: C-only, GGO+C, a negative without mask, and one PNG image."""
    root = tmp_path / "cncb"
    (root / "imgs").mkdir(parents=True)
    (root / "masks").mkdir()
    c_only = np.ones((H, W), np.uint8)
    c_only[2:14, 2:14] = 3  # 144 px consolidation, no GGO
    both = np.ones((H, W), np.uint8)
    both[0:11, 0:11] = 2  # 121 px GGO
    both[13:24, 9:20] = 3  # 121 px C
    grey(10).save(root / "imgs" / "0_10.jpg", quality=100)
    label_png(c_only).save(root / "masks" / "0_10.png")
    grey(20).save(root / "imgs" / "0_2.jpg", quality=100)
    label_png(both).save(root / "masks" / "0_2.png")
    grey(30).save(root / "imgs" / "1_5.jpg", quality=100)  # no mask: negative
    grey(40).save(root / "imgs" / "2_1.png")
    label_png(np.ones((H, W), np.uint8)).save(root / "masks" / "2_1.png")  # lungs only
    label_png(np.zeros((H, W), np.uint8)).save(root / "masks" / "9_9.png")  # mask without image
    return root


def load(root, layout="cncb", **kw) -> LesionFolderDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LesionFolderDataset(root, layout, **kw)


def test_cncb_pairs_by_stem_in_natural_order(cncb_root):
    with pytest.warns(UserWarning, match=r"1 of 4 image\(s\) have no mask.*1_5"):
        ds = LesionFolderDataset(cncb_root, "cncb", mask_type="both")
    assert ds.stems == ["0_2", "0_10", "1_5", "2_1"] and len(ds) == 4
    sample = ds[1]
    assert isinstance(sample, Sample) and sample.sample_id == "0_10"
    assert sample.source.endswith("0_10.jpg") and sample.meta["mask"].endswith("0_10.png")
    assert sample.target["labels"].tolist() == [2]  # C-only keeps class C
    assert sample.target["boxes"].tolist() == [[2.0, 2.0, 14.0, 14.0]]
    assert sample.image.shape == (1, H, W) and sample.image.dtype == torch.float32
    assert abs(float(sample.image.mean()) - 10 / 255) < 2 / 255  # as_stored window
    assert ds[0].target["labels"].tolist() == [1, 2]


@pytest.mark.parametrize(
    "mask_type, labels_by_stem",
    [
        ("merge", {"0_2": [1, 1], "0_10": [1], "1_5": [], "2_1": []}),
        ("ggo", {"0_2": [1], "0_10": [], "1_5": [], "2_1": []}),
        ("separate", {"0_2": [1, 2, 3], "0_10": [1, 3], "1_5": [], "2_1": [1]}),
    ],
)
def test_cncb_mask_types(cncb_root, mask_type, labels_by_stem):
    ds = load(cncb_root, mask_type=mask_type)
    got = {ds.stems[i]: ds[i].target["labels"].tolist() for i in range(len(ds))}
    assert got == labels_by_stem


def test_negative_has_empty_target_of_image_size(cncb_root):
    ds = load(cncb_root)
    target = ds[ds.stems.index("1_5")].target
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, H, W)


def test_split_file_order_names_and_missing(cncb_root, tmp_path):
    split = tmp_path / "split.txt"
    split.write_text("2_1.png\n\n0_10.jpg 2 0 0 5 5\n# comment\n1_5\n")
    ds = load(cncb_root, split=split)
    assert ds.stems == ["2_1", "0_10", "1_5"]
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(["0_10.jpg"] + [f"7_{i}.jpg" for i in range(7)]))
    expected = r"7 image\(s\) named in split.*7_0, 7_1, 7_2, 7_3, 7_4 \.\.\."
    with pytest.raises(FileNotFoundError, match=expected) as info:
        load(cncb_root, split=bad)
    assert "7_5" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="nosplit.txt"):
        load(cncb_root, split=tmp_path / "nosplit.txt")


def test_resize_option(cncb_root):
    sample = load(cncb_root, mask_type="both", size=12)[1]
    assert sample.image.shape == (1, 12, 12)
    assert sample.target["masks"].shape[1:] == (12, 12)


@pytest.mark.parametrize(
    "setup, error, match",
    [
        ("shape", ValueError, r"image .*0_10\.jpg is 24x20 but mask .*0_10\.png is 10x10"),
        ("value", ValueError, r"0_10\.png.*values \[5\].*cncb codes \[0, 1, 2, 3\]"),
        ("rgb", ValueError, r"0_10\.png.*mode 'RGB'"),
    ],
)
def test_bad_masks_name_the_file(cncb_root, setup, error, match):
    mask = cncb_root / "masks" / "0_10.png"
    if setup == "shape":
        label_png(np.zeros((10, 10), np.uint8)).save(mask)
    elif setup == "value":
        codes = np.zeros((H, W), np.uint8)
        codes[0, 0] = 5
        label_png(codes).save(mask)
    else:
        Image.fromarray(np.zeros((H, W, 3), np.uint8), mode="RGB").save(mask)
    ds = load(cncb_root)
    with pytest.raises(error, match=match):
        ds[ds.stems.index("0_10")]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"layout": "coco"}, ValueError, "unknown layout 'coco'"),
        ({"window": "lung"}, ValueError, "already windowed"),
        ({"mask_type": "lesion"}, ValueError, "unknown mask type"),
        ({"layout": "semiseg"}, FileNotFoundError, r"Imgs not found.*Imgs/ and GT/"),
    ],
)
def test_constructor_errors(cncb_root, kwargs, error, match):
    kwargs = {"layout": "cncb", **kwargs}
    with pytest.raises(error, match=match):
        load(cncb_root, **kwargs)


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LesionFolderDataset(tmp_path / "nowhere", "cncb")


@pytest.fixture
def semiseg_root(tmp_path) -> Path:
    root = tmp_path / "MultiClassInfection-Train"
    (root / "Imgs").mkdir(parents=True)
    (root / "GT").mkdir()
    codes = np.zeros((H, W), np.uint8)
    codes[0:11, 0:11] = 1  # GGO
    codes[12:24, 8:20] = 2  # C
    grey(50).save(root / "Imgs" / "3.jpg", quality=100)
    label_png(codes, palette=True).save(root / "GT" / "3.png")
    c_only = np.zeros((H, W), np.uint8)
    c_only[5:20, 5:15] = 2
    grey(60).save(root / "Imgs" / "12.jpg", quality=100)
    label_png(c_only, palette=False).save(root / "GT" / "12.png")  # 'L' mask, same values
    return root


def test_semiseg_palette_indices_map_to_canonical(semiseg_root):
    with Image.open(semiseg_root / "GT" / "3.png") as img:
        assert img.mode == "P"
    ds = LesionFolderDataset(semiseg_root, "semiseg", mask_type="both")
    assert ds.stems == ["3", "12"]
    s3, s12 = ds[0], ds[1]
    assert s3.target["labels"].tolist() == [1, 2]  # GGO, C
    assert s12.target["labels"].tolist() == [2]  # C-only 'L' mask
    merged = LesionFolderDataset(semiseg_root, "semiseg", mask_type="separate")[0]
    assert merged.target["labels"].tolist() == [2, 3]  # no lung class in semiseg


def test_semiseg_binary_gt_rejected_with_hint(semiseg_root):
    binary = np.zeros((H, W), np.uint8)
    binary[0:5, 0:5] = 255
    label_png(binary).save(semiseg_root / "GT" / "3.png")
    ds = LesionFolderDataset(semiseg_root, "semiseg")
    with pytest.raises(ValueError, match=r"3\.png.*\[255\].*Doctor-label.*MultiClassInfection"):
        ds[0]


def test_semiseg_value_3_rejected(semiseg_root):
    codes = np.zeros((H, W), np.uint8)
    codes[0, 0] = 3  # pleural effusion in MedSeg: not a semiseg class
    label_png(codes).save(semiseg_root / "GT" / "12.png")
    with pytest.raises(ValueError, match=r"12\.png.*values \[3\].*semiseg codes \[0, 1, 2\]"):
        LesionFolderDataset(semiseg_root, "semiseg")[1]


# --------------------------------------------------------------------------- volumes


def test_volume_dataset_flattens_images_and_nifti(tmp_path):
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    grey(7).save(root / "a.png")
    hu = np.full((H, W, 3), -600.0, np.float32)  # X=H, Y=W -> slices [W, H]
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(root / "sub" / "vol.nii.gz"))
    ds = VolumeDataset(root)
    assert len(ds) == 4
    ids = [ds[i].sample_id for i in range(4)]
    assert ids == ["a", "vol#0000", "vol#0001", "vol#0002"]
    s = ds[2]
    assert s.slice_index == 1 and s.target is None and s.image.shape == (1, W, H)
    assert torch.allclose(s.image, torch.full_like(s.image, 0.5))  # -600 HU at the lung level
    assert ds[0].meta["window"] == "as_stored" and s.meta["window"] == "W1500:L-600"
    with pytest.raises(IndexError):
        ds[4]


def test_volume_dataset_labels_and_opens_volume_once(tmp_path, monkeypatch):
    hu = np.zeros((16, 16, 2), np.float32)
    labels = np.zeros((16, 16, 2), np.uint8)
    labels[2:14, 2:14, 1] = 2
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "v.nii"))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "v_lab.nii"))
    import ctlesion.data.datasets as datasets

    calls = []
    real = datasets.open_volume  # opened once (headers), then one slice decoded per item
    monkeypatch.setattr(datasets, "open_volume", lambda *a, **k: calls.append(a) or real(*a, **k))
    ds = VolumeDataset(tmp_path / "v.nii", labels=tmp_path / "v_lab.nii", mask_type="merge")
    targets = [ds[i].target["labels"].tolist() for i in range(len(ds))]
    assert targets == [[], [1]] and len(calls) == 1
    with pytest.raises(ValueError, match="exactly one NIfTI"):
        VolumeDataset([tmp_path / "v.nii", tmp_path / "v.nii"], labels=tmp_path / "v_lab.nii")


def test_discover_inputs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ghost"):
        discover_inputs(tmp_path / "ghost")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no DICOM series, NIfTI"):
        discover_inputs(tmp_path)


# --------------------------------------------------------------------------- config


def test_build_dataset_dispatch(cncb_root, semiseg_root):
    with pytest.warns(UserWarning, match="no mask"):
        ds = build_dataset(DataConfig(format="cncb", root=str(cncb_root), min_area=0), "both")
    assert isinstance(ds, LesionFolderDataset) and ds.layout == "cncb" and ds.min_area == 0
    ds = build_dataset(DataConfig(format="semiseg", root=str(semiseg_root), size=8), "merge")
    assert ds.layout == "semiseg" and ds[0].image.shape == (1, 8, 8)
    ds = build_dataset(DataConfig(format="images", root=str(cncb_root / "imgs")), "merge")
    assert isinstance(ds, VolumeDataset) and len(ds) == 4 and ds[0].target is None


@pytest.mark.parametrize(
    "cfg, error, match",
    [
        (DataConfig(format="coco", root="."), ValueError, r"unknown data format 'coco'.*'cncb'"),
        (DataConfig(format="cncb", root=None), ValueError, "data.root is required"),
        (DataConfig(format="dicom", root="/no/such/dir"), FileNotFoundError, "/no/such/dir"),
    ],
)
def test_build_dataset_errors(cfg, error, match):
    with pytest.raises(error, match=match):
        build_dataset(cfg, "merge")


def test_parse_data_spec_detects_formats(cncb_root, semiseg_root, tmp_path):
    assert parse_data_spec(str(cncb_root)).format == "cncb"
    assert parse_data_spec(str(semiseg_root)).format == "semiseg"
    assert parse_data_spec(str(cncb_root / "imgs")).format == "images"
    assert parse_data_spec(str(cncb_root / "imgs" / "2_1.png")).format == "images"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(tmp_path / "v.nii.gz"))
    cfg = parse_data_spec(str(tmp_path / "v.nii.gz"))
    assert (cfg.format, cfg.root) == ("nifti", str(tmp_path / "v.nii.gz"))
    # forced format
    cfg = parse_data_spec(f"semiseg:{cncb_root}")
    assert (cfg.format, cfg.root) == ("semiseg", str(cncb_root))


def test_parse_data_spec_dicom_folder(tmp_path):
    from pydicom.data import get_testdata_file  # a CT slice bundled with pydicom

    folder = tmp_path / "P9"
    folder.mkdir()
    (folder / "IM1").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())  # no suffix
    assert parse_data_spec(str(folder)).format == "dicom"
    assert parse_data_spec(str(tmp_path)).format == "dicom"  # series one level down
    (sample,) = [VolumeDataset(tmp_path)[0]]
    assert sample.image.shape == (1, 128, 128) and sample.sample_id == "P9"


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("phantom", dict(num_samples=64, phantom_size=512, seed=0)),
        ("phantom:n=32,size=128,seed=7", dict(num_samples=32, phantom_size=128, seed=7)),
        ("phantom:classes=normal+covid", dict(phantom_classes=["normal", "covid"])),
    ],
)
def test_parse_phantom(spec, expected):
    cfg = parse_data_spec(spec)
    assert cfg.format == "phantom" and cfg.root is None
    for key, value in expected.items():
        assert getattr(cfg, key) == value


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("phantom:n=abc", ValueError, "n must be an integer"),
        ("phantom:colour=red", ValueError, "unknown phantom option 'colour'"),
        ("phantom:n", ValueError, "not key=value"),
        ("phantom:size=0", ValueError, "size must be >= 1"),
        ("", ValueError, "--data is empty"),
        ("/definitely/not/here", FileNotFoundError, "/definitely/not/here"),
        ("cncb:/definitely/not/here", FileNotFoundError, "/definitely/not/here"),
    ],
)
def test_parse_data_spec_errors(spec, error, match):
    with pytest.raises(error, match=match):
        parse_data_spec(spec)


def test_cache_reads_each_sample_once():
    from ctlesion.config import DataConfig
    from ctlesion.data.factory import build_dataset
    from ctlesion.data.wrappers import CachedDataset

    cfg = DataConfig(format="phantom", num_samples=3, phantom_size=64, min_area=4, cache=True)
    dataset = build_dataset(cfg, "both")
    assert isinstance(dataset, CachedDataset) and len(dataset) == 3
    calls = []
    inner = dataset.dataset
    original = inner.__class__.__getitem__
    inner.__class__.__getitem__ = lambda self, i: calls.append(i) or original(self, i)
    try:
        first = [dataset[i] for i in range(3)]
        again = [dataset[i] for i in range(3)]
    finally:
        inner.__class__.__getitem__ = original
    assert calls == [0, 1, 2]
    assert all(a is b for a, b in zip(first, again))
    assert not isinstance(build_dataset(DataConfig(format="phantom", num_samples=1, phantom_size=64), "merge"),
                          CachedDataset)


def test_cache_reads_a_volume_backed_dataset_in_order_at_the_first_miss():
    from ctlesion.data.wrappers import CachedDataset

    class Volumes(torch.utils.data.Dataset):
        """Slices 0-3 of volume A, 4-7 of B; one volume held, as CovidCtMdDataset."""
        reads_in_order = True

        def __init__(self):
            self.decodes, self.held = [], None

        def __len__(self):
            return 8

        def __getitem__(self, i):
            volume = "AB"[i // 4]
            if self.held != volume:
                self.decodes.append(volume)
                self.held = volume
            return (volume, i)

    inner = Volumes()
    cached = CachedDataset(inner)
    shuffled = [5, 0, 7, 2, 4, 1, 6, 3]
    assert [cached[i] for i in shuffled] == [("AB"[i // 4], i) for i in shuffled]
    assert inner.decodes == ["A", "B"]               # each volume once, not once per switch
    uncached = Volumes()
    [uncached[i] for i in shuffled]
    assert len(uncached.decodes) == 8                # what a shuffled epoch costs without it

