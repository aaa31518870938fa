"""torchrun on CPU (2 gloo processes): the same losses as one process with the double batch,
checkpoints that move between 1 and 2 processes, frozen parameters frozen, joint models.

The CNN runs with BatchNorm on running statistics (``train.cls_bn=eval``), so a sample's
loss does not depend on which rank's batch it is in: the 2-process mean equals the
1-process mean up to float summation order (tolerance 1e-5 relative).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ctlesion.engine.checkpoint import load_checkpoint, load_train_state
from ctlesion.engine.loop import seed_everything
from ctlesion.engine.train import train
from ctlesion.experiment import load_experiment
from ctlesion.registry import create_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

SIZE = 64
CNN = ["model.name=cnn-resnet18", f"model.classifier.input_size={SIZE}", "data.format=phantom", "data.num_samples=8",
       f"data.phantom_size={SIZE}", "train.update_rule=full", "train.cls_bn=eval", "train.lr=1e-3",
       "train.save_every=1", "train.device=cpu", "train.seed=3"]


def _torchrun(out, sets, *extra, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config = out.parent / f"{out.name}.yaml"
    config.write_text("{}\n")                                  # everything comes from --set
    cmd = [sys.executable, "-m", "ctlesion", "train", str(config), "--out", str(out), "--nproc", "2", "--quiet",
           *(f"--set={s}" for s in sets), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _losses(out, key="cls_loss"):
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [x[key] for x in lines if "event" not in x]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with batch 4 and two with batch 2, 2 epochs of 8 phantoms each."""
    root = tmp_path_factory.mktemp("ddp")
    cfg = load_experiment(None, [*CNN, "train.batch_size=4", "train.epochs=2"])
    train(cfg, root / "one", progress=False)
    _torchrun(root / "two", [*CNN, "train.batch_size=2", "train.epochs=2"])
    return root


def test_two_processes_follow_one_process_with_the_double_batch(runs):
    one, two = _losses(runs / "one"), _losses(runs / "two")
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-5)
    assert len(set(one)) > 1                                    # it trained
    single, _, _ = load_checkpoint(runs / "one" / "checkpoint")
    ddp, _, meta = load_checkpoint(runs / "two" / "checkpoint")  # a DDP checkpoint loads in one process
    assert meta["epoch"] == 2
    diffs = torch.tensor([float((a - b).abs().max()) for a, b in zip(single.state_dict().values(),
                                                                       ddp.state_dict().values()) if a.is_floating_point()])
    # Adam scales each update to about lr, so a gradient within rounding of 0 can step either
    # way: single weights may differ by up to steps x lr; almost all agree to rounding.
    assert float(diffs.max()) <= 4 * 1e-3 * 1.01
    assert float(diffs.median()) < 1e-5
    state = load_train_state(runs / "two" / "checkpoint")
    assert len(state["rng_ranks"]) == 2                           # both ranks' RNG, for exact resume


@pytest.mark.parametrize("origin", ["one", "two"])
def test_checkpoints_resume_across_process_counts(runs, tmp_path, origin):
    # the same checkpoint (of a 1- or a 2-process run) resumed by 1 and by 2 processes:
    # both continue alike (a DDP checkpoint loads in one process, and vice versa)
    shutil.copytree(runs / origin, tmp_path / "by_one")
    shutil.copytree(runs / origin, tmp_path / "by_two")
    train(load_experiment(None, [*CNN, "train.batch_size=4", "train.epochs=3"]), tmp_path / "by_one", resume=True,
          progress=False)
    _torchrun(tmp_path / "by_two", [*CNN, "train.batch_size=2", "train.epochs=3"], "--resume")
    by_one, by_two = _losses(tmp_path / "by_one"), _losses(tmp_path / "by_two")
    assert len(by_one) == len(by_two) == 6 and by_one[:4] == by_two[:4] == _losses(runs / origin)
    assert by_one[4:] == pytest.approx(by_two[4:], rel=1e-5)


def test_joint_model_under_two_processes_keeps_frozen_parameters_frozen(tmp_path):
    sets = ["model.name=ssm-2branch-r18-s2", f"model.detector.min_size={SIZE}", f"model.detector.max_size={SIZE}",
            "model.detector.rpn_pre_nms_top_n_test=100", "model.detector.rpn_post_nms_top_n_test=50",
            "model.detector.rpn_pre_nms_top_n_train=100", "model.detector.rpn_post_nms_top_n_train=50",
            "model.detector.box_batch_size_per_image=16", "model.detector.representation_size=16",
            "model.classifier.rois=8", "model.classifier.s_features=16", "data.format=phantom", "data.num_samples=4",
            f"data.phantom_size={SIZE}", "data.min_area=5", "seg_data.format=phantom", "seg_data.num_samples=4",
            f"seg_data.phantom_size={SIZE}", "seg_data.min_area=5", "seg_data.phantom_classes=[cp,covid]",
            "train.update_rule=s_only", "train.copy_rule=every", "train.epochs=1", "train.lr=1e-3",
            "train.device=cpu", "train.save_every=1"]
    _torchrun(tmp_path / "joint", sets)
    records = [json.loads(x) for x in (tmp_path / "joint" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert len(steps) == 2 and all("cls_loss" in r and "seg_sample" in r for r in steps)
    cfg = load_experiment(None, sets)
    seed_everything(cfg.train.seed)
    initial = create_model(cfg.model).state_dict()              # what every rank started from (rank 0's init)
    trained, _, _ = load_checkpoint(tmp_path / "joint" / "checkpoint")
    after = trained.state_dict()
    # the classification step (s_only) touches only S; L_SEG trains only the detector
    assert all(torch.equal(initial[k], after[k]) for k in initial if k.startswith("cls_branch.") and
               not any(r.get("copied") for r in steps))
    assert any(not torch.equal(initial[k], after[k]) for k in initial if k.startswith("head."))
    if any("seg_loss" in r for r in steps):
        assert any(not torch.equal(initial[k], after[k]) for k in initial if k.startswith("detector.roi_heads."))
