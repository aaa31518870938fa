"""Built-in weights: fp16 folders made from a checkpoint, the catalogue and its SHA-256 check,
model cards, ``--model NAME`` (predict, evaluate, train.init_from), ``models --card``, and a
guard that every shipped catalogue entry verifies and loads.

Tests build tiny built-ins (``maskrcnn-r18-s2`` at 64 px, random weights) under a temporary
root named by ``CTLESION_BUILTIN_DIR``; nothing here writes into the package."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import stat
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

import ctlesion.builtin as builtin_pkg
from ctlesion.builtin import (DISCLAIMER, builtin_entry, builtin_for_model, builtin_names, builtin_root,
                              builtin_weights, read_card, read_catalogue, render_card)
from ctlesion.cli import main
from ctlesion.engine.builtin_weights import (check_catalogue, make_builtin, read_card_input, remove_builtin,
                                             resolve_checkpoint)
from ctlesion.engine.checkpoint import load_checkpoint, load_weights, read_meta, save_checkpoint
from ctlesion.engine.steps import init_from_checkpoint
from ctlesion.errors import CheckpointError, ConfigError
from ctlesion.experiment import load_experiment
from ctlesion.registry import create_model, list_models

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
NAME = "lesion-tiny"
# fp16 parameters give outputs within this fraction of each output's largest magnitude
# (measured: 5e-4 to 1e-3 on this model; the bound leaves a factor of five).
RELATIVE_TOLERANCE = 5e-3

CARD = {
    "summary": "Tiny test detector (random weights)",
    "training_data": "COVID-SemiSeg, 50 labelled slices (test stand-in: none really)",
    "licence": "COVID-SemiSeg: non-commercial research use only",
    "preprocessing": "8-bit slices as stored, resized to 64 px",
    "window": "as_stored",
    "metrics": {"protocol": "5-fold cross-validation (made-up numbers for the test)",
                "values": {"pixel_dice": {"mean": 0.5, "std": 0.1, "folds": [0.4, 0.5, 0.6, 0.5, 0.5]}}},
    "intended_use": "tests of the built-in machinery",
    "limits": ["random weights", "64 px"],
}


def _config():
    return load_experiment(None, ["model.name=maskrcnn-r18-s2", f"model.detector.min_size={SIZE}",
                                  f"model.detector.max_size={SIZE}", "model.detector.mask_type=both",
                                  "data.format=phantom", f"data.phantom_size={SIZE}", "data.min_area=4"])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """An fp32 checkpoint of the tiny detector whose BatchNorm statistics have moved."""
    cfg = _config()
    torch.manual_seed(1)
    model = create_model(cfg.model)
    model.train()
    model.backbone(torch.rand(2, 3, SIZE, SIZE))   # running stats and num_batches_tracked change
    return save_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", model, cfg, epoch=3, step=7)


@pytest.fixture(scope="module")
def built_root(tmp_path_factory, source) -> Path:
    root = tmp_path_factory.mktemp("builtin")
    make_builtin(source, NAME, dict(CARD), root=root)
    return root


@pytest.fixture
def root(built_root, monkeypatch) -> Path:
    monkeypatch.setenv("CTLESION_BUILTIN_DIR", str(built_root))
    return built_root


@pytest.fixture
def copy_root(built_root, tmp_path, monkeypatch) -> Path:
    """A private copy of the built-in root, for tests that damage or change it."""
    copy = tmp_path / "builtin"
    shutil.copytree(built_root, copy)
    monkeypatch.setenv("CTLESION_BUILTIN_DIR", str(copy))
    return copy


# ------------------------------------------------------------------ the folder, fp16, the catalogue


def test_make_builtin_writes_an_fp16_folder_its_card_and_the_catalogue(root, source):
    entry = read_catalogue()[NAME]
    weights = root / NAME / "model.safetensors"
    assert entry.folder == (root / NAME).resolve() and entry.model == "maskrcnn-r18-s2"
    assert entry.task == "segmentation" and entry.weights_dtype == "float16"
    assert entry.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert entry.size_bytes == weights.stat().st_size
    # half the fp32 file (buffers stay fp32, they are a sliver of it)
    assert weights.stat().st_size < 0.52 * (source / "model.safetensors").stat().st_size
    assert sorted(p.name for p in (root / NAME).iterdir()) == ["card.json", "card.md", "config.yaml", "meta.json",
                                                               "model.safetensors"]   # weights only, no train state
    meta = read_meta(root / NAME)
    assert meta["weights_dtype"] == "float16" and meta["epoch"] == 3 and meta["step"] == 7
    assert meta["source"]["sha256"] == read_meta(source)["files"]["model.safetensors"]
    card = json.loads((root / NAME / "card.json").read_text())
    assert card["sha256"] == entry.sha256 and card["size_bytes"] == entry.size_bytes
    assert card["disclaimer"] == DISCLAIMER and "not a medical device" in DISCLAIMER
    assert card["class_names"] == ["GGO", "C"] and card["task"] == "segmentation"
    assert (root / NAME / "card.md").read_text() == render_card(card)
    assert builtin_for_model() == {"maskrcnn-r18-s2": [NAME]} and builtin_names() == [NAME]
    umask = os.umask(0)
    os.umask(umask)
    for file in (root / NAME).iterdir():   # readable as package data (safetensors itself writes 0600)
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file.name


def test_parameters_are_stored_fp16_and_buffers_as_they_were(root, source):
    reference, _, _ = load_checkpoint(source)
    params = {n for n, _ in reference.named_parameters()}
    buffers = dict(reference.named_buffers())
    assert any(n.endswith("num_batches_tracked") for n in buffers)
    with safe_open(str(root / NAME / "model.safetensors"), "pt") as fh:
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
    assert set(stored) == set(reference.state_dict())
    for name, value in stored.items():
        if name in params:
            assert value.dtype == torch.float16, name
        else:
            assert value.dtype == buffers[name].dtype and torch.equal(value, buffers[name]), name
    tracked = [v for n, v in stored.items() if n.endswith("num_batches_tracked")]
    assert all(v.dtype == torch.int64 and int(v) == 1 for v in tracked)


def _head_outputs(model, image):
    """Every head of the detector on one image and two fixed boxes (detections themselves may
    differ in number near the score threshold, the raw outputs may not)."""
    model.eval()
    with torch.no_grad():
        images, _ = model.transform([image])
        features = model.backbone(images.tensors)
        objectness, deltas = model.rpn.head(list(features.values()))
        boxes = [torch.tensor([[4.0, 4.0, 40.0, 40.0], [10.0, 20.0, 60.0, 50.0]])]
        roi = model.roi_heads
        class_logits, box_reg = roi.box_predictor(roi.box_head(roi.box_roi_pool(features, boxes, images.image_sizes)))
        masks = roi.mask_predictor(roi.mask_head(roi.mask_roi_pool(features, boxes, images.image_sizes)))
    return {"features": torch.cat([v.flatten() for v in features.values()]),
            "objectness": torch.cat([o.flatten() for o in objectness]),
            "rpn_deltas": torch.cat([d.flatten() for d in deltas]),
            "class_logits": class_logits, "box_regression": box_reg, "mask_logits": masks}


def test_the_fp16_model_loads_as_fp32_and_matches_the_fp32_outputs(root, source):
    fp32, _, _ = load_checkpoint(source)
    fp16, cfg, meta = load_checkpoint(resolve_checkpoint(NAME))
    assert meta["weights_dtype"] == "float16"
    state = load_weights(resolve_checkpoint(NAME), meta)      # what init_from copies too
    assert {v.dtype for v in state.values()} == {torch.float32, torch.int64}
    for name, value in fp16.state_dict().items():
        assert value.dtype in (torch.float32, torch.int64), name
    reference = dict(fp32.named_parameters())
    for name, value in fp16.named_parameters():
        assert torch.equal(value, reference[name].half().float()), name   # exactly the rounded weights
    for (name, a), (_, b) in zip(fp32.named_buffers(), fp16.named_buffers()):
        assert torch.equal(a, b), name
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    want, got = _head_outputs(fp32, image), _head_outputs(fp16, image)
    for key in want:
        scale = float(want[key].abs().max())
        assert scale > 0, key
        assert float((want[key] - got[key]).abs().max()) <= RELATIVE_TOLERANCE * scale, key
        assert not torch.equal(want[key], got[key]), key    # it is fp16: not bit-identical


def test_a_parameter_beyond_the_fp16_range_is_refused(tmp_path):
    cfg = _config()
    model = create_model(cfg.model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = 1e6
    with pytest.raises(CheckpointError, match="beyond float16's range"):
        save_checkpoint(tmp_path / "c", model, cfg, epoch=0, step=0, weights_dtype="float16")


# ------------------------------------------------------------------ verification and names


def test_weights_changed_after_packaging_are_caught_by_the_catalogue_hash(copy_root):
    weights = copy_root / NAME / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    # meta.json rewritten to match: only the catalogue's SHA-256 can tell
    meta = json.loads((copy_root / NAME / "meta.json").read_text())
    meta["files"]["model.safetensors"] = hashlib.sha256(bytes(data)).hexdigest()
    (copy_root / NAME / "meta.json").write_text(json.dumps(meta))
    read_meta(copy_root / NAME)   # the folder on its own looks fine
    with pytest.raises(CheckpointError, match=rf"{weights}.*SHA-256 in the catalogue"):
        resolve_checkpoint(NAME)
    with pytest.raises(CheckpointError, match="SHA-256 in the catalogue"):
        check_catalogue()


def test_truncated_or_missing_weights_name_the_file(copy_root):
    weights = copy_root / NAME / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{weights} has \d+ bytes, the catalogue says"):
        builtin_weights(NAME)
    weights.unlink()
    with pytest.raises(CheckpointError, match=rf"{weights} is missing"):
        builtin_weights(NAME)


def test_names_resolve_and_unknown_names_get_clear_errors(root, source):
    assert resolve_checkpoint(source) == source                              # a path stays a path
    assert resolve_checkpoint(str(source)) == source
    assert resolve_checkpoint(NAME) == (root / NAME).resolve()
    assert resolve_checkpoint("maskrcnn-r18-s2") == (root / NAME).resolve()  # its only built-in
    with pytest.raises(CheckpointError, match=f"neither a checkpoint folder nor a built-in model name.*{NAME}"):
        resolve_checkpoint("no-such-thing")
    with pytest.raises(ConfigError, match=f"no built-in model 'lesion-tinyy'.*did you mean '{NAME}'"):
        builtin_entry("lesion-tinyy")
    with pytest.raises(ConfigError, match="'maskrcnn-r34-s3' is a registered model without built-in weights"):
        builtin_entry("maskrcnn-r34-s3", registry_names=list_models())


def test_a_registry_model_with_two_builtins_must_be_named(copy_root, source):
    make_builtin(source, "lesion-tiny-b", dict(CARD), root=copy_root)
    with pytest.raises(ConfigError, match="has 2 built-in weights .*lesion-tiny, lesion-tiny-b"):
        builtin_entry("maskrcnn-r18-s2")
    assert builtin_entry("lesion-tiny-b").folder.name == "lesion-tiny-b"
    remove_builtin("lesion-tiny-b")
    assert builtin_names() == [NAME] and not (copy_root / "lesion-tiny-b").exists()
    assert builtin_entry("maskrcnn-r18-s2").name == NAME


def test_an_empty_catalogue_says_none_are_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("CTLESION_BUILTIN_DIR", str(tmp_path))
    assert read_catalogue() == {} and builtin_for_model() == {}
    with pytest.raises(ConfigError, match="none are installed"):
        builtin_entry("anything")


def test_a_damaged_catalogue_is_named(tmp_path):
    (tmp_path / "catalogue.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="catalogue.json: unreadable built-in catalogue"):
        read_catalogue(tmp_path)
    (tmp_path / "catalogue.json").write_text(json.dumps({"format_version": 9, "models": {}}))
    with pytest.raises(CheckpointError, match="format 9 is not supported"):
        read_catalogue(tmp_path)
    (tmp_path / "catalogue.json").write_text(json.dumps({"format_version": 1, "models": {"x": {"folder": "x"}}}))
    with pytest.raises(CheckpointError, match="entry 'x' is incomplete"):
        read_catalogue(tmp_path)


# ------------------------------------------------------------------ cards


def test_card_files_are_checked_field_by_field(tmp_path, source):
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(CARD))
    assert read_card_input(path) == CARD
    for change, message in (
        ({"limits": ""}, "lacks limits"),
        ({"licence": "CC-BY"}, "non-commercial research only; the licence field must say 'non-commercial'"),
        ({"metrics": {"protocol": "CV", "values": {"dice": {"mean": 0.5}}}}, "dice needs a numeric 'mean' and 'std'"),
        ({"metrics": {"values": {"dice": {"mean": 0.5, "std": 0.1}}}}, "metrics.protocol is missing"),
        ({"colour": "blue"}, "unknown card fields"),
    ):
        path.write_text(yaml.safe_dump({**CARD, **change}))
        with pytest.raises(ConfigError, match=rf"{path}: .*{message}"):
            read_card_input(path)
    path.write_text("- a list")
    with pytest.raises(ConfigError, match="a model card is a mapping"):
        read_card_input(path)


def test_make_builtin_refuses_to_overwrite_or_to_take_a_registry_name(copy_root, source, tmp_path):
    card = tmp_path / "card.json"
    card.write_text(json.dumps(CARD))
    with pytest.raises(ConfigError, match="exists .*--replace"):
        make_builtin(source, NAME, card, root=copy_root)
    with pytest.raises(ConfigError, match="is a registry model name"):
        make_builtin(source, "maskrcnn-r18-s2", card, root=copy_root)
    before = read_catalogue(copy_root)[NAME].sha256
    entry = make_builtin(source, NAME, card, root=copy_root, replace=True)
    assert entry["sha256"] == before            # the same weights give the same file
    assert builtin_names(copy_root) == [NAME]


def test_read_card_and_render_it(root):
    card = read_card(NAME)
    text = render_card(card)
    for needle in (DISCLAIMER, "non-commercial", card["sha256"], "pixel_dice: 0.5000 ± 0.1000",
                   "5-fold cross-validation", "## Intended use", "- random weights", "maskrcnn-r18-s2",
                   "float16"):
        assert needle in text, needle


# ------------------------------------------------------------------ the command line


def test_models_marks_builtin_weights(root, capsys):
    assert main(["models", "--json", "--filter", "maskrcnn-r18-s*"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["maskrcnn-r18-s2"]["builtin_weights"] is True and rows["maskrcnn-r18-s2"]["builtin"] == [NAME]
    assert rows["maskrcnn-r18-s3"]["builtin_weights"] is False and rows["maskrcnn-r18-s3"]["task"] == "segmentation"
    assert main(["models", "--filter", "maskrcnn-r18-s*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "built-in" in lines[0]
    assert NAME in next(line for line in lines if line.startswith("maskrcnn-r18-s2 "))
    assert " - " in next(line for line in lines if line.startswith("maskrcnn-r18-s3 "))


def test_models_card_prints_the_card(root, capsys):
    assert main(["models", "--card", NAME]) == 0
    out = capsys.readouterr().out
    assert out == render_card(read_card(NAME)) and "not a medical device" in out
    assert main(["models", "--card", NAME, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == read_catalogue()[NAME].sha256
    assert main(["models", "--card", "lesion-tine"]) == 2
    assert f"did you mean '{NAME}'" in capsys.readouterr().err
    assert main(["models", "--card", "maskrcnn-r34-s3"]) == 2
    assert "registered model without built-in weights" in capsys.readouterr().err


def test_models_card_of_a_builtin_without_card(copy_root, capsys):
    (copy_root / NAME / "card.json").unlink()
    assert main(["models", "--card", NAME]) == 2
    assert "has no model card" in capsys.readouterr().err


def test_predict_and_evaluate_run_a_builtin_by_name(root, tmp_path, capsys):
    png = tmp_path / "slice.png"
    Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE)) * 255).astype(np.uint8)).save(png)
    assert main(["predict", "--model", NAME, str(png), "--out", str(tmp_path / "pred"), "--quiet",
                 "--device", "cpu"]) == 0
    assert "1 slices" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 1
    assert main(["evaluate", "--model", "maskrcnn-r18-s2", "--data", f"phantom:n=2,size={SIZE},seed=1",
                 "--out", str(tmp_path / "eval"), "--overlays", "0", "--quiet", "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert Path(metrics["checkpoint"]) == (root / NAME).resolve() and metrics["num_images"] == 2


def test_model_and_checkpoint_are_exclusive_and_names_are_checked(root, source, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", NAME, "--checkpoint", str(source), "x.png", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--data", "phantom:n=1", "--out", str(tmp_path)])   # one of them is required
    capsys.readouterr()
    assert main(["predict", "--model", "maskrcnn-r34-s3", "x.png", "--out", str(tmp_path / "p")]) == 2
    assert "'maskrcnn-r34-s3' is a registered model without built-in weights" in capsys.readouterr().err
    assert main(["evaluate", "--model", "lesion-tyni", "--data", "phantom:n=1", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert f"no built-in model 'lesion-tyni' (built-in: {NAME}); did you mean '{NAME}'" in err


def test_predict_with_damaged_builtin_weights_stops_naming_the_file(copy_root, tmp_path, capsys):
    weights = copy_root / NAME / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    assert main(["predict", "--model", NAME, "x.png", "--out", str(tmp_path / "p")]) == 2
    assert f"{weights} does not match its SHA-256 in the catalogue" in capsys.readouterr().err


# ------------------------------------------------------------------ train.init_from NAME


def test_init_from_a_builtin_name_fills_a_detector_and_a_joint_model(root, tmp_path):
    from ctlesion.engine.train import train

    reference, _, _ = load_checkpoint(resolve_checkpoint(NAME))
    cfg = _config()
    cfg.train.init_from, cfg.train.lr, cfg.train.epochs = NAME, 0.0, 1
    cfg.train.max_steps_per_epoch, cfg.train.batch_size, cfg.train.skip_negatives = 1, 1, False
    cfg.data.num_samples, cfg.data.seed = 2, 3
    result = train(cfg, tmp_path / "run", progress=False)
    report = json.loads((tmp_path / "run" / "init.json").read_text())
    assert report["source"] == NAME and Path(report["source_path"]) == (root / NAME).resolve()
    assert len(report["loaded"]) == len(reference.state_dict()) and report["skipped_shape"] == []
    trained, _, _ = load_checkpoint(result.checkpoint)
    want = dict(reference.named_parameters())
    for name, value in trained.named_parameters():   # lr 0: the built-in's weights, as loaded
        assert torch.equal(value, want[name]), name
    joint = create_model(load_experiment(None, ["model.name=ssm-r18-s2"]).model)
    report = init_from_checkpoint(joint, NAME)
    assert report["loaded"] and all(n.startswith("detector.") for n in report["loaded"])
    weights = dict(joint.named_parameters())
    assert torch.equal(weights["detector.backbone.body.conv1.weight"], want["backbone.body.conv1.weight"])


def test_the_make_builtin_script_is_the_command_the_lead_runs(source, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_builtin", REPO / "scripts" / "make_builtin.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump(CARD))
    root = tmp_path / "root"
    assert script.main([str(source), "--name", "lesion-script", "--card", str(card), "--root", str(root)]) == 0
    out = capsys.readouterr().out
    entry = read_catalogue(root)["lesion-script"]
    assert f"SHA-256 {entry.sha256}" in out and "largest fp16-vs-fp32 output difference" in out
    difference = float(out.split("synthetic slice: ")[1].split()[0])
    assert 0 < difference < 0.05
    assert script.main([str(source), "--name", "lesion-script", "--card", str(card), "--root", str(root)]) == 2
    assert "--replace" in capsys.readouterr().err
    assert script.main(["--remove", "lesion-script", "--root", str(root)]) == 0
    assert read_catalogue(root) == {}


# ------------------------------------------------------------------ what ships


def test_every_shipped_catalogue_entry_verifies_and_loads(monkeypatch, capsys):
    monkeypatch.delenv("CTLESION_BUILTIN_DIR", raising=False)
    package = Path(builtin_pkg.__file__).resolve().parent
    assert builtin_root() == package and (package / "catalogue.json").is_file()
    checked = check_catalogue()
    assert [c["name"] for c in checked] == builtin_names()
    for c in checked:
        assert read_card(c["name"])["sha256"] == read_catalogue()[c["name"]].sha256
    with capsys.disabled():
        print(f"\n[built-in weights] {len(checked)} shipped catalogue entr{'y' if len(checked) == 1 else 'ies'} "
              f"verified (SHA-256, size) and loaded: {', '.join(c['name'] for c in checked) or 'none shipped yet'}")


def test_package_data_globs_cover_what_make_builtin_writes(built_root):
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ctlesion.builtin"]
    files = [p.relative_to(built_root).as_posix() for p in built_root.rglob("*") if p.is_file()]
    assert "catalogue.json" in files and len(files) == 6
    for name in files:
        assert any(fnmatch(name, g) and name.count("/") == g.count("/") for g in globs), name
