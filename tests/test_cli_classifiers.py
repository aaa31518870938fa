"""The classifier command line as a user runs it (README "Commands"): `ctlesion train`
of joint models (SSM, Affinity, LSTM-2), slice classifiers (CTM, CNN) and fine-tuning,
then `ctlesion evaluate`, `ctlesion predict` (PNG, DICOM series, NIfTI), `ctlesion
compare` and `ctlesion models`.

Everything is toy size: 64-px phantoms, a shrunken detector, one or two optimiser steps.
`ctlesion demo` is covered by tests/test_cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from _helpers import write_ct_series

from ctlesion.cli import main
from ctlesion.data.phantom import make_phantom

SIZE = 64

# A detector small enough for a CPU test (every model family shares these keys).
DETECTOR = f"""    min_size: {SIZE}
    max_size: {SIZE}
    rpn_pre_nms_top_n_train: 200
    rpn_post_nms_top_n_train: 100
    rpn_pre_nms_top_n_test: 200
    rpn_post_nms_top_n_test: 100
    box_batch_size_per_image: 32
    representation_size: 32"""

PHANTOMS = f"{{format: phantom, num_samples: 6, phantom_size: {SIZE}, min_area: 20, seed: 2}}"
SEG_PHANTOMS = (f"{{format: phantom, num_samples: 4, phantom_size: {SIZE}, min_area: 20, seed: 1, "
                "phantom_classes: [cp, covid]}")
TRAIN = "{epochs: 1, max_steps_per_epoch: 2, lr: 1.0e-3, seed: 0, device: cpu}"


def write_config(path: Path, name: str, *, classifier: str = "", seg: bool = True, data: str = PHANTOMS,
                 train: str = TRAIN, detector: str = "") -> Path:
    text = f"""
model:
  name: {name}
  backbone: {{out_channels: 64}}
  detector:
{DETECTOR}
{detector}
  classifier: {{{classifier}}}
data: {data}
train: {train}
"""
    if seg:
        text += f"seg_data: {SEG_PHANTOMS}\n"
    path.write_text(text)
    return path


def log_steps(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [x for x in lines if "event" not in x]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()


# --------------------------------------------------------------------------- inputs


def _png(path: Path, seed: int) -> Path:
    """An 8-bit grey 64x64 slice: a lung-windowed phantom."""
    hu = make_phantom(SIZE, ("normal", "covid")[seed % 2], seed).hu
    grey = np.clip((hu - (-600 - 750)) / 1500 * 255, 0, 255).astype(np.uint8)
    Image.fromarray(grey).save(path)
    return path


def _write_dicom_series(folder: Path, n: int = 4) -> Path:
    return write_ct_series(folder, [make_phantom(SIZE, ("normal", "cp", "covid")[i % 3], 100 + i).hu for i in range(n)])


def _write_nifti(path: Path, n: int = 4) -> Path:
    import nibabel as nib

    hu = np.stack([make_phantom(SIZE, "covid", 200 + i).hu for i in range(n)], axis=-1)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([0.7, 0.7, 2.0, 1])), str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    return {
        "png_a": _png(root / "a.png", 1),
        "png_b": _png(root / "b.png", 2),
        "series": _write_dicom_series(root / "series", 4),
        "nifti": _write_nifti(root / "vol.nii.gz", 4),
    }


# --------------------------------------------------------------------------- 1. SSM two-branch


@pytest.fixture(scope="module")
def ssm_run(tmp_path_factory) -> Path:
    """`ctlesion train` of a two-branch Single-Shot Model with segmentation data."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("ssm")
    config = write_config(root / "ssm.yaml", "ssm-2branch-r18-s2", classifier="rois: 16, s_features: 32")
    assert main(["train", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run"


def test_train_ssm_writes_checkpoint_resolved_config_and_both_losses(ssm_run, capsys):
    ckpt = ssm_run / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "config.yaml", "meta.json",
                                                 "train_state.pt"}
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["task"] == "joint" and meta["class_names"] == ["normal", "cp", "covid"]
    # "auto" is resolved to the SSM code's settings and recorded
    for where in (ssm_run / "config.yaml", ckpt / "config.yaml"):
        train = yaml.safe_load(where.read_text())["train"]
        assert (train["update_rule"], train["copy_rule"], train["cls_bn"]) == ("s_backbone", "running_min", "eval")
    steps = log_steps(ssm_run)
    assert len(steps) == 2
    for s in steps:
        assert np.isfinite(s["seg_loss"]) and np.isfinite(s["cls_loss"])
        assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg",
                "seg_sample", "samples", "copied", "lr"} <= set(s)
    # the running-minimum rule copies at the first segmentation step (L_SEG < 10,000)
    assert steps[0]["copied"] is True


@pytest.fixture(scope="module")
def ssm_eval(ssm_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ssm-eval") / "eval"
    assert main(["evaluate", "--checkpoint", str(ssm_run / "checkpoint"), "--data", f"phantom:n=6,size={SIZE},seed=3",
                 "--seg-data", f"phantom:n=3,size={SIZE},seed=4", "--out", str(out), "--quiet"]) == 0
    return out


def test_evaluate_classifier_writes_metrics_confusion_matrix_and_predictions(ssm_eval):
    metrics = json.loads((ssm_eval / "metrics.json").read_text())
    assert {"sensitivity", "ppv", "overall_accuracy", "f1_weighted", "f1_macro", "roc_auc", "confusion_matrix",
            "class_names", "f1_weighted_paper", "f1_weights", "support"} <= set(metrics)
    names = ["normal", "cp", "covid"]
    assert metrics["class_names"] == names
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 6
    assert cm.sum(axis=1).tolist() == [2, 2, 2]  # phantom classes cycle normal, cp, covid
    assert set(metrics["sensitivity"]) == set(names) == set(metrics["ppv"]) == set(metrics["roc_auc"])
    assert metrics["overall_accuracy"] == pytest.approx(np.trace(cm) / 6)
    # default weights: the test-set shares
    assert metrics["f1_weights"] == pytest.approx({n: 1 / 3 for n in names})
    seg = metrics["segmentation"]
    assert {"AP50", "AP75", "mAP"} <= set(seg["legacy"])
    assert {"segm", "bbox"} <= set(seg["coco"]) and seg["num_images"] == 3

    assert_png(ssm_eval / "confusion_matrix.png")

    records = read_jsonl(ssm_eval / "predictions.jsonl")
    assert len(records) == 6 and len({r["sample_id"] for r in records}) == 6
    for r in records:
        assert set(r["probabilities"]) == set(names)
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted_class"] == max(r["probabilities"], key=r["probabilities"].get)
        assert r["label"] in (0, 1, 2)
    # the confusion matrix is the predictions' own tally
    tally = np.zeros((3, 3), int)
    for r in records:
        tally[r["label"], r["predicted"]] += 1
    assert tally.tolist() == metrics["confusion_matrix"]


def test_evaluate_f1_weights_paper(ssm_run, ssm_eval, tmp_path):
    out = tmp_path / "paper"
    assert main(["evaluate", "--checkpoint", str(ssm_run / "checkpoint"), "--data", f"phantom:n=6,size={SIZE},seed=3",
                 "--out", str(out), "--f1-weights", "paper", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["f1_weights"] == pytest.approx({"normal": 0.45, "cp": 0.35, "covid": 0.20})
    assert "segmentation" not in metrics  # no --seg-data this time
    shares = json.loads((ssm_eval / "metrics.json").read_text())
    # same checkpoint, same data: the same predictions, and the fixed-weight F1 is the one
    # reported as f1_weighted_paper either way
    assert metrics["confusion_matrix"] == shares["confusion_matrix"]
    if metrics["f1_weighted"] is not None:
        assert metrics["f1_weighted"] == pytest.approx(shares["f1_weighted_paper"])


def test_evaluate_f1_weights_paper_is_recorded_as_paper(ssm_run, tmp_path):
    out = tmp_path / "paper"
    assert main(["evaluate", "--checkpoint", str(ssm_run / "checkpoint"), "--data", f"phantom:n=3,size={SIZE},seed=3",
                 "--out", str(out), "--f1-weights", "paper", "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["f1_weights_source"] == "paper"


@pytest.mark.parametrize("weights, message", [("bogus", "--f1-weights"), ("1,2", "2 entries")])
def test_evaluate_bad_f1_weights_exit_2_with_one_line(ssm_run, tmp_path, capsys, weights, message):
    code = main(["evaluate", "--checkpoint", str(ssm_run / "checkpoint"), "--data", f"phantom:n=3,size={SIZE},seed=3",
                 "--out", str(tmp_path / "o"), "--f1-weights", weights, "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctlesion evaluate: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


# --------------------------------------------------------------------------- 2. predict


@pytest.fixture(scope="module")
def ssm_predict(ssm_run, inputs, tmp_path_factory) -> tuple[Path, str]:
    """`ctlesion predict` on two PNG slices, a 4-slice DICOM series and a 4-slice NIfTI volume."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("ssm-predict") / "pred"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["predict", "--checkpoint", str(ssm_run / "checkpoint"), str(inputs["png_a"]),
                     str(inputs["png_b"]), str(inputs["series"]), str(inputs["nifti"]), "--out", str(out), "--quiet"])
    assert code == 0
    return out, printed.getvalue()


def test_predict_with_a_joint_model_on_png_dicom_and_nifti(ssm_predict, inputs):
    out, printed = ssm_predict
    assert "10 slices" in printed and "patients.json" in printed
    records = read_jsonl(out / "predictions.jsonl")
    assert len(records) == 2 + 4 + 4
    names = ["normal", "cp", "covid"]
    for r in records:
        assert set(r["probabilities"]) == set(names)
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted_class"] == max(r["probabilities"], key=r["probabilities"].get)
        assert "label" not in r
        lesions = r["lesions"]  # a joint model also lists the lesions it found
        assert len(lesions["boxes"]) == len(lesions["scores"]) == len(lesions["classes"]) == len(lesions["areas_px"])
        assert set(lesions["classes"]) <= {"lesion", "GGO", "C"}
    dicom = [r for r in records if Path(r["source"]).parent == inputs["series"]]
    assert [r["slice_index"] for r in dicom] == [0, 1, 2, 3]
    nifti = [r for r in records if r["source"] == str(inputs["nifti"])]
    assert [r["slice_index"] for r in nifti] == [0, 1, 2, 3]
    pngs = [r for r in records if r["source"] in (str(inputs["png_a"]), str(inputs["png_b"]))]
    assert len(pngs) == 2 and all(r["lesions"]["areas_mm2"] is None for r in pngs)

    patients = json.loads((out / "patients.json").read_text())
    assert patients["method"] == "abnormal_fraction" and patients["min_abnormal_fraction"] == 0.1
    volumes = patients["volumes"]
    for source, slices in ((str(inputs["png_a"]), pngs[:1]), (str(inputs["png_b"]), pngs[1:]),
                           (str(inputs["nifti"]), nifti)):
        verdict = volumes[source]
        assert verdict["method"] == "abnormal_fraction" and verdict["class"] in names
        assert verdict["num_slices"] == len(slices)
        assert verdict["abnormal_slices"] == sum(r["predicted_class"] != "normal" for r in slices)
        if verdict["abnormal_slices"] == 0:
            assert verdict["class"] == "normal"

    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == len(records)
    assert_png(overlays[0])


def test_predict_gives_one_verdict_per_dicom_series(ssm_predict, inputs):
    out, _ = ssm_predict
    volumes = json.loads((out / "patients.json").read_text())["volumes"]
    assert len(volumes) == 4  # two PNG slices, one series, one NIfTI volume
    assert sorted(v["num_slices"] for v in volumes.values()) == [1, 1, 4, 4]


def test_predict_volume_summaries_hold_the_verdict_and_slice_probabilities(ssm_predict, inputs):
    out, printed = ssm_predict
    volumes = json.loads((out / "patients.json").read_text())["volumes"]
    records = read_jsonl(out / "predictions.jsonl")
    for folder, source in (("series", str(inputs["series"])), ("vol", str(inputs["nifti"]))):
        summary = json.loads((out / folder / "summary.json").read_text())
        assert summary["source"] == source and summary["verdict"] == volumes[source]
        mine = [r for r in records if r["volume"] == source]
        assert [s["probabilities"] for s in summary["slices"]] == [
            {k: round(v, 4) for k, v in r["probabilities"].items()} for r in mine]
        assert (out / folder / "lesions.nii.gz").is_file()
    assert (out / "series" / "seg.dcm").is_file() and not (out / "vol" / "seg.dcm").exists()
    assert not (out / "a").exists()  # PNG slices have no voxel grid: no volume folder
    assert "report: " in printed and (out / "report.html").is_file()


def test_predict_aggregate_mean_is_recorded_and_is_the_mean(ssm_run, inputs, tmp_path):
    out = tmp_path / "mean"
    assert main(["predict", "--checkpoint", str(ssm_run / "checkpoint"), str(inputs["series"]), str(inputs["nifti"]),
                 "--out", str(out), "--aggregate", "mean", "--overlays", "none", "--quiet"]) == 0
    patients = json.loads((out / "patients.json").read_text())
    assert patients["method"] == "mean"
    records = read_jsonl(out / "predictions.jsonl")
    assert len(records) == 8 and not (out / "overlays").exists()
    for source, verdict in patients["volumes"].items():
        assert verdict["method"] == "mean"
        probs = [r["probabilities"] for r in records if r["volume"] == source]
        mean = {k: float(np.mean([p[k] for p in probs])) for k in probs[0]}
        assert verdict["probabilities"] == pytest.approx(mean, abs=1e-6)
        assert verdict["class"] == max(mean, key=mean.get)


# --------------------------------------------------------------------------- 3. mask-feature models


def _train_mask_feature(root: Path, name: str) -> Path:
    torch.set_num_threads(2)
    # mask features 32 channels wide (the papers: 256), LSTM hidden size 32
    config = write_config(root / f"{name}.yaml", name, classifier="hidden_size: 32",
                          detector="    mask_head_layers: [32]\n    mask_predictor_width: 32")
    run = root / name
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    return run


@pytest.fixture(scope="module")
def affinity_run(tmp_path_factory) -> Path:
    return _train_mask_feature(tmp_path_factory.mktemp("affinity"), "affinity-r18")


@pytest.fixture(scope="module")
def lstm2_run(tmp_path_factory) -> Path:
    return _train_mask_feature(tmp_path_factory.mktemp("lstm2"), "lstm2-r18")


def _predict_mask_feature(run: Path, inputs: dict, out: Path) -> list[dict]:
    assert main(["predict", "--checkpoint", str(run / "checkpoint"), str(inputs["png_a"]), str(inputs["series"]),
                 "--out", str(out), "--quiet"]) == 0
    records = read_jsonl(out / "predictions.jsonl")
    assert len(records) == 1 + 4
    for r in records:
        assert len(r["roi_boxes"]) == len(r["roi_scores"]) == len(r["roi_weights"])
        assert all(len(b) == 4 for b in r["roi_boxes"])
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert len(list((out / "overlays").glob("*.png"))) == len(records)
    for p in (out / "overlays").glob("*.png"):
        assert_png(p)
    return records


def test_affinity_predict_reports_w_v_per_roi_rank(affinity_run, inputs, tmp_path):
    from ctlesion.engine.checkpoint import load_checkpoint

    steps = log_steps(affinity_run)
    assert len(steps) == 2 and all(s["copied"] for s in steps if "seg_loss" in s)  # copy rule "every"
    records = _predict_mask_feature(affinity_run, inputs, tmp_path / "pred")
    model, cfg, _ = load_checkpoint(affinity_run / "checkpoint")
    assert cfg.train.copy_rule == "every" and cfg.model.classifier.rois == 8
    head = model.head
    wv = (head.layer.affinity_matrix @ head.layer.affinity_vector).detach()
    assert wv.shape == (8,)
    for r in records:
        assert len(r["roi_weights"]) == 8
        # weight i belongs to RoI rank i (padding repeats a rank, it does not reorder)
        assert r["roi_weights"] == pytest.approx(wv.tolist(), rel=1e-5, abs=1e-6)
        # Affinity reads its RoIs in confidence order
        assert r["roi_scores"] == sorted(r["roi_scores"], reverse=True)


def test_lstm2_predict_reports_16_attention_weighted_rois(lstm2_run, inputs, tmp_path):
    train = yaml.safe_load((lstm2_run / "config.yaml").read_text())["train"]
    assert (train["update_rule"], train["copy_rule"], train["cls_bn"]) == ("s_backbone", "previous", "batch")
    records = _predict_mask_feature(lstm2_run, inputs, tmp_path / "pred")
    for r in records:
        assert len(r["roi_weights"]) == 16
        assert all(np.isfinite(r["roi_weights"]))


# --------------------------------------------------------------------------- 4. CNN; joint without seg_data


def test_cnn_trains_and_evaluates_without_seg_data(tmp_path, capsys):
    config = write_config(tmp_path / "cnn.yaml", "cnn-resnet18", classifier=f"input_size: {SIZE}", seg=False,
                          train="{epochs: 1, max_steps_per_epoch: 2, batch_size: 2, lr: 1.0e-3, device: cpu}")
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    steps = log_steps(run)
    assert len(steps) == 2 and all("seg_loss" not in s and np.isfinite(s["cls_loss"]) for s in steps)
    train = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (train["update_rule"], train["copy_rule"], train["cls_bn"]) == ("full", "none", "batch")
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "checkpoint"), "--data", f"phantom:n=6,size={SIZE},seed=3",
                 "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 6 and np.array(metrics["confusion_matrix"]).sum() == 6
    assert "segmentation" not in metrics
    assert len(read_jsonl(out / "predictions.jsonl")) == 6
    assert_png(out / "confusion_matrix.png")
    # a CNN has no segmentation branch to score
    code = main(["evaluate", "--checkpoint", str(run / "checkpoint"), "--data", f"phantom:n=3,size={SIZE},seed=3",
                 "--seg-data", f"phantom:n=2,size={SIZE}", "--out", str(tmp_path / "e2"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctlesion evaluate: error: --seg-data") and "no segmentation branch" in err


def test_joint_model_without_seg_data_exits_2_naming_seg_data(tmp_path, capsys):
    config = write_config(tmp_path / "ssm.yaml", "ssm-r18-s2", classifier="rois: 16, s_features: 32", seg=False)
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctlesion train: error:") and "seg_data" in err
    assert "\n" not in err and "Traceback" not in err


# --------------------------------------------------------------------------- 5. fine-tuning 3 -> 2 classes

LAST = ["head.layers.4.weight", "head.layers.4.bias"]
CTM = "rois: 16, s_features: 32"


@pytest.fixture(scope="module")
def ctm3_run(tmp_path_factory) -> Path:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("ctm3")
    config = write_config(root / "ctm.yaml", "ctm-r18-s2", classifier=CTM, seg=False,
                          train="{epochs: 1, max_steps_per_epoch: 1, batch_size: 2, lr: 1.0e-3, device: cpu}")
    assert main(["train", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run"


def _classfirst_pngs(root: Path) -> Path:
    """iCTCF-like names: class first, 0 normal / 1 cp / 2 covid."""
    root.mkdir()
    for i, name in enumerate(["0_1_1_1", "2_2_1_1", "0_3_1_1", "2_4_1_1", "1_5_1_1"]):
        _png(root / f"{name}.png", i + 10)
    return root


def test_fine_tuning_3_to_2_classes_via_cli(ctm3_run, tmp_path, capsys):
    from ctlesion.engine.checkpoint import load_checkpoint

    data = _classfirst_pngs(tmp_path / "ictcf")
    config = ctm3_run / "config.yaml"
    run = tmp_path / "ft"
    # the data's classes are (normal, covid) after the map: matched by index, with a warning
    with pytest.warns(UserWarning, match="matched by index"):
        code = main(["train", str(config), "--out", str(run), "--quiet",
                     "--set", "model.classifier.class_names=[negative,covid]",
                     "--set", f"train.init_from={ctm3_run / 'checkpoint'}",
                     "--set", "data.format=classfirst", "--set", f"data.root={data}",
                     "--set", "data.class_map=[0,-1,1]"])
    assert code == 0
    report = json.loads((run / "init.json").read_text())
    assert sorted(report["skipped_shape"]) == sorted(LAST)
    assert report["source_model"] == "ctm-r18-s2" and report["loaded"]
    assert not set(LAST) & set(report["loaded"])
    steps = log_steps(run)
    assert steps and all(not sid.startswith("1_") for s in steps for sid in s["samples"])  # CP dropped

    model, cfg, meta = load_checkpoint(run / "checkpoint")
    assert meta["class_names"] == ["negative", "covid"] and list(model.class_names) == ["negative", "covid"]
    assert model.head.layers[4].weight.shape[0] == 2 and model.head.layers[4].bias.shape == (2,)
    with model.inference("eval"):
        out = model([torch.rand(1, SIZE, SIZE)])
    assert out.logits.shape == (1, 2)

    # evaluate on the same naming scheme: the class map is inherited from training
    ev = tmp_path / "eval"
    with pytest.warns(UserWarning, match="matched by index"):
        code = main(["evaluate", "--checkpoint", str(run / "checkpoint"), "--data", f"classfirst:{data}",
                     "--out", str(ev), "--quiet"])
    assert code == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["class_names"] == ["negative", "covid"] and metrics["num_samples"] == 4
    assert "f1_weighted_paper" not in metrics  # two classes


def test_fine_tuning_on_phantoms_with_a_class_map(ctm3_run, tmp_path):
    assert main(["train", str(ctm3_run / "config.yaml"), "--out", str(tmp_path / "ft"), "--quiet",
                 "--set", "model.classifier.class_names=[negative,covid]",
                 "--set", f"train.init_from={ctm3_run / 'checkpoint'}",
                 "--set", "data.phantom_classes=[normal,covid]", "--set", "data.class_map=[0,-1,1]"]) == 0


# --------------------------------------------------------------------------- 6. compare; 7. models


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, str]:
    import contextlib
    import io

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("compare")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["compare", "--quick", "--families", "ssm,resnet18", "--out", str(out), "--budget", "5",
                     "--quiet"])
    assert code == 0
    return out, printed.getvalue()


def test_compare_quick_writes_one_row_per_family(compared):
    out, printed = compared
    table = json.loads((out / "comparison.json").read_text())
    assert table["budget_s_per_family"] == 5 and table["image_size"] == 128
    rows = table["rows"]
    assert [r["family"] for r in rows] == ["ssm", "resnet18"]
    assert [r["model"] for r in rows] == ["ssm-2branch-r18-s3", "cnn-resnet18"]
    keys = {"family", "model", "params_M", "iterations", "train_seconds", "overall_accuracy", "f1_weighted",
            "f1_macro", "roc_auc_macro", "sensitivity", "update_rule", "copy_rule", "cls_bn"}
    for r in rows:
        assert keys <= set(r)
        assert 1 <= r["iterations"] <= 2 and 0.0 <= r["overall_accuracy"] <= 1.0 and r["params_M"] > 0
        assert set(r["sensitivity"]) == {"normal", "cp", "covid"}
        assert "auto" not in (r["update_rule"], r["copy_rule"], r["cls_bn"])
        run = out / "compare" / r["family"]
        assert (run / "checkpoint" / "model.safetensors").is_file()
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["overall_accuracy"] == r["overall_accuracy"]
        assert_png(run / "confusion_matrix.png")
    assert rows[0]["params_M"] == pytest.approx(8.27, rel=0.01)  # README: ssm-2branch-r18-s3
    assert "ssm-2branch-r18-s3" in printed and "cnn-resnet18" in printed


def test_compare_quick_names_the_heldout_set_it_scored(compared):
    out, _ = compared
    table = json.loads((out / "comparison.json").read_text())
    scored = json.loads((out / "compare" / "ssm" / "metrics.json").read_text())["num_samples"]
    assert f"n={scored}," in table["heldout"]


def test_models_json_filter_ssm(capsys):
    assert main(["models", "--json", "--filter", "ssm-*"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows]
    assert names and all("ssm" in n for n in names)
    assert {"ssm-r18-s3", "ssm-2branch-r18-s3", "ssm-detector-r18-s3"} <= set(names)
    assert all(set(r) == {"name", "params", "description", "task", "builtin_weights", "builtin"}
               and r["params"] > 0 for r in rows)
    assert {r["name"]: r["task"] for r in rows}["ssm-r18-s3"] == "joint"
    params = {r["name"]: r["params"] for r in rows}
    # paper 001 Table 1: 4.51 M single branch, the second branch adds ~1.6 M
    assert params["ssm-r18-s2"] / 1e6 == pytest.approx(4.51, rel=0.01)
    assert params["ssm-r18-s2"] < params["ssm-2branch-r18-s2"]
