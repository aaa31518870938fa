"""Backbones and detectors: shapes, the papers' architecture choices, one training step per preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ctlesion.config import BackboneConfig
from ctlesion.experiment import load_experiment
from ctlesion.models.backbones import build_backbone
from ctlesion.registry import count_parameters, create_model, default_model_config, list_models

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# Segmentation presets (the classifier presets are exercised in test_presets.py).
PAPER_PRESETS = sorted(p for p in CONFIG_DIR.glob("*.yaml")
                       if not p.stem.startswith("demo") and p.stem.startswith(("ctm_seg", "ssm_seg", "semiseg")))


@pytest.mark.parametrize(
    "arch, stages, fpn, expected",
    [
        ("resnet18", 2, "single", {"0": (256, 8, 8)}),
        ("resnet18", 3, "single", {"0": (256, 4, 4)}),
        ("resnet18", 4, "single", {"0": (256, 2, 2)}),
        ("resnet34", 3, "single", {"0": (256, 4, 4)}),
        ("resnet50", 3, "single", {"0": (256, 4, 4)}),
        ("resnext50_32x4d", 2, "single", {"0": (256, 8, 8)}),
        ("resnet50", 4, "full", {"0": (256, 16, 16), "1": (256, 8, 8), "2": (256, 4, 4), "3": (256, 2, 2)}),
    ],
)
def test_backbone_output_shapes(arch, stages, fpn, expected):
    backbone = build_backbone(BackboneConfig(arch=arch, stages=stages, fpn=fpn)).eval()
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 64, 64))
    # No extra max-pool level ("pool"): the papers' FPN has none (spec §11.1).
    assert {k: tuple(v.shape[1:]) for k, v in features.items()} == expected


@pytest.mark.parametrize("stages", [2, 3])
def test_truncated_stages_are_not_built(stages):
    body = build_backbone(BackboneConfig(stages=stages)).body
    names = {n for n, _ in body.named_children()}
    assert f"layer{stages}" in names
    assert not any(f"layer{i}" in names for i in range(stages + 1, 5))


def test_batchnorm_is_trainable_not_frozen():
    backbone = build_backbone(BackboneConfig())
    norms = [m for m in backbone.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)
    assert all(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("bad", [dict(stages=5), dict(arch="vgg16"), dict(fpn="full", stages=3), dict(fpn="x")])
def test_backbone_config_errors(bad):
    with pytest.raises(ValueError):
        build_backbone(BackboneConfig(**bad))


def test_imagenet_weights_load_from_a_local_file(tmp_path):
    from torchvision.models import resnet18
    from safetensors.torch import save_file

    reference = resnet18()
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    backbone = build_backbone(BackboneConfig(weights=str(path)))
    assert torch.equal(backbone.body.conv1.weight, reference.conv1.weight)
    bad = tmp_path / "bad.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="bad.safetensors"):
        build_backbone(BackboneConfig(weights=str(bad)))


def test_detector_uses_the_papers_heads():
    model = create_model("maskrcnn-r18-s3")
    assert model.rpn.anchor_generator.num_anchors_per_location() == [30]
    assert model.rpn.head.cls_logits.out_channels == 30
    assert model.roi_heads.box_head.fc7.out_features == 128
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 4 * 2  # merge: bg + lesion
    convs = [m for m in model.roi_heads.mask_head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(256, 128)]
    assert model.roi_heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    full = create_model("maskrcnn-r50-fpn")
    assert full.rpn.anchor_generator.num_anchors_per_location() == [30] * 4
    convs = [m for m in full.roi_heads.mask_head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4


def _s_params(n: int = 128, f: int = 512) -> int:
    # Module S of spec §4.3: Linear(5N->F), Linear(F->F), Linear(F->3), with biases.
    return (5 * n * f + f) + (f * f + f) + (f * 3 + 3)


@pytest.mark.parametrize(
    "name, paper_millions",
    [("ssm-detector-r18-s2", 4.51), ("ssm-detector-r18-s3", 6.64),
     ("ssm-detector-r34-s2", 5.17), ("ssm-detector-r34-s3", 12.04)],
)
def test_ssm_detector_plus_s_matches_ssm_paper_table1(name, paper_millions):
    """SSM paper 001 Table 1 single-branch totals = detector + module S (spec §5.4)."""
    total = count_parameters(create_model(name)) + _s_params()
    assert abs(total / 1e6 - paper_millions) / paper_millions < 0.01


def test_ctm_r34_truncated_matches_readme_count():
    # The CTM README quotes 11.45M parameters for the lightweight R34 truncation-1 model.
    assert abs(count_parameters(create_model("maskrcnn-r34-s3")) / 1e6 - 11.45) < 0.02


def test_registry_names_and_errors():
    names = list_models()
    assert {"maskrcnn-r50-fpn", "maskrcnn-r18-s3", "ssm-detector-r18-s3", "maskrcnn-x101-s4"} <= set(names)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("maskrcnn-r19-s3")


def _small(cfg, size=64):
    cfg.model.detector.min_size = size
    cfg.model.detector.max_size = size
    return cfg


def _lesion_target(size=64):
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[0, 10:30, 8:28] = 1
    masks[1, 40:52, 36:60] = 1
    return {"boxes": torch.tensor([[8.0, 10, 28, 30], [36, 40, 60, 52]]),
            "labels": torch.tensor([1, 1]), "masks": masks}


def _negative_target(size=64):
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, size, size, dtype=torch.uint8)}


@pytest.mark.parametrize("path", PAPER_PRESETS, ids=[p.stem for p in PAPER_PRESETS])
def test_one_training_step_per_preset_with_and_without_lesions(path):
    cfg = _small(load_experiment(path))
    model = create_model(cfg.model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    image = torch.rand(1, 64, 64)
    expected = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}

    losses = model([image], [_lesion_target()])
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    before = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(before, model.roi_heads.box_predictor.cls_score.weight)

    # A lesion-free slice is a valid sample: no box or mask regression loss (torchvision contract).
    optimizer.zero_grad()
    losses = model([image], [_negative_target()])
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_mask"].item() == 0.0
    assert losses["loss_classifier"].item() > 0.0
    sum(losses.values()).backward()


@pytest.mark.parametrize("height, width", [(64, 64), (70, 90), (97, 61)])
def test_eval_output_contract_on_grey_odd_sized_input(height, width):
    model = create_model(_small(load_experiment(None, ["model.name=maskrcnn-r18-s2"])).model).eval()
    with torch.no_grad():
        (out,) = model([torch.rand(1, height, width)])
    k = len(out["boxes"])
    assert out["masks"].shape == (k, 1, height, width)
    assert out["labels"].dtype == torch.int64 and out["scores"].shape == (k,)
    if k:
        assert float(out["masks"].min()) >= 0.0 and float(out["masks"].max()) <= 1.0
        assert float(out["boxes"][:, 2].max()) <= width and float(out["boxes"][:, 3].max()) <= height


def test_every_registered_model_builds_with_its_class_names():
    for name in list_models():
        cfg = default_model_config(name)
        assert cfg.name == name
    model = create_model(load_experiment(None, ["model.detector.mask_type=both"]).model)
    assert model.class_names == ("GGO", "C")
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
