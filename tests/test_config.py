"""Typed configs: YAML presets resolve, bad keys and values fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ctlesion.config import ConfigError, ExperimentConfig, apply_overrides, to_dict
from ctlesion.experiment import experiment_from_dict, load_experiment
from ctlesion.demo import demo_config
from ctlesion.registry import list_models

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_preset_resolves_to_a_registered_model(path):
    cfg = load_experiment(path)
    assert cfg.model.name in list_models()
    # The paper presets keep the papers' optimiser unless the file says otherwise.
    raw = yaml.safe_load(path.read_text())
    assert cfg.train.lr == float(raw.get("train", {}).get("lr", 1e-5))


def test_preset_overrides_only_what_it_states():
    cfg = load_experiment(CONFIGS[0].parent / "ctm_seg_r50_fpn.yaml")
    # From the registry entry (not in the YAML):
    assert cfg.model.detector.mask_head_layers == [256, 256, 256, 256]
    assert cfg.model.backbone.fpn == "full"
    # From the YAML:
    assert cfg.data.format == "cncb" and cfg.train.epochs == 100


def test_ssm_preset_uses_the_ssm_code_sampling():
    cfg = load_experiment(CONFIGS[0].parent / "ssm_seg_r18_s3.yaml")
    d = cfg.model.detector
    assert (d.box_fg_iou_thresh, d.box_batch_size_per_image, d.box_positive_fraction) == (0.5, 512, 0.25)
    assert (d.rpn_pre_nms_top_n_test, d.rpn_post_nms_top_n_test) == (2000, 1000)


@pytest.mark.parametrize(
    "override, getter, expected",
    [
        ("train.lr=1e-4", lambda c: c.train.lr, 1e-4),
        ("train.epochs=3", lambda c: c.train.epochs, 3),
        ("model.detector.anchor_sizes=[4, 8]", lambda c: c.model.detector.anchor_sizes, [4, 8]),
        ("data.split=null", lambda c: c.data.split, None),
        ("train.skip_negatives=false", lambda c: c.train.skip_negatives, False),
        ("eval.score_thresh=1", lambda c: c.eval.score_thresh, 1.0),
    ],
)
def test_overrides_are_typed(override, getter, expected):
    cfg = apply_overrides(ExperimentConfig(), [override])
    assert getter(cfg) == expected
    assert type(getter(cfg)) is type(expected)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrate=1", "train.lrate"),
        ("train.epochs=many", "train.epochs"),
        ("train.skip_negatives=3", "train.skip_negatives"),
        ("model.detector.anchor_sizes=4", "anchor_sizes"),
        ("no_equals_sign", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(ExperimentConfig(), [override])


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.epochz"):
        load_experiment(path)


def test_model_name_override_switches_registry_defaults():
    cfg = load_experiment(None, ["model.name=maskrcnn-r50-fpn"])
    assert cfg.model.backbone.arch == "resnet50" and cfg.model.backbone.fpn == "full"


def test_resolved_config_round_trips_through_yaml():
    cfg = load_experiment(CONFIGS[0].parent / "ssm_seg_r18_s3.yaml", ["train.epochs=7"])
    again = experiment_from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


def test_demo_yaml_matches_the_demo():
    """configs/demo_segmentation.yaml documents what `ctlesion demo` runs: keep them equal."""
    assert load_experiment(CONFIGS[0].parent / "demo_segmentation.yaml") == demo_config()
