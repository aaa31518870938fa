"""What long runs meet: a kill in the middle of a checkpoint write (SIGKILL at 20 different
points of the saves), a full disk, a non-finite loss, a series folder holding a DICOM object
without pixels; mixed precision on CPU; TensorBoard logging."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from _helpers import ListDataset, write_ct_series

import ctlesion.engine.checkpoint as checkpoint_module
from ctlesion.data.sample import Sample
from ctlesion.engine.checkpoint import load_checkpoint, load_train_state
from ctlesion.engine.train import NonFiniteLossError, train
from ctlesion.experiment import load_experiment

SIZE = 48
SETS = ["model.name=maskrcnn-r18-s2", f"model.detector.min_size={SIZE}", f"model.detector.max_size={SIZE}",
        "model.detector.rpn_pre_nms_top_n_train=100", "model.detector.rpn_post_nms_top_n_train=50",
        "model.detector.box_batch_size_per_image=16", "model.detector.representation_size=16",
        "data.format=phantom", "data.num_samples=4", f"data.phantom_size={SIZE}", "data.min_area=5",
        "data.phantom_classes=[cp,covid]", "train.batch_size=2", "train.epochs=3", "train.lr=1e-3",
        "train.save_every=1", "train.skip_negatives=false", "train.device=cpu"]
KILLS = range(1, 21)   # 26 kill points in the saves of 3 epochs (4 or 5 per save); the first 20


def _losses(out, after_resume=False):
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    if after_resume and any(x.get("event") == "resume" for x in lines):
        lines = lines[max(i for i, x in enumerate(lines) if x.get("event") == "resume") + 1:]
    return {x["step"]: x["loss"] for x in lines if "event" not in x}


def _killed(out, point: int) -> subprocess.Popen:
    config = out.parent / f"{out.name}.yaml"
    config.write_text("{}\n")
    # the same intra-op thread count as this process (conftest: 2), so the sums round alike
    env = {**os.environ, "CTLESION_TEST_KILL_AT": str(point), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "ctlesion", "train", str(config), "--out", str(out), "--quiet",
           *(f"--set={s}" for s in SETS)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_kill_at_any_point_of_a_checkpoint_write_loses_nothing(tmp_path):
    reference = tmp_path / "reference"
    train(load_experiment(None, SETS), reference, progress=False)
    expected = _losses(reference)
    assert len(expected) == 6
    runs = {}
    for first in range(0, len(KILLS), 2):               # two at a time: the box has 2 cores
        batch = {k: _killed(tmp_path / f"kill{k}", k) for k in list(KILLS)[first:first + 2]}
        for k, proc in batch.items():
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == -9, f"kill point {k}: exit {proc.returncode}: {err.decode()[-2000:]}"
        runs.update(batch)
    for k in KILLS:
        out = tmp_path / f"kill{k}"
        try:
            load_checkpoint(out / "checkpoint")               # the latest checkpoint loads after the kill
            resume = True
        except checkpoint_module.CheckpointError:
            resume = False                                    # killed before the first checkpoint existed
            assert k <= 8, f"kill point {k}: no loadable checkpoint"
        train(load_experiment(None, SETS), out, resume=resume, progress=False)
        again = _losses(out, after_resume=resume)
        assert again and all(again[s] == expected[s] for s in again), f"kill point {k}: {again} vs {expected}"
        assert max(again) == 6
        assert not list(out.glob(".*.tmp-*")) and not list(out.glob(".*.old-*"))


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    real, calls = checkpoint_module.save_file, []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:                               # epoch 2's first save: epoch-0002/
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        train(load_experiment(None, SETS), tmp_path, progress=False)
    model, _, meta = load_checkpoint(tmp_path / "checkpoint")
    assert meta["epoch"] == 1 and not (tmp_path / "epoch-0002").exists()
    assert not list(tmp_path.glob(".*.tmp-*"))


def _sample(i: int, nan: bool = False) -> Sample:
    gen = torch.Generator().manual_seed(i)
    image = 0.2 * torch.rand(1, SIZE, SIZE, generator=gen)
    x, y = 6 + 3 * i, 8 + 2 * i
    image[:, y:y + 14, x:x + 16] += 0.6
    mask = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
    mask[0, y:y + 14, x:x + 16] = 1
    if nan:
        image[0, 0, 0] = float("nan")
    target = {"boxes": torch.tensor([[x, y, x + 16, y + 14]], dtype=torch.float32), "labels": torch.tensor([1]),
              "masks": mask}
    return Sample(image=image, target=target, sample_id=f"s{i}", source="synthetic")


def test_a_non_finite_loss_saves_the_last_good_state_and_resume_continues_after_the_fix(tmp_path):
    cfg = load_experiment(None, [*SETS, "train.epochs=2"])
    clean = ListDataset([_sample(i) for i in range(4)])
    train(cfg, tmp_path / "clean", dataset=clean, progress=False)
    broken = ListDataset([_sample(i, nan=i == 2) for i in range(4)])
    with pytest.raises(NonFiniteLossError, match="last good state is saved"):
        train(cfg, tmp_path / "run", dataset=broken, progress=False)
    state = load_train_state(tmp_path / "run" / "checkpoint")
    model, _, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert all(bool(torch.isfinite(b).all()) for b in model.state_dict().values() if b.is_floating_point())
    # the data is fixed, the run resumes at the batch that failed and ends as the clean run
    train(cfg, tmp_path / "run", dataset=clean, resume=True, progress=False)
    assert _losses(tmp_path / "run", after_resume=True).items() <= _losses(tmp_path / "clean").items()
    assert max(_losses(tmp_path / "run")) == max(_losses(tmp_path / "clean"))
    assert state["step"] < max(_losses(tmp_path / "clean"))


def test_a_dicom_object_without_pixels_in_a_series_is_skipped_with_a_warning(tmp_path):
    from pydicom import dcmread

    from ctlesion.data.datasets import VolumeDataset

    series = write_ct_series(tmp_path / "series", [np.full((16, 16), -700.0) for _ in range(3)])
    sr = dcmread(series / "s0.dcm")
    del sr.PixelData
    sr.Modality = "SR"
    sr.save_as(series / "SR0001.dcm")
    with pytest.warns(UserWarning, match=r"without pixel data: SR0001\.dcm \(SR\)"):
        data = VolumeDataset(series, window="lung")
        samples = [data[i] for i in range(len(data))]
    assert len(samples) == 3


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_and_stays_finite_on_cpu(tmp_path, amp):
    result = train(load_experiment(None, [*SETS, "train.epochs=1", f"train.amp={amp}"]), tmp_path, progress=False)
    losses = _losses(tmp_path)
    assert result.steps == 2 and all(math.isfinite(v) for v in losses.values())
    state = load_train_state(tmp_path / "checkpoint")
    assert ("scaler" in state) == (amp == "fp16")


def test_tensorboard_logs_every_loss_term(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(load_experiment(None, [*SETS, "train.epochs=1", "train.tensorboard=true"]), tmp_path, progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_mask", "train/lr"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
