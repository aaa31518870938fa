"""Training engine: exact resume, loss log, non-finite loss stop, negatives."""

from __future__ import annotations

import json

import pytest
import torch

from _helpers import ListDataset, small_detector_overrides, square_sample

from ctlesion.experiment import load_experiment
from ctlesion.data.sample import Sample
from ctlesion.engine.checkpoint import load_checkpoint, load_train_state
from ctlesion.engine.train import NonFiniteLossError, epoch_order, train_segmentation

SIZE = 48


def _square_sample(i: int, lesion: bool = True, nan: bool = False) -> Sample:
    return square_sample(i, SIZE, lesion=lesion, nan=nan)


def _cfg(*extra):
    return load_experiment(None, [*small_detector_overrides(SIZE), "train.save_every=1", *extra])


def _steps(log_path):
    return [json.loads(line) for line in log_path.read_text().splitlines() if '"step"' in line and "event" not in line]


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    assert epoch_order(10, 3, 1) == epoch_order(10, 3, 1)
    assert epoch_order(10, 3, 1) != epoch_order(10, 3, 2)
    assert sorted(epoch_order(10, 3, 1)) == list(range(10))


def test_resume_continues_with_the_same_next_loss(tmp_path):
    data = ListDataset([_square_sample(i, lesion=i % 3 != 0) for i in range(6)])
    straight = train_segmentation(_cfg("train.epochs=2"), tmp_path / "a", dataset=data, progress=False)
    assert straight.epochs_done == 2 and straight.steps == 6

    train_segmentation(_cfg("train.epochs=1"), tmp_path / "b", dataset=data, progress=False)
    resumed = train_segmentation(_cfg("train.epochs=2"), tmp_path / "b", dataset=data, progress=False,
                                 resume=True)
    assert resumed.steps == 6
    a, b = _steps(tmp_path / "a" / "train_log.jsonl"), _steps(tmp_path / "b" / "train_log.jsonl")
    assert [s["samples"] for s in a] == [s["samples"] for s in b]
    assert [s["loss"] for s in a] == [s["loss"] for s in b]  # bit-identical on CPU
    wa = load_checkpoint(tmp_path / "a" / "checkpoint")[0].state_dict()
    wb = load_checkpoint(tmp_path / "b" / "checkpoint")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "b" / "epoch-0001").is_dir() and (tmp_path / "b" / "epoch-0002").is_dir()


def test_time_limit_stops_mid_epoch_and_resume_picks_up_the_next_batch(tmp_path, monkeypatch):
    data = ListDataset([_square_sample(i) for i in range(6)])
    train_segmentation(_cfg("train.epochs=1"), tmp_path / "ref", dataset=data, progress=False)

    clock = iter(range(1000))
    monkeypatch.setattr("ctlesion.engine.loop.time.monotonic", lambda: float(next(clock)))
    # The clock ticks once at start and once per batch check: a limit of 2.5 s allows two batches.
    first = train_segmentation(_cfg("train.epochs=1", "train.time_limit_s=2.5"), tmp_path / "cut",
                               dataset=data, progress=False)
    monkeypatch.undo()
    assert first.stopped_early and first.steps == 2
    assert load_train_state(tmp_path / "cut" / "checkpoint")["batch_pos"] == 2
    train_segmentation(_cfg("train.epochs=1"), tmp_path / "cut", dataset=data, progress=False, resume=True)
    ref, cut = _steps(tmp_path / "ref" / "train_log.jsonl"), _steps(tmp_path / "cut" / "train_log.jsonl")
    assert [s["loss"] for s in ref] == [s["loss"] for s in cut]


def test_log_has_every_loss_term_and_the_config_is_saved(tmp_path):
    data = ListDataset([_square_sample(i) for i in range(2)])
    train_segmentation(_cfg("train.epochs=1"), tmp_path, dataset=data, progress=False)
    (line,) = _steps(tmp_path / "train_log.jsonl")
    assert {"loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
            "loss_rpn_box_reg", "epoch", "step", "samples"} <= set(line)
    assert abs(line["loss"] - sum(v for k, v in line.items() if k.startswith("loss_"))) < 1e-4
    assert load_experiment(None).train.lr == 1e-5  # defaults untouched
    saved = (tmp_path / "config.yaml").read_text()
    assert "maskrcnn-r18-s2" in saved and "lr: 0.001" in saved


def test_non_finite_loss_stops_and_names_the_batch(tmp_path):
    data = ListDataset([_square_sample(0, nan=True), _square_sample(1, nan=True)])
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1, samples \['sq-"):
        train_segmentation(_cfg("train.epochs=1"), tmp_path, dataset=data, progress=False)


def test_negatives_are_skipped_when_the_papers_say_so(tmp_path):
    data = ListDataset([_square_sample(i, lesion=False) for i in range(4)])
    skipped = train_segmentation(_cfg("train.epochs=1", "train.skip_negatives=true"), tmp_path / "s",
                                 dataset=data, progress=False)
    assert skipped.steps == 0
    trained = train_segmentation(_cfg("train.epochs=1"), tmp_path / "t", dataset=data, progress=False)
    assert trained.steps == 2


def test_cosine_schedule_is_a_pure_function_of_the_step():
    from ctlesion.config import TrainConfig
    from ctlesion.engine.train import scheduled_lr

    tc = TrainConfig(lr=1e-3, lr_schedule="cosine", min_lr_ratio=0.01)
    lrs = [scheduled_lr(tc, s, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[50] == pytest.approx(0.505e-3) and lrs[100] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert scheduled_lr(TrainConfig(lr=2e-5), 77, 100) == 2e-5  # the papers: constant
    with pytest.raises(ValueError, match="lr_schedule"):
        scheduled_lr(TrainConfig(lr_schedule="step"), 0, 10)


def test_cosine_run_logs_the_decaying_lr(tmp_path):
    data = ListDataset([_square_sample(i) for i in range(4)])
    train_segmentation(_cfg("train.epochs=2", "train.lr_schedule=cosine"), tmp_path, dataset=data, progress=False)
    lrs = [s["lr"] for s in _steps(tmp_path / "train_log.jsonl")]
    assert len(lrs) == 4 and lrs[0] == pytest.approx(1e-3) and lrs == sorted(lrs, reverse=True)


def test_validation_is_logged_and_does_not_change_training(tmp_path):
    from ctlesion.config import DataConfig

    data = ListDataset([_square_sample(i) for i in range(4)])
    val = ["val_data.format=phantom", "val_data.num_samples=3", f"val_data.phantom_size={SIZE}",
           "val_data.min_area=4"]
    plain = train_segmentation(_cfg("train.epochs=2", "train.save_every=5"), tmp_path / "plain",
                               dataset=data, progress=False)
    checked = train_segmentation(_cfg("train.epochs=2", "train.save_every=5", "train.eval_every=1", *val),
                                 tmp_path / "val", dataset=data, progress=False)
    assert plain.steps == checked.steps == 4
    lines = [json.loads(x) for x in (tmp_path / "val" / "train_log.jsonl").read_text().splitlines()]
    events = [x for x in lines if x.get("event") == "validation"]
    assert [e["epoch"] for e in events] == [1, 2]
    assert all(0.0 <= e["legacy_mAP"] <= 1.0 for e in events)
    # Validation forces a checkpoint of the epoch it scored, with its metrics beside the weights.
    metrics = json.loads((tmp_path / "val" / "epoch-0001" / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and "legacy" in metrics and "coco" in metrics
    assert not (tmp_path / "plain" / "epoch-0001").exists()
    # Scoring draws nothing from the training RNG: both runs train identically.
    assert [s["loss"] for s in _steps(tmp_path / "plain" / "train_log.jsonl")] == \
           [s["loss"] for s in _steps(tmp_path / "val" / "train_log.jsonl")]
    assert DataConfig().cache is False


def test_resume_refuses_a_different_model(tmp_path):
    data = ListDataset([_square_sample(i) for i in range(2)])
    train_segmentation(_cfg("train.epochs=1"), tmp_path, dataset=data, progress=False)
    with pytest.raises(ValueError, match="cannot resume"):
        train_segmentation(_cfg("train.epochs=2", "model.detector.representation_size=64"), tmp_path,
                           dataset=data, progress=False, resume=True)


def test_unlabelled_training_data_is_a_clear_error(tmp_path):
    sample = _square_sample(0)
    sample.target = None
    with pytest.raises(ValueError, match="needs labelled slices"):
        train_segmentation(_cfg("train.epochs=1", "train.skip_negatives=true"), tmp_path,
                           dataset=ListDataset([sample]), progress=False)


def test_the_loop_trains_a_model_it_is_given(tmp_path):
    from ctlesion.engine.train import train
    from ctlesion.registry import create_model

    cfg = _cfg("train.epochs=1")
    torch.manual_seed(5)
    mine = create_model(cfg.model)
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    result = train(cfg, tmp_path, model=mine, dataset=ListDataset([_square_sample(i) for i in range(2)]),
                   progress=False)
    assert result.steps == 1
    saved, _, meta = load_checkpoint(result.checkpoint)
    assert meta["task"] == "segmentation"
    after = mine.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)          # this very model learned
    assert all(torch.equal(after[k], v) for k, v in saved.state_dict().items())  # and was saved
