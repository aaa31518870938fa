"""Checkpoint folders: safetensors round trip, atomic writes, corruption is detected."""

from __future__ import annotations

import json

import pytest
import torch

from ctlesion.config import ExperimentConfig
from ctlesion.experiment import load_experiment
from ctlesion.engine.checkpoint import (
    CheckpointError, load_checkpoint, load_train_state, save_checkpoint,
)
from ctlesion.engine.io import atomic_write_bytes
from ctlesion.registry import create_model


@pytest.fixture(scope="module")
def small_cfg() -> ExperimentConfig:
    return load_experiment(None, ["model.name=maskrcnn-r18-s2", "model.detector.min_size=64",
                                  "model.detector.max_size=64", "model.detector.mask_type=both"])


def test_round_trip_gives_identical_weights_and_outputs(tmp_path, small_cfg):
    model = create_model(small_cfg.model)
    # Make BN running stats non-trivial so buffers are checked too.
    model.train()
    model.backbone(torch.rand(2, 3, 64, 64))
    state = {"epoch": 3, "batch_pos": 0, "step": 9, "optimizer": {"state": {}, "param_groups": []},
             "rng": {"torch": torch.get_rng_state()}}
    path = save_checkpoint(tmp_path / "ckpt", model, small_cfg, epoch=3, step=9, train_state=state)
    loaded, cfg, meta = load_checkpoint(path)
    assert cfg == small_cfg
    assert meta["epoch"] == 3 and meta["class_names"] == ["GGO", "C"] and meta["model_name"] == "maskrcnn-r18-s2"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    image = [torch.rand(1, 64, 64)]
    model.eval(), loaded.eval()
    with torch.no_grad():
        a, b = model(image)[0], loaded(image)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    assert load_train_state(path)["step"] == 9


def test_weights_file_is_safetensors_not_pickle(tmp_path, small_cfg):
    path = save_checkpoint(tmp_path / "c", create_model(small_cfg.model), small_cfg, epoch=0, step=0)
    header = (path / "model.safetensors").read_bytes()[:8]
    assert int.from_bytes(header, "little") > 0  # safetensors: 8-byte header length, then JSON
    assert (path / "model.safetensors").read_bytes()[8:9] == b"{"
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        load_train_state(path)


def test_corrupted_weights_are_detected(tmp_path, small_cfg):
    path = save_checkpoint(tmp_path / "c", create_model(small_cfg.model), small_cfg, epoch=0, step=0)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupted"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["no_meta", "no_folder", "bad_format"])
def test_incomplete_checkpoints_fail_clearly(tmp_path, small_cfg, damage):
    path = save_checkpoint(tmp_path / "c", create_model(small_cfg.model), small_cfg, epoch=0, step=0)
    if damage == "no_meta":
        (path / "meta.json").unlink()
        match = "incomplete"
    elif damage == "no_folder":
        path = tmp_path / "elsewhere"
        match = "not found"
    else:
        meta = json.loads((path / "meta.json").read_text())
        meta["format_version"] = 99
        (path / "meta.json").write_text(json.dumps(meta))
        match = "not supported"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_save_replaces_previous_checkpoint_and_leaves_no_temp(tmp_path, small_cfg):
    model = create_model(small_cfg.model)
    save_checkpoint(tmp_path / "c", model, small_cfg, epoch=1, step=1)
    save_checkpoint(tmp_path / "c", model, small_cfg, epoch=2, step=2)
    assert load_checkpoint(tmp_path / "c")[2]["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, small_cfg, monkeypatch):
    model = create_model(small_cfg.model)
    save_checkpoint(tmp_path / "c", model, small_cfg, epoch=1, step=1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ctlesion.engine.checkpoint.save_file", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "c", model, small_cfg, epoch=2, step=2)
    assert load_checkpoint(tmp_path / "c")[2]["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_atomic_write_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    from ctlesion.engine import io

    def broken(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
