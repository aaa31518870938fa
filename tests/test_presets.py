"""Classifier presets (spec §10.1): every one resolves, names a registered classifier, and
trains one classification step at toy size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctlesion.experiment import load_experiment
from ctlesion.engine.steps import resolve_auto_settings
from ctlesion.models.classifier import UPDATE_RULES, trainable_names
from ctlesion.models.rcnn_classifier import one_hot_bce
from ctlesion.registry import create_model, get_entry

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CLASSIFIER_PRESETS = sorted(
    p for p in CONFIG_DIR.glob("*.yaml") if p.stem.startswith(("ctm_cls", "ssm_r", "affinity", "attention",
                                                               "lstm", "cnn"))
)


def test_every_paper_variant_has_a_preset():
    assert len(SMALL_PRESETS) == len(STEP_PRESETS)
    stems = {p.stem for p in CLASSIFIER_PRESETS}
    for backbone in ("r50_fpn", "r18_s3", "r34_s3"):
        for mode in ("s_only", "s_bn", "full"):
            assert f"ctm_cls_{backbone}_{mode}" in stems
    for arch in ("r18", "r34"):
        for stages in (2, 3):
            for variant in ("single", "two_branch", "scratch"):
                assert f"ssm_{arch}_s{stages}_{variant}" in stems
    for c in (8, 16, 32, 64):
        assert f"affinity_r18_c{c}" in stems
    for family in ("attention", "lstm1", "lstm2"):
        for arch in ("r18", "r34", "r50", "x50", "x101"):
            assert f"{family}_{arch}" in stems
    for arch in ("resnet18", "resnext50", "resnext101", "densenet121", "densenet169"):
        assert f"cnn_{arch}" in stems


# One training step per family and variant; the other presets differ only in backbone
# (built and counted in test_models / test_ctm_ssm) and are resolved above.
STEP_PRESETS = ("ctm_cls_r18_s3_s_only", "ctm_cls_r18_s3_s_bn", "ctm_cls_r18_s3_full", "ssm_r18_s2_single",
                "ssm_r18_s2_two_branch", "ssm_r18_s2_scratch", "affinity_r18_c8", "cnn_resnet18")


@pytest.mark.parametrize("path", CLASSIFIER_PRESETS, ids=[p.stem for p in CLASSIFIER_PRESETS])
def test_classifier_preset_resolves(path):
    cfg = load_experiment(path)
    assert get_entry(cfg.model.name).task in ("classification", "joint")
    resolve_auto_settings(cfg)
    assert cfg.train.update_rule in UPDATE_RULES
    assert cfg.train.cls_bn in ("eval", "batch")
    if path.stem.startswith("ssm_") and path.stem.endswith(("two_branch", "scratch")):
        assert cfg.model.classifier.branch == "separate"
        assert cfg.train.copy_rule == ("once" if path.stem.endswith("two_branch") else "running_min")
    if get_entry(cfg.model.name).task == "joint":
        assert cfg.seg_data is not None, "a joint model's preset needs seg_data"


SMALL_PRESETS = [p for p in CLASSIFIER_PRESETS if p.stem in STEP_PRESETS]


@pytest.mark.parametrize("path", SMALL_PRESETS, ids=[p.stem for p in SMALL_PRESETS])
def test_classifier_preset_trains_one_step(path):
    cfg = load_experiment(path)
    resolve_auto_settings(cfg)
    cfg.model.detector.min_size = cfg.model.detector.max_size = 64
    cfg.model.classifier.input_size = 64
    model = create_model(cfg.model)
    model.classification_mode(cfg.train.cls_bn)
    logits = model([torch.rand(1, 64, 64), torch.rand(1, 64, 64)]).logits
    assert logits.shape == (2, len(cfg.model.classifier.class_names))
    one_hot_bce(logits, torch.tensor([0, 2])).backward()
    trainable = trainable_names(model, cfg.train.update_rule, cfg.train.bn_params)
    head = [n for n, p in model.named_parameters() if n in trainable and p.grad is not None]
    assert head, "the classification loss reaches no trainable parameter"
