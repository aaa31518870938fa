"""Convert the author's released checkpoints into ctlesion checkpoints (``ctlesion convert-weights``).

1. :func:`~ctlesion.convert.author_reader.read_author_checkpoint` reads the torch 1.1 file
   without executing anything;
2. :func:`infer_model_name` names the ctlesion model from the weights (family from the
   head's keys, backbone from the body's, CTM vs SSM detector from the anchor generator);
3. :func:`author_config` resolves the model's config: the registry entry, then what the
   author stored (anchors, C*, class counts, N and F of module S), then the settings of the
   author's evaluation scripts (:data:`AUTHOR_EVALUATION`);
4. :func:`~ctlesion.convert.keymap.map_state_dict` renames the weights strictly, and a normal
   checkpoint folder is written, recording the source file's SHA-256 in ``meta.json``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import ExperimentConfig, update_dataclass
from ..data.masks import get_mask_type
from ..engine.checkpoint import save_checkpoint
from ..errors import ConfigError, CtlesionError, DataError
from ..registry import create_model, default_model_config, get_entry, list_models
from .author_reader import anchor_settings, read_author_checkpoint, sha256_of_file, state_dict_of
from .keymap import map_state_dict

__all__ = [
    "AUTHOR_EVALUATION", "ConversionError", "ConversionResult", "infer_family", "infer_model_name",
    "author_config", "convert_author_checkpoint",
]

# What each original repo's evaluation script builds where it differs from the registry
# entry (the fixtures' READMEs quote the scripts). Common to all: RPN min_size 0 and NMS on
# the objectness logits (torchvision 0.3). CTM: area > 0 filter and logit masks
# (evaluation_mean_ap.py keeps 128 detections); SSM: evaluation_class_branch.py scores
# detections at 0.05 (evaluation_seg_branch.py: 0.75, i.e. `--score-thresh 0.75`); AFF:
# test_classification_branch.py with the code's shared refinement and extra conv; LSTM:
# eval.py (score 0.75, 4 detections, no Eq. 16 Linear, backbone BN on batch statistics).
_AUTHOR_RPN = {"rpn_min_size": 0.0, "rpn_nms_score": "logit"}
AUTHOR_EVALUATION: dict[str, dict[str, dict[str, Any]]] = {
    "maskrcnn": {
        "model": {"detector": {**_AUTHOR_RPN, "detection_filter": "positive_area", "mask_paste": "logits",
                               "box_detections_per_img": 128}},
        "eval": {"score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 128},
    },
    "ssm-detector": {
        "model": {"detector": {**_AUTHOR_RPN, "detection_filter": "none"}},
        "eval": {"score_thresh": 0.75, "nms_thresh": 0.5, "detections_per_img": 128},
    },
    "ctm": {
        "model": {"detector": {**_AUTHOR_RPN, "detection_filter": "positive_area", "mask_paste": "logits"}},
        "train": {"cls_bn": "eval"},
    },
    "ssm": {
        "model": {"detector": {**_AUTHOR_RPN, "detection_filter": "none", "box_score_thresh": 0.05}},
        "eval": {"score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 128},
        "train": {"cls_bn": "eval"},
    },
    "affinity": {
        "model": {"detector": {**_AUTHOR_RPN, "detection_filter": "none"},
                  "classifier": {"shared_refinement": True, "extra_conv": True, "head_batch_stats": True}},
        "train": {"cls_bn": "eval"},
    },
    "lstm2": {
        "model": {"detector": {**_AUTHOR_RPN, "detection_filter": "none", "box_score_thresh": 0.75,
                               "box_detections_per_img": 4},
                  "classifier": {"eq16_linear": False, "extra_conv": True, "head_batch_stats": True,
                                 "roi_order": "distance_code"}},
        "eval": {"score_thresh": 0.75, "nms_thresh": 0.5, "detections_per_img": 4},
        "train": {"cls_bn": "batch"},
    },
}
# Detector classes (with background) -> mask type, where the registry entry's differs.
_MASK_TYPE_BY_CLASSES = {2: "merge", 3: "both", 4: "separate"}


class ConversionError(CtlesionError, ValueError):
    """The author's checkpoint cannot be converted; the message names the file and why."""


@dataclass
class ConversionResult:
    checkpoint: Path
    model_name: str
    family: str
    source_sha256: str
    num_tensors: int
    settings: dict[str, Any]
    notes: list[str]


def infer_family(weights: Mapping[str, torch.Tensor]) -> str:
    """The original repo's model family from the keys: ``affinity``, ``lstm2``, ``ssm-2branch``,
    ``ssm``, ``ctm`` or ``segmentation`` (a Mask R-CNN of either repo)."""
    keys = set(weights)
    if "affinity_layer.batch_to_feat_mat" in keys:
        return "affinity"
    if any(k.startswith("attn_layer.lstm_") for k in keys):
        return "lstm2"
    if any(k.startswith("s2new.fc_scores.") for k in keys):
        if any(k.startswith("roi_heads.box_head_s2.") for k in keys):
            return "ssm-2branch"
        return "ssm" if any(k.startswith("roi_heads.mask_predictor.") for k in keys) else "ctm"
    if any(k.startswith("roi_heads.mask_predictor.") for k in keys):
        return "segmentation"
    raise ConversionError("no known head in the weights (no s2new, affinity_layer, attn_layer or mask predictor)")


def _backbone_tag(weights: Mapping[str, torch.Tensor]) -> tuple[str, int, bool]:
    """``(short arch, stages kept, full FPN)`` from the body's keys and shapes."""
    body = "backbone.body."
    if f"{body}layer1.0.conv1.weight" not in weights:
        raise ConversionError("no ResNet body in the weights (backbone.body.layer1 missing)")
    stages = max(i for i in range(1, 5) if f"{body}layer{i}.0.conv1.weight" in weights)
    if f"{body}layer1.0.conv3.weight" in weights:          # bottleneck blocks
        # conv2 of layer1: ResNet50 [64, 64, 3, 3]; ResNeXt50-32x4d [128, 4, 3, 3]; 101-32x8d [256, 8, 3, 3]
        out_ch, in_per_group = weights[f"{body}layer1.0.conv2.weight"].shape[:2]
        arch = "r50" if out_ch == in_per_group else ("x101" if out_ch == 256 else "x50")
    else:
        arch = "r34" if f"{body}layer1.2.conv1.weight" in weights else "r18"
    full_fpn = "backbone.fpn.inner_blocks.3.weight" in weights
    return arch, stages, full_fpn


def infer_model_name(weights: Mapping[str, torch.Tensor], anchor_levels: int | None) -> str:
    """The registered ctlesion model the author's weights belong to, or a ConversionError
    naming the candidates. ``anchor_levels``: how many size tuples the stored anchor
    generator has (the CTM code stores 5, the SSM code 1; None when absent)."""
    family = infer_family(weights)
    arch, stages, full_fpn = _backbone_tag(weights)
    tail = "r50-fpn" if full_fpn else f"{arch}-s{stages}"
    if family in ("affinity", "lstm2"):
        candidates = [f"{family}-{arch}"]
    elif family == "segmentation":
        candidates = [f"maskrcnn-{tail}", f"ssm-detector-{tail}"]
        if anchor_levels is not None:
            candidates = candidates[:1] if anchor_levels > 1 else candidates[1:]
    else:
        candidates = [f"{family}-{tail}"]
    known = [c for c in candidates if c in list_models()]
    if len(known) == 1:
        return known[0]
    if not known:
        raise ConversionError(f"the weights look like {family} on {tail}, which no registered model is "
                              f"(tried {', '.join(candidates)}); pass --model")
    raise ConversionError(f"the weights fit several models: {', '.join(known)} (the checkpoint stores no "
                          "anchor generator to tell them apart); pass --model")


def _profile_key(model_name: str) -> str:
    family = model_name.split("-")[0]
    if model_name.startswith("ssm-detector-"):
        return "ssm-detector"
    return {"ssm": "ssm", "ctm": "ctm", "maskrcnn": "maskrcnn"}.get(family, family)


def _stored_settings(cfg: ExperimentConfig, ckpt: Mapping[str, Any], weights: Mapping[str, torch.Tensor],
                     class_names: list[str] | None) -> list[str]:
    """Put what the author stored into ``cfg`` (it wins over the preset); returns notes."""
    notes: list[str] = []
    d, c = cfg.model.detector, cfg.model.classifier
    anchors = anchor_settings(ckpt)
    if anchors is None:
        notes.append("no anchor generator stored: anchors from the preset")
    else:
        sizes, ratios = [int(s) for s in anchors[0]], [float(r) for r in anchors[1]]
        if (sizes, ratios) != (list(d.anchor_sizes), list(d.aspect_ratios)):
            notes.append(f"anchors from the checkpoint {sizes} x {ratios} (preset {d.anchor_sizes} x {d.aspect_ratios})")
        d.anchor_sizes, d.aspect_ratios = sizes, ratios
    det_classes = weights["roi_heads.box_predictor.cls_score.weight"].shape[0]

    if len(get_mask_type(d.mask_type).class_names) + 1 != det_classes:
        d.mask_type = _MASK_TYPE_BY_CLASSES.get(det_classes, d.mask_type)
        notes.append(f"{det_classes} detector classes: mask type {d.mask_type}")
    if "s2new.fc_scores.weight" in weights:                       # module S: N and F
        features, inputs = weights["s2new.fc_scores.weight"].shape
        c.rois, c.s_features = inputs // 5, features
    if "affinity_layer.batch_to_feat_mat" in weights:              # Affinity: beta and C*
        c.rois, c.affinity_dim = weights["affinity_layer.batch_to_feat_mat"].shape
        if "affinity" in ckpt and int(ckpt["affinity"]) != c.affinity_dim:
            raise ConversionError(f"ckpt['affinity'] = {ckpt['affinity']} but the affinity matrix has "
                                  f"C* = {c.affinity_dim}")
    out = next((weights[k].shape[0] for k in ("s2new.fc_scores_img.weight", "s2new.class_predict_logits.weight",
                                              "pos_classifier_attn.class_predict_logits.weight") if k in weights), None)
    if class_names is not None:
        if out is not None and len(class_names) != out:
            raise ConversionError(f"--class-names gives {len(class_names)} names, the image head has {out} outputs")
        c.class_names = list(class_names)
    elif out is not None and out != len(c.class_names):
        c.class_names = [f"class{i}" for i in range(out)]
        notes.append(f"{out} image classes: named {c.class_names} (pass --class-names)")
    return notes


def author_config(model_name: str, ckpt: Mapping[str, Any], weights: Mapping[str, torch.Tensor],
                  class_names: list[str] | None = None) -> tuple[ExperimentConfig, list[str]]:
    """The resolved config of the converted model: registry entry <- what the author stored
    <- the author's evaluation settings. Returns ``(config, notes)``."""
    cfg = ExperimentConfig(model=default_model_config(model_name))
    notes = _stored_settings(cfg, ckpt, weights, class_names)
    update_dataclass(cfg, AUTHOR_EVALUATION[_profile_key(model_name)])
    return cfg, notes


def _check_family(model_name: str, family: str) -> None:
    expected = {"segmentation": ("maskrcnn", "ssm-detector"), "ctm": ("ctm",), "ssm": ("ssm",),
                "ssm-2branch": ("ssm-2branch",), "affinity": ("affinity",), "lstm2": ("lstm2",)}[family]
    fits = any(model_name.startswith(p + "-") for p in expected)
    if family == "ssm":
        fits = fits and not model_name.startswith(("ssm-2branch-", "ssm-detector-"))
    if not fits:
        raise ConversionError(f"--model {model_name}: the weights are a {family} model "
                              f"(expected a name starting with {' or '.join(p + '-' for p in expected)})")


def anchor_levels(generator: Any) -> tuple:
    """The stored generator's per-level size tuples (the CTM code stores 5, the SSM code 1)."""
    sizes = generator.get("sizes") if isinstance(generator, Mapping) else getattr(generator, "sizes", None)
    return tuple(sizes) if sizes is not None else ()


def convert_author_checkpoint(path: str | Path, out: str | Path, *, model_name: str | None = None,
                              class_names: list[str] | None = None) -> ConversionResult:
    """Read the author's checkpoint at ``path`` and write a ctlesion checkpoint folder ``out``."""

    path = Path(path)
    ckpt = read_author_checkpoint(path)
    weights = state_dict_of(ckpt, path)
    try:
        family = infer_family(weights)
        anchors = ckpt.get("anchor_generator")
        levels = len(anchor_levels(anchors)) if anchors is not None else None
        if model_name is None:
            model_name = infer_model_name(weights, levels)
        else:
            get_entry(model_name)
            _check_family(model_name, family)
        cfg, notes = author_config(model_name, ckpt, weights, class_names)
        model = create_model(cfg.model)
        state = map_state_dict(weights, model.state_dict(), source=str(path),
                               detector_prefix="detector." if get_entry(model_name).task != "segmentation" else "")
    except (ConversionError, ConfigError, DataError) as exc:
        message = str(exc)
        raise ConversionError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    model.load_state_dict(state)
    source = {"file": path.name, "sha256": sha256_of_file(path), "format": "author (Ter-Sarkisov) checkpoint",
              "epoch": str(ckpt.get("epoch")), "family": family}
    task = get_entry(model_name).task
    epoch = int(ckpt["epoch"]) if str(ckpt.get("epoch", "")).isdigit() else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_checkpoint(out, model, cfg, epoch=epoch, step=0, task=task, source=source)
    settings = AUTHOR_EVALUATION[_profile_key(model_name)]
    return ConversionResult(Path(out), model_name, family, source["sha256"], len(state), settings, notes)
