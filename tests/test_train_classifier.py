"""The slice-classifier engine (spec §4.5, §5.2, §5.3, §11.8-11.9): frozen parameters stay
bit-identical, copy rules, exact resume, errors, "auto" settings, init_from and scoring.

Everything runs on 64-px phantoms with a shrunken detector (RPN top-n, RoI sampling, box
head width, N and F), a few optimiser steps per run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from _helpers import ListDataset

import ctlesion.registry as registry
from ctlesion.config import ExperimentConfig
from ctlesion.experiment import load_experiment
from ctlesion.data.phantom import PhantomDataset
from ctlesion.engine.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from ctlesion.engine.evaluate_classifier import evaluate_classifier, run_classifier
from ctlesion.engine.train import NonFiniteLossError
from ctlesion.engine.steps import (
    COPY_RULES,
    FAMILY_DEFAULTS,
    CopyRule,
    init_from_checkpoint,
    resolve_auto_settings,
    seg_index,
)
from ctlesion.engine.train import train_classifier
from ctlesion.models.ctm import ModuleS

SIZE = 64
ROIS = 16
DETECTOR = [
    f"model.detector.min_size={SIZE}", f"model.detector.max_size={SIZE}",
    "model.detector.rpn_pre_nms_top_n_test=200", "model.detector.rpn_post_nms_top_n_test=100",
    "model.detector.rpn_pre_nms_top_n_train=200", "model.detector.rpn_post_nms_top_n_train=100",
    "model.detector.box_batch_size_per_image=32", "model.detector.representation_size=32",
    "model.backbone.out_channels=64",
]
SMALL = [
    *DETECTOR, f"model.classifier.rois={ROIS}", "model.classifier.s_features=32",
    "data.format=phantom", "data.num_samples=4", f"data.phantom_size={SIZE}", "data.min_area=5",
    "train.epochs=1", "train.lr=1e-3", "train.save_every=1", "train.device=cpu",
]
SEG = ["seg_data.format=phantom", "seg_data.num_samples=4", f"seg_data.phantom_size={SIZE}",
       "seg_data.min_area=5", "seg_data.phantom_classes=[cp,covid]", "seg_data.seed=1"]


def config(name: str, *extra: str) -> ExperimentConfig:
    joint = name.startswith("ssm") and "train.joint=false" not in extra
    return load_experiment(None, [f"model.name={name}", *SMALL, *(SEG if joint else []), *extra])


def steps(out_dir) -> list[dict]:
    lines = [json.loads(x) for x in (out_dir / "train_log.jsonl").read_text().splitlines()]
    return [x for x in lines if "event" not in x]


@pytest.fixture
def spy(monkeypatch):
    """Every model the engine creates: ``[(model, state_dict snapshot at creation)]``."""
    made = []
    real = registry.create_model

    def create(arg):
        model = real(arg)
        made.append((model, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(registry, "create_model", create)
    return made


@pytest.fixture
def adam_spy(monkeypatch):
    """Every optimiser step: the parameters that had a gradient and (optionally) a snapshot
    of all parameters just before the update."""
    calls: list[dict] = []
    real = torch.optim.Adam

    class SpyAdam(real):
        snapshot = False

        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            calls.append({
                "with_grad": {id(p) for p in params if p.grad is not None},
                "before": {id(p): p.detach().clone() for p in params} if SpyAdam.snapshot else None,
            })
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    return calls, SpyAdam


def _changed(model: nn.Module, snapshot: dict) -> set[str]:
    state = model.state_dict()
    return {k for k in snapshot if not torch.equal(snapshot[k], state[k])}


def _params(model, prefix: str = "") -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def _buffers(model) -> set[str]:
    return {n for n, _ in model.named_buffers()}


# ---------------------------------------------------------------------------------------
# frozen parameters are bit-identical (grad=None, not zero: spec §5.2 step 3, §11.8)
# ---------------------------------------------------------------------------------------


def test_ctm_s_only_changes_nothing_but_module_s(tmp_path, spy):
    cfg = config("ctm-r18-s2", "train.update_rule=s_only", "train.batch_size=2", "train.max_steps_per_epoch=1")
    result = train_classifier(cfg, tmp_path, progress=False)
    assert result.steps == 1
    model, before = spy[0]
    changed = _changed(model, before)
    assert changed == _params(model, "head.")  # every S parameter moved, nothing else did
    assert not changed & _buffers(model)       # BN running statistics frozen (eval mode)
    saved = load_checkpoint(tmp_path / "checkpoint")[0].state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_ctm_s_bn_moves_only_backbone_bn_affine_params(tmp_path, spy):
    cfg = config("ctm-r18-s2", "train.update_rule=s_bn", "train.batch_size=2", "train.max_steps_per_epoch=1")
    train_classifier(cfg, tmp_path, progress=False)
    model, before = spy[0]
    bn = {f"detector.backbone.{m}.{p}" for m, mod in model.detector.backbone.named_modules()
          if isinstance(mod, nn.BatchNorm2d) for p in ("weight", "bias")}
    assert any(".downsample.1." in n for n in bn)  # bn_params "all" (spec §10 #12)
    assert _changed(model, before) == _params(model, "head.") | bn


def test_ctm_s_bn_code_filter_keeps_downsample_bns_frozen(tmp_path, spy):
    cfg = config("ctm-r18-s2", "train.update_rule=s_bn", "train.bn_params=code", "train.max_steps_per_epoch=1")
    train_classifier(cfg, tmp_path, progress=False)
    model, before = spy[0]
    changed = _changed(model, before)
    assert {n for n in changed if n.startswith("detector.")}
    assert not any(".downsample." in n for n in changed)


def test_ctm_full_never_reaches_the_rpn(tmp_path, spy):
    """Spec §4.5 mode 3 and §10 #11: proposals are detached, the RPN gets no gradient."""
    cfg = config("ctm-r18-s2", "train.update_rule=full", "train.max_steps_per_epoch=1")
    train_classifier(cfg, tmp_path, progress=False)
    model, before = spy[0]
    changed = _changed(model, before)
    assert not changed & _params(model, "detector.rpn.")
    assert not changed & _buffers(model)
    for prefix in ("head.", "detector.backbone.body.", "detector.backbone.fpn.",
                   "detector.roi_heads.box_head.", "detector.roi_heads.box_predictor."):
        assert changed & _params(model, prefix), prefix


def test_ssm_joint_copy_none_keeps_the_classification_branch(tmp_path, spy, adam_spy):
    calls, _ = adam_spy
    cfg = config("ssm-2branch-r18-s2", "train.copy_rule=none", "train.max_steps_per_epoch=2")
    result = train_classifier(cfg, tmp_path, progress=False)
    assert result.steps == 2
    model, before = spy[0]
    changed = _changed(model, before)
    assert not changed & _params(model, "cls_branch.")
    assert _params(model, "head.") <= changed
    for prefix in ("detector.rpn.", "detector.roi_heads.box_head.", "detector.roi_heads.mask_head.",
                   "detector.backbone.body."):
        assert changed & _params(model, prefix), prefix
    assert changed & _buffers(model)  # the segmentation step runs in train mode
    log = steps(tmp_path)
    assert len(log) == 2 and all("seg_loss" in x and x["copied"] is False for x in log)

    # Steps alternate segmentation / classification; only the allowed parameters have grads.
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(calls) == 4
    allowed_cls = _params(model, "head.") | _params(model, "detector.backbone.")
    for i, call in enumerate(calls):
        with_grad = {names[i_] for i_ in call["with_grad"]}
        if i % 2 == 0:  # segmentation: the detector only
            assert with_grad and all(n.startswith("detector.") for n in with_grad)
            assert with_grad & _params(model, "detector.rpn.")
        else:           # classification, rule s_backbone: S + backbone (and FPN)
            assert _params(model, "head.") <= with_grad <= allowed_cls


def test_ssm_classification_only_s_only_freezes_the_backbone(tmp_path, spy):
    cfg = config("ssm-2branch-r18-s2", "train.joint=false", "train.update_rule=s_only",
                 "train.max_steps_per_epoch=1")
    train_classifier(cfg, tmp_path, progress=False)
    model, before = spy[0]
    assert _changed(model, before) == _params(model, "head.")
    assert "seg_loss" not in steps(tmp_path)[0]


def test_ssm_classification_only_s_backbone_freezes_rpn_and_roi_branches(tmp_path, spy):
    cfg = config("ssm-r18-s2", "train.joint=false", "train.max_steps_per_epoch=1")
    train_classifier(cfg, tmp_path, progress=False)
    model, before = spy[0]
    changed = _changed(model, before)
    assert changed == _params(model, "head.") | _params(model, "detector.backbone.")
    assert not changed & _buffers(model)  # cls_bn eval: running statistics frozen


# ---------------------------------------------------------------------------------------
# copy rules (spec §5.2, §10 #14, §11.9)
# ---------------------------------------------------------------------------------------


def test_copy_rule_running_min():
    rule = CopyRule("running_min")
    assert rule.reference == 10_000.0
    seq = [10_000.0, 5.0, 7.0, 3.0, 3.0, 2.9, 9_999.0]
    assert [rule.should_copy(v) for v in seq] == [False, True, False, True, False, True, False]
    assert rule.state() == {"rule": "running_min", "reference": 2.9}
    carried = CopyRule("running_min", rule.state())  # carried across epochs / resume
    assert carried.should_copy(2.95) is False and carried.should_copy(2.8) is True


def test_copy_rule_previous():
    rule = CopyRule("previous")
    assert rule.reference == 1_000.0
    seq = [1_000.0, 5.0, 7.0, 6.0, 6.0, 5.5, 2_000.0, 1_500.0]
    # compared with the previous iteration's loss, which is overwritten every time
    assert [rule.should_copy(v) for v in seq] == [False, True, False, True, False, True, False, True]
    assert rule.reference == 1_500.0
    assert CopyRule("previous", {"rule": "previous", "reference": 3.0}).should_copy(2.0) is True


@pytest.mark.parametrize("name, expected", [("every", True), ("none", False), ("once", False)])
def test_copy_rules_every_none_once(name, expected):
    rule = CopyRule(name)
    assert [rule.should_copy(v) for v in (1e9, 5.0, 1.0, 0.0, 3.0)] == [expected] * 5
    assert rule.rule == name


def test_copy_rule_names_are_validated():
    assert set(COPY_RULES) == {"none", "once", "running_min", "previous", "every"}
    with pytest.raises(ValueError, match="copy_rule"):
        CopyRule("sometimes")


def test_seg_index_is_a_pure_uniform_draw_with_replacement():
    draws = [seg_index(5, 3, s) for s in range(200)]
    assert draws == [seg_index(5, 3, s) for s in range(200)]
    assert set(draws) == set(range(5))
    assert draws != [seg_index(5, 4, s) for s in range(200)]
    assert len(set(draws[:6])) < 6 or len(set(draws[:20])) < 20  # with replacement


def _seg_branch(model) -> dict[str, torch.Tensor]:
    """The segmentation box head + predictor of a joint model (or of a bare detector)."""
    heads = getattr(model, "detector", model).roi_heads
    return {**{f"box_head.{k}": v for k, v in heads.box_head.state_dict().items()},
            **{f"box_predictor.{k}": v for k, v in heads.box_predictor.state_dict().items()}}


def _cls_branch(model) -> dict[str, torch.Tensor]:
    return {**{f"box_head.{k}": v for k, v in model.cls_branch["box_head"].state_dict().items()},
            **{f"box_predictor.{k}": v for k, v in model.cls_branch["box_predictor"].state_dict().items()}}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("rule, num_steps", [("every", 2), ("running_min", 3)])
def test_engine_copies_the_pre_step_segmentation_branch(tmp_path, spy, adam_spy, rule, num_steps):
    calls, spy_cls = adam_spy
    spy_cls.snapshot = True
    cfg = config("ssm-2branch-r18-s2", f"train.copy_rule={rule}", f"train.max_steps_per_epoch={num_steps}")
    train_classifier(cfg, tmp_path, progress=False)
    model, initial = spy[0]
    log = steps(tmp_path)
    assert len(log) == num_steps and len(calls) == 2 * num_steps

    # The logged flags replay the rule on the logged L_SEG sequence.
    replay = CopyRule(rule)
    assert [x["copied"] for x in log] == [replay.should_copy(x["seg_loss"]) for x in log]
    assert log[0]["copied"] is True
    if rule == "running_min":
        assert not all(x["copied"] for x in log), "the test needs an iteration that does not copy"

    # The copy happens before the segmentation optimiser step: after training, the
    # classification branch holds the segmentation branch as it was just BEFORE the
    # update of the last iteration that copied (and the branch is otherwise never touched).
    prefix = {id(p): n for n, p in model.named_parameters()}
    last = max(i for i, x in enumerate(log) if x["copied"])
    pre_step = {prefix[i].split("roi_heads.", 1)[1]: t for i, t in calls[2 * last]["before"].items()
                if prefix[i].startswith(("detector.roi_heads.box_head.", "detector.roi_heads.box_predictor."))}
    assert _equal(_cls_branch(model), pre_step)
    assert not _equal(_cls_branch(model), _seg_branch(model))  # not the post-step weights
    if last > 0:  # it is not simply the initial (deep-copied) branch
        initial_seg = {k.split("roi_heads.", 1)[1]: v for k, v in initial.items()
                       if k.startswith(("detector.roi_heads.box_head.", "detector.roi_heads.box_predictor."))}
        assert not _equal(_cls_branch(model), initial_seg)


# ---------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------


def _weights(path):
    return load_checkpoint(path)[0].state_dict()


def test_ctm_time_limit_resume_is_bit_identical(tmp_path, monkeypatch):
    train_classifier(config("ctm-r18-s2", "data.num_samples=3"), tmp_path / "ref", progress=False)
    # "auto" settings are resolved and recorded (spec §4.5: S + BN, eval-mode BN)
    saved = yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())["train"]
    assert (saved["update_rule"], saved["copy_rule"], saved["cls_bn"]) == ("s_bn", "none", "eval")

    clock = iter(range(1000))
    monkeypatch.setattr("ctlesion.engine.loop.time.monotonic", lambda: float(next(clock)))
    # one tick at start, one per batch check: a limit of 2.5 s allows two of the three batches
    first = train_classifier(config("ctm-r18-s2", "data.num_samples=3", "train.time_limit_s=2.5"), tmp_path / "cut",
                             progress=False)
    monkeypatch.undo()
    assert first.stopped_early and first.steps == 2
    assert load_train_state(tmp_path / "cut" / "checkpoint")["batch_pos"] == 2
    done = train_classifier(config("ctm-r18-s2", "data.num_samples=3"), tmp_path / "cut", progress=False, resume=True)
    assert done.steps == 3 and not done.stopped_early
    ref, cut = steps(tmp_path / "ref"), steps(tmp_path / "cut")
    assert [x["samples"] for x in ref] == [x["samples"] for x in cut]
    assert [x["cls_loss"] for x in ref] == [x["cls_loss"] for x in cut]
    wa, wb = _weights(tmp_path / "ref" / "checkpoint"), _weights(tmp_path / "cut" / "checkpoint")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ssm_joint_resume_across_epochs_is_bit_identical(tmp_path):
    extra = ("train.copy_rule=running_min", "train.max_steps_per_epoch=1")
    train_classifier(config("ssm-2branch-r18-s2", "train.epochs=2", *extra), tmp_path / "a", progress=False)
    train_classifier(config("ssm-2branch-r18-s2", "train.epochs=1", *extra), tmp_path / "b", progress=False)
    state = load_train_state(tmp_path / "b" / "checkpoint")
    assert state["copy"]["rule"] == "running_min" and state["copy"]["reference"] < 10_000
    resumed = train_classifier(config("ssm-2branch-r18-s2", "train.epochs=2", *extra), tmp_path / "b",
                               progress=False, resume=True)
    assert resumed.steps == 2 and resumed.epochs_done == 2
    a, b = steps(tmp_path / "a"), steps(tmp_path / "b")
    for key in ("samples", "seg_sample", "seg_loss", "copied", "cls_loss"):
        assert [x[key] for x in a] == [x[key] for x in b], key
    wa, wb = _weights(tmp_path / "a" / "checkpoint"), _weights(tmp_path / "b" / "checkpoint")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "b" / "epoch-0001").is_dir() and (tmp_path / "b" / "epoch-0002").is_dir()


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


def test_non_finite_classification_loss_names_the_samples(tmp_path, monkeypatch):
    real = registry.create_model

    def broken(arg):
        model = real(arg)
        with torch.no_grad():
            model.head.layers[-1].bias[0] = float("nan")
        return model

    monkeypatch.setattr(registry, "create_model", broken)
    with pytest.raises(NonFiniteLossError, match=r"classification loss at epoch 1, step 1, samples \['phantom-0-0000"):
        train_classifier(config("ctm-r18-s2", "train.batch_size=2"), tmp_path, progress=False)


def test_non_finite_segmentation_loss_names_the_sample(tmp_path):
    data = PhantomDataset(2, SIZE, 1, ("cp", "covid"), "merge", 5)
    samples = [data[i] for i in range(2)]
    for s in samples:
        s.image[0, 30, 30] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"segmentation loss at epoch 1, step 1, samples \['phantom-1-"):
        train_classifier(config("ssm-2branch-r18-s2"), tmp_path, progress=False, seg_dataset=ListDataset(samples))


def test_nan_classification_image_raises_naming_the_sample(tmp_path):
    data = PhantomDataset(2, SIZE, 0)
    samples = [data[i] for i in range(2)]
    for s in samples:
        s.image[0, 30, 30] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"samples \['phantom-0-0000"):  # today: DID NOT RAISE
        train_classifier(config("ctm-r18-s2", "train.max_steps_per_epoch=1"), tmp_path, progress=False,
                         dataset=ListDataset(samples))


def test_joint_model_without_seg_data_is_a_clear_error(tmp_path):
    cfg = load_experiment(None, ["model.name=ssm-r18-s2", *SMALL])
    assert cfg.seg_data is None
    with pytest.raises(ValueError, match="seg_data"):
        train_classifier(cfg, tmp_path, progress=False)


def test_labels_outside_the_class_range_are_a_clear_error(tmp_path):
    # A 2-class model on 3-class phantoms (labels 0, 1, 2): refused before training.
    cfg = config("ctm-r18-s2", "model.classifier.class_names=[negative,covid]", "data.phantom_classes=[normal,covid]")
    with pytest.raises(ValueError, match=r"data has 3 classes .*data\.class_map"):
        train_classifier(cfg, tmp_path, progress=False)
    # A dataset that names no classes is checked label by label.
    samples = [PhantomDataset(3, SIZE, 0)[i] for i in range(3)]
    with pytest.raises(ValueError, match=r"label 2 .*data\.class_map"):
        train_classifier(cfg, tmp_path / "b", progress=False, dataset=ListDataset(samples))


def test_a_detector_is_not_a_slice_classifier(tmp_path):
    cfg = load_experiment(None, ["model.name=maskrcnn-r18-s2", *DETECTOR[:2]])
    with pytest.raises(ValueError, match="not a slice classifier"):
        train_classifier(cfg, tmp_path, progress=False)


# ---------------------------------------------------------------------------------------
# "auto" settings
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("ctm-r18-s2", ("s_bn", "none", "eval")),
    ("ctm-r50-fpn", ("s_bn", "none", "eval")),
    ("ssm-2branch-r18-s3", ("s_backbone", "running_min", "eval")),
    ("ssm-r34-s2", ("s_backbone", "none", "eval")),  # single branch: nothing to copy into
])
def test_auto_settings_resolve_per_family(name, expected):
    cfg = load_experiment(None, [f"model.name={name}"])
    assert (cfg.train.update_rule, cfg.train.copy_rule, cfg.train.cls_bn) == ("auto",) * 3
    resolve_auto_settings(cfg)
    assert (cfg.train.update_rule, cfg.train.copy_rule, cfg.train.cls_bn) == expected
    explicit = load_experiment(None, [f"model.name={name}", "train.update_rule=full", "train.copy_rule=every",
                                      "train.cls_bn=batch"])
    resolve_auto_settings(explicit)
    assert (explicit.train.update_rule, explicit.train.copy_rule, explicit.train.cls_bn) == ("full", "every", "batch")
    assert FAMILY_DEFAULTS["ssm"] == ("s_backbone", "running_min", "eval")


def test_auto_settings_refuse_a_detector():
    with pytest.raises(ValueError, match="not a slice classifier"):
        resolve_auto_settings(load_experiment(None, ["model.name=maskrcnn-r18-s2"]))


def test_ssm_config_yaml_records_the_resolved_settings(tmp_path):
    train_classifier(config("ssm-2branch-r18-s2", "train.joint=false", "train.max_steps_per_epoch=1"),
                     tmp_path, progress=False)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]
    assert (saved["update_rule"], saved["copy_rule"], saved["cls_bn"]) == ("s_backbone", "running_min", "eval")
    ckpt = yaml.safe_load((tmp_path / "checkpoint" / "config.yaml").read_text())["train"]
    assert ckpt["update_rule"] == "s_backbone"


# ---------------------------------------------------------------------------------------
# init_from: segmentation checkpoint -> joint model; fine-tuning 3 -> 2 classes
# ---------------------------------------------------------------------------------------


def _segmentation_checkpoint(path):
    cfg = load_experiment(None, ["model.name=ssm-detector-r18-s2", *DETECTOR])
    torch.manual_seed(1234)
    detector = registry.create_model(cfg.model)
    save_checkpoint(path, detector, cfg, epoch=1, step=1)
    return detector


def test_segmentation_checkpoint_fills_the_detector_and_the_copied_branch(tmp_path, spy):
    detector = _segmentation_checkpoint(tmp_path / "seg")
    cfg = config("ssm-2branch-r18-s2", "train.joint=false", "train.update_rule=s_only",
                 "train.copy_rule=running_min", f"train.init_from={tmp_path / 'seg'}",
                 "train.max_steps_per_epoch=1")
    train_classifier(cfg, tmp_path / "run", progress=False)
    model, _ = spy[-1]  # spy[0] is the detector saved above
    report = json.loads((tmp_path / "run" / "init.json").read_text())
    det_state = detector.state_dict()
    assert sorted(report["loaded"]) == sorted(f"detector.{k}" for k in det_state)
    assert report["skipped_shape"] == []
    assert sorted(report["missing"]) == sorted(
        n for n in model.state_dict() if n.startswith(("head.", "cls_branch.")) and "num_batches_tracked" not in n)
    # s_only, eval mode: the detector still holds the checkpoint's weights and statistics
    state = model.state_dict()
    assert all(torch.equal(state[f"detector.{k}"], v) for k, v in det_state.items())
    # a pretrained two-branch model copies the segmentation branch once before training
    assert _equal(_cls_branch(model), _seg_branch(detector))


def test_init_from_checkpoint_direct_call_on_an_ssm(tmp_path):
    detector = _segmentation_checkpoint(tmp_path / "seg")
    model = registry.create_model(config("ssm-r18-s2").model)
    report = init_from_checkpoint(model, tmp_path / "seg")
    assert report["source_model"] == "ssm-detector-r18-s2"
    assert all(torch.equal(model.detector.state_dict()[k], v) for k, v in detector.state_dict().items())
    assert sorted(report["missing"]) == sorted(_params(model, "head."))


def _ctm3_checkpoint(path):
    cfg = config("ctm-r18-s2")
    torch.manual_seed(99)
    model = registry.create_model(cfg.model)
    save_checkpoint(path, model, cfg, epoch=1, step=1, task="classification")
    return model


LAST = ["head.layers.4.weight", "head.layers.4.bias"]


def test_fine_tuning_3_to_2_classes_skips_only_the_last_layer(tmp_path, spy):
    source = _ctm3_checkpoint(tmp_path / "ctm3")
    # phantom labels index (normal, cp, covid): keep normal and covid as classes 0 and 1
    two = ("model.classifier.class_names=[negative,covid]", "data.phantom_classes=[normal,covid]",
           "data.class_map=[0,-1,1]")

    # direct: everything but the last layer equals the source; the last keeps its init
    fresh = registry.create_model(config("ctm-r18-s2", *two).model)
    init_last = {k: fresh.state_dict()[k].clone() for k in LAST}
    report = init_from_checkpoint(fresh, tmp_path / "ctm3")
    assert sorted(report["skipped_shape"]) == sorted(LAST) and sorted(report["missing"]) == sorted(LAST)
    src, new = source.state_dict(), fresh.state_dict()
    assert new["head.layers.4.weight"].shape == (2, 32)
    for k in new:
        if k in LAST:
            assert torch.equal(new[k], init_last[k])
        else:
            assert torch.equal(new[k], src[k]), k

    # through the engine: init.json reports the skipped layer; s_only leaves the detector as loaded
    cfg = config("ctm-r18-s2", *two, "train.update_rule=s_only", f"train.init_from={tmp_path / 'ctm3'}",
                 "train.max_steps_per_epoch=1")
    train_classifier(cfg, tmp_path / "run", progress=False)
    report = json.loads((tmp_path / "run" / "init.json").read_text())
    assert sorted(report["skipped_shape"]) == sorted(LAST)
    assert len(report["loaded"]) == len(src) - 2
    model = spy[-1][0]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in src.items() if k.startswith("detector."))
    assert model.class_names == ("negative", "covid")


def test_init_from_a_checkpoint_that_fits_nothing_is_an_error(tmp_path):
    cfg = config("ctm-r18-s2")
    save_checkpoint(tmp_path / "s", ModuleS(4, 8), cfg, epoch=0, step=0, task="classification")
    with pytest.raises(ValueError, match="no weight of this checkpoint"):
        init_from_checkpoint(registry.create_model(cfg.model), tmp_path / "s")


# ---------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------

METRIC_KEYS = {"sensitivity", "ppv", "overall_accuracy", "f1_weighted", "f1_macro", "roc_auc",
               "confusion_matrix", "class_names"}


@pytest.mark.parametrize("cls_bn", ["eval", "batch"])
def test_evaluation_is_repeatable_and_leaves_the_model_alone(cls_bn):
    # At most 10 proposals x 1 class < 16 rows: every batch is padded (random run lengths).
    cfg = config("ssm-2branch-r18-s2", "model.detector.rpn_post_nms_top_n_test=10")
    model = registry.create_model(cfg.model)
    model.train()
    model.detector.rpn.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    data = PhantomDataset(3, SIZE, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    metrics, records = evaluate_classifier(model, data, torch.device("cpu"), cls_bn=cls_bn, progress=False)
    assert METRIC_KEYS <= set(metrics)
    assert metrics["class_names"] == ["normal", "cp", "covid"]
    assert len(metrics["confusion_matrix"]) == 3 and sum(map(sum, metrics["confusion_matrix"])) == 3
    assert metrics["settings"]["padding_seed"] == 0 and metrics["settings"]["cls_bn"] == cls_bn
    assert [r["label"] for r in records] == [0, 1, 2]
    again = evaluate_classifier(model, data, torch.device("cpu"), cls_bn=cls_bn, progress=False)
    assert again == (metrics, records)

    # nothing changed: weights, BN running statistics, modes, global RNG, padding source
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.padding_generator is None

    # the padding really is random and really is seeded
    outs = list(run_classifier(model, [[data[0]]], torch.device("cpu"), cls_bn=cls_bn, seed=0, progress=False))
    assert outs[0][2]["num_survivors"] < ROIS
    assert torch.equal(outs[0][1], torch.tensor(list(records[0]["probabilities"].values())))
    other = list(run_classifier(model, [[data[0]]], torch.device("cpu"), cls_bn=cls_bn, seed=1, progress=False))
    assert not torch.equal(other[0][1], outs[0][1])


def test_batch_statistics_scoring_leaves_every_buffer_alone():
    model = registry.create_model(config("ssm-r18-s2").model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate_classifier(model, PhantomDataset(2, SIZE, 0), torch.device("cpu"), cls_bn="batch", progress=False)
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def test_ssm_joint_trains_with_classification_batches_of_two(tmp_path):
    # Batches larger than the papers' 1 (issue 11): each iteration, one segmentation slice,
    # then the classification step over two slices.
    result = train_classifier(config("ssm-2branch-r18-s2", "train.batch_size=2"), tmp_path, progress=False)
    log = steps(tmp_path)
    assert result.steps == 2 == len(log)                  # 4 phantom slices in batches of 2
    assert all(len(x["samples"]) == 2 and "seg_loss" in x and x["cls_loss"] > 0 for x in log)
    assert len({s for x in log for s in x["samples"]}) == 4
