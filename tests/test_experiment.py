"""Config resolution and versions: a config written by an earlier ctlesion still loads,
newer or unknown versions are refused clearly, upgraders run in order."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import ctlesion.experiment as experiment
from ctlesion.config import CONFIG_VERSION, ConfigError, ExperimentConfig
from ctlesion.engine.io import save_config
from ctlesion.experiment import experiment_from_dict, load_experiment, upgrade_config
from ctlesion.registry import count_parameters, create_model

DATA = Path(__file__).parent / "data"


def test_a_config_saved_before_versions_existed_loads_and_builds_its_model():
    # config.yaml of a checkpoint written at commit 44fb6c9 (converted author SSM): no version key
    data = yaml.safe_load((DATA / "config_v1_ssm-2branch-r18-s3.yaml").read_text())
    assert "version" not in data
    cfg = experiment_from_dict(data)
    assert cfg.version == CONFIG_VERSION
    assert cfg.model.name == "ssm-2branch-r18-s3" and cfg.model.detector.rpn_min_size == 0.0
    assert count_parameters(create_model(cfg.model)) == 8_267_759  # the author's SSM (fixture README)


def test_saved_configs_carry_the_version_and_round_trip(tmp_path):
    cfg = load_experiment(None, ["model.name=maskrcnn-r18-s2", "train.epochs=3"])
    save_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data["version"] == CONFIG_VERSION
    assert experiment_from_dict(data) == cfg


def test_a_newer_config_version_is_refused():
    with pytest.raises(ConfigError, match="newer than this ctlesion"):
        upgrade_config({"version": CONFIG_VERSION + 1}, "x.yaml")


def test_upgraders_run_in_order(monkeypatch):
    def rename(data):                       # a hypothetical v1 -> v2 field rename
        data.setdefault("train", {})["epochs"] = data.get("train", {}).pop("num_epochs")

    monkeypatch.setattr(experiment, "CONFIG_VERSION", 2)
    monkeypatch.setattr(experiment, "UPGRADERS", {1: rename})
    upgraded = upgrade_config({"train": {"num_epochs": 7}})
    assert upgraded == {"train": {"epochs": 7}, "version": 2}
    monkeypatch.setattr(experiment, "UPGRADERS", {})
    with pytest.raises(ConfigError, match="no upgrade from config version 1"):
        upgrade_config({"train": {}})


def test_yaml_files_are_upgraded_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: maskrcnn-r18-s2}\ntrain: {epochs: 2}\n")
    assert load_experiment(path).train.epochs == 2
    path.write_text(f"version: {CONFIG_VERSION + 5}\n")
    with pytest.raises(ConfigError, match="newer"):
        load_experiment(path)
    assert ExperimentConfig().version == CONFIG_VERSION


def test_config_choices_are_the_tables_the_code_uses():
    import typing

    from ctlesion.config import BackboneConfig, ClassifierConfig, DataConfig, DetectorConfig, TrainConfig
    from ctlesion.data.factory import FORMATS
    from ctlesion.data.masks import MASK_TYPES
    from ctlesion.engine.steps import COPY_RULES, FAMILY_DEFAULTS
    from ctlesion.models.backbones import ARCHS
    from ctlesion.models.classifier import UPDATE_RULES
    from ctlesion.models.cnn import CNN_ARCHS
    from ctlesion.models.rcnn_classifier import ROI_ORDERS
    from ctlesion.models.rcnn_parts import DETECTION_FILTERS

    def choices(cls, key):
        return set(typing.get_args(typing.get_type_hints(cls)[key]))

    assert choices(DetectorConfig, "mask_type") == set(MASK_TYPES)
    assert choices(DetectorConfig, "detection_filter") == set(DETECTION_FILTERS)
    assert choices(BackboneConfig, "arch") == set(ARCHS)
    assert choices(ClassifierConfig, "cnn_arch") == set(CNN_ARCHS)
    assert choices(ClassifierConfig, "roi_order") == set(ROI_ORDERS)
    assert choices(ClassifierConfig, "kind") == set(FAMILY_DEFAULTS) | {"none"}
    assert choices(DataConfig, "format") == set(FORMATS)
    assert choices(TrainConfig, "update_rule") == set(UPDATE_RULES) | {"auto"}
    assert choices(TrainConfig, "copy_rule") == set(COPY_RULES) | {"auto"}


def test_a_misspelt_option_fails_when_the_config_loads_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"train\.copy_rule: 'runing_min' is not one of .*did you mean 'running_min'"):
        load_experiment(None, ["train.copy_rule=runing_min"])
    with pytest.raises(ConfigError, match="model.backbone.arch"):
        load_experiment(None, ["model.backbone.arch=resnet101"])
