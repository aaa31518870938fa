"""`ctlesion verify-data`: clean data exits 0; broken copies exit 1 naming every problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctlesion.cli import main
from ctlesion.data.verify import split_patient_id, verify_data


def _cncb(root: Path, n: int = 4) -> Path:
    """A tiny CNCB folder: 48-px images (all different) and masks with lung, GGO, C."""
    (root / "imgs").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
        mask = np.zeros((48, 48), np.uint8)
        mask[4:40, 4:40] = 1
        mask[10:25, 10:25] = 2           # a 225 px GGO
        mask[30:33, 30:33] = 3 if i % 2 else 2   # a 9 px instance: under min area
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return root


def _run(argv, capsys) -> tuple[int, str]:
    code = main(["verify-data", *argv, "--quiet"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out


def test_clean_cncb_folder_exits_0_and_counts_classes(tmp_path, capsys):
    root = _cncb(tmp_path / "cncb")
    code, out = _run([str(root)], capsys)
    assert code == 0 and out.rstrip().endswith("clean")
    report = verify_data(root, progress=False).as_dict()
    checks = {c["name"]: c for c in report["checks"]}
    assert report["format"] == "cncb"
    assert checks["slices per class"]["detail"] == "C 2, GGO 4, lung 4"
    assert checks["lesions per class (8-connected, any size)"]["detail"] == "C 2, GGO 6"
    assert checks["instances under min area 100 px"]["status"] == "info"
    assert checks["instances under min area 100 px"]["detail"].startswith("4 instance(s)")


def test_broken_copy_lists_every_problem_and_exits_1(tmp_path, capsys):
    root = _cncb(tmp_path / "cncb", n=6)
    (root / "masks" / "0.png").unlink()                                   # image without mask
    Image.fromarray(np.full((48, 48), 7, np.uint8)).save(root / "masks" / "1.png")   # value 7
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "masks" / "2.png")     # wrong size
    shutil.copy(root / "imgs" / "4.png", root / "imgs" / "3.png")         # duplicate image
    Image.fromarray(np.full((48, 48), 90, np.uint8)).save(root / "imgs" / "5.png")   # constant image
    (root / "imgs" / "6.png").write_bytes(b"not a png")                   # unreadable
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(root / "masks" / "9.png")     # mask without image
    code, out = _run([str(root)], capsys)
    assert code == 1
    for needle in ("0.png: no mask", "9.png: no image", "values [7] outside [0, 1, 2, 3]",
                   "2.png: 40x48 but image 2.png is 48x48", "3.png = 4.png", "5.png: constant image",
                   "6.png: not a readable image"):
        assert needle in out, needle
    code, out = _run([str(root), "--json"], capsys)
    failed = {c["name"] for c in json.loads(out)["checks"] if c["status"] == "FAIL"}
    assert failed == {"files readable", "image/mask pairs complete", "image/mask sizes equal",
                      "mask values in the cncb table", "NaN or constant images", "duplicate images"}


def test_split_files_report_patients_in_two_splits(tmp_path, capsys):
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("NCP_96_1_0001.png 2 0 0 512 512\nNCP_96_1_0002.png 2 0 0 512 512\nCP_5_2_0001.png 1 0 0 9 9\n")
    test.write_text("NCP_96_3_0007.png 2 0 0 512 512\nNormal_7_1_0001.png 0 0 0 9 9\nNormal_7_1_0001.png 0 0 0 9 9\n")
    code, out = _run([str(train), str(test)], capsys)
    assert code == 1
    assert "patient NCP_96 in test.txt, train.txt" in out
    assert "test.txt: Normal_7_1_0001.png appears 2 times" in out
    assert "CP_5" not in out.split("patients in more than one split")[1]
    assert split_patient_id("0_1728_1013_0023.png") == "Normal_1728"  # the author's class-first names
    assert split_patient_id("2_pCT1088.jpg") is None  # iCTCF names number slices, not patients


def test_missing_path_and_bad_format_are_problems_not_tracebacks(tmp_path, capsys):
    code, out = _run([str(tmp_path / "absent")], capsys)
    assert code == 1 and "absent: not found" in out
    (tmp_path / "empty").mkdir()
    code, out = _run([str(tmp_path / "empty")], capsys)
    assert code == 1 and "FAIL" in out


def test_volume_inputs_flag_nan_and_constant_slices(tmp_path, capsys):
    import nibabel as nib

    data = np.random.default_rng(0).normal(-500, 200, (32, 32, 3)).astype(np.float32)
    data[..., 1] = -400.0
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "v.nii.gz")
    code, out = _run([str(tmp_path / "v.nii.gz")], capsys)
    assert code == 1 and "v#0001: constant image" in out
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "v.nii.gz")
    code, out = _run([str(tmp_path / "v.nii.gz")], capsys)
    assert code == 1 and "NaN" in out


def test_shared_semiseg_is_clean_and_a_broken_copy_is_not(shared_data, tmp_path, capsys):
    root = shared_data / "covid-semiseg" / "Dataset" / "TrainingSet" / "MultiClassInfection-Train"
    if not root.is_dir():
        pytest.skip(f"{root} is not in the data root")
    code, out = _run([str(root)], capsys)
    assert code == 0 and "semiseg" in out
    copy = tmp_path / "semiseg"
    shutil.copytree(root, copy)
    first = sorted((copy / "GT").glob("*.png"))[0]
    first.unlink()
    code, out = _run([str(copy)], capsys)
    assert code == 1 and f"no mask {first}" in out


def test_shared_split_files_have_no_patient_in_two_splits(shared_data, capsys):
    folder = shared_data / "splits" / "AlexTS1980" / "COVID-CT-Mask-Net"
    files = [folder / "train_split_segmentation.txt", folder / "test_split_segmentation.txt"]
    if not all(f.is_file() for f in files):
        pytest.skip(f"the author's segmentation split files are not in {folder}")
    code, out = _run([str(f) for f in files], capsys)
    assert code == 0 and "patients over 2 splits" in out
