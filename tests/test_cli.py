"""The command line as a user runs it: models, train -> evaluate -> predict, errors, demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _helpers import write_ct_series

from ctlesion.cli import main

SIZE = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkpoint trained for two steps on 64-px phantoms through `ctlesion train`."""
    root = tmp_path_factory.mktemp("train")
    config = root / "tiny.yaml"
    config.write_text(f"""
model:
  name: maskrcnn-r18-s2
  detector: {{mask_type: both, min_size: {SIZE}, max_size: {SIZE}, box_batch_size_per_image: 32}}
data: {{format: phantom, num_samples: 6, phantom_size: {SIZE}, seed: 3, min_area: 4}}
train: {{epochs: 1, lr: 1.0e-3, batch_size: 2, max_steps_per_epoch: 2, skip_negatives: false}}
""")
    assert main(["train", str(config), "--out", str(root / "run"), "--quiet", "--set", "train.seed=5"]) == 0
    return root / "run"


def test_models_json_lists_every_model_with_parameter_counts(capsys):
    assert main(["models", "--json", "--filter", "*-r18-*"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in rows}
    assert {"maskrcnn-r18-s2", "maskrcnn-r18-s3", "ssm-detector-r18-s3"} <= names
    assert all(set(r) == {"name", "params", "description", "task", "builtin_weights", "builtin"} for r in rows)
    assert {r["name"]: r["task"] for r in rows}["ssm-detector-r18-s3"] == "segmentation"
    params = {r["name"]: r["params"] for r in rows}
    assert params["maskrcnn-r18-s2"] < params["maskrcnn-r18-s3"] < params["maskrcnn-r18-s4"]


def test_models_table_is_readable(capsys):
    assert main(["models", "--filter", "maskrcnn-r50-fpn"]) == 0
    out = capsys.readouterr().out
    assert "maskrcnn-r50-fpn" in out and "31.73M" in out


def test_train_writes_config_log_and_checkpoint(trained):
    assert (trained / "config.yaml").read_text().count("seed: 5") == 1  # --set was applied
    steps = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(np.isfinite(s["loss"]) for s in steps)
    assert json.loads((trained / "checkpoint" / "meta.json").read_text())["class_names"] == ["GGO", "C"]


def test_resume_from_cli_finishes_more_epochs(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["train", str(run / "config.yaml"), "--out", str(run), "--resume", "--quiet",
                 "--set", "train.epochs=2"]) == 0
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    assert meta["epoch"] == 2 and meta["step"] == 4


def test_evaluate_writes_both_metric_sets_and_settings(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--checkpoint", str(trained / "checkpoint"), "--data",
                 f"phantom:n=6,size={SIZE},seed=99", "--out", str(out), "--score-thresh", "0.3",
                 "--overlays", "2", "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["legacy"]) >= {"AP50", "AP75", "mAP"}
    assert set(metrics["coco"]["segm"]) >= {"AP", "AP50", "AP75"} and set(metrics["coco"]["bbox"]) >= {"AP"}
    assert metrics["settings"]["score_thresh"] == 0.3 and metrics["num_images"] == 6
    assert metrics["num_negative_images"] == 2  # every third phantom is Normal
    assert 0.0 <= metrics["legacy"]["mAP"] <= 1.0
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert "legacy" in capsys.readouterr().out


def _write_dicom_series(folder: Path, n: int = 3) -> None:
    write_ct_series(folder, [np.full((SIZE, SIZE), -800, dtype=np.int16)] * n)


def test_predict_on_png_dicom_series_and_nifti(trained, tmp_path, capsys):
    import nibabel as nib

    png = tmp_path / "slice.png"
    Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE)) * 255).astype(np.uint8)).save(png)
    series = tmp_path / "series"
    _write_dicom_series(series)
    nifti = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.full((SIZE, SIZE, 2), -700, np.int16), np.diag([0.7, 0.7, 2.0, 1])), nifti)
    out = tmp_path / "pred"
    code = main(["predict", "--checkpoint", str(trained / "checkpoint"), str(png), str(series), str(nifti),
                 "--out", str(out), "--score-thresh", "0.0", "--quiet"])
    assert code == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 1 + 3 + 2
    by_kind = {r["source"]: r for r in records}
    assert any(r["spacing_mm"] is None and r["areas_mm2"] is None for r in records)  # the PNG
    dicom = [r for r in records if r["spacing_mm"] == [0.8, 0.8]]
    assert len(dicom) == 3 and [r["slice_index"] for r in dicom] == [0, 1, 2]
    for r in records:
        assert len(r["boxes"]) == len(r["scores"]) == len(r["labels"]) == len(r["areas_px"])
        assert set(r["classes"]) <= {"GGO", "C"}
        if r["areas_mm2"] is not None:
            scale = r["spacing_mm"][0] * r["spacing_mm"][1]
            assert r["areas_mm2"] == pytest.approx([a * scale for a in r["areas_px"]], abs=1e-3)
    assert len(list((out / "overlays").glob("*.png"))) == len(records)
    assert len(by_kind) >= 3
    assert "6 slices" in capsys.readouterr().out


def test_predict_on_a_real_jpeg_lossless_dicom(trained, tmp_path, shared_data):
    files = sorted((shared_data / "covid-ct-md" / "Sample data" / "COVID-19 subjects" / "P001").glob("*.dcm"))
    if not files:
        pytest.skip("COVID-CT-MD P001 is not in the data root")
    out = tmp_path / "real"
    assert main(["predict", "--checkpoint", str(trained / "checkpoint"), str(files[0]), "--out", str(out),
                 "--quiet"]) == 0
    (record,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    # The slice keeps its 512 px (the model's transform rescales internally and maps back).
    assert record["image_size"] == [512, 512]
    assert record["spacing_mm"][0] == pytest.approx(0.748, abs=0.001)
    assert record["areas_mm2"] is not None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "{cfg}", "--out", "{tmp}/o", "--set", "train.lrate=1"], "train.lrate"),
        (["train", "{tmp}/missing.yaml", "--out", "{tmp}/o"], "missing.yaml"),
        (["evaluate", "--checkpoint", "{tmp}/nope", "--data", "phantom:n=2", "--out", "{tmp}/o"], "nope"),
        (["predict", "--checkpoint", "{ckpt}", "{tmp}/absent.png", "--out", "{tmp}/o"], "absent.png"),
    ],
)
def test_user_errors_exit_2_with_one_clear_line(argv, message, trained, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: maskrcnn-r18-s2}\n")
    argv = [a.format(cfg=cfg, tmp=tmp_path, ckpt=trained / "checkpoint") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctlesion ") and message in err and "Traceback" not in err


def test_demo_quick_writes_metrics_checkpoint_and_pictures(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quick", "--quiet"]) == 0
    seg = tmp_path / "segmentation"
    metrics = json.loads((seg / "metrics.json").read_text())
    assert {"legacy", "coco", "settings"} <= set(metrics)
    assert (seg / "checkpoint" / "model.safetensors").is_file()
    assert (seg / "overlays.png").is_file() and list((seg / "overlays").glob("*.png"))
    out = capsys.readouterr().out
    assert "pictures" in out and str(seg / "overlays.png") in out
    # the classification stage: an SSM from that detector, scored on held-out phantoms
    cls = tmp_path / "classification"
    report = json.loads((cls / "metrics.json").read_text())
    assert {"sensitivity", "ppv", "overall_accuracy", "f1_weighted", "confusion_matrix", "segmentation"} <= set(report)
    assert sum(map(sum, report["confusion_matrix"])) == report["num_samples"] == 12
    assert (cls / "confusion_matrix.png").is_file() and (cls / "checkpoint" / "model.safetensors").is_file()
    init = json.loads((cls / "init.json").read_text())
    assert init["source_model"] == "maskrcnn-r18-s2" and init["loaded"]
    assert str(cls / "confusion_matrix.png") in out
