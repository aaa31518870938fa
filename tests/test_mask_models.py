"""The mask-feature models as whole models (spec §6.1, §7.1): sizes against paper 004,
the classification branch's copy of box and mask parts, RoI ordering, one joint step per
family, and frozen parameters."""

from __future__ import annotations

import pytest
import torch

from ctlesion.config import DataConfig, ExperimentConfig, TrainConfig
from ctlesion.engine.train import train_classifier
from ctlesion.models.roi_batch import distance_order
from ctlesion.registry import count_parameters, create_model, default_model_config

SIZE = 64


@pytest.mark.parametrize("name, paper_m", [("lstm2-r18", 23), ("attention-r50", 35), ("lstm2-x101", 99)])
def test_model_size_matches_paper_004_within_1m(name, paper_m):
    with torch.device("meta"):  # counts without allocating or initialising 99M weights
        model = create_model(name)
    assert abs(count_parameters(model) / 1e6 - paper_m) < 1.0


@pytest.mark.parametrize("name, beta, order, classes", [
    ("affinity-r18", 8, "confidence", ("GGO+C",)),
    ("attention-r18", 16, "distance", ("lung", "GGO", "C")),
    ("lstm2-r18", 16, "distance", ("lung", "GGO", "C")),
])
def test_registry_defaults_follow_the_code(name, beta, order, classes):
    cfg = default_model_config(name)
    assert cfg.classifier.rois == beta and cfg.classifier.roi_nms_thresh == 0.25
    assert cfg.classifier.roi_order == order
    assert cfg.detector.normalization == "per_image"
    model = create_model(name)
    assert len(model.lesion_class_names) == len(classes)
    assert model.uses_mask_features and model.cls_branch is not None


def _small(name):
    cfg = default_model_config(name)
    cfg.detector.min_size = cfg.detector.max_size = SIZE
    return cfg


def test_copy_covers_box_and_mask_parts():
    model = create_model(_small("affinity-r18"))
    with torch.no_grad():
        for p in model.cls_branch.parameters():
            p.add_(1.0)
    heads = model.detector.roi_heads
    assert not torch.equal(model.cls_branch["box_head"].fc6.weight, heads.box_head.fc6.weight)
    assert model.copy_segmentation_branch()
    assert torch.equal(model.cls_branch["box_head"].fc6.weight, heads.box_head.fc6.weight)
    assert torch.equal(model.cls_branch["box_predictor"].bbox_pred.bias, heads.box_predictor.bbox_pred.bias)
    assert torch.equal(model.cls_branch["mask_branch"].mask_fcn1.weight, heads.mask_head[0][0].weight)
    assert torch.equal(model.cls_branch["mask_branch"].conv5_mask.weight, heads.mask_predictor.conv5_mask.weight)


def test_forward_orders_rois_by_distance_and_returns_weights():
    model = create_model(_small("lstm2-r18"))
    model.classification_mode("batch")
    out = model([torch.rand(1, SIZE, SIZE)])
    rois = out.rois[0]
    assert out.logits.shape == (1, 3)
    assert rois["boxes"].shape == (16, 4) and rois["weights"].shape == (16,)
    # ascending distance of the top-left corner from the origin
    d = rois["boxes"][:, 0] ** 2 + rois["boxes"][:, 1] ** 2
    assert torch.all(d[1:] >= d[:-1] - 1e-4)
    assert torch.allclose(rois["weights"].sum(), torch.tensor(1.0), atol=1e-5)  # softmax attention


def test_distance_order_is_applied_after_selection():
    boxes = torch.tensor([[30.0, 30, 40, 40], [0, 5, 10, 10], [5, 0, 9, 9], [1, 1, 2, 2]])
    assert distance_order(boxes).tolist() == [3, 1, 2, 0]


def _joint_cfg(name, **train):
    data = DataConfig(format="phantom", num_samples=2, phantom_size=SIZE, seed=1, min_area=10)
    seg = DataConfig(format="phantom", num_samples=2, phantom_size=SIZE, seed=2, min_area=10,
                     phantom_classes=["covid", "cp"])
    return ExperimentConfig(model=_small(name), data=data, seg_data=seg,
                            train=TrainConfig(epochs=1, lr=1e-3, save_every=1, **train))


@pytest.mark.parametrize("name", ["affinity-r18", "attention-r18", "lstm1-r18", "lstm2-r18"])
def test_one_joint_step_per_family_respects_update_rule(name, tmp_path, monkeypatch):
    """One segmentation + one classification step; the RPN and the classification branch
    get no update from the classification loss (grad None), and the head learns."""
    import ctlesion.registry as registry

    built = {}
    create = registry.create_model

    def spy(cfg):
        built["model"] = model = create(cfg)
        built["before"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        return model

    monkeypatch.setattr(registry, "create_model", spy)
    cfg = _joint_cfg(name, copy_rule="none", max_steps_per_epoch=1)
    result = train_classifier(cfg, tmp_path, progress=False)
    assert result.steps == 1
    model, before = built["model"], built["before"]
    after = dict(model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("head.") for k in changed)
    assert not any(k.startswith("cls_branch.") for k in changed), "copy_rule none: the branch must not move"
    # the family's code setting: the LSTM code runs the backbone BN on batch statistics
    assert cfg.train.cls_bn == ("eval" if name == "affinity-r18" else "batch")
    assert cfg.train.update_rule == "s_backbone"


def test_code_faithful_flags_change_the_model():
    base = default_model_config("affinity-r18")
    base.classifier.shared_refinement = True
    base.classifier.extra_conv = True
    model = create_model(base)
    branch = model.cls_branch["mask_branch"]
    assert branch.conv_reduce is not None and not branch.conv_reduce.weight.requires_grad
    plain = create_model("affinity-r18")
    assert count_parameters(model) != count_parameters(plain)

    lstm = default_model_config("lstm2-r18")
    lstm.classifier.eq16_linear = False
    assert count_parameters(create_model(lstm)) < count_parameters(create_model("lstm2-r18"))
