"""Classification datasets (covidx, classfirst, class_folders, COVID-CT-MD), patient splits,
and their wiring into build_dataset / parse_data_spec."""

from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctlesion.config import DataConfig
from ctlesion.data import classification as cls_mod
from ctlesion.data.classification import (
    CLASS_NAMES,
    ClassificationFolderDataset,
    CovidCtMdDataset,
    covidx_patient_id,
    ctmd_label_row,
    patient_labels,
    patient_split,
    split_indices,
)
from ctlesion.data.factory import build_dataset, parse_data_spec

S = 16  # synthetic image side


def png(path: Path, value: int | tuple[int, int, int] = 100, side: int = S) -> Path:
    """A flat 8-bit image (grey for an int value, RGB for a triple); suffix picks the format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(value, tuple):
        img = Image.fromarray(np.full((side, side, 3), value, np.uint8), mode="RGB")
    else:
        img = Image.fromarray(np.full((side, side), value, np.uint8), mode="L")
    img.save(path, quality=100) if path.suffix == ".jpg" else img.save(path)
    return path


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


# --------------------------------------------------------------------------- covidx

COVIDX_FILES = {  # name -> (class, grey value)
    "NCP_96_1328_0032.png": (2, 10),
    "NCP_96_1328_0033.png": (2, 20),
    "CP_7_10_0001.png": (1, 30),
    "Normal_7_20_0005.png": (0, 40),
    "COVIDCTMD-P001-IM0027.png": (2, 50),
}


@pytest.fixture
def covidx_root(tmp_path) -> Path:
    root = tmp_path / "covidx"
    for name, (_, value) in COVIDX_FILES.items():
        png(root / name, value)
    png(root / "CP_8_11_0002.jpg", 60)  # named .png in the split: found by stem
    lines = ["# COVIDx-CT style", ""]
    lines += [f"{name} {c} 9 94 512 405" for name, (c, _) in COVIDX_FILES.items()]
    lines.append("CP_8_11_0002.png 1")  # box left out: allowed
    (tmp_path / "split.txt").write_text("\n".join(lines) + "\n")
    return root


def covidx(root: Path, **kw) -> ClassificationFolderDataset:
    return ClassificationFolderDataset(root, "covidx", split=root.parent / "split.txt", **kw)


def test_covidx_labels_patients_and_samples(covidx_root):
    ds = ClassificationFolderDataset(covidx_root, "covidx", split=covidx_root.parent / "split.txt")
    assert len(ds) == 6
    assert ds.labels == [2, 2, 1, 0, 2, 1]
    assert ds.patient_ids == ["NCP_96", "NCP_96", "CP_7", "Normal_7", "COVIDCTMD-P001", "CP_8"]
    assert ds.sample_ids[0] == "NCP_96_1328_0032" and ds.paths[-1].name == "CP_8_11_0002.jpg"
    assert ds.class_names == CLASS_NAMES == ("normal", "cp", "covid")
    sample = ds[2]
    # The box (9 94 512 405) is not used: the whole slice, no crop.
    assert sample.image.shape == (1, S, S) and sample.image.dtype == torch.float32
    assert torch.allclose(sample.image, torch.full((1, S, S), 30 / 255))
    assert sample.target is None and sample.label == 1
    assert sample.sample_id == "CP_7_10_0001" and sample.source == str(covidx_root / "CP_7_10_0001.png")
    assert sample.meta["patient"] == "CP_7" and sample.meta["window"] == "as_stored"


@pytest.mark.parametrize(
    "name, patient",
    [
        ("NCP_96_1328_0032.png", "NCP_96"),
        ("Normal_2011_5_0101.png", "Normal_2011"),
        ("CP_1769_3998_0012.png", "CP_1769"),
        ("COVIDCTMD-P001-IM0027.png", "COVIDCTMD-P001"),
        ("COVIDCTMD-normal001-IM0144.png", "COVIDCTMD-normal001"),
        ("LIDC-IDRI-0068-1.3.6.1.4.1.14519.5.2.1.6279.6001.1234-0101.png", "LIDC-IDRI-0068"),
        ("volume-covid19-A-0573_ct-0010.png", "volume-covid19-A-0573"),
        ("volume-covid19-A-0090_0_ct-0003.png", "volume-covid19-A-0090_0"),
        ("137covid_patient76_SR_2_IM00014.png", "patient76"),
        ("normal1_patient170_SR_3_IM00020.png", "patient170"),
        ("radiopaedia_4_85506_1-0004.png", "radiopaedia_4_85506"),
        ("coronacases_010-0075.png", "coronacases_010"),  # fallback: drop the last token
        ("scan.png", "scan"),  # no separator: the stem
    ],
)
def test_covidx_patient_id(name, patient):
    assert covidx_patient_id(name) == patient


@pytest.mark.parametrize(
    "lines, error, match",
    [
        (["NCP_96_1328_0032.png 2 1 2 3 4", "nothere.png 1 1 2 3 4"], FileNotFoundError,
         r"1 image\(s\) named in split .*split\.txt are not in .*: line 2: nothere\.png"),
        ([f"gone{i}.png 0" for i in range(7)], FileNotFoundError,
         r"7 image\(s\).*line 1: gone0\.png, .*line 5: gone4\.png \.\.\."),
        (["NCP_96_1328_0032.png"], ValueError, r"split\.txt:1: expected '<filename> <class>"),
        (["# header", "NCP_96_1328_0032.png two 1 2 3 4"], ValueError, r"split\.txt:2: expected"),
        (["NCP_96_1328_0032.png 2 1 2 3"], ValueError, r"split\.txt:1: expected"),
        (["NCP_96_1328_0032.png 2 1 2 3 x"], ValueError, r"split\.txt:1: expected"),
        (["NCP_96_1328_0032.png 3 1 2 3 4"], ValueError,
         r"split\.txt:1: NCP_96_1328_0032\.png: unknown class index 3"),
        (["NCP_96_1328_0032.png 2", "CP_7_10_0001.png 1", "NCP_96_1328_0032.png 2"], ValueError,
         r"split\.txt:3: NCP_96_1328_0032\.png is named again \(first on line 1\)"),
        (["# only a comment", ""], ValueError, "names no image"),
    ],
)
def test_covidx_split_errors(covidx_root, lines, error, match):
    split = covidx_root.parent / "split.txt"
    split.write_text("\n".join(lines) + "\n")
    with pytest.raises(error, match=match):
        ClassificationFolderDataset(covidx_root, "covidx", split=split)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(layout="covidx"), ValueError, "needs a split file"),
        (dict(layout="covidx", split="no_such_split.txt"), FileNotFoundError, "split file not found"),
        (dict(layout="coco"), ValueError, "unknown classification layout 'coco'"),
        (dict(layout="covidx", split="SPLIT", window="lung"), ValueError, "8-bit|stored|as_stored"),
        (dict(layout="covidx", split="SPLIT", size=0), ValueError, "size must be a positive integer"),
        (dict(layout="covidx", split="SPLIT", class_names=["a"]), ValueError, "class_folders"),
        (dict(layout="covidx", split="SPLIT", patients="NCP_96"), ValueError, "list of patient ids"),
    ],
)
def test_constructor_errors(covidx_root, kwargs, error, match):
    if kwargs.get("split") == "SPLIT":
        kwargs["split"] = covidx_root.parent / "split.txt"
    with pytest.raises(error, match=match):
        ClassificationFolderDataset(covidx_root, **kwargs)


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset root not found"):
        ClassificationFolderDataset(tmp_path / "nope", "classfirst")


@pytest.mark.parametrize(
    "class_map, labels, class_names",
    [
        (None, [2, 2, 1, 0, 2, 1], ("normal", "cp", "covid")),
        ([0, -1, 1], [1, 1, 0, 1], ("normal", "covid")),  # iCTCF-style: CP dropped
        ([0, 1, 1], [1, 1, 1, 0, 1, 1], ("normal", "cp+covid")),
        ([0, -1, 2], [2, 2, 0, 2], ("normal", "unused", "covid")),  # keeps the 3-class indices
        ([2, 1, 0], [0, 0, 1, 2, 0, 1], ("covid", "cp", "normal")),
    ],
)
def test_class_map(covidx_root, class_map, labels, class_names):
    ds = covidx(covidx_root, class_map=class_map)
    assert ds.labels == labels and ds.class_names == class_names
    assert [ds[i].label for i in range(len(ds))] == labels


@pytest.mark.parametrize(
    "class_map, match",
    [
        ([0, 1], r"class_map \[0, 1\] has 2 entries but the source has 3 classes"),
        ([0, 1, 2, 3], "has 4 entries"),
        ([0, -2, 1], "integers >= 0, or -1"),
        ([0, 1.5, 1], "integers >= 0, or -1"),
        ([-1, -1, -1], "drops every class"),
    ],
)
def test_class_map_errors(covidx_root, class_map, match):
    with pytest.raises(ValueError, match=match):
        covidx(covidx_root, class_map=class_map)


def test_class_map_dropping_everything_present_is_an_error(covidx_root):
    split = covidx_root.parent / "split.txt"
    split.write_text("CP_7_10_0001.png 1 1 2 3 4\n")
    with pytest.raises(ValueError, match=r"no sample left out of 1 after class_map \[0, -1, 1\]"):
        ClassificationFolderDataset(covidx_root, "covidx", split=split, class_map=[0, -1, 1])


def test_patients_filter(covidx_root):
    split = covidx_root.parent / "split.txt"
    ds = ClassificationFolderDataset(covidx_root, "covidx", split=split, patients=["NCP_96", "CP_8"])
    assert ds.patient_ids == ["NCP_96", "NCP_96", "CP_8"] and ds.labels == [2, 2, 1]
    with pytest.warns(UserWarning, match=r"1 of the 2 requested patient\(s\) are not in this dataset: NCP_9"):
        ds = ClassificationFolderDataset(covidx_root, "covidx", split=split, patients=["CP_7", "NCP_999"])
    assert ds.patient_ids == ["CP_7"]
    with pytest.raises(ValueError, match=r"no sample left out of 6 after patients \(1 given\)"):
        quiet(ClassificationFolderDataset, covidx_root, "covidx", split=split, patients=["NCP_999"])


def test_resize_and_rgb_to_grey(tmp_path):
    root = tmp_path / "cf"
    rgb = (200, 100, 50)
    png(root / "2_96_1328_0032.png", rgb, side=32)
    ds = ClassificationFolderDataset(root, "classfirst", size=8)
    sample = ds[0]
    assert sample.image.shape == (1, 8, 8)  # one grey channel, resized
    with Image.open(root / "2_96_1328_0032.png") as img:
        expected = np.asarray(img.convert("L"))[0, 0] / 255  # PIL's ITU-R 601 luma
    assert expected not in (rgb[0] / 255, rgb[1] / 255, rgb[2] / 255)
    assert torch.allclose(sample.image, torch.full((1, 8, 8), float(expected)), atol=1e-6)


# --------------------------------------------------------------------------- classfirst

CLASSFIRST_FILES = ["0_5_6_0001.png", "1_7_8_0009.png", "2_96_1328_0032.png", "2_96_1328_0100.png",
                    "0_nCT12.jpg", "2_pCT3.jpg"]


@pytest.fixture
def classfirst_root(tmp_path) -> Path:
    root = tmp_path / "classfirst"
    for i, name in enumerate(CLASSFIRST_FILES):
        png(root / name, 10 * (i + 1))
    (root / "notes.txt").write_text("not an image")  # ignored
    return root


def test_classfirst_without_split(classfirst_root):
    ds = ClassificationFolderDataset(classfirst_root, "classfirst")
    # natural order of the names; ids from the CNCB-style names, iCTCF names keep the stem
    assert ds.sample_ids == [
        "0_5_6_0001", "0_nCT12", "1_7_8_0009", "2_96_1328_0032", "2_96_1328_0100", "2_pCT3",
    ]
    assert ds.labels == [0, 0, 1, 2, 2, 2]
    assert ds.patient_ids == ["Normal_5", "0_nCT12", "CP_7", "NCP_96", "NCP_96", "2_pCT3"]
    assert ds[3].label == 2 and ds[3].meta["patient"] == "NCP_96"


def test_classfirst_split_keeps_order_and_ictcf_map(classfirst_root):
    split = classfirst_root.parent / "train_ictcf.txt"
    split.write_text("2_pCT3.jpg\n0_nCT12.jpg\n")
    ds = ClassificationFolderDataset(classfirst_root, "classfirst", split=split, class_map=[0, -1, 1])
    assert ds.sample_ids == ["2_pCT3", "0_nCT12"] and ds.labels == [1, 0]
    assert ds.class_names == ("normal", "covid")


@pytest.mark.parametrize(
    "lines, error, match",
    [
        (["2_pCT3.jpg", "x_1_2_3.png"], ValueError,
         r"train\.txt:2: x_1_2_3\.png: the 'classfirst' layout needs"),
        (["NCP_96_1328_0032.png"], ValueError, "looks like a COVIDx name: use the 'covidx' layout"),
        (["2_pCT3.jpg extra"], ValueError, r"train\.txt:1: expected one file name per line"),
        (["3_1_2_0001.png"], ValueError, r"train\.txt:1: 3_1_2_0001\.png: unknown class index 3"),
        (["2_pCT3.jpg", "2_pCT4.jpg"], FileNotFoundError, r"train\.txt are not in .*: line 2: 2_pCT4\.jpg"),
    ],
)
def test_classfirst_split_errors(classfirst_root, lines, error, match):
    split = classfirst_root.parent / "train.txt"
    split.write_text("\n".join(lines) + "\n")
    with pytest.raises(error, match=match):
        ClassificationFolderDataset(classfirst_root, "classfirst", split=split)


def test_classfirst_bad_name_in_folder(classfirst_root):
    png(classfirst_root / "scan_12.png")
    with pytest.raises(ValueError, match=r"scan_12\.png: the 'classfirst' layout needs names '<class>_"):
        ClassificationFolderDataset(classfirst_root, "classfirst")


def test_classfirst_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        ClassificationFolderDataset(tmp_path, "classfirst")


# --------------------------------------------------------------------------- class_folders


@pytest.fixture
def folders_root(tmp_path) -> Path:
    root = tmp_path / "folders"
    png(root / "normal" / "a.png", 10)
    png(root / "normal" / "b.jpg", (90, 90, 90))
    png(root / "covid" / "a.png", 200)
    return root


def test_class_folders_sorted_names(folders_root):
    ds = ClassificationFolderDataset(folders_root, "class_folders")
    assert ds.class_names == ("covid", "normal")  # sorted folder names
    assert ds.sample_ids == ["covid/a", "normal/a", "normal/b"]  # unique across classes
    assert ds.patient_ids == ds.sample_ids and ds.labels == [0, 1, 1]
    sample = ds[1]
    assert sample.label == 1 and sample.sample_id == "normal/a"
    assert torch.allclose(sample.image, torch.full((1, S, S), 10 / 255))


def test_class_folders_given_names(folders_root):
    ds = ClassificationFolderDataset(folders_root, "class_folders", class_names=["normal", "cp", "covid"])
    assert ds.class_names == ("normal", "cp", "covid") and ds.labels == [0, 0, 2]
    ds = ClassificationFolderDataset(
        folders_root, "class_folders", class_names=["normal", "cp", "covid"], class_map=[0, -1, 1]
    )
    assert ds.labels == [0, 0, 1] and ds.class_names == ("normal", "covid")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_names=["normal", "cp"]),
         r"subfolder\(s\) \['covid'\] are not among class_names.*found subfolders \['covid', 'normal'\]"),
        (dict(class_names=["normal", "normal", "covid"]), "repeats a name"),
        (dict(split="x.txt"), "does not use a split file"),
        (dict(class_map=[0, 1, 2]), "has 3 entries but the source has 2 classes"),
    ],
)
def test_class_folders_errors(folders_root, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassificationFolderDataset(folders_root, "class_folders", **kwargs)


@pytest.mark.parametrize("setup, match", [("none", "found none"), ("empty", "hold no image")])
def test_class_folders_nothing_to_read(tmp_path, setup, match):
    if setup == "empty":
        (tmp_path / "normal").mkdir()
        (tmp_path / "covid").mkdir()
    with pytest.raises(ValueError, match=match):
        ClassificationFolderDataset(tmp_path, "class_folders")


# --------------------------------------------------------------------------- patient_split


def toy_patients(n_per_class=(20, 10, 6), slices=3):
    """Slice-level (patient ids, labels): patient 'c<k>_<i>' with `slices` slices of class k."""
    ids, labels = [], []
    for c, n in enumerate(n_per_class):
        for i in range(n):
            ids += [f"c{c}_{i}"] * slices
            labels += [c] * slices
    return ids, labels


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("stratified", [False, True])
def test_patient_split_partitions_patients(seed, stratified):
    ids, labels = toy_patients()
    splits = patient_split(ids, labels if stratified else None, seed=seed)
    assert list(splits) == ["train", "val", "test"]
    flat = [p for members in splits.values() for p in members]
    assert sorted(flat) == sorted(set(ids))  # every patient exactly once
    assert [len(m) for m in splits.values()] == [25, 6, 5]  # 36 * (.7, .15, .15), largest remainder
    assert patient_split(ids, labels if stratified else None, seed=seed) == splits  # deterministic


def test_patient_split_seed_and_order():
    ids, labels = toy_patients()
    a = patient_split(ids, labels, seed=0)
    assert patient_split(ids, labels, seed=1) != a
    rev = list(zip(ids, labels))[::-1]  # slice order does not matter
    assert patient_split([p for p, _ in rev], [lab for _, lab in rev], seed=0) == a


@pytest.mark.parametrize("seed", range(5))
def test_patient_split_stratified(seed):
    ids, labels = toy_patients(n_per_class=(20, 10, 6))
    cls = dict(zip(ids, labels))
    splits = patient_split(ids, labels, fractions={"train": 0.5, "val": 0.25, "test": 0.25}, seed=seed)
    for name, frac in (("train", 0.5), ("val", 0.25), ("test", 0.25)):
        counts = Counter(cls[p] for p in splits[name])
        for c, n in enumerate((20, 10, 6)):
            assert abs(counts[c] - n * frac) <= 1, (name, c, counts)


def test_patient_split_unstratified_can_be_unbalanced():
    """Sanity check of the test above: without labels one class can miss a split entirely."""
    ids, labels = toy_patients(n_per_class=(30, 3), slices=1)
    cls = dict(zip(ids, labels))
    missing = 0
    for seed in range(20):
        splits = patient_split(ids, None, fractions=(("a", 0.5), ("b", 0.5)), seed=seed)
        missing += any(not any(cls[p] == 1 for p in members) for members in splits.values())
        strat = patient_split(ids, labels, fractions=(("a", 0.5), ("b", 0.5)), seed=seed)
        assert all(any(cls[p] == 1 for p in members) for members in strat.values())
    assert missing > 0


def test_patient_class_is_majority_label():
    # p1: two slices of class 2, one of class 0 -> 2; p2: tie 1/0 -> the smaller, 0.
    ids = ["p1", "p1", "p1", "p2", "p2", "p3"]
    labels = [2, 0, 2, 1, 0, 1]
    assert patient_labels(ids, labels) == {"p1": 2, "p2": 0, "p3": 1}
    splits = patient_split(ids, labels, fractions=(("x", 1 / 3), ("y", 1 / 3), ("z", 1 / 3)), seed=3)
    # three classes, one patient each, three equal splits: one patient per split
    assert sorted(len(m) for m in splits.values()) == [1, 1, 1]


@pytest.mark.parametrize(
    "n, sizes, empty",
    [
        (1, [1, 0, 0], ["val", "test"]),
        (2, [1, 1, 0], ["test"]),
        (3, [1, 1, 1], []),
        (5, [3, 1, 1], []),
        (10, [7, 2, 1], []),
    ],
)
def test_patient_split_few_patients(n, sizes, empty):
    ids = [f"p{i}" for i in range(n)]
    if empty:
        with pytest.warns(UserWarning, match=re.escape(f"split(s) {empty} stay empty")):
            splits = patient_split(ids)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            splits = patient_split(ids)
    assert [len(m) for m in splits.values()] == sizes
    assert sorted(p for m in splits.values() for p in m) == sorted(ids)


def test_patient_split_zero_fraction_stays_empty():
    splits = patient_split([f"p{i}" for i in range(4)], fractions=(("train", 1.0), ("val", 0.0)))
    assert len(splits["train"]) == 4 and splits["val"] == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fractions=(("a", 0.5), ("b", 0.4))), "sum to 1"),
        (dict(fractions=(("a", 1.5), ("b", -0.5))), ">= 0"),
        (dict(fractions=(("a", 0.5), ("a", 0.5))), "twice"),
        (dict(fractions=()), "pairs or a mapping"),
        (dict(labels=[0]), "1 labels for 2 patient ids"),
        (dict(labels=[0, None]), "contain None"),
    ],
)
def test_patient_split_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        patient_split(["a", "b"], **kwargs)


def test_split_indices():
    ids = ["a", "b", "a", "c"]
    assert split_indices(ids, ["a", "c"]) == [0, 2, 3]
    assert split_indices(ids, []) == []


def test_dataset_level_split_has_no_shared_patient(tmp_path):
    """patient_split on a dataset's ids, then one dataset per split via DataConfig.patients."""
    root = tmp_path / "cf"
    rng = np.random.default_rng(0)
    for c in range(3):
        for p in range(6):
            for s in range(int(rng.integers(1, 4))):
                png(root / f"{c}_{100 * c + p}_9_{s:04d}.png", side=4)
    full = ClassificationFolderDataset(root, "classfirst")
    splits = patient_split(full.patient_ids, full.labels, seed=5)
    seen: dict[str, str] = {}
    total = 0
    for name, members in splits.items():
        ds = build_dataset(DataConfig(format="classfirst", root=str(root), patients=members), "merge")
        assert sorted(set(ds.patient_ids)) == sorted(members)
        assert split_indices(full.patient_ids, members) == [
            i for i, pid in enumerate(full.patient_ids) if pid in set(ds.patient_ids)
        ]
        for pid in ds.patient_ids:
            assert seen.setdefault(pid, name) == name  # no patient in two splits
        assert {ds.labels[i] for i in range(len(ds))} == set(range(3))  # stratified: all classes
        total += len(ds)
    assert total == len(full)


# --------------------------------------------------------------------------- build / parse


def test_build_dataset_classification_formats(covidx_root, classfirst_root, folders_root):
    # a relative split path that does not exist as given is read relative to data.root
    (covidx_root / "split.txt").write_text((covidx_root.parent / "split.txt").read_text())
    ds = build_dataset(DataConfig(format="covidx", root=str(covidx_root), split="split.txt", size=8), "merge")
    assert isinstance(ds, ClassificationFolderDataset) and len(ds) == 6 and ds[0].image.shape == (1, 8, 8)
    cfg = DataConfig(format="classfirst", root=str(classfirst_root), class_map=[0, -1, 1])
    ds = build_dataset(cfg, "merge")
    assert ds.layout == "classfirst" and ds.labels == [0, 0, 1, 1, 1]
    ds = build_dataset(DataConfig(format="class_folders", root=str(folders_root), cache=True), "merge")
    assert ds[0].label == 0 and len(ds) == 3  # CachedDataset around it
    with pytest.raises(ValueError, match="data.split is required for format 'covidx'"):
        build_dataset(DataConfig(format="covidx", root=str(covidx_root)), "merge")


def test_phantom_ignores_patients():
    ds = build_dataset(DataConfig(format="phantom", num_samples=2, phantom_size=64, patients=["x"]), "merge")
    assert len(ds) == 2 and ds[0].label == 0


@pytest.mark.parametrize(
    "folders, expected",
    [
        ({"normal": ["a.png"], "covid": ["b.jpg"]}, "class_folders"),
        ({"Normal": ["a.png"], "CP": ["b.png"], "NCP": ["c.png"]}, "class_folders"),
        ({"patientA": ["a.png"], "patientB": ["b.png"]}, "images"),  # not class names
        ({"normal": ["a.png"]}, "images"),  # one folder: ambiguous
        ({"normal": ["a.png"], "covid": ["b.png"], ".": ["loose.png"]}, "images"),  # loose image at the top
        ({"normal": ["a.png", "sub/c.png"], "covid": ["b.png"]}, "images"),  # nested folders
    ],
)
def test_detect_class_folders_only_when_unambiguous(tmp_path, folders, expected):
    root = tmp_path / "data"
    for folder, files in folders.items():
        for f in files:
            png(root / folder / f)
    assert parse_data_spec(str(root)).format == expected


@pytest.mark.parametrize("fmt", ["covidx", "classfirst", "class_folders", "covid-ct-md"])
def test_parse_forced_classification_format(tmp_path, fmt):
    cfg = parse_data_spec(f"{fmt}:{tmp_path}")
    assert (cfg.format, cfg.root) == (fmt, str(tmp_path))


# --------------------------------------------------------------------------- COVID-CT-MD (synthetic)


def write_series(folder: Path, n: int) -> None:
    """n CT slices (pydicom's CT_small, 128 px), positions descending with the file number reversed."""
    import pydicom
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k in range(n):
        ds = template.copy()
        z = -100.0 + 2.0 * k  # file IM<k> at z; head first = highest z = last file
        ds.ImagePositionPatient = [-158.1, -179.0, z]
        ds.SliceLocation = z
        ds.InstanceNumber = n - k
        ds.save_as(folder / f"IM{k}.dcm")


def index_csv(*rows: str, header: str = "Label Index,Diagnosis,Relative Path,Folder/ID"):
    """A test mutation that rewrites Index.csv with these rows."""
    return lambda root: (root / "Index.csv").write_text("\n".join((header, *rows)) + "\n")


@pytest.fixture
def ctmd_root(tmp_path) -> Path:
    """COVID-CT-MD-like tree: P001 (row 0), cap001 (Label Index 44 -> row 43), normal001."""
    root = tmp_path / "ctmd"
    write_series(root / "COVID-19 Cases" / "P001", 4)
    write_series(root / "CAP Cases" / "cap001", 3)
    write_series(root / "Normal Cases" / "normal001", 2)
    (root / "Index.csv").write_text(
        "Label Index,Diagnosis,Relative Path,Folder/ID\n0,COVID-19,./COVID-19/,P001\n44,CAP,./CAP/,cap001\n"
    )
    updated = np.zeros((44, 10), np.int32)
    updated[0, [1, 2]] = 1
    updated[43, [0]] = 1
    original = updated.copy()
    original[0, 2] = 0
    np.save(root / "Slice-level-labels-updated-1.npy", updated)
    np.save(root / "Slice-level-labels.npy", original)
    return root


@pytest.mark.parametrize(
    "kwargs, ids, labels, infected",
    [
        # sorted walk order: "CAP Cases" < "COVID-19 Cases" < "Normal Cases"
        (dict(), ["cap001#0000", "P001#0001", "P001#0002", "normal001#0000", "normal001#0001"],
         [1, 2, 2, 0, 0], [1, 1, 1, 0, 0]),
        (dict(slice_labels="original"), ["cap001#0000", "P001#0001", "normal001#0000", "normal001#0001"],
         [1, 2, 0, 0], [1, 1, 0, 0]),
        (dict(exclude_uninfected=False, patients=["P001"]),
         ["P001#0000", "P001#0001", "P001#0002", "P001#0003"], [2, 2, 2, 2], [0, 1, 1, 0]),
        (dict(class_map=[0, -1, 1], patients=["P001", "cap001"]), ["P001#0001", "P001#0002"], [1, 1], [1, 1]),
    ],
)
def test_ctmd_synthetic_labels(ctmd_root, kwargs, ids, labels, infected):
    ds = CovidCtMdDataset(ctmd_root, **kwargs)
    assert ds.sample_ids == ids and ds.labels == labels and ds.infected == infected
    assert ds.patient_ids == [s.split("#")[0] for s in ids]


def test_ctmd_synthetic_samples_follow_head_first_order(ctmd_root, monkeypatch):
    ds = CovidCtMdDataset(ctmd_root, exclude_uninfected=False, size=32)
    reads = []
    real = cls_mod.read_volume
    monkeypatch.setattr(cls_mod, "read_volume", lambda p, **kw: reads.append(Path(p).name) or real(p, **kw))
    samples = [ds[i] for i in range(len(ds))]
    assert reads == ["cap001", "P001", "normal001"]  # in-order access decodes each volume once
    p001 = [s for s in samples if s.meta["patient"] == "P001"]
    # slice j = j-th in descending position: file IM3 (z=-94) first
    assert [s.meta["slice_position"] for s in p001] == [-94.0, -96.0, -98.0, -100.0]
    assert [Path(s.source).name for s in p001] == ["IM3.dcm", "IM2.dcm", "IM1.dcm", "IM0.dcm"]
    s = p001[1]
    assert s.sample_id == "P001#0001" and s.slice_index == 1 and s.label == 2 and s.target is None
    assert s.meta["infected"] == 1 and s.meta["window"] == "W1500:L-600"
    assert s.image.shape == (1, 32, 32) and s.spacing == pytest.approx((0.661468 * 4, 0.661468 * 4))


def test_ctmd_unlabelled_patient_keeps_all_slices(ctmd_root):
    write_series(ctmd_root / "COVID-19 Cases" / "P099", 3)
    with pytest.warns(UserWarning, match=r"1 COVID-19/CAP patient\(s\) have no slice labels.*P099"):
        ds = CovidCtMdDataset(ctmd_root)
    assert ds.unlabelled_patients == ["P099"]
    idx = split_indices(ds.patient_ids, ["P099"])
    assert [ds.sample_ids[i] for i in idx] == ["P099#0000", "P099#0001", "P099#0002"]
    assert {ds.infected[i] for i in idx} == {None} and {ds.labels[i] for i in idx} == {2}


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda r: (r / "Index.csv").unlink(), FileNotFoundError, r"Index\.csv not found"),
        (lambda r: (r / "Slice-level-labels-updated-1.npy").unlink(), FileNotFoundError,
         r"Slice-level-labels-updated-1\.npy not found"),
        (lambda r: (r / "CAP Cases").rename(r / "Other Cases"), ValueError,
         r"Other Cases: cannot tell the COVID-CT-MD class"),
        (index_csv("0,CAP,x,P001"), ValueError,
         r"Index\.csv:2: P001 has diagnosis 'CAP' but its folder 'COVID-19 Cases' says covid"),
        (index_csv("x,CAP,x,P001"), ValueError, r"Index\.csv:2: Label Index 'x' is not an integer"),
        (index_csv("0,P001", header="Label,Folder/ID"), ValueError, "needs the columns"),
        (index_csv("90,COVID-19,x,P001"), ValueError, r"Label Index 90 -> row 89, outside"),
        (index_csv("0,COVID-19,x,P001", "1,COVID-19,x,P001"), ValueError,
         r"Index\.csv:3: patient 'P001' is listed twice"),
        (lambda r: np.save(r / "Slice-level-labels-updated-1.npy", np.eye(44, 10, 6, dtype=np.int32)),
         ValueError, r"P001: 4 DICOM slices, but the updated slice labels mark slice 6 as infected"),
        (lambda r: write_series(r / "COVID-19 Cases" / "cap001", 1), ValueError,
         "two patient folders are named 'cap001'"),
        (lambda r: write_series(r / "P777", 1), ValueError, "patient folder directly under the root"),
    ],
)
def test_ctmd_errors(ctmd_root, mutate, error, match):
    mutate(ctmd_root)
    with pytest.raises(error, match=match):
        quiet(CovidCtMdDataset, ctmd_root)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(slice_labels="newest"), ValueError, "slice_labels must be one of"),
        (dict(window="as_stored"), ValueError, "as_stored"),
        (dict(patients=["nobody"]), ValueError, "no slice left"),
    ],
)
def test_ctmd_argument_errors(ctmd_root, kwargs, error, match):
    with pytest.raises(error, match=match):
        quiet(CovidCtMdDataset, ctmd_root, **kwargs)


def test_ctmd_normal_only_needs_no_label_files(tmp_path):
    write_series(tmp_path / "Normal subjects" / "normal009", 2)
    ds = CovidCtMdDataset(tmp_path)
    assert ds.sample_ids == ["normal009#0000", "normal009#0001"] and ds.labels == [0, 0]


def test_ctmd_slice_count_mismatch_at_read(ctmd_root):
    ds = CovidCtMdDataset(ctmd_root, patients=["normal001"])
    (ctmd_root / "Normal Cases" / "normal001" / "IM1.dcm").unlink()  # counted 2, reads 1
    with pytest.raises(ValueError, match="slice labels would be misaligned"):
        quiet(ds.__getitem__, 0)


@pytest.mark.parametrize("label_index, row", [(0, 0), (42, 42), (44, 43), (79, 78)])
def test_ctmd_label_row_skips_43(label_index, row):
    assert ctmd_label_row(label_index) == row


def test_ctmd_build_and_detect(ctmd_root):
    cfg = parse_data_spec(str(ctmd_root))
    assert cfg.format == "covid-ct-md"
    cfg.exclude_uninfected, cfg.patients, cfg.slice_labels = False, ["cap001"], "original"
    ds = build_dataset(cfg, "merge")
    assert isinstance(ds, CovidCtMdDataset) and ds.sample_ids == ["cap001#0000", "cap001#0001", "cap001#0002"]


# --------------------------------------------------------------------------- COVID-CT-MD (real)

CTMD = "covid-ct-md"


def ctmd_root_real(shared_data: Path) -> Path:
    root = shared_data / CTMD
    if not (root / "Index.csv").is_file():
        pytest.skip(f"{root} is absent")
    return root


@pytest.mark.parametrize(
    "slice_labels, exclude, counts",
    [
        ("updated", True, {"P001": 80, "cap001": 86, "normal001": 154}),
        ("original", True, {"P001": 39, "cap001": 86, "normal001": 154}),
        ("updated", False, {"P001": 148, "cap001": 168, "normal001": 154}),
    ],
)
def test_real_ctmd_counts_without_decoding(shared_data, slice_labels, exclude, counts):
    ds = CovidCtMdDataset(ctmd_root_real(shared_data), slice_labels=slice_labels, exclude_uninfected=exclude)
    assert Counter(ds.patient_ids) == counts
    assert {p: ds.num_slices(p) for p in counts} == {"P001": 148, "cap001": 168, "normal001": 154}
    assert dict(zip(ds.patient_ids, ds.labels)) == {"P001": 2, "cap001": 1, "normal001": 0}
    assert ds.unlabelled_patients == [] and ds._cache is None  # nothing decoded
    if not exclude:
        infected = Counter(p for p, inf in zip(ds.patient_ids, ds.infected) if inf == 1)
        assert infected == {"P001": 80, "cap001": 86}


def kept_slices(ds: CovidCtMdDataset, patient: str) -> list[int]:
    """Slice indices (DicomReader order) of ``patient`` that the dataset kept."""
    return [int(s.split("#")[1]) for s, q in zip(ds.sample_ids, ds.patient_ids) if q == patient]


def test_real_ctmd_infected_ranges_and_covidx_alignment(shared_data):
    """README: updated infected slices P001 26-124, cap001 48-138; COVIDx CT-3A names the
    original-label infected slices IM{j+1}, which must be exactly our kept slices."""
    root = ctmd_root_real(shared_data)
    ds = CovidCtMdDataset(root)
    idx = {p: kept_slices(ds, p) for p in ("P001", "cap001")}
    assert (idx["P001"][0], idx["P001"][-1], idx["cap001"][0], idx["cap001"][-1]) == (26, 124, 48, 138)
    split = shared_data / "splits" / "COVIDNet-CT" / "splits" / "v3" / "val_COVIDx_CT-3A.txt"
    if not split.is_file():
        pytest.skip(f"{split} is absent")
    original = CovidCtMdDataset(root, slice_labels="original", patients=["P001", "cap001"])
    covidx: dict[str, set[int]] = {}
    for line in split.read_text().splitlines():
        m = re.match(r"COVIDCTMD-(P001|cap001)-IM(\d+)\.png (\d)", line)
        if m:
            covidx.setdefault(m.group(1), set()).add(int(m.group(2)) - 1)
            assert int(m.group(3)) == {"P001": 2, "cap001": 1}[m.group(1)]
    ours = {p: set(kept_slices(original, p)) for p in ("P001", "cap001")}
    assert ours == covidx and len(covidx["P001"]) == 39 and len(covidx["cap001"]) == 86


def test_real_ctmd_reads_one_volume_once(shared_data, monkeypatch):
    ds = CovidCtMdDataset(ctmd_root_real(shared_data), patients=["P001"])
    reads = []
    real = cls_mod.read_volume
    monkeypatch.setattr(cls_mod, "read_volume", lambda p, **kw: reads.append(Path(p).name) or real(p, **kw))
    first, second = ds[0], ds[1]
    assert reads == ["P001"]
    assert (first.sample_id, second.sample_id) == ("P001#0026", "P001#0027")
    assert first.label == 2 and first.target is None and first.slice_index == 26
    assert {k: first.meta[k] for k in ("units", "window", "patient", "infected")} == {
        "units": "HU", "window": "W1500:L-600", "patient": "P001", "infected": 1,
    }
    assert first.image.shape == (1, 512, 512)
    assert 0 <= float(first.image.min()) < float(first.image.max()) <= 1
    assert first.spacing == pytest.approx((0.748, 0.748), abs=1e-3)
    # head first: positions descend
    assert first.meta["slice_position"] > second.meta["slice_position"]


def test_real_ctmd_patient_split(shared_data):
    ds = CovidCtMdDataset(ctmd_root_real(shared_data))
    splits = patient_split(ds.patient_ids, ds.labels, seed=0)
    assert sorted(p for m in splits.values() for p in m) == ["P001", "cap001", "normal001"]
    assert [len(m) for m in splits.values()] == [1, 1, 1]
    assert sum(len(split_indices(ds.patient_ids, m)) for m in splits.values()) == len(ds)


def test_real_covidx_names_match_metadata_patients(shared_data):
    """Every patient id derived from the COVIDx CT-3A names is a patient of metadata.csv."""
    base = shared_data / "splits" / "COVIDNet-CT"
    if not (base / "metadata.csv").is_file():
        pytest.skip(f"{base} is absent")
    known = {line.split(",", 1)[0] for line in (base / "metadata.csv").read_text().splitlines()[1:]}
    for split in ("val_COVIDx_CT-3A.txt", "test_COVIDx_CT-3A.txt"):
        lines = (base / "splits" / "v3" / split).read_text().splitlines()
        names = [line.split()[0] for line in lines if line]
        unknown = {covidx_patient_id(n) for n in names} - known
        assert not unknown, (split, sorted(unknown)[:5])
