"""`ctlesion predict` on a DICOM series and a NIfTI volume, as a user runs it: every volume
output is written, reads back in nibabel / highdicom, agrees with predictions.jsonl, and the
HTML report works in a real headless browser (skipped when no Chromium is installed)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from _helpers import write_ct_series

from ctlesion.cli import main
from ctlesion.outputs.report import NOTICE

SIZE = 64


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A two-step detector (GGO, C), then predict on a 4-slice series and a 3-slice NIfTI."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("volumes")
    config = root / "tiny.yaml"
    config.write_text(f"""
model:
  name: maskrcnn-r18-s2
  detector: {{mask_type: both, min_size: {SIZE}, max_size: {SIZE}, box_batch_size_per_image: 32}}
data: {{format: phantom, num_samples: 4, phantom_size: {SIZE}, seed: 3, min_area: 4}}
train: {{epochs: 1, lr: 1.0e-3, batch_size: 2, max_steps_per_epoch: 2, skip_negatives: false}}
""")
    assert main(["train", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    rng = np.random.default_rng(0)
    series = write_ct_series(root / "series", [rng.normal(-500, 300, (SIZE, SIZE)).astype(np.int16)
                                               for _ in range(4)])
    affine = np.array([[-0.7, 0, 0, 40.0], [0, -0.7, 0, 30.0], [0, 0, 2.0, -50.0], [0, 0, 0, 1]])
    nifti = root / "vol.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(-500, 300, (SIZE, SIZE, 3)).astype(np.int16), affine), nifti)
    out = root / "pred"
    assert main(["predict", "--checkpoint", str(root / "run" / "checkpoint"), str(series), str(nifti),
                 "--out", str(out), "--score-thresh", "0.05", "--overlays", "none", "--quiet"]) == 0
    return {"root": root, "series": series, "nifti": nifti, "affine": affine, "out": out,
            "checkpoint": root / "run" / "checkpoint"}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_label_volumes_lie_on_the_input_grid_where_the_detections_were(run):
    import nibabel as nib

    from ctlesion.data.readers import read_volume
    from ctlesion.outputs.geometry import volume_geometry

    records = _records(run["out"])
    for folder, source, n in (("series", run["series"], 4), ("vol", run["nifti"], 3)):
        image = nib.load(str(run["out"] / folder / "lesions.nii.gz"))
        assert image.shape == (SIZE, SIZE, n)
        expected = run["affine"] if folder == "vol" else volume_geometry(read_volume(source)).affine
        assert np.allclose(image.affine, expected, atol=1e-5)
        labels = np.asarray(image.dataobj).transpose(2, 1, 0)  # -> [slice, row, col]
        mine = [r for r in records if r["source"] == str(source) or Path(r["source"]).parent == source]
        assert len(mine) == n
        for r in mine:
            painted = labels[r["slice_index"]]
            inside = np.zeros_like(painted, dtype=bool)
            for x1, y1, x2, y2 in r["boxes"]:  # masks are pasted into their boxes (+1 px rounding)
                inside[max(int(y1) - 2, 0):int(y2) + 3, max(int(x1) - 2, 0):int(x2) + 3] = True
            assert not (painted[~inside] > 0).any()
            assert set(np.unique(painted)) <= {0, 1, 2}
            total = int((painted > 0).sum())
            assert total <= sum(r["areas_px"])
            assert total >= max(r["areas_px"], default=0)  # the union covers every mask


def test_instances_and_summary_agree_with_the_label_volume(run):
    import nibabel as nib

    for folder in ("series", "vol"):
        d = run["out"] / folder
        summary = json.loads((d / "summary.json").read_text())
        labels = np.asarray(nib.load(str(d / "lesions.nii.gz")).dataobj).transpose(2, 1, 0)
        ids = np.asarray(nib.load(str(d / "instances.nii.gz")).dataobj).transpose(2, 1, 0)
        voxel_ml = summary["burden"]["voxel_ml"]
        sp = summary["spacing_mm"]
        assert voxel_ml == pytest.approx(sp["row"] * sp["col"] * sp["slice"] / 1000)
        for c, name in ((1, "GGO"), (2, "C")):
            row = summary["burden"]["classes"][name]
            assert row["voxels"] == int((labels == c).sum())
            assert row["volume_ml"] == pytest.approx(row["voxels"] * voxel_ml, abs=1e-3)
            assert row["lesions"] == sum(les["class"] == name for les in summary["lesions"])
        assert len(summary["lesions"]) == len(np.unique(ids)) - 1
        for les in summary["lesions"]:
            assert (labels[ids == les["id"]] == les["class_id"]).all() and (ids == les["id"]).sum() == les["voxels"]
        assert ((ids > 0) == (labels > 0)).all()
        in_lung = summary["burden"]["all_lesions"]["in_lung_voxels"]
        assert in_lung <= summary["burden"]["all_lesions"]["voxels"] == int((labels > 0).sum())
        if summary["burden"]["lung"]["voxels"]:
            assert summary["burden"]["percent_lung_affected"] == pytest.approx(
                100 * in_lung / summary["burden"]["lung"]["voxels"], abs=1e-3)
        assert len(summary["slices"]) == summary["shape_zyx"][0]
        meta = json.loads((run["checkpoint"] / "meta.json").read_text())
        assert summary["model"]["checkpoint_sha256"] == meta["files"]["model.safetensors"]
        assert summary["verdict"] is None and any("slice thickness" in t or "slice step" in t
                                                  for t in summary["limits"])


def test_dicom_seg_reads_back_for_the_series_only(run):
    hd = pytest.importorskip("highdicom")
    import nibabel as nib

    seg = hd.seg.segread(run["out"] / "series" / "seg.dcm")
    assert seg.number_of_segments == 2
    labels = np.asarray(nib.load(str(run["out"] / "series" / "lesions.nii.gz")).dataobj).transpose(2, 1, 0)
    import pydicom

    files = sorted(run["series"].glob("*.dcm"), key=lambda f: -float(pydicom.dcmread(f).ImagePositionPatient[2]))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2],
                                               ignore_spatial_locations=True)
    assert (pixels[..., 0] == (labels == 1)).all() and (pixels[..., 1] == (labels == 2)).all()
    assert not (run["out"] / "vol" / "seg.dcm").exists()  # NIfTI input: no DICOM-SEG


def test_report_is_self_contained_with_the_notice_and_every_volume(run):
    text = (run["out"] / "report.html").read_text()
    assert html.escape(NOTICE) in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)  # no network
    assert text.count("<section class=volume") == 2 and text.count("<svg") == 2
    assert json.loads((run["out"] / "series" / "summary.json").read_text())["model"]["checkpoint_sha256"] in text


def test_each_volume_output_can_be_switched_off(run, tmp_path):
    out = tmp_path / "p"
    assert main(["predict", "--checkpoint", str(run["checkpoint"]), str(run["series"]), "--out", str(out),
                 "--no-dicom-seg", "--no-report", "--no-instances", "--overlays", "none", "--quiet"]) == 0
    # complete.json (written last) and the volume's predictions.jsonl are always there: resuming needs them
    assert sorted(p.name for p in (out / "series").iterdir()) == ["complete.json", "lesions.nii.gz",
                                                                  "predictions.jsonl", "summary.json"]
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "series"]  # no scratch left
    assert not (out / "report.html").exists()
    out2 = tmp_path / "q"
    assert main(["predict", "--checkpoint", str(run["checkpoint"]), str(run["series"]), "--out", str(out2),
                 "--no-volume-outputs", "--overlays", "none", "--quiet"]) == 0
    assert sorted(p.name for p in out2.iterdir()) == ["predictions.jsonl"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def _dump_dom(browser: str, url: str, tmp_path: Path) -> str:
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=3000", "--dump-dom", url],
        capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _element(dom: str, element_id: str) -> str:
    match = re.search(rf'<[^>]*id="{element_id}"[^>]*>([^<]*)', dom)
    assert match, element_id
    return match.group(0)


def test_report_slider_changes_the_slice_in_a_headless_browser(run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium binary (chromium, chromium-browser, google-chrome) on PATH")
    report = run["out"] / "report.html"
    summary = json.loads((run["out"] / "series" / "summary.json").read_text())
    frames = json.loads(re.search(r"const VOLUMES = (.*?);</script>", report.read_text()).group(1)
                        .replace("<\\/", "</"))[0]["frames"]
    seen = {}
    for s in (0, 3):
        dom = _dump_dom(browser, f"{report.as_uri()}#v=0&s={s}", tmp_path)
        label = _element(dom, "slice-label-0")
        assert f"slice {s} / 3" in label
        img = _element(dom, "frame-0")
        assert f'data-slice="{s}"' in img
        seen[s] = re.search(r'src="([^"]*)"', img).group(1)
        assert seen[s] == frames[s] and seen[s].startswith("data:image/jpeg;base64,")
        info = html.unescape(_element(dom, "slice-info-0"))
        for name, mm2 in summary["slices"][s]["lesion_area_mm2"].items():
            assert f"{name} {mm2:.2f} mm²" in info
        for name, row in summary["burden"]["classes"].items():  # the table shows summary.json's numbers
            assert re.search(rf"data-key=\"{name}.volume_ml\"[^>]*>{row['volume_ml']:.3f}<", dom)
            assert re.search(rf"data-key=\"{name}.lesions\"[^>]*>{row['lesions']}<", dom)
        pct = summary["burden"]["percent_lung_affected"]
        assert re.search(rf"data-key=\"percent_lung_affected\"[^>]*>{pct:.2f}<", dom)
    assert seen[0] != seen[3]
