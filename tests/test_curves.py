"""Learning curves: the per-epoch series built from a training log (means of every loss
term, validation metrics, resumed runs drawn once) and ``curves.png`` written by training
after every epoch and at a time-limit stop."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from _helpers import ListDataset, small_detector_overrides, square_sample

import ctlesion.engine.loop as loop
from ctlesion.data.sample import Sample
from ctlesion.engine.curves import (CurveSeries, curve_series, plot_learning_curves, read_log,
                                    write_learning_curves)
from ctlesion.engine.train import train_segmentation
from ctlesion.experiment import load_experiment

SIZE = 48


def _step(epoch, step, loss, **terms):
    return {"epoch": epoch, "step": step, "samples": [f"s{step}"], "loss": loss, **terms, "lr": 1e-3}


def test_series_hold_the_mean_of_every_loss_term_per_epoch():
    records = [
        _step(1, 1, 4.0, loss_mask=1.0, copied=True), _step(1, 2, 2.0, loss_mask=3.0), _step(1, 3, 3.0),
        _step(2, 4, 1.0, loss_mask=0.5), _step(2, 5, 0.0, loss_mask=0.25),
        {"event": "validation", "epoch": 1, "step": 3, "legacy_mAP": 0.1, "coco_segm_AP": None},
        {"event": "validation", "epoch": 2, "step": 5, "legacy_mAP": 0.3, "coco_segm_AP": 0.2},
    ]
    series = curve_series(records)
    assert series.train == {"loss": [(1, 3.0), (2, 0.5)], "loss_mask": [(1, 2.0), (2, 0.375)]}
    assert set(series.validation) == {"legacy_mAP", "coco_segm_AP"}
    assert series.validation["legacy_mAP"] == [(1, 0.1), (2, 0.3)]
    (e1, v1), (e2, v2) = series.validation["coco_segm_AP"]
    assert (e1, e2) == (1, 2) and math.isnan(v1) and v2 == 0.2   # null (undefined) is a gap, not a zero


def test_joint_records_plot_both_losses_and_not_accuracy_or_lr():
    records = [{"epoch": 1, "step": 1, "seg_sample": "a", "seg_loss": 2.0, "loss_mask": 1.0, "copied": False,
                "samples": ["x"], "cls_loss": 0.7, "cls_accuracy": 0.5, "lr": 0.01},
               {"epoch": 1, "step": 2, "seg_sample": "b", "samples": ["y"], "cls_loss": 0.5, "cls_accuracy": 1.0,
                "lr": 0.01}]    # a lesion-free segmentation image: no segmentation terms
    assert curve_series(records).train == {"seg_loss": [(1, 2.0)], "loss_mask": [(1, 1.0)], "cls_loss": [(1, 0.6)]}


def test_a_resumed_run_drops_what_was_logged_past_its_resume_point():
    records = [_step(1, 1, 5.0), _step(1, 2, 3.0), _step(2, 3, 9.0), _step(2, 4, 9.0),
               {"event": "validation", "epoch": 1, "step": 2, "legacy_mAP": 0.1},
               {"event": "validation", "epoch": 2, "step": 4, "legacy_mAP": 0.9},
               {"event": "resume", "epoch": 1, "batch_pos": 0, "step": 2},      # back to epoch-0001
               _step(2, 3, 2.0), _step(2, 4, 1.0),
               {"event": "validation", "epoch": 2, "step": 4, "legacy_mAP": 0.4}]
    series = curve_series(records)
    assert series.train == {"loss": [(1, 4.0), (2, 1.5)]}
    assert series.validation == {"legacy_mAP": [(1, 0.1), (2, 0.4)]}
    # a time-limit stop mid-epoch resumed at its exact position keeps the whole epoch
    cut = [_step(1, 1, 2.0), {"event": "resume", "epoch": 0, "batch_pos": 1, "step": 1}, _step(1, 2, 4.0)]
    assert curve_series(cut).train == {"loss": [(1, 3.0)]}


def test_a_torn_log_line_is_left_out_with_a_warning(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps(_step(1, 1, 2.0)) + "\n" + '{"epoch": 1, "st')
    with pytest.warns(UserWarning, match=r"train_log.jsonl:2: unreadable log line"):
        records = read_log(log)
    assert len(records) == 1


def test_the_plot_is_a_png_even_without_steps_or_validation(tmp_path):
    for series in (CurveSeries(), CurveSeries(train={"loss": [(1, 1.0)]}),
                   CurveSeries(train={"loss": [(1, -1.0), (2, 0.5)]}, validation={"f1": [(1, 0.2)]})):
        path = plot_learning_curves(series, tmp_path / "c.png", title="t")
        with Image.open(path) as im:
            im.verify()
            assert im.format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]      # no temporary file left behind
    assert write_learning_curves(tmp_path / "nothing-here") is None


def _square_sample(i: int) -> Sample:
    return square_sample(i, SIZE)


def _cfg(*extra):
    return load_experiment(None, [*small_detector_overrides(SIZE), "train.save_every=5", *extra])


@pytest.mark.slow
def test_training_redraws_curves_png_after_every_epoch(tmp_path, monkeypatch):
    drawn = []

    def spy(out_dir, title=None):
        path = write_learning_curves(out_dir, title)
        drawn.append(curve_series(read_log(out_dir / "train_log.jsonl")))
        return path

    monkeypatch.setattr(loop, "write_learning_curves", spy)
    val = ["val_data.format=phantom", "val_data.num_samples=1", f"val_data.phantom_size={SIZE}", "val_data.min_area=4"]
    run = tmp_path / "run"
    train_segmentation(_cfg("train.epochs=2", "train.batch_size=1", "train.eval_every=1", *val), run,
                       dataset=ListDataset([_square_sample(i) for i in range(2)]), progress=False)
    png = run / "curves.png"
    with Image.open(png) as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 1000      # two panels: losses and validation
    assert len(drawn) == 2                                     # once per epoch, with that epoch's validation
    assert [e for e, _ in drawn[0].train["loss"]] == [1] and [e for e, _ in drawn[0].validation["legacy_mAP"]] == [1]
    # the plotted means are the epoch means of the log, for every loss term
    steps = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if '"event"' not in x]
    final = drawn[-1]
    assert set(final.train) == {"loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                                "loss_rpn_box_reg"}
    for term, points in final.train.items():
        for epoch, mean in points:
            values = [s[term] for s in steps if s["epoch"] == epoch]
            assert len(values) == 2 and mean == pytest.approx(sum(values) / 2, rel=1e-12)
    assert [e for e, _ in final.validation["legacy_mAP"]] == [1, 2]


def test_a_time_limit_stop_still_draws_the_curves(tmp_path):
    run = tmp_path / "cut"
    result = train_segmentation(_cfg("train.epochs=3", "train.time_limit_s=0"), run,
                                dataset=ListDataset([_square_sample(i) for i in range(4)]), progress=False)
    assert result.stopped_early and result.steps == 0
    with Image.open(run / "curves.png") as im:
        im.verify()
