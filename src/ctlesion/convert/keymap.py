"""The author's state-dict keys -> ctlesion's, for every family (strict).

The author's models are torchvision 0.3 modules plus their own heads; ctlesion's are
current torchvision modules plus ours. The renames, in the order they are tried:

=========================================================  ==============================================
author                                                     ctlesion
=========================================================  ==============================================
``backbone.fpn.{inner,layer}_blocks.I.{weight,bias}``      ``...blocks.I.0.*`` (torchvision 0.3 FPN names)
``rpn.head.conv.*``                                         ``rpn.head.conv.0.0.*``
``roi_heads.mask_head.mask_fcnI.*``                         ``roi_heads.mask_head.{I-1}.0.*``
``roi_heads.mask_predictor.conv_mask.*`` (AFF/LSTM)         ``roi_heads.mask_predictor.conv5_mask.*``
``roi_heads.box_head_s2.*``, ``box_predictor_s2.*``         ``cls_branch.box_head.*``, ``cls_branch.box_predictor.*``
``roi_heads.mask_head_s2.mask_fcn1.*``                      ``cls_branch.mask_branch.mask_fcn1.*``
``roi_heads.mask_predictor_s2.{conv_mask,conv_reduce}.*``   ``cls_branch.mask_branch.{conv5_mask,conv_reduce}.*``
``s2new.fc_scores{,_2,_img}.*`` (module S)                  ``head.layers.{0,2,4}.*``
``{affinity,attn}_layer.sieve.0.*``                         ``head.layer.refinement.blocks.0.*``
``{affinity,attn}_layer.{conv_d1,bn1,...,bn3}.*``           ``head.layer.vectorisation.*``
``affinity_layer.batch_to_feat_{mat,vec}``                  ``head.layer.affinity_{matrix,vector}``
``s2new.{fc_l1,fc_l2,class_predict_logits}.*`` (AFF)        ``head.classifier.*``
``attn_layer.lstm_{pos,neg}.*``                             ``head.layer.{pos,neg}.lstm.*``
``attn_layer.final_linear_{pos,neg}.*``                     ``head.layer.{pos,neg}.fc_v.*``
``{pos,neg}_classifier_attn.*``                             ``head.classifier_{pos,neg}.*``
=========================================================  ==============================================

Classifier models hold the detector under ``detector.``. The Affinity code's tied copies
(``sieve.1``, ``sieve.2``: the one shared block; ``pars.0``, ``pars.1``: W and v again)
are checked to equal their original and then skipped.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..errors import CheckpointError

__all__ = ["KeyMapError", "author_key_to_ctlesion", "map_state_dict", "TIED_DUPLICATES"]


class KeyMapError(CheckpointError):
    """The author's weights do not fill the ctlesion model one to one; the message lists why."""


def _mask_fcn(m: re.Match) -> str:
    return f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"


# (pattern, replacement) applied in order with re.sub; detector keys first.
DETECTOR_RULES: list[tuple[str, str | Callable[[re.Match], str]]] = [
    (r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(weight|bias)$", r"backbone.fpn.\1_blocks.\2.0.\3"),
    (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
    (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$", _mask_fcn),
    (r"^roi_heads\.mask_predictor\.conv_mask\.", "roi_heads.mask_predictor.conv5_mask."),
]
HEAD_RULES: list[tuple[str, str]] = [
    (r"^roi_heads\.box_head_s2\.", "cls_branch.box_head."),
    (r"^roi_heads\.box_predictor_s2\.", "cls_branch.box_predictor."),
    (r"^roi_heads\.mask_head_s2\.mask_fcn1\.", "cls_branch.mask_branch.mask_fcn1."),
    (r"^roi_heads\.mask_predictor_s2\.conv_mask\.", "cls_branch.mask_branch.conv5_mask."),
    (r"^roi_heads\.mask_predictor_s2\.conv_reduce\.", "cls_branch.mask_branch.conv_reduce."),
    (r"^s2new\.fc_scores\.", "head.layers.0."),
    (r"^s2new\.fc_scores_2\.", "head.layers.2."),
    (r"^s2new\.fc_scores_img\.", "head.layers.4."),
    (r"^(?:affinity|attn)_layer\.sieve\.0\.", "head.layer.refinement.blocks.0."),
    (r"^(?:affinity|attn)_layer\.(conv_d1|bn1|conv_d2|bn2|conv_d_final|bn3)\.", r"head.layer.vectorisation.\1."),
    (r"^affinity_layer\.batch_to_feat_mat$", "head.layer.affinity_matrix"),
    (r"^affinity_layer\.batch_to_feat_vec$", "head.layer.affinity_vector"),
    (r"^s2new\.(fc_l1|fc_l2|class_predict_logits)\.", r"head.classifier.\1."),
    (r"^attn_layer\.lstm_(pos|neg)\.", r"head.layer.\1.lstm."),
    (r"^attn_layer\.final_linear_(pos|neg)\.", r"head.layer.\1.fc_v."),
    (r"^(pos|neg)_classifier_attn\.", r"head.classifier_\1."),
]
# Tied copies in the Affinity code: key pattern -> the key it must equal.
TIED_DUPLICATES: list[tuple[str, str]] = [
    (r"^((?:affinity|attn)_layer)\.sieve\.[1-9]\d*\.(.+)$", r"\1.sieve.0.\2"),
    (r"^affinity_layer\.pars\.0$", "affinity_layer.batch_to_feat_mat"),
    (r"^affinity_layer\.pars\.1$", "affinity_layer.batch_to_feat_vec"),
]
_DETECTOR_PREFIXES = ("backbone.", "rpn.", "roi_heads.")


def author_key_to_ctlesion(key: str, detector_prefix: str = "") -> str | None:
    """The ctlesion key for one author key (``None``: no rule knows it).

    ``detector_prefix`` is ``"detector."`` for classifier models, ``""`` for detectors.
    """
    for pattern, repl in HEAD_RULES:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    if not key.startswith(_DETECTOR_PREFIXES):
        return None
    for pattern, repl in DETECTOR_RULES:
        if re.search(pattern, key):
            key = re.sub(pattern, repl, key)
            break
    return detector_prefix + key


def _tied_original(key: str) -> str | None:
    for pattern, repl in TIED_DUPLICATES:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def map_state_dict(author: Mapping[str, Tensor], target: Mapping[str, Tensor], *,
                   detector_prefix: str = "", source: str = "author checkpoint") -> OrderedDict[str, Tensor]:
    """Rename ``author`` onto the keys of ``target`` (a model's ``state_dict()``), strictly.

    Every author key is used (or is a verified tied copy), every target key is filled, and
    shapes agree (the affinity vector ``[C*, 1]`` becomes ``[C*]``); otherwise one
    :class:`KeyMapError` lists everything that is missing, left over or mis-shaped.
    """
    mapped: OrderedDict[str, Tensor] = OrderedDict()
    unknown, untied, shapes, misfit = [], [], [], set()
    for key, value in author.items():
        original = _tied_original(key)
        if original is not None:
            if original not in author or not torch.equal(author[original], value):
                untied.append(f"{key} (differs from {original})")
            continue
        new = author_key_to_ctlesion(key, detector_prefix)
        if new is None or new not in target:
            unknown.append(key if new is None else f"{key} -> {new}")
            continue
        if new.endswith("affinity_vector") and value.dim() == 2 and value.shape[1] == 1:
            value = value.reshape(-1)
        if tuple(value.shape) != tuple(target[new].shape):
            shapes.append(f"{key} {tuple(value.shape)} -> {new} {tuple(target[new].shape)}")
            misfit.add(new)
            continue
        mapped[new] = value.to(target[new].dtype)
    missing = [k for k in target if k not in mapped and k not in misfit]
    problems = [
        (f"{len(unknown)} author keys with no place in the model", unknown),
        (f"{len(missing)} model keys not filled", missing),
        (f"{len(shapes)} shape mismatches", shapes),
        (f"{len(untied)} tied copies that differ", untied),
    ]
    if any(items for _, items in problems):
        lines = [f"{source}: the weights do not fit the model one to one:"]
        for title, items in problems:
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
                lines.append(f"  {title}: {shown}")
        raise KeyMapError("\n".join(lines))
    return OrderedDict((k, mapped[k]) for k in target)
