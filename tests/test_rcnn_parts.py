"""The author-behaviour switches of ``ctlesion.models.rcnn_parts`` (RPN min size and logit
NMS, detection filter, logit mask pasting, per-image normalisation), their config
validation, the code distance order, and that the registry defaults are stock torchvision."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.roi_heads import RoIHeads, paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork

from ctlesion.config import ConfigError, update_dataclass
from ctlesion.experiment import load_experiment
from ctlesion.models.roi_batch import distance_order
from ctlesion.models.rcnn_parts import (
    LesionRoIHeads, LesionRPN, LesionTransform, keep_detections, logit_mask_scores,
)
from ctlesion.registry import create_model, default_model_config

TINY = "maskrcnn-r18-s2"


def _build_tiny(**detector):
    """A small maskrcnn-r18-s2 (64-128 px input) with ``--set``-like detector changes, eval mode."""
    cfg = default_model_config(TINY)
    torch.manual_seed(0)                     # the same weights whichever test builds it first
    update_dataclass(cfg, {"detector": {"min_size": 64, "max_size": 128, "rpn_pre_nms_top_n_test": 100,
                                        "rpn_post_nms_top_n_test": 60, "box_detections_per_img": 12,
                                        **detector}})
    return create_model(cfg).eval()


_CACHE: dict = {}


def _tiny(**detector):
    """:func:`_build_tiny`, shared between tests: callers must not modify it (build a fresh one)."""
    key = tuple(sorted(detector.items()))
    if key not in _CACHE:
        _CACHE[key] = _build_tiny(**detector)
    return _CACHE[key]


# ----------------------------------------------------------------------------- RPN


def _zero_height_case():
    """One level, two anchors: a zero-height box (higher logit) and a normal box."""
    proposals = torch.tensor([[[10.0, 10.0, 30.0, 10.0], [30.0, 30.0, 50.0, 50.0]]])
    objectness = torch.tensor([[2.0], [1.0]])
    return proposals, objectness, [(64, 64)], [2]


@pytest.mark.parametrize("nms_score", ["probability", "logit"])
def test_rpn_min_size_zero_keeps_zero_height_proposals(nms_score):
    kept = _tiny(rpn_min_size=0.0, rpn_nms_score=nms_score).rpn
    default = _tiny(rpn_nms_score=nms_score).rpn
    assert isinstance(kept, LesionRPN) and kept.min_size == 0.0 and default.min_size == 1e-3
    boxes, _ = kept.filter_proposals(*_zero_height_case())
    assert boxes[0].tolist() == [[10.0, 10.0, 30.0, 10.0], [30.0, 30.0, 50.0, 50.0]]
    boxes, _ = default.filter_proposals(*_zero_height_case())
    assert boxes[0].tolist() == [[30.0, 30.0, 50.0, 50.0]]


def _saturated_case():
    """Logits 20 (level 0) and 21 (level 1): distinct logits, equal float32 probabilities.

    The per-level top-n puts level 0 first, so a ranking by probability (a tie) keeps the
    20-logit proposal first; a ranking by logit puts the 21-logit proposal first."""
    proposals = torch.tensor([[[0.0, 0.0, 20.0, 20.0], [40.0, 40.0, 60.0, 60.0]]])
    objectness = torch.tensor([[20.0], [21.0]])
    return proposals, objectness, [(64, 64)], [1, 1]


def test_rpn_logit_nms_ranks_by_logit_where_probabilities_tie():
    assert torch.sigmoid(torch.tensor(20.0)) == torch.sigmoid(torch.tensor(21.0)) == 1.0  # the premise
    logit, prob = _build_tiny(rpn_nms_score="logit").rpn, _build_tiny().rpn    # modified below
    assert (logit.nms_score, prob.nms_score) == ("logit", "probability")

    boxes, scores = logit.filter_proposals(*_saturated_case())
    assert scores[0].tolist() == [21.0, 20.0]                    # the logits themselves, by logit
    assert boxes[0].tolist() == [[40.0, 40.0, 60.0, 60.0], [0.0, 0.0, 20.0, 20.0]]
    boxes, scores = prob.filter_proposals(*_saturated_case())
    assert scores[0].tolist() == [1.0, 1.0]                      # probabilities
    assert boxes[0].tolist() == [[0.0, 0.0, 20.0, 20.0], [40.0, 40.0, 60.0, 60.0]]  # the other way

    # With a post-NMS cap of one the two settings keep different proposals.
    for rpn in (logit, prob):
        rpn._post_nms_top_n = dict(training=1, testing=1)
    assert logit.filter_proposals(*_saturated_case())[0][0].tolist() == [[40.0, 40.0, 60.0, 60.0]]
    assert prob.filter_proposals(*_saturated_case())[0][0].tolist() == [[0.0, 0.0, 20.0, 20.0]]


def test_rpn_logit_nms_suppresses_like_probability_nms_on_distinct_scores():
    """Away from ties the logit path keeps the same boxes, in the same order, as torchvision's."""
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(1, 60, 2, generator=g) * 48
    wh = torch.rand(1, 60, 2, generator=g) * 20 + 2
    proposals = torch.cat([xy, xy + wh], -1)
    objectness = torch.randn(60, 1, generator=g)
    args = (proposals, objectness, [(64, 64)], [40, 20])
    lb, ls = _tiny(rpn_nms_score="logit").rpn.filter_proposals(*args)
    pb, ps = _tiny().rpn.filter_proposals(*args)
    assert len(lb[0]) < 60                                       # NMS did suppress something
    assert torch.equal(lb[0], pb[0])
    # (sigmoid of a gathered subset may differ from the gathered sigmoid by an ulp: SIMD tails)
    torch.testing.assert_close(torch.sigmoid(ls[0]), ps[0], rtol=0, atol=1e-7)


def test_rpn_rejects_unknown_nms_score():
    rpn = _tiny().rpn
    with pytest.raises(ValueError, match="nms_score"):
        LesionRPN.like(rpn, nms_score="logits")


# ----------------------------------------------------------------------------- detection filter

NARROW = [10.0, 10.0, 10.005, 20.0]      # 0.005 wide: positive area, side < 1e-2
ZERO = [30.0, 30.0, 30.0, 40.0]          # zero width
NORMAL = [40.0, 40.0, 50.0, 50.0]


def test_keep_detections_rules():
    boxes = torch.tensor([NARROW, ZERO, NORMAL])
    assert keep_detections(boxes, "min_side").tolist() == [2]
    assert keep_detections(boxes, "positive_area").tolist() == [0, 2]
    assert keep_detections(boxes, "none").tolist() == [0, 1, 2]
    assert keep_detections(torch.zeros(0, 4), "none").tolist() == []
    with pytest.raises(ValueError, match="detection filter"):
        keep_detections(boxes, "area")


def _detection_inputs():
    """Two proposals (one zero-height), lesion clearly scored, zero box deltas."""
    proposals = [torch.tensor([[10.0, 10.0, 30.0, 10.0], [35.0, 35.0, 55.0, 55.0]])]
    class_logits = torch.tensor([[0.0, 3.0], [0.0, 2.0]])
    box_regression = torch.zeros(2, 8)
    return class_logits, box_regression, proposals, [(64, 64)]


def test_detection_filter_none_keeps_zero_height_detection():
    default = _tiny().roi_heads
    none = _tiny(detection_filter="none").roi_heads
    area = _tiny(detection_filter="positive_area").roi_heads
    assert isinstance(none, LesionRoIHeads) and default.detection_filter == "min_side"
    boxes, scores, labels = none.postprocess_detections(*_detection_inputs())
    assert boxes[0].tolist() == [[10.0, 10.0, 30.0, 10.0], [35.0, 35.0, 55.0, 55.0]]
    assert labels[0].tolist() == [1, 1]
    assert scores[0][0] > scores[0][1]
    for heads in (default, area):
        boxes, _, _ = heads.postprocess_detections(*_detection_inputs())
        assert boxes[0].tolist() == [[35.0, 35.0, 55.0, 55.0]]


def test_detection_filter_reimplementation_equals_torchvision_on_ordinary_boxes():
    """``none``/``positive_area`` re-implement torchvision's postprocess; on boxes no filter
    removes they must give torchvision's detections exactly (multi-class, random deltas)."""
    g = torch.Generator().manual_seed(5)
    xy = torch.rand(80, 2, generator=g) * 60
    proposals = [torch.cat([xy, xy + 8 + torch.rand(80, 2, generator=g) * 30], -1)]
    class_logits = torch.randn(80, 3, generator=g) * 2
    box_regression = torch.randn(80, 9 // 3 * 4, generator=g) * 0.1
    outputs = []
    for rule in ("min_side", "positive_area", "none"):
        heads = _tiny(detection_filter=rule).roi_heads
        outputs.append(heads.postprocess_detections(class_logits, box_regression, proposals, [(96, 96)]))
    ref = outputs[0]
    assert 3 < len(ref[0][0]) < 160                              # score filter and NMS both acted
    for out in outputs[1:]:
        for a, b in zip(out, ref):
            assert torch.equal(a[0], b[0])


# ----------------------------------------------------------------------------- logit masks


@pytest.mark.parametrize("t", [0.5, 0.0, -1.25, 3.0])
def test_logit_mask_scores_threshold_is_exact(t):
    tt = torch.tensor(t)
    near = [torch.nextafter(tt, torch.tensor(float("inf"))), torch.nextafter(tt, torch.tensor(float("-inf")))]
    near += [torch.nextafter(near[0], torch.tensor(float("inf"))), tt + 1e-6, tt - 1e-6]
    pasted = torch.cat([torch.stack([tt, *near]), torch.linspace(t - 40, t + 40, 301),
                        torch.tensor([-1e30, 1e30, 0.0])])
    scores = logit_mask_scores(pasted, t)
    assert scores.dtype == torch.float32 and scores.shape == pasted.shape
    assert torch.equal(scores > 0.5, pasted > t)
    assert bool((scores >= 0).all() and (scores <= 1).all())
    # the premise: plain float32 sigmoid rounds the just-above value to 0.5
    assert torch.sigmoid(near[0] - t) == 0.5 or t != 0.5
    order = pasted.argsort()
    assert bool((scores[order].diff() >= 0).all())               # monotone in pasted
    # and away from the boundary it is the plain sigmoid
    far = (pasted - t).abs() > 1e-3
    assert torch.equal(scores[far], torch.sigmoid(pasted[far] - t))


def test_logit_mask_scores_keeps_a_grid_shape():
    pasted = torch.linspace(-3, 3, 2 * 5 * 7).reshape(2, 1, 5, 7)
    scores = logit_mask_scores(pasted, 0.5)
    assert scores.shape == (2, 1, 5, 7)
    assert torch.equal(scores > 0.5, pasted > 0.5)


@pytest.mark.parametrize("threshold", [0.5, -0.75])
def test_logit_mask_model_output_equals_pasted_logits_thresholded(threshold):
    model = _tiny(mask_paste="logits", mask_logit_threshold=threshold)
    assert model.roi_heads.mask_paste == "logits" and model.transform.mask_logit_threshold == threshold
    captured = []
    hook = model.roi_heads.mask_predictor.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    image = torch.rand(1, 64, 80, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            out = model([image])[0]
    finally:
        hook.remove()
    assert set(out) == {"boxes", "labels", "scores", "masks"}   # mask_logits consumed by the transform
    k = len(out["boxes"])
    assert k > 0
    masks = out["masks"]
    assert masks.shape == (k, 1, 64, 80)
    assert bool((masks >= 0).all() and (masks <= 1).all())
    assert len(captured) == 1 and captured[0].shape[:2] == (k, 2)
    logits = captured[0][torch.arange(k), out["labels"]][:, None]
    reference = paste_masks_in_image(logits, out["boxes"], (64, 80)) > threshold
    assert reference.any() and not reference.all()               # a meaningful comparison
    assert torch.equal(masks > 0.5, reference)


def test_probability_masks_differ_from_logit_masks_on_the_same_weights():
    """The switch changes the output: same weights, same image, different pasted masks."""
    logit = _tiny(mask_paste="logits", mask_logit_threshold=0.0)
    prob = _build_tiny()
    prob.load_state_dict(logit.state_dict())
    image = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = logit([image.clone()])[0], prob([image.clone()])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and len(a["boxes"]) > 0
    # threshold 0 on logits is 0.5 on probabilities, but bilinear pasting before/after the sigmoid differs
    assert not torch.equal(a["masks"], b["masks"])


def test_mask_paste_logits_does_not_change_training():
    """The logit-mask switch is inference only: the same training losses, bit for bit."""
    image = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(3))
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 12:40, 16:44] = 1
    target = {"boxes": torch.tensor([[16.0, 12.0, 44.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks}
    losses = []
    for paste in ("logits", "probabilities"):
        model = _build_tiny(mask_paste=paste).train()
        torch.manual_seed(5)                 # the samplers draw from the global generator
        losses.append(model([image.clone()], [dict(target)]))
    assert set(losses[0]) == set(losses[1]) and "loss_mask" in losses[0]
    for key in losses[0]:
        assert torch.equal(losses[0][key], losses[1][key]), key


# ----------------------------------------------------------------------------- per-image normalisation


def _per_image_transform() -> LesionTransform:
    return LesionTransform(64, 128, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], per_image=True)


def test_per_image_normalisation_grey_equals_replica_and_formula():
    t = _per_image_transform()
    grey = torch.rand(1, 37, 53) * 0.7 + 0.1
    out = t.normalize(grey)
    assert out.shape == (3, 37, 53)
    assert torch.equal(out, t.normalize(grey.expand(3, -1, -1).clone()))
    c = grey[0]
    expected = (c - c.mean()) / c.std()
    for ch in out:
        assert torch.equal(ch, expected)
    colour = torch.stack([grey[0], grey[0] ** 2, 1 - grey[0]])
    out = t.normalize(colour)
    for ch, c in zip(out, colour):
        assert torch.equal(ch, (c - c.mean()) / c.std())
    # not the fixed ImageNet constants
    assert not torch.equal(out, LesionTransform(64, 128, t.image_mean, t.image_std).normalize(colour))


def test_per_image_normalisation_constant_image_is_finite():
    out = _per_image_transform().normalize(torch.full((1, 16, 16), 0.3))
    assert out.shape == (3, 16, 16)
    assert bool(torch.isfinite(out).all())


def test_per_image_normalisation_is_wired_from_the_config():
    assert _tiny(normalization="per_image").transform.per_image is True
    assert _tiny().transform.per_image is False


# ----------------------------------------------------------------------------- defaults


def test_registry_defaults_are_torchvision():
    model = create_model(TINY)
    assert type(model.rpn) is LesionRPN and type(model.roi_heads) is LesionRoIHeads
    assert model.rpn.min_size == 1e-3 and model.rpn.nms_score == "probability"
    assert model.roi_heads.detection_filter == "min_side" and model.roi_heads.mask_paste == "probabilities"
    assert model.transform.per_image is False and model.transform.mask_logit_threshold == 0.5
    d = default_model_config(TINY).detector
    assert (d.rpn_min_size, d.rpn_nms_score, d.detection_filter, d.mask_paste) == (
        1e-3, "probability", "min_side", "probabilities")


def test_default_model_equals_stock_torchvision_maskrcnn():
    model = create_model(TINY).eval()
    d, rpn, heads, t = model.config.detector, model.rpn, model.roi_heads, model.transform
    # Sizes only, not switches under test, for a fast forward; the stock model gets the same.
    t.min_size, t.max_size = (64,), 128
    rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"], heads.detections_per_img = 150, 100, 20
    stock = MaskRCNN(
        model.backbone, num_classes=None, min_size=t.min_size, max_size=t.max_size,
        image_mean=t.image_mean, image_std=t.image_std,
        rpn_anchor_generator=rpn.anchor_generator, rpn_head=rpn.head,
        rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=100, rpn_nms_thresh=d.rpn_nms_thresh,
        box_roi_pool=heads.box_roi_pool, box_head=heads.box_head, box_predictor=heads.box_predictor,
        box_score_thresh=d.box_score_thresh, box_nms_thresh=d.box_nms_thresh,
        box_detections_per_img=20,
        mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head, mask_predictor=heads.mask_predictor,
    ).eval()
    assert type(stock.rpn) is RegionProposalNetwork and type(stock.roi_heads) is RoIHeads
    image = torch.rand(1, 64, 64)
    with torch.no_grad():
        ours, ref = model([image.clone()])[0], stock([image.clone()])[0]
    assert len(ref["boxes"]) == 20                               # the cap: NMS and ranking both matter
    assert set(ours) == set(ref) == {"boxes", "labels", "scores", "masks"}
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


# ----------------------------------------------------------------------------- config


def test_config_rejects_misspelt_mask_paste_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        load_experiment(None, ["model.detector.mask_paste=logit"])
    message = str(info.value)
    assert "model.detector.mask_paste" in message and "'logits'" in message


@pytest.mark.parametrize("override", [
    "model.detector.detection_filter=bogus", "model.detector.rpn_nms_score=sigmoid",
    "model.detector.rpn_nms_score=logits", "model.detector.normalization=per-slice",
    "model.classifier.roi_order=distance-code",
])
def test_config_rejects_unknown_choices(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_experiment(None, [override])


@pytest.mark.parametrize("key, value", [
    ("detection_filter", "min_side"), ("detection_filter", "positive_area"), ("detection_filter", "none"),
    ("rpn_nms_score", "logit"), ("rpn_nms_score", "probability"),
    ("mask_paste", "logits"), ("mask_paste", "probabilities"),
])
def test_config_accepts_valid_choices(key, value):
    cfg = load_experiment(None, [f"model.detector.{key}={value}"])
    assert getattr(cfg.model.detector, key) == value


def test_config_numeric_author_switches_and_roi_order():
    cfg = load_experiment(None, ["model.detector.rpn_min_size=0", "model.detector.mask_logit_threshold=-1",
                                 "model.classifier.roi_order=distance_code"])
    assert cfg.model.detector.rpn_min_size == 0.0 and isinstance(cfg.model.detector.rpn_min_size, float)
    assert cfg.model.detector.mask_logit_threshold == -1.0
    assert cfg.model.classifier.roi_order == "distance_code"


# ----------------------------------------------------------------------------- distance order


def _tied_boxes():
    # distances 5 (x4, in input order 0,2,3,5), 1, 0, sqrt(2)
    xy = torch.tensor([[3.0, 4.0], [1.0, 0.0], [4.0, 3.0], [0.0, 5.0], [0.0, 0.0], [5.0, 0.0], [1.0, 1.0]])
    return torch.cat([xy, xy + 10], 1)


def test_distance_order_code_is_the_code_expression():
    boxes = _tied_boxes()
    x1, y1 = boxes[:, 0], boxes[:, 1]
    assert torch.equal(distance_order(boxes, code=True), torch.sqrt(x1 ** 2 + y1 ** 2).sort().indices)
    g = torch.Generator().manual_seed(2)
    boxes = torch.cat([torch.randint(0, 8, (40, 2), generator=g).float()] * 2, 1)  # many ties
    x1, y1 = boxes[:, 0], boxes[:, 1]
    assert torch.equal(distance_order(boxes, code=True), torch.sqrt(x1 ** 2 + y1 ** 2).sort().indices)


def test_distance_order_is_stable_on_ties():
    assert distance_order(_tied_boxes()).tolist() == [4, 1, 6, 0, 2, 3, 5]
    g = torch.Generator().manual_seed(4)
    boxes = torch.cat([torch.randint(0, 6, (50, 2), generator=g).float()] * 2, 1)
    d2 = [(float(x) ** 2 + float(y) ** 2, i) for i, (x, y) in enumerate(boxes[:, :2].tolist())]
    assert distance_order(boxes).tolist() == [i for _, i in sorted(d2)]
    assert distance_order(boxes).dtype == torch.long
