"""Benchmark whole-slice CNN classifiers (spec §2.1 last bullets, §1.4): small 64-px inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from ctlesion.config import ClassifierConfig, ModelConfig
from ctlesion.models.classifier import ClassifierOutput, SliceClassifier, trainable_names
from ctlesion.models.cnn import (
    CNN_ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CNNClassifier,
    build_cnn_classifier,
)

ARCHS = ["resnet18", "resnext50_32x4d", "resnext101_32x8d", "densenet121", "densenet169"]
HEADS = {"resnet18": "fc", "resnext50_32x4d": "fc", "resnext101_32x8d": "fc",
         "densenet121": "classifier", "densenet169": "classifier"}
CLASSES = ["normal", "cp", "covid"]
SIZE = 64

_CACHE: dict[str, CNNClassifier] = {}


def _model(arch: str) -> CNNClassifier:
    """One 3-class model per arch for the whole file (building the big ones costs ~1 s)."""
    if arch not in _CACHE:
        torch.manual_seed(0)
        _CACHE[arch] = CNNClassifier(CLASSES, arch=arch, input_size=SIZE)
    return _CACHE[arch]


def test_supported_archs_are_the_papers_five():
    assert sorted(CNN_ARCHS) == sorted(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_training_forward_per_arch(arch):
    """One forward + backward per arch: shape, grey == replicated RGB, resizing, gradients."""
    model = _model(arch)
    model.classification_mode("batch")
    assert model.training
    grey = torch.rand(1, SIZE, SIZE)
    small = torch.rand(1, 48, 48)
    # What the model should do to the 48-px image: bilinear, align_corners=False, no antialias.
    small_up = F.interpolate(small[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
    images = [grey, grey.expand(3, -1, -1).clone(), small, small_up.expand(3, -1, -1).clone()]
    model.zero_grad(set_to_none=True)
    out = model(images)
    assert isinstance(out, ClassifierOutput)
    assert out.detections is None and out.rois is None
    assert out.logits.shape == (4, len(CLASSES))
    assert torch.isfinite(out.logits).all()
    # Rows with identical model input give identical logits (batch BN stats are shared).
    torch.testing.assert_close(out.logits[0], out.logits[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[2], out.logits[3], rtol=1e-5, atol=1e-5)
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 0])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_groups_partition_all_parameters(arch):
    model = _model(arch)
    groups = model.parameter_groups()
    names = {n for n, _ in model.named_parameters()}
    head, backbone = set(groups["head"]), set(groups["backbone"])
    assert head and backbone and not head & backbone
    assert head | backbone == names
    assert len(groups["head"]) + len(groups["backbone"]) == len(names)
    # BN groups: affine params of every backbone BatchNorm; the "code" filter is a subset.
    bn_all, bn_code = set(groups["backbone_bn"]), set(groups["backbone_bn_code"])
    assert bn_all and bn_all <= backbone and bn_code <= bn_all
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(bn_all) == 2 * n_bn
    if arch.startswith("res"):
        # The original "bn" filter leaves out the downsample BNs.
        assert bn_code and all(".downsample." not in n for n in bn_code)
        assert any(".downsample." in n for n in bn_all - bn_code)
    # Update rules work on these groups; "full" is everything.
    assert trainable_names(model, "s_only") == head
    assert trainable_names(model, "s_bn") == head | bn_all
    assert trainable_names(model, "full") == names


@pytest.mark.parametrize("arch", ARCHS)
def test_head_is_the_final_layer(arch):
    model = _model(arch)
    head_name = HEADS[arch]
    assert sorted(model.parameter_groups()["head"]) == [f"net.{head_name}.bias", f"net.{head_name}.weight"]
    layer = getattr(model.net, head_name)
    assert model.head is layer
    assert isinstance(layer, nn.Linear) and layer.out_features == len(CLASSES)
    # It is the last module the torchvision model registers (the last one run).
    assert list(model.net.children())[-1] is layer
    assert model.num_classes == 3 and isinstance(model, SliceClassifier) and not model.has_segmentation


def test_two_class_label_set_and_eval_mode():
    torch.manual_seed(1)
    model = CNNClassifier(["normal", "covid"], arch="resnet18", input_size=SIZE)
    model.classification_mode("eval")
    assert not model.training
    grey = torch.rand(1, SIZE, SIZE)
    with torch.no_grad():
        logits = model([grey, grey.repeat(3, 1, 1), torch.rand(1, 48, 48)]).logits
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # eval mode: an image's logits do not depend on the rest of the batch
        torch.testing.assert_close(model([grey]).logits[0], logits[0], rtol=1e-5, atol=1e-5)


def test_preprocessing_replicates_resizes_and_normalises():
    model = CNNClassifier(CLASSES, arch="resnet18")  # default input_size 512 (the papers')
    assert model.input_size == 512
    x = model.preprocess([torch.full((1, 40, 60), 0.5), torch.full((3, 512, 512), 0.25)])
    assert x.shape == (2, 3, 512, 512)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 7, 9], (0.5 - mean) / std)
    torch.testing.assert_close(x[1, :, 100, 3], (0.25 - mean) / std)
    assert "image_mean" not in model.state_dict()  # constants are not checkpointed


@pytest.mark.parametrize(
    "images, match",
    [
        ([], "non-empty"),
        ([torch.rand(2, 32, 32)], "C = 1 or 3"),
        ([torch.rand(4, 32, 32)], "C = 1 or 3"),
        ([torch.rand(32, 32)], r"\[C, H, W\]"),
        ([torch.rand(1, 1, 32, 32)], r"\[C, H, W\]"),
        ([torch.rand(1, 32, 32), torch.full((1, 32, 32), float("nan"))], "image 1 .*NaN"),
        ([torch.full((3, 32, 32), float("inf"))], "infinite"),
        ([torch.zeros(1, 32, 32, dtype=torch.uint8)], "float"),
        ([torch.rand(1, 0, 32)], "empty"),
        (["not a tensor"], "not a tensor"),
    ],
)
def test_bad_inputs_raise(images, match):
    with pytest.raises(ValueError, match=match):
        _model("resnet18")(images)


def test_unknown_arch_and_bad_settings_raise():
    with pytest.raises(ValueError, match="densenet121.*resnext101_32x8d"):
        CNNClassifier(CLASSES, arch="vgg16")
    with pytest.raises(ValueError, match="two distinct"):
        CNNClassifier(["only"], arch="resnet18")
    with pytest.raises(ValueError, match="input_size"):
        CNNClassifier(CLASSES, arch="resnet18", input_size=0)
    with pytest.raises(ValueError, match="cls_bn"):
        _model("resnet18").classification_mode("frozen")


def test_build_from_model_config():
    cfg = ModelConfig(name="cnn-densenet121",
                      classifier=ClassifierConfig(kind="cnn", cnn_arch="densenet121", input_size=SIZE,
                                                  class_names=["normal", "cp", "covid"]))
    model = build_cnn_classifier(cfg)
    assert isinstance(model, CNNClassifier)
    assert (model.arch, model.input_size, model.class_names) == ("densenet121", SIZE, tuple(CLASSES))
    assert model.config is cfg
    assert model.net.classifier.out_features == 3
    with pytest.raises(ValueError, match="kind='cnn'"):
        build_cnn_classifier(ModelConfig())
    cfg.classifier.cnn_arch = "alexnet"
    with pytest.raises(ValueError, match="unknown CNN arch"):
        build_cnn_classifier(cfg)


def _old_densenet_keys(state: dict) -> dict:
    """The layout of torchvision's released DenseNet files: "norm.1" for "norm1", and no
    ``num_batches_tracked`` buffers (they predate them)."""
    import re

    return {
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
        for k, v in state.items() if not k.endswith("num_batches_tracked")
    }


@pytest.mark.parametrize(
    "arch, fmt",
    [("resnet18", "pth"), ("resnet18", "safetensors"),
     ("densenet121", "pth"), ("densenet121", "safetensors"), ("densenet121", "old-keys.pth")],
)
def test_local_imagenet_weights_skip_the_mismatched_head(arch, fmt, tmp_path, caplog):
    torch.manual_seed(3)
    imagenet = getattr(models, arch)(weights=None)  # 1000 classes, like the real file
    state = imagenet.state_dict()
    path = tmp_path / f"{arch}.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(_old_densenet_keys(state) if fmt.startswith("old") else state, path)
        if fmt.startswith("old"):
            assert any(".norm.1." in k for k in torch.load(path, weights_only=True))
    head = HEADS[arch]
    with caplog.at_level("INFO", logger="ctlesion.models.cnn"):
        model = CNNClassifier(CLASSES, arch=arch, input_size=SIZE, weights=str(path))
    assert model.skipped_weight_keys == [f"{head}.bias", f"{head}.weight"]
    assert f"{head}.weight" in caplog.text
    mine = model.net.state_dict()
    for k, v in state.items():
        if not k.startswith(head + ".") and not k.endswith("num_batches_tracked"):
            assert torch.equal(mine[k], v), k
    assert mine[f"{head}.weight"].shape == (3, state[f"{head}.weight"].shape[1])


def test_weights_for_another_arch_or_missing_file_raise(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="not a state dict for this architecture"):
        CNNClassifier(CLASSES, arch="densenet121", input_size=SIZE, weights=str(path))
    with pytest.raises(FileNotFoundError):
        CNNClassifier(CLASSES, arch="resnet18", input_size=SIZE, weights=str(tmp_path / "absent.pth"))
    # A matching 3-class file loads whole: nothing skipped.
    torch.save(models.resnet18(weights=None, num_classes=3).state_dict(), path)
    assert CNNClassifier(CLASSES, arch="resnet18", input_size=SIZE, weights=str(path)).skipped_weight_keys == []
