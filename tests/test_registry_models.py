"""Every family of the registry, timm style: the model builds from its name, runs one
training forward and backward at 64 px, and every trainable parameter receives a gradient
(from the segmentation losses, the classification loss, or both for the joint models).

One model per family and backbone kind (basic-block ResNet, bottleneck ResNet, ResNeXt,
DenseNet) keeps the suite fast; every registered name is at least built on the meta device.
"""

from __future__ import annotations

import pytest
import torch

from ctlesion.data.phantom import PhantomDataset
from ctlesion.experiment import load_experiment
from ctlesion.models.rcnn_classifier import one_hot_bce
from ctlesion.registry import create_model, get_entry, list_models

SIZE = 64
SMALL_DETECTOR = [
    f"model.detector.min_size={SIZE}", f"model.detector.max_size={SIZE}",
    "model.detector.rpn_pre_nms_top_n_test=100", "model.detector.rpn_post_nms_top_n_test=50",
    "model.detector.rpn_pre_nms_top_n_train=100", "model.detector.rpn_post_nms_top_n_train=50",
    "model.detector.box_batch_size_per_image=16", "model.detector.representation_size=16",
]
REPRESENTATIVES = [
    "maskrcnn-r18-s2", "maskrcnn-r34-s3", "maskrcnn-r50-fpn", "maskrcnn-x50-s3", "ssm-detector-r18-s2",
    "ctm-r18-s2", "ctm-r50-fpn", "ssm-r18-s2", "ssm-2branch-r34-s2",
    "affinity-r18", "attention-r18", "lstm1-r18", "lstm2-r18",
    "cnn-resnet18", "cnn-densenet121",
]
# The classification loss never reaches the RPN (proposals are detached, spec §10 #11),
# and CTM's detector is never trained on segmentation: its RPN gets no gradient by design.
# In the mask-feature models the classification branch's box part only selects the RoIs
# (scores, NMS, decoded boxes: no gradient path); it is a copy of the segmentation branch.
_SELECTION_ONLY = ("cls_branch.box_head.", "cls_branch.box_predictor.")
NO_GRADIENT_BY_DESIGN = {"ctm": ("detector.rpn.",), "affinity": _SELECTION_ONLY, "attention": _SELECTION_ONLY,
                         "lstm1": _SELECTION_ONLY, "lstm2": _SELECTION_ONLY}
# At 64 px every RoI maps to the finest FPN level (torchvision's level mapper: 224 px per
# level 4), so CTM's box head reads level 0 only; the RPN (trained only in segmentation)
# sees every level. The four-level model's coarser output convs get no classification gradient here.
SMALL_IMAGE_ONLY_LEVEL_0 = {"ctm-r50-fpn": tuple(f"detector.backbone.fpn.layer_blocks.{i}." for i in (1, 2, 3))}


def _model(name: str):
    kind = name.split("-")[0]
    extra = [] if kind == "cnn" else list(SMALL_DETECTOR)
    if kind in ("ctm", "ssm"):
        extra += ["model.classifier.rois=8", "model.classifier.s_features=16"]
    if kind == "cnn":
        extra += [f"model.classifier.input_size={SIZE}"]
    cfg = load_experiment(None, [f"model.name={name}", *extra])
    return create_model(cfg.model), cfg


def _sample():
    return next(s for s in PhantomDataset(4, SIZE, 3, ["covid"], "merge", 5) if len(s.target["boxes"]))


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_builds_runs_and_every_trainable_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model, cfg = _model(name)
    task = get_entry(name).task
    sample = _sample()
    got = set()

    def collect():
        got.update(n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0)
        model.zero_grad(set_to_none=True)

    if task in ("segmentation", "joint"):
        model.train()
        losses = (model.segmentation_losses if task == "joint" else model)([sample.image], [sample.target])
        assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
        sum(losses.values()).backward()
        collect()
    if task in ("classification", "joint"):
        model.classification_mode("batch" if name.startswith(("cnn", "attention", "lstm")) else "eval")
        out = model([sample.image, sample.image])
        assert out.logits.shape == (2, len(cfg.model.classifier.class_names))
        one_hot_bce(out.logits, torch.tensor([2, 1])).backward()
        collect()
    skip = NO_GRADIENT_BY_DESIGN.get(name.split("-")[0], ()) + SMALL_IMAGE_ONLY_LEVEL_0.get(name, ())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(skip)}
    assert trainable - got == set()


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert get_entry(name).task in ("segmentation", "classification", "joint")
