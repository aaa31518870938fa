"""The fast inference path gives the stock outputs (issue 11; speed is in docs/benchmarks.md,
never timed here): boolean box-by-box mask pasting against torchvision's pasting, the joint
models' shared RoI pass against a second stock pass, on tiny inputs with forced detections."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from ctlesion.engine.evaluate import compact_prediction, detect_batch, mask_areas
from ctlesion.models.maskrcnn import set_detection_settings
from ctlesion.models.rcnn_parts import (
    binary_masks, logit_mask_scores, paste_masks_binary, paste_masks_binary_with_areas, pasted_mask_areas,
)
from ctlesion.registry import create_model, default_model_config


def _images(n=1, size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((1, size, size), generator=g) for _ in range(n)]


def _detector(name="maskrcnn-r18-s2", detections=24, **changes):
    cfg = default_model_config(name)
    for key, value in changes.items():
        setattr(cfg.detector, key, value)
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    det = getattr(model, "detector", model)
    # Forced detections: every candidate passes the score threshold, NMS keeps all (IoU <= 1).
    set_detection_settings(det, score_thresh=0.0, nms_thresh=1.0, detections_per_img=detections)
    return model


def _mask_iou(a, b):
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@pytest.mark.parametrize("threshold", [0.5, 0.2, 0.9])
def test_binary_paste_equals_stock_paste_then_threshold(threshold):
    g = torch.Generator().manual_seed(1)
    masks = torch.rand((40, 1, 28, 28), generator=g)
    xy = torch.rand((40, 2), generator=g) * 70 - 5
    wh = torch.rand((40, 2), generator=g) * 40
    boxes = torch.cat([xy, xy + wh], 1).clamp_min(0)                # clipped, as detections are
    boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clamp_max(60), boxes[:, 1::2].clamp_max(64)
    boxes[0] = torch.tensor([10.0, 10.0, 10.0, 10.0])        # zero-size box
    boxes[1] = torch.tensor([0.0, 0.0, 60.0, 64.0])          # the whole image
    stock = paste_masks_in_image(masks, boxes, (64, 60)) > threshold
    fast = paste_masks_binary(masks, boxes, (64, 60), threshold)
    assert fast.dtype == torch.bool and fast.shape == stock.shape == (40, 1, 64, 60)
    assert torch.equal(fast, stock)
    again, areas = paste_masks_binary_with_areas(masks, boxes, (64, 60), threshold)
    assert torch.equal(again, fast) and areas.dtype == torch.int64
    assert torch.equal(areas, stock[:, 0].flatten(1).sum(1))          # counted while pasting
    assert areas[1] > 0                                               # the whole-image box
    assert torch.equal(pasted_mask_areas(masks, boxes, (64, 60), threshold), areas)   # without frames


@pytest.mark.parametrize("logit_threshold", [0.5, 0.0, -0.5])
def test_binary_paste_of_logits_equals_the_ctm_logit_pasting(logit_threshold):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn((12, 1, 28, 28), generator=g) * 3
    boxes = torch.tensor([[4.0, 5.0, 30.0, 20.0], [0.0, 0.0, 47.0, 47.0], [40.0, 40.0, 47.0, 47.0]]).repeat(4, 1)
    pasted = paste_masks_in_image(logits, boxes, (48, 48))
    stock = logit_mask_scores(pasted, logit_threshold) > 0.5
    fast = paste_masks_binary(logits, boxes, (48, 48), 0.5, logit_threshold=logit_threshold)
    assert torch.equal(fast, stock)
    _, areas = paste_masks_binary_with_areas(logits, boxes, (48, 48), 0.5, logit_threshold=logit_threshold)
    assert torch.equal(areas, stock[:, 0].flatten(1).sum(1))          # background counted where it is True
    assert torch.equal(pasted_mask_areas(logits, boxes, (48, 48), 0.5, logit_threshold=logit_threshold), areas)
    if logit_threshold < 0:       # outside every box the pasted logit 0 is above the threshold
        assert fast[0, 0, 47, 0]


def test_binary_paste_of_no_detections():
    out = paste_masks_binary(torch.zeros((0, 1, 28, 28)), torch.zeros((0, 4)), (32, 32), 0.5)
    assert out.shape == (0, 1, 32, 32) and out.dtype == torch.bool
    _, areas = paste_masks_binary_with_areas(torch.zeros((0, 1, 28, 28)), torch.zeros((0, 4)), (32, 32), 0.5)
    assert areas.shape == (0,) and areas.dtype == torch.int64
    only = pasted_mask_areas(torch.zeros((0, 1, 28, 28)), torch.zeros((0, 4)), (32, 32), 0.5)
    assert only.shape == (0,) and only.dtype == torch.int64


def test_binary_paste_counts_a_box_outside_the_image():
    masks = torch.ones((2, 1, 28, 28))
    boxes = torch.tensor([[100.0, 100.0, 120.0, 120.0], [0.0, 0.0, 7.0, 7.0]])
    for logit_threshold, outside in ((None, 0), (-0.5, 32 * 32)):     # background False / True
        frames, areas = paste_masks_binary_with_areas(masks if logit_threshold is None else -masks, boxes,
                                                      (32, 32), 0.5, logit_threshold=logit_threshold)
        assert areas[0] == outside
        assert torch.equal(areas, frames[:, 0].flatten(1).sum(1))
        assert torch.equal(pasted_mask_areas(masks if logit_threshold is None else -masks, boxes, (32, 32), 0.5,
                                             logit_threshold=logit_threshold), areas)


def _assert_same_detections(fast, stock, mask_thresh=0.5):
    assert len(fast["scores"]) == len(stock["scores"]) > 0
    torch.testing.assert_close(fast["boxes"], stock["boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(fast["scores"], stock["scores"], atol=1e-4, rtol=0)
    assert torch.equal(fast["labels"], stock["labels"])
    stock_masks = stock["masks"][:, 0] > mask_thresh
    assert fast["masks"].dtype == torch.bool and fast["masks"].shape == stock_masks.shape
    assert _mask_iou(fast["masks"], stock_masks).min() >= 0.999


@pytest.mark.parametrize("mask_paste", ["probabilities", "logits"])
def test_detect_batch_gives_the_stock_detections(mask_paste):
    model = _detector(mask_paste=mask_paste, detection_filter="none" if mask_paste == "logits" else "min_side")
    images = _images(2, size=80)
    with torch.inference_mode():
        stock = model(images)
        fast = detect_batch(model, images, 0.5)
    for f, s in zip(fast, stock):
        _assert_same_detections(f, s)
        assert torch.equal(f["mask_areas"], mask_areas(f["masks"]))      # counted while pasting
    assert model.transform.binary_mask_threshold is None             # restored
    assert model.backbone.body.conv1.weight.is_contiguous()          # layout restored


def _record_mask_head_inputs(model):
    """Hook on the first mask-head convolution: the (dtype, channels-last?) of its output."""
    seen = []
    conv = model.roi_heads.mask_head[0][0]
    hook = conv.register_forward_hook(
        lambda mod, inp, out: seen.append((out.dtype, inp[0].is_contiguous(memory_format=torch.channels_last))))
    return seen, hook


@pytest.mark.parametrize("mask_paste", ["probabilities", "logits"])
def test_fast_path_runs_the_mask_branch_channels_last_and_changes_only_the_masks(mask_paste):
    model = _detector(mask_paste=mask_paste, detection_filter="none" if mask_paste == "logits" else "min_side")
    images = _images(2, size=80, seed=5)
    seen, hook = _record_mask_head_inputs(model)
    with torch.inference_mode():
        stock = model(images)
        assert seen == [(torch.float32, False)]                      # the model's own forward: stock
        fast = detect_batch(model, images, 0.5, roi_align="torchvision")
    hook.remove()
    assert seen[1:] == [(torch.float32, True)]                       # the fast path: channels-last
    assert model.roi_heads.mask_channels_last is False               # restored
    for f, s in zip(fast, stock):
        for key in ("boxes", "scores", "labels"):                    # before the mask branch: bitwise
            assert torch.equal(f[key], s[key].to(f[key].dtype)), key
        _assert_same_detections(f, s)


@pytest.mark.parametrize("name", ["maskrcnn-r18-s2", "maskrcnn-r50-fpn"])
def test_gather_roi_align_keeps_the_stock_detections_within_the_bound(name):
    # The default fast path pools by one weighted gather: boxes and scores move by float32
    # rounding only (issue 11: same count and labels, boxes and scores within 1e-4).
    model = _detector(name, detections=16)
    det = getattr(model, "detector", model)
    images = _images(2, size=80, seed=3)
    with torch.inference_mode():
        stock = det(images)
        fast = detect_batch(det, images, 0.5, roi_align="gather")
    for f, s in zip(fast, stock):
        assert len(f["scores"]) == len(s["scores"]) > 0
        assert torch.equal(f["labels"], s["labels"])
        torch.testing.assert_close(f["boxes"], s["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(f["scores"], s["scores"].float(), atol=1e-4, rtol=0)


def test_bf16_mask_runs_only_the_mask_branch_in_bf16():
    from ctlesion.models.inference import inference_precision

    model = _detector()
    images = _images(1, size=80, seed=6)
    seen, hook = _record_mask_head_inputs(model)
    with torch.inference_mode():
        fp32 = detect_batch(model, images, 0.5)
        with inference_precision("cpu", "bf16-mask", model):
            bf16 = detect_batch(model, images, 0.5)
            assert model.roi_heads.mask_dtype == torch.bfloat16
    hook.remove()
    assert [dtype for dtype, _ in seen] == [torch.float32, torch.bfloat16]
    assert model.roi_heads.mask_dtype is None                        # restored
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(bf16[0][key], fp32[0][key]), key
    assert bf16[0]["masks"].dtype == torch.bool and bf16[0]["masks"].shape == fp32[0]["masks"].shape
    with pytest.raises(ValueError, match="needs the model"):
        inference_precision("cpu", "bf16-mask")


def test_bf16_mask_leaves_a_joint_models_class_logits_alone():
    from ctlesion.models.inference import inference_precision

    model = _detector("ssm-2branch-r18-s3", detections=16)
    images = _images(1, size=96, seed=7)
    with torch.inference_mode(), model.inference(), binary_masks(model, 0.5):
        model.padding_generator = torch.Generator().manual_seed(0)
        fp32 = model(images, with_detections=True)
        with inference_precision("cpu", "bf16-mask", model):
            model.padding_generator = torch.Generator().manual_seed(0)
            bf16 = model(images, with_detections=True)
    assert torch.equal(bf16.logits, fp32.logits)
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(bf16.detections[0][key], fp32.detections[0][key]), key


def test_channels_last_keeps_values_and_restores_the_layout():
    from ctlesion.models.inference import channels_last

    conv = torch.nn.Conv2d(3, 4, 3)
    before = conv.weight.detach().clone()
    with channels_last(conv):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(conv.weight, before)
    assert conv.weight.is_contiguous() and torch.equal(conv.weight, before)


def test_bf16_is_opt_in_and_checked():
    from ctlesion.errors import ConfigError
    from ctlesion.models.inference import inference_precision

    with inference_precision("cpu", "bf16"):
        assert torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with inference_precision("cpu", "fp32"):
        assert torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ConfigError):
        inference_precision("cpu", "fp16")


def test_binary_masks_leaves_other_models_alone():
    with binary_masks(torch.nn.Linear(2, 2), 0.5):
        pass


@pytest.mark.parametrize("name", ["ssm-r18-s3", "ssm-2branch-r18-s3", "affinity-r18"])
@pytest.mark.parametrize("roi_align", ["gather", "torchvision"])
def test_joint_forward_shares_the_roi_pass_with_the_stock_detections(name, roi_align):
    model = _detector(name, detections=32)
    if model.cls_branch is not None:      # make the two branches differ, as after training
        with torch.no_grad():
            for p in model.cls_branch.parameters():
                p.add_(0.01 * torch.randn_like(p))
    images = _images(1, size=96, seed=3)
    model.padding_generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(), model.inference():
        out = model(images, with_detections=True)
        image_list, _ = model.detector.transform(images)
        features = model.detector.backbone(image_list.tensors)
        proposals, _ = model.detector.rpn(image_list, features)
        dets, _ = model.detector.roi_heads(features, proposals, image_list.image_sizes)
        stock = model.detector.transform.postprocess(dets, image_list.image_sizes, [(96, 96)])
        model.padding_generator = torch.Generator().manual_seed(0)
        batches = model.roi_batches(images)[0]
        with binary_masks(model, 0.5, roi_align):
            model.padding_generator = torch.Generator().manual_seed(0)
            fast = model(images, with_detections=True)
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(out.detections[0][key], stock[0][key]), key     # bitwise: the same ops
    _assert_same_detections(compact_prediction(fast.detections[0], 0.5), stock[0])
    if roi_align == "torchvision":       # the stock pooling: the class logits are bitwise the same
        assert torch.equal(fast.logits, out.logits)
    else:                                # the gather (default): float32 summation order
        torch.testing.assert_close(fast.logits, out.logits, atol=1e-4, rtol=0)
    assert torch.equal(batches[0].scores, out.rois[0]["scores"])


@pytest.mark.slow
@pytest.mark.parametrize("mask_paste", ["probabilities", "logits"])
def test_onnx_export_matches_pytorch_with_onnxruntime(tmp_path, mask_paste, capsys):
    pytest.importorskip("onnx", reason="the onnx extra is not installed")
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from ctlesion.cli import main
    from ctlesion.config import ExperimentConfig
    from ctlesion.engine.checkpoint import save_checkpoint
    from ctlesion.engine.export import verification_slice, verify_onnx

    cfg = default_model_config("maskrcnn-r18-s2")
    cfg.detector.box_score_thresh, cfg.detector.box_nms_thresh, cfg.detector.box_detections_per_img = 0.0, 1.0, 12
    cfg.detector.mask_paste = mask_paste
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, ExperimentConfig(model=cfg), epoch=0, step=0)
    out = tmp_path / "model.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out), "--size", "64"]) == 0
    assert "ok" in capsys.readouterr().out
    # Another slice size than the trace's (dynamic height/width), checked here directly.
    check = verify_onnx(model, out, verification_slice(80, seed=5))
    assert check["ok"], check
    assert check["detections"] == check["onnx_detections"] == 12
    assert check["max_abs_diff"]["scores"] <= 1e-4


def test_export_without_a_mask_branch_is_a_clear_error(tmp_path):
    pytest.importorskip("onnx", reason="the onnx extra is not installed")
    from ctlesion.engine.export import export_model_onnx
    from ctlesion.errors import ConfigError

    with pytest.raises(ConfigError, match="no Mask R-CNN segmentation branch"):
        export_model_onnx(create_model("ctm-r18-s3"), tmp_path / "x.onnx", size=64)


def test_stock_reference_is_built_from_stock_classes_only():
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from ctlesion.engine.benchmark import stock_reference

    name, stock = stock_reference(default_model_config("ssm-2branch-r18-s3"))
    assert type(stock) is MaskRCNN and "r18t3" in name
    assert type(stock.roi_heads) is RoIHeads and type(stock.rpn) is RegionProposalNetwork
    assert type(stock.transform) is GeneralizedRCNNTransform
    assert stock.roi_heads.box_head.fc6.out_features == 128          # the model's shape
    assert stock.rpn.anchor_generator.num_anchors_per_location() == [30, 30]


def test_benchmark_cli_writes_the_table_and_json_with_forced_detections(tmp_path, capsys):
    import json

    from ctlesion.cli import main

    out = tmp_path / "bench.json"
    assert main(["benchmark", "--models", "ssm-detector-r18-s3", "--size", "64", "--detections", "8",
                 "--repeats", "1", "--warmup", "0", "--threads", "2", "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "ssm-detector-r18-s3" in text and "stock r18t3" in text
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["detections"] == row["stock_detections"] == 8
    assert row["ratio"] > 0 and row["ctlesion"]["runs"] == 1
    assert result["machine"]["torch"] == torch.__version__ and result["settings"]["detections"] == 8


def test_compact_prediction_gives_float32_scores_after_bf16():
    pred = {"boxes": torch.zeros((2, 4), dtype=torch.bfloat16), "scores": torch.tensor([0.5, 0.25], dtype=torch.bfloat16),
            "labels": torch.tensor([1, 2]), "masks": torch.zeros((2, 1, 4, 4), dtype=torch.bool)}
    out = compact_prediction(pred, 0.5)
    assert out["scores"].dtype == out["boxes"].dtype == torch.float32 and out["labels"].dtype == torch.int64
    assert out["scores"].tolist() == [0.5, 0.25] and out["masks"].shape == (2, 4, 4)


@pytest.mark.parametrize("per_image", [[300], [70, 0, 130], [5]])
def test_threaded_roi_align_equals_one_call_bitwise(per_image):
    from torchvision.ops import MultiScaleRoIAlign

    from ctlesion.models.rcnn_parts import ThreadedRoIAlign

    g = torch.Generator().manual_seed(0)
    n = len(per_image)
    features = {"0": torch.randn((n, 8, 24, 24), generator=g), "1": torch.randn((n, 8, 12, 12), generator=g)}
    corners = [torch.rand((k, 2, 2), generator=g).mul(96).sort(dim=1).values for k in per_image]
    boxes = [c.transpose(1, 2).reshape(-1, 4)[:, [0, 2, 1, 3]] for c in corners]   # x0 y0 x1 y1, x0 <= x1
    shapes = [(96, 96), (80, 96), (96, 64)][:n]
    pool = MultiScaleRoIAlign(["0", "1"], output_size=7, sampling_ratio=2)
    with torch.inference_mode():
        stock = pool(features, boxes, shapes)
        for workers in (1, 2, 3):
            threaded = ThreadedRoIAlign(pool, workers)(features, boxes, shapes)
            assert torch.equal(threaded, stock), workers
    assert not list(ThreadedRoIAlign(pool, 2).state_dict())      # nothing added to checkpoints


def test_binary_masks_threads_roi_align_and_puts_the_pools_back():
    from ctlesion.models.rcnn_parts import ThreadedRoIAlign

    model = _detector()
    pools = (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with binary_masks(model, 0.5, "torchvision"):
            assert isinstance(model.roi_heads.box_roi_pool, ThreadedRoIAlign)
            assert isinstance(model.roi_heads.mask_roi_pool, ThreadedRoIAlign)
            assert model.roi_heads.box_roi_pool.workers == 2
    finally:
        torch.set_num_threads(threads)
    assert (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool) == pools


def _forced_checkpoint_and_slices(tmp_path, seed):
    """A random-weight ``maskrcnn-r18-s2`` checkpoint whose saved settings force 6
    detections per slice, and two random 64² PNG slices."""
    import numpy as np
    from PIL import Image

    from ctlesion.engine.checkpoint import save_checkpoint
    from ctlesion.experiment import experiment_from_dict

    cfg = experiment_from_dict({"model": {"name": "maskrcnn-r18-s2", "detector": {
        "box_score_thresh": 0.0, "box_nms_thresh": 1.0, "box_detections_per_img": 6}},
        "data": {"format": "phantom", "size": 64}})
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ck", create_model(cfg.model), cfg, epoch=0, step=0)
    rng = np.random.default_rng(seed)
    inputs = [tmp_path / f"s{i}.png" for i in range(2)]
    for path in inputs:
        Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(path)
    return ckpt, inputs


def test_predict_with_bf16_mask_keeps_the_boxes_scores_and_labels(tmp_path):
    import json

    from ctlesion.engine.api import predict_checkpoint

    ckpt, inputs = _forced_checkpoint_and_slices(tmp_path, 0)
    runs = {}
    for precision in ("fp32", "bf16-mask"):
        predict_checkpoint(ckpt, inputs, tmp_path / precision, overlays="none", device="cpu", progress=False,
                           precision=precision)
        lines = (tmp_path / precision / "predictions.jsonl").read_text().splitlines()
        runs[precision] = [json.loads(line) for line in lines]
    assert len(runs["fp32"]) == len(runs["bf16-mask"]) == 2
    for a, b in zip(runs["fp32"], runs["bf16-mask"]):
        assert len(a["scores"]) == 6
        assert (a["boxes"], a["scores"], a["labels"]) == (b["boxes"], b["scores"], b["labels"])
        assert len(b["areas_px"]) == 6


def test_predict_without_overlays_builds_no_mask_frames_and_writes_the_same_lines(tmp_path, monkeypatch):
    import json

    import ctlesion.models.rcnn_parts as parts
    from ctlesion.engine.api import predict_checkpoint

    ckpt, inputs = _forced_checkpoint_and_slices(tmp_path, 1)
    framed = []

    def spy(*args, **kwargs):
        framed.append(1)
        return paste_masks_binary_with_areas(*args, **kwargs)

    monkeypatch.setattr(parts, "paste_masks_binary_with_areas", spy)
    runs = {}
    for overlays in ("all", "none"):
        framed.clear()
        predict_checkpoint(ckpt, inputs, tmp_path / overlays, overlays=overlays, device="cpu", progress=False)
        runs[overlays] = ([json.loads(line) for line in (tmp_path / overlays / "predictions.jsonl").read_text()
                           .splitlines()], len(framed))
    (with_overlays, framed_all), (without, framed_none) = runs["all"], runs["none"]
    assert framed_all == 2 and framed_none == 0            # frames only where overlays are drawn
    assert len(list((tmp_path / "all" / "overlays").glob("*.png"))) == 2
    assert not (tmp_path / "none" / "overlays").exists()
    assert len(without) == 2 and all(len(line["scores"]) == 6 for line in without)
    assert without == with_overlays                       # areas counted box-locally: the same numbers
    assert all(sum(line["areas_px"]) > 0 for line in without)


def test_detect_batch_without_frames_gives_the_areas_of_the_frames():
    model = _detector()
    images = _images(2)
    with torch.inference_mode():
        framed = detect_batch(model, images)
        counted = detect_batch(model, images, frames=False)
    for a, b in zip(framed, counted):
        assert "masks" in a and "masks" not in b
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
        assert torch.equal(b["mask_areas"], mask_areas(a["masks"])) and len(b["mask_areas"]) == len(b["scores"]) > 0
    assert model.transform.mask_frames is True             # restored after the block


@pytest.mark.parametrize("shape", [(5, 33, 47), (0, 8, 8), (3, 1, 1)])
def test_mask_areas_count_the_pixels_of_each_mask(shape):
    from ctlesion.engine.evaluate import mask_areas

    masks = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.4
    if shape[0]:
        masks[0] = True                                     # a full frame: H*W
    areas = mask_areas(masks)
    assert areas.dtype == torch.int64 and torch.equal(areas, masks.flatten(1).sum(1))
    assert torch.equal(mask_areas(masks.transpose(1, 2)), masks.transpose(1, 2).flatten(1).sum(1))
    with pytest.raises(ValueError, match="boolean"):
        mask_areas(masks.float())


def _cxx_compiler():
    import os
    import shutil

    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@pytest.mark.skipif(_cxx_compiler() is None, reason="torch.compile (TorchInductor) needs a C++ compiler on the CPU")
def test_predict_with_torch_compile_gives_the_eager_detections(tmp_path):
    import json
    import warnings

    import numpy as np
    from torch._dynamo.utils import counters

    from ctlesion.engine.api import predict_checkpoint

    ckpt, inputs = _forced_checkpoint_and_slices(tmp_path, 3)
    counters.clear()
    runs = {}
    for compiled in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            predict_checkpoint(ckpt, inputs, tmp_path / str(compiled), overlays="none", device="cpu",
                               progress=False, torch_compile=compiled)
        # compiled, not the eager fallback (torch's own deprecation notes also name torch.compile)
        assert not [w for w in caught if "torch.compile of the backbone failed" in str(w.message)]
        lines = (tmp_path / str(compiled) / "predictions.jsonl").read_text().splitlines()
        runs[compiled] = [json.loads(line) for line in lines]
    assert counters["stats"]["unique_graphs"] >= 1                       # Dynamo did capture the backbone
    for eager, comp in zip(runs[False], runs[True]):
        assert len(eager["scores"]) == len(comp["scores"]) == 6 and eager["labels"] == comp["labels"]
        np.testing.assert_allclose(comp["boxes"], eager["boxes"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(comp["scores"], eager["scores"], atol=1e-4, rtol=0)


def test_compiled_backbone_swaps_in_and_out_and_keeps_one_wrapper(monkeypatch):
    from ctlesion.models import inference

    monkeypatch.setattr(torch, "compile", lambda module: module)        # no compiling here: the plumbing
    model = _detector(detections=4)
    backbone, keys, keys_params = model.backbone, list(model.state_dict()), list(model.parameters())
    with inference.compiled_backbone(model) as m:
        wrapper = m.backbone
        assert isinstance(wrapper, inference.CompiledModule) and wrapper.module is backbone
        assert len(list(model.parameters())) == len(keys_params)          # nothing listed twice
    assert model.backbone is backbone and list(model.state_dict()) == keys
    assert getattr(model, inference.COMPILED_ATTR) is wrapper
    with inference.compiled_backbone(model):
        assert model.backbone is wrapper                                  # compiled once, reused
    with inference.compiled_backbone(model, enabled=False):
        assert model.backbone is backbone
    other = torch.nn.Linear(2, 2)                                         # no backbone: left alone
    with inference.compiled_backbone(other) as m:
        assert m is other


def test_a_failed_compile_warns_once_and_runs_eagerly():
    from ctlesion.models.inference import CompiledModule

    module = torch.nn.Conv2d(1, 2, 3)
    wrapped = CompiledModule(module)

    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")

    wrapped._compiled = broken
    x = torch.rand(1, 1, 8, 8)
    with pytest.warns(RuntimeWarning, match=r"torch.compile of the backbone failed \(RuntimeError: InvalidCxxCompiler"):
        out = wrapped(x)
    assert torch.equal(out, module(x)) and "more detail" not in wrapped.failure
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(wrapped(x), module(x))                        # no second warning


def _captured_cli(command, monkeypatch):
    """``command``'s arguments for a built-in model, and the dict its API call's keyword
    arguments land in (the call is replaced by one that records them and exits 0)."""
    from ctlesion.engine import api, benchmark

    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(api, "predict_checkpoint", capture)
    monkeypatch.setattr(api, "evaluate_checkpoint", capture)
    monkeypatch.setattr(benchmark, "run_benchmark", capture)
    return seen, {"predict": ["predict", "--model", "lesion-semiseg-r18", "x.png", "--out", "o"],
                  "evaluate": ["evaluate", "--model", "lesion-semiseg-r18", "--data", "phantom:4", "--out", "o"],
                  "benchmark": ["benchmark", "--models", "maskrcnn-r18-s2"]}[command]


@pytest.mark.parametrize("command", ["predict", "evaluate", "benchmark"])
def test_compile_is_an_opt_in_flag_of_predict_evaluate_and_benchmark(command, monkeypatch):
    from ctlesion import cli

    seen, args = _captured_cli(command, monkeypatch)
    for flags, expected in (([], False), (["--compile"], True)):
        seen.clear()
        with pytest.raises(SystemExit):
            cli.main(args + flags)
        assert seen["torch_compile"] is expected


@pytest.mark.parametrize("command", ["predict", "evaluate", "benchmark"])
def test_the_fast_path_defaults_and_the_bitwise_stock_flags(command, monkeypatch):
    """The gather and channels-last weights by default; ``--roi-align torchvision
    --no-channels-last`` asks for the bitwise-stock path; other kernels are refused."""
    from ctlesion import cli

    seen, args = _captured_cli(command, monkeypatch)
    for flags, expected in (([], ("gather", True)), (["--roi-align", "torchvision", "--no-channels-last"],
                                                     ("torchvision", False))):
        seen.clear()
        with pytest.raises(SystemExit):
            cli.main(args + flags)
        assert (seen["roi_align"], seen["channels_last"]) == expected
    with pytest.raises(SystemExit) as err:
        cli.main(args + ["--roi-align", "fast"])
    assert err.value.code == 2                                           # argparse's usage error


def test_speed_options_set_the_kernel_and_the_weight_layout_and_restore_them():
    from ctlesion.errors import ConfigError
    from ctlesion.models.inference import speed_options

    model = _detector()
    conv = model.backbone.body.conv1.weight
    heads = model.roi_heads
    with speed_options(model, "cpu"):
        assert heads.roi_align_kernel == "gather" and conv.is_contiguous(memory_format=torch.channels_last)
    with speed_options(model, "cpu", channels_last_weights=False, roi_align="torchvision"):
        assert heads.roi_align_kernel == "torchvision" and conv.is_contiguous()
    assert heads.roi_align_kernel == "gather" and conv.is_contiguous()
    with pytest.raises(ConfigError, match="roi_align"):
        with speed_options(model, "cpu", roi_align="fast"):
            pass


@pytest.mark.parametrize("name", ["maskrcnn-r18-s2", "ssm-2branch-r18-s3"])
def test_the_default_speed_options_give_the_stock_detections_and_logits(name):
    """What predict runs by default (speed_options' gather and channels-last weights, the
    fast path) against the model as built: the issue-11 bounds."""
    from ctlesion.models.inference import speed_options

    model = _detector(name, detections=32)
    images = _images(1, size=96, seed=4)
    joint = hasattr(model, "detector")
    with torch.inference_mode():
        if joint:
            model.padding_generator = torch.Generator().manual_seed(0)
            with model.inference():
                stock = model(images, with_detections=True)
                model.padding_generator = torch.Generator().manual_seed(0)
                with speed_options(model, "cpu"), binary_masks(model, 0.5):
                    fast = model(images, with_detections=True)
            torch.testing.assert_close(fast.logits, stock.logits, atol=1e-4, rtol=0)
            stock, fast = stock.detections, fast.detections
        else:
            stock = model(images)
            with speed_options(model, "cpu"):
                fast = detect_batch(model, images, 0.5)
    _assert_same_detections(compact_prediction(fast[0], 0.5) if joint else fast[0], stock[0])
