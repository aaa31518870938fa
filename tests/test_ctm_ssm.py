"""COVID-CT-Mask-Net stage 2 and the Single-Shot Model (spec §4.3-4.5, §5.1, §5.3-5.4):
module S, the loss, the registry's parameter counts, the forward contract, modes, the
weight copy and the update rules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ctlesion.experiment import load_experiment
from ctlesion.models.classifier import UPDATE_RULES, ClassifierOutput, trainable_names
from ctlesion.models.ctm import ModuleS
from ctlesion.models.rcnn_classifier import RCNNSliceClassifier, one_hot_bce
from ctlesion.models.roi_batch import RoIBatch
from ctlesion.registry import count_parameters, create_model, default_model_config, get_entry, list_models

SIZE = 64


def s_params(n: int, f: int, c: int = 3) -> int:
    """Module S of spec §4.3: Linear(5N->F), Linear(F->F), Linear(F->C), all with biases."""
    return (5 * n * f + f) + (f * f + f) + (f * c + c)


def small(name: str, *extra: str) -> RCNNSliceClassifier:
    cfg = load_experiment(None, [
        f"model.name={name}", f"model.detector.min_size={SIZE}", f"model.detector.max_size={SIZE}",
        "model.detector.rpn_pre_nms_top_n_test=200", "model.detector.rpn_post_nms_top_n_test=60",
        "model.classifier.rois=32", "model.classifier.s_features=32", "model.backbone.out_channels=64",
        "model.detector.representation_size=32", *extra,
    ])
    return create_model(cfg.model)


def _perturb(module: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------
# module S
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, f, millions", [(128, 512, 0.592), (256, 1024, 2.36)])
def test_module_s_parameter_count(n, f, millions):
    s = ModuleS(n, f)
    assert count_parameters(s) == s_params(n, f)
    assert round(count_parameters(s) / 1e6, 3 if millions < 1 else 2) == millions
    shapes = [tuple(m.weight.shape) for m in s.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(f, 5 * n), (f, f), (3, f)]


def test_module_s_rejects_a_batch_of_the_wrong_shape():
    s = ModuleS(4, 8)
    for bad in (torch.zeros(5, 5), torch.zeros(4, 4), torch.zeros(20)):
        with pytest.raises(ValueError, match=r"\[4, 5\]"):
            s(bad)
    logits, weights = s(torch.zeros(4, 5))
    assert logits.shape == (3,) and weights is None


def test_module_s_init_is_kaiming_normal_fan_out():
    s = ModuleS(128, 512)
    linears = [m for m in s.modules() if isinstance(m, nn.Linear)]
    for lin in linears:
        fan_out, fan_in = lin.weight.shape
        expected = math.sqrt(2.0 / fan_out)  # fan_out mode, ReLU gain
        assert abs(lin.weight.std().item() / expected - 1) < 0.15, (lin, lin.weight.std().item(), expected)
        assert abs(lin.weight.mean().item()) < 0.2 * expected
        # biases: PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert lin.bias.abs().max().item() <= 1 / math.sqrt(fan_in)
    # the last layer (3 outputs) is far wider than the default init would give
    assert linears[-1].weight.std().item() > 0.5


def test_module_s_flattens_row_major():
    torch.manual_seed(3)
    s = ModuleS(4, 16).eval()
    rows = torch.randn(4, 5)
    logits, _ = s(rows)
    l1, l2, l3 = [m for m in s.modules() if isinstance(m, nn.Linear)]
    x = torch.cat([rows[0], rows[1], rows[2], rows[3]])  # row 0's five numbers first
    ref = l3(torch.relu(l2(torch.relu(l1(x)))))
    torch.testing.assert_close(logits, ref)
    # the rank of a row matters: permuting rows (or reading column-major) changes the output
    assert not torch.allclose(s(rows[[1, 0, 2, 3]])[0], logits)
    assert not torch.allclose(l3(torch.relu(l2(torch.relu(l1(rows.t().reshape(-1)))))), logits)
    # an RoIBatch is read through its rows
    batch = RoIBatch(rows, torch.zeros(4, 4), torch.ones(4, dtype=torch.int64), 4)
    assert torch.equal(s(batch)[0], logits)


def test_one_hot_bce_is_the_full_binary_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.8, 1.5]])
    labels = torch.tensor([0, 2])
    target = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    loss = one_hot_bce(logits, labels)
    torch.testing.assert_close(loss, nn.BCEWithLogitsLoss()(logits, target))
    by_hand = -sum(math.log(1 / (1 + math.exp(-v))) if t else math.log(1 - 1 / (1 + math.exp(-v)))
                   for row, trow in zip(logits.tolist(), target.tolist()) for v, t in zip(row, trow)) / 6
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # paper 002 Eq. 2 keeps only the positive terms: a different number
    positive_only = -torch.nn.functional.logsigmoid(logits[torch.arange(2), labels]).mean()
    assert abs(loss.item() - positive_only.item()) > 1e-3
    assert one_hot_bce(torch.zeros(1, 2), torch.tensor([1])).item() == pytest.approx(math.log(2))


# ---------------------------------------------------------------------------------------
# registry: names, parameter counts (paper 001 Table 1, spec §5.4), CTM detector
# ---------------------------------------------------------------------------------------

SSM_TABLE = [
    ("ssm-r18-s2", 4.51), ("ssm-r18-s3", 6.64), ("ssm-r34-s2", 5.17), ("ssm-r34-s3", 12.04),
    ("ssm-2branch-r18-s2", 6.13), ("ssm-2branch-r18-s3", 8.27),
    ("ssm-2branch-r34-s2", 6.80), ("ssm-2branch-r34-s3", 13.66),
]


@pytest.mark.parametrize("name, paper_millions", SSM_TABLE)
def test_ssm_parameter_counts_match_paper_table1(name, paper_millions):
    model = create_model(name)
    assert "ssm" in name and name in list_models("ssm*")
    assert get_entry(name).task == "joint"
    total = count_parameters(model)
    assert abs(total / 1e6 - paper_millions) / paper_millions < 0.01, total
    assert count_parameters(model.head) == s_params(128, 512)
    assert model.num_rois == 128 and model.nms_thresh == 0.75 and model.min_area == 1e-5
    two_branch = "2branch" in name
    assert (model.cls_branch is not None) is two_branch
    # detector (+ second branch) + S: nothing else holds parameters
    branch = count_parameters(model.cls_branch) if two_branch else 0
    assert total == count_parameters(model.detector) + branch + s_params(128, 512)
    assert model.detector.roi_heads.has_mask()


@pytest.mark.parametrize("short", ["r18-s2", "r34-s3"])
def test_second_branch_adds_exactly_a_box_head_and_predictor(short):
    single, double = create_model(f"ssm-{short}"), create_model(f"ssm-2branch-{short}")
    heads = single.detector.roi_heads
    extra = count_parameters(heads.box_head) + count_parameters(heads.box_predictor)
    assert count_parameters(double) - count_parameters(single) == extra
    assert 1.6e6 < extra < 1.65e6  # "add 1.62M"
    names = {n for n, _ in double.named_parameters() if n.startswith("cls_branch.")}
    assert names == {f"cls_branch.box_head.{n}" for n, _ in heads.box_head.named_parameters()} | \
        {f"cls_branch.box_predictor.{n}" for n, _ in heads.box_predictor.named_parameters()}


@pytest.mark.parametrize("name", ["ctm-r18-s2", "ctm-r34-s3"])
def test_ctm_detector_has_no_mask_branch(name):
    model = create_model(name)
    assert get_entry(name).task == "classification"
    assert not model.detector.roi_heads.has_mask()
    assert not any("mask" in n for n, _ in model.named_parameters())
    assert model.cls_branch is None and not model.has_segmentation
    assert model.num_rois == 128 and model.min_area == 0.0  # CTM keeps every box of positive area
    seg = create_model(name.replace("ctm-", "maskrcnn-"))
    mask = count_parameters(seg.roi_heads.mask_head) + count_parameters(seg.roi_heads.mask_predictor)
    assert count_parameters(model) == count_parameters(seg) - mask + s_params(128, 512)
    with pytest.raises(NotImplementedError):
        model.segmentation_losses([torch.rand(1, SIZE, SIZE)], [{}])


def test_ctm_r50_uses_n256_f1024():
    cfg = default_model_config("ctm-r50-fpn")
    assert (cfg.classifier.rois, cfg.classifier.s_features, cfg.classifier.kind) == (256, 1024, "ctm")
    assert s_params(256, 1024) == pytest.approx(2.36e6, rel=0.005)


def test_ssm_branch_setting_is_validated():
    cfg = default_model_config("ssm-r18-s2")
    cfg.classifier.branch = "twin"
    with pytest.raises(ValueError, match="branch"):
        create_model(cfg)


# ---------------------------------------------------------------------------------------
# forward contract and modes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ctm-r18-s2", "ssm-2branch-r18-s2"])
def test_forward_two_images_of_different_sizes(name):
    model = small(name)
    model.classification_mode()
    images = [torch.rand(1, SIZE, SIZE), torch.rand(1, 96, 128)]  # the second is scaled by 1/2
    model.padding_generator = torch.Generator().manual_seed(0)
    out = model(images)
    assert isinstance(out, ClassifierOutput)
    assert out.logits.shape == (2, 3) and torch.isfinite(out.logits).all()
    assert out.logits.requires_grad and out.detections is None
    assert len(out.rois) == 2
    # rois: the batch's boxes mapped back to the original image
    model.padding_generator = torch.Generator().manual_seed(0)
    batches, image_list, _, _, sizes = model.roi_batches(images)
    assert sizes == [(SIZE, SIZE), (96, 128)]
    assert [tuple(s) for s in image_list.image_sizes] == [(SIZE, SIZE), (48, 64)]
    for roi, batch, (h, w), scale in zip(out.rois, batches, sizes, (1.0, 2.0)):
        assert roi["boxes"].shape == (32, 4) and roi["scores"].shape == (32,)
        assert not roi["boxes"].requires_grad
        torch.testing.assert_close(roi["boxes"], batch.boxes * scale, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(roi["scores"], batch.scores.detach())
        assert roi["boxes"].min() >= 0
        assert (roi["boxes"][:, [0, 2]] <= w + 1e-3).all() and (roi["boxes"][:, [1, 3]] <= h + 1e-3).all()
        assert roi["weights"] is None and 0 <= roi["num_survivors"] <= 32


@pytest.mark.parametrize("name", ["ctm-r18-s2", "ssm-r18-s2"])
def test_forward_with_the_rpn_in_train_mode_is_a_clear_error(name):
    model = small(name).train()
    with pytest.raises(RuntimeError, match="classification_mode"):
        model([torch.rand(1, SIZE, SIZE)])


def test_classification_mode_sets_eval_everywhere_but_the_head():
    model = small("ssm-2branch-r18-s2").train()
    model.classification_mode()
    assert model.head.training and all(m.training for m in model.head.modules())
    assert not any(m.training for m in model.detector.modules())
    assert not any(m.training for m in model.cls_branch.modules())
    model.classification_mode("batch")
    assert all(m.training for m in model.detector.backbone.modules())
    assert not model.detector.rpn.training and not model.detector.roi_heads.training
    with pytest.raises(ValueError, match="cls_bn"):
        model.classification_mode("frozen")


def test_inference_restores_every_modules_flag_and_returns_detections():
    model = small("ssm-2branch-r18-s2", "model.detector.box_score_thresh=0.0")
    model.train()
    model.detector.rpn.eval()
    model.cls_branch["box_head"].eval()
    flags = {name: m.training for name, m in model.named_modules()}
    images = [torch.rand(1, SIZE, SIZE), torch.rand(1, 80, 72)]
    with torch.no_grad(), model.inference():
        assert not any(m.training for m in model.modules())
        out = model(images, with_detections=True)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert out.logits.shape == (2, 3)
    assert len(out.detections) == 2
    for det, (h, w) in zip(out.detections, [(SIZE, SIZE), (80, 72)]):
        assert {"boxes", "labels", "scores", "masks"} <= set(det)
        k = len(det["boxes"])
        assert k > 0  # score threshold 0: something is detected
        assert det["masks"].shape == (k, 1, h, w) and det["scores"].shape == (k,)
        assert (det["boxes"][:, [0, 2]] <= w).all() and (det["boxes"][:, [1, 3]] <= h).all()
    # without asking, or in train-mode-free classification mode, no detections
    with torch.no_grad(), model.inference():
        assert model(images).detections is None


def test_inference_with_batch_statistics_never_changes_running_stats():
    model = small("ssm-r18-s2")
    bns = [m for m in model.detector.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momenta = [m.momentum for m in bns]
    with torch.no_grad(), model.inference("batch"):
        assert all(m.training for m in model.detector.backbone.modules())
        assert all(m.momentum == 0.0 for m in bns)
        model([torch.rand(1, SIZE, SIZE)])
    assert [m.momentum for m in bns] == momenta
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "num_batches_tracked" not in k)


def test_ctm_never_returns_detections():
    model = small("ctm-r18-s2")
    with torch.no_grad(), model.inference():
        out = model([torch.rand(1, SIZE, SIZE)], with_detections=True)
    assert out.detections is None and out.logits.shape == (1, 3)


@pytest.mark.parametrize("name, uses_cls_branch", [("ssm-2branch-r18-s2", True), ("ssm-r18-s2", False)])
def test_the_classification_batch_comes_from_the_right_branch(name, uses_cls_branch):
    model = small(name)
    image = [torch.rand(1, SIZE, SIZE)]

    def logits():
        model.padding_generator = torch.Generator().manual_seed(0)
        with torch.no_grad(), model.inference():
            return model(image).logits

    base = logits()
    _perturb(model.detector.roi_heads.box_predictor, scale=0.5)
    assert torch.equal(logits(), base) is uses_cls_branch
    if uses_cls_branch:
        _perturb(model.cls_branch["box_predictor"], scale=0.5)
        assert not torch.equal(logits(), base)


# ---------------------------------------------------------------------------------------
# weight copy
# ---------------------------------------------------------------------------------------


def test_copy_segmentation_branch_copies_box_head_and_predictor():
    model = small("ssm-2branch-r18-s2")
    heads, cls = model.detector.roi_heads, model.cls_branch
    _perturb(heads.box_head, 1)
    _perturb(heads.box_predictor, 2)
    assert not _state_equal(cls["box_head"], heads.box_head)
    assert model.copy_segmentation_branch() is True
    assert _state_equal(cls["box_head"], heads.box_head)
    assert _state_equal(cls["box_predictor"], heads.box_predictor)
    # a copy, not shared storage: later segmentation updates do not leak into the branch
    snapshot = {k: v.clone() for k, v in cls.state_dict().items()}
    _perturb(heads.box_head, 3)
    assert all(torch.equal(snapshot[k], v) for k, v in cls.state_dict().items())
    assert all(p.requires_grad for p in cls.parameters())


def test_copy_is_a_no_op_for_single_branch_models():
    for name in ("ssm-r18-s2", "ctm-r18-s2"):
        model = small(name)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert model.copy_segmentation_branch() is False
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------
# update rules
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ctm-r18-s3", "ssm-2branch-r18-s3"])
def test_update_rules_are_nested(name):
    model = create_model(name)
    every = {n for n, _ in model.named_parameters()}
    head = {n for n in every if n.startswith("head.")}
    backbone = {n for n in every if n.startswith("detector.backbone.")}
    rules = {r: trainable_names(model, r) for r in UPDATE_RULES}
    assert rules["s_only"] == head and len(head) == 6
    assert rules["s_only"] < rules["s_bn"] < rules["full"]
    assert rules["s_only"] < rules["s_backbone"] < rules["full"]
    assert rules["full"] == every
    assert rules["s_backbone"] == head | backbone
    assert any(".fpn." in n for n in rules["s_backbone"])  # the FPN is part of the backbone
    assert not any(n.startswith(("detector.rpn.", "detector.roi_heads.", "cls_branch.")) for n in rules["s_backbone"])
    bn = rules["s_bn"] - head
    bn_modules = {n for n, m in model.detector.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert bn == {f"detector.backbone.{m}.{p}" for m in bn_modules for p in ("weight", "bias")}
    assert bn < backbone


def test_code_bn_filter_leaves_out_the_downsample_batchnorms():
    model = create_model("ssm-r18-s3")
    every = trainable_names(model, "s_bn", "all")
    code = trainable_names(model, "s_bn", "code")
    downsample = {n for n in every if ".downsample.1." in n}
    assert downsample == {f"detector.backbone.body.layer{i}.0.downsample.1.{p}"
                          for i in (2, 3) for p in ("weight", "bias")}
    assert code == every - downsample
    assert all("bn" in n.split(".")[-2] for n in code - {n for n in code if n.startswith("head.")})


def test_rule_names_are_validated():
    model = create_model("ctm-r18-s2")
    with pytest.raises(ValueError, match="update_rule"):
        trainable_names(model, "s_everything")
    with pytest.raises(ValueError, match="bn_params"):
        trainable_names(model, "s_bn", "some")
