"""Stage-by-stage comparison of a converted model with a forward pass of the author's code.

An author fixture is a folder holding ``author_checkpoint.pth.xz`` (the author's format),
``input.npy`` (what the author's model was given) and ``outputs.npz`` (every stage of the
author's forward; two layouts: full arrays for the CTM/SSM fixtures, per-channel digests
for the Affinity/LSTM ones, see each fixture's README). :func:`compare_fixture` converts
the checkpoint, runs the ctlesion model with forward hooks on the same slice, and returns
one :class:`StageResult` per array both sides have. ``scripts/faithfulness.py`` prints them
as ``docs/faithfulness.md``; ``tests/test_author_equivalence.py`` asserts them.

Input: the CTM/SSM fixtures' ``input.npy`` is the 8-bit slice / 255 (their transform
normalises it); the Affinity/LSTM ``input.npy`` is already standardised by the author's
``normalize_img``, so the model is given ``source_u8 / 255`` and its per-image
normalisation must reproduce ``input.npy`` (stage ``batch``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.checkpoint import load_checkpoint
from .author import convert_author_checkpoint

__all__ = ["StageResult", "FixtureRun", "fixture_input", "compare_fixture", "find_fixtures"]

AUTHOR_FILE = "author_checkpoint.pth.xz"
# Arrays describing the author's run itself, or indices into the author's internal lists
# that torchvision does not expose (the values they index are compared instead).
NOT_STAGES = {
    "fwd_seed", "source_u8", "normalize_mean", "normalize_std_unbiased", "cell_anchors",
    "det_masks_pasted_shape", "roi_padded", "det_nms_candidate_proposal_idx", "det_keep_proposal_idx",
    "roi_candidate_proposal_idx", "roi_nms_keep", "roi_batch_proposal_idx", "sel_proposal_index",
    "rpn_pre_nms_top_index", "rpn_proposal_anchor_index", "rpn_proposal_anchors", "rpn_proposal_deltas",
}


@dataclass
class StageResult:
    stage: str
    shape: tuple[int, ...]
    max_abs: float
    bitwise: bool
    note: str = ""


@dataclass
class FixtureRun:
    name: str
    model_name: str
    results: list[StageResult]
    not_compared: list[str]
    checkpoint: Path


def find_fixtures(root: str | Path) -> list[Path]:
    """Every fixture folder under ``root`` (those holding an author checkpoint), sorted."""
    root = Path(root)
    return sorted(p.parent for p in root.glob(f"*/{AUTHOR_FILE}")) if root.is_dir() else []


def fixture_input(fixture: Path, outputs: dict[str, np.ndarray]) -> torch.Tensor:
    """The tensor ctlesion's model is given: ``source_u8 / 255`` (3 channels, as the author's
    RGB conversion) where the fixture has it, else ``input.npy``."""
    if "source_u8" in outputs:
        u8 = torch.from_numpy(outputs["source_u8"].astype(np.float32))
        return (u8 / 255)[None].expand(3, -1, -1).contiguous()
    return torch.from_numpy(np.load(fixture / "input.npy"))


def _digest(prefix: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fixtures' digest of ``[n, C, h, w]``: per-(n, C) mean and population std over
    (h, w), per-(n, h, w) mean over C; float64 arithmetic, float32 result."""
    x = x.double()
    return {f"{prefix}_mean": x.mean((2, 3)).float(), f"{prefix}_std": x.std((2, 3), correction=0).float(),
            f"{prefix}_cmean": x.mean(1).float()}


class _Recorder:
    """Forward hooks and method wrappers that copy each stage's output into ``self.arrays``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.arrays = model, {}
        self.det = getattr(model, "detector", model)
        self.handles: list[Any] = []

    def hook(self, module, fn) -> None:
        if module is not None:
            self.handles.append(module.register_forward_hook(lambda m, i, o: fn(o)))

    def wrap(self, owner, name: str, fn) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            fn(args, out)
            return out

        setattr(owner, name, wrapper)
        self.handles.append((owner, name))

    def put(self, **arrays: torch.Tensor) -> None:
        self.arrays.update({k: v.detach().clone() for k, v in arrays.items()})

    def append(self, key: str, value: torch.Tensor) -> None:
        """Stages run more than once per forward (classification path first, then detections)."""
        self.arrays.setdefault(key, []).append(value.detach().clone())

    def install(self) -> None:
        det, a = self.det, self.put
        self.hook(det.transform, lambda o: a(batch=o[0].tensors))
        self.hook(det.backbone.body, lambda o: a(body_out=next(iter(o.values()))))
        self.hook(det.backbone, lambda o: a(features=next(iter(o.values()))))
        self.hook(det.rpn.head, lambda o: a(rpn_objectness=o[0][0], rpn_deltas=o[1][0]))
        self.wrap(det.rpn, "filter_proposals", lambda args, o: a(proposals=o[0][0], proposal_logits=o[1][0]))
        heads = det.roi_heads
        self.hook(heads.box_head, lambda o: a(box_features=o))
        self.hook(heads.box_predictor, lambda o: a(class_logits=o[0], box_regression=o[1]))
        self.hook(heads.mask_predictor, lambda o: a(mask_predictor_out=o))
        self.hook(heads.box_roi_pool, lambda o: self.append("box_pool", o))
        self.hook(heads.mask_roi_pool, lambda o: self.append("mask_pool", o))
        self.hook(heads.mask_head, lambda o: a(seg_mask_head=o))
        branch = getattr(self.model, "cls_branch", None)
        if branch is not None:
            self.hook(branch["box_head"], lambda o: a(cls_box_features=o))
            self.hook(branch["box_predictor"], lambda o: a(cls_class_logits=o[0], cls_box_regression=o[1]))
            if "mask_branch" in branch:
                mb = branch["mask_branch"]
                self.hook(mb, lambda o: a(mask_features=o))
                self.hook(mb.mask_fcn1, lambda o: a(cls_mask_head=torch.relu(o)))
                self.hook(mb.conv5_mask, lambda o: a(cls_mask_convT=o))
                self.hook(mb.conv_reduce, lambda o: a(cls_mask_conv_reduce=o))
        if hasattr(self.model, "_order"):
            self.wrap(self.model, "_order", lambda args, o: a(
                roi_batch=args[0].rows, roi_batch_boxes=args[0].boxes, roi_batch_labels=args[0].labels,
                roi_n_survivors=torch.tensor(args[0].num_survivors), ordered_boxes=o.boxes))
        head = getattr(self.model, "head", None)
        layer = getattr(head, "layer", None)
        if layer is not None:
            self.hook(layer, lambda o: a(affinity_z=o[0], affinity_Y=o[1]))   # AffinityLayer only
            self.hook(layer.refinement, lambda o: a(refine_out=o))
            for block in layer.refinement.blocks:
                self.hook(block, lambda o: self.append("refine_block_apps", o))
            vec = layer.vectorisation
            self.hook(vec.bn1, lambda o: a(vec_bn1=o))
            self.hook(vec.bn2, lambda o: a(vec_bn2=o))
            self.hook(vec.conv_d_final, lambda o: a(vec_conv_d_final=o.flatten(1)))
            self.hook(vec, lambda o: a(X=o))
            for side in ("pos", "neg"):
                branch_mod = getattr(layer, side, None)
                if branch_mod is not None:
                    self.hook(branch_mod.lstm, lambda o, s=side: a(**{
                        f"lstm_{s}_H": o[0][0], f"lstm_{s}_h": o[1][0][-1, 0], f"lstm_{s}_c": o[1][1][-1, 0]}))
                    self.hook(branch_mod.fc_v, lambda o, s=side: a(**{f"v_{s}": o}))
                    classifier = getattr(head, f"classifier_{side}")
                    self.hook(classifier, lambda o, s=side: a(**{f"logits_{s}": o}))
                    self.hook(classifier.fc_l1, lambda o, s=side: a(**{f"{s}_fc_l1": o}))
                    self.handles.append(classifier.register_forward_pre_hook(
                        lambda m, i, s=side: a(**{f"p_{s}": i[0]})))
            classifier = getattr(head, "classifier", None)
            if classifier is not None:
                self.hook(classifier.fc_l1, lambda o: a(cls_fc_l1=o))
                self.hook(classifier.fc_l2, lambda o: a(cls_fc_l2=o))

    def remove(self) -> None:
        for h in self.handles:
            if isinstance(h, tuple):
                delattr(*h)           # drop the instance attribute: the class method is back
            else:
                h.remove()


def _ours(rec: dict[str, torch.Tensor], out: dict[str, Any], author: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Our arrays under the fixture's names (both layouts)."""
    ours = {k: v for k, v in rec.items() if not isinstance(v, list)}
    ours.pop("ordered_boxes", None)
    box_pool, mask_pool = rec.get("box_pool", []), rec.get("mask_pool", [])
    if box_pool and "logits" in out:   # one pooling of the proposals, shared by both branches
        ours["cls_box_pool_mean"] = box_pool[0].double().mean((1, 2, 3)).float()
        ours["cls_box_pool_std"] = box_pool[0].double().std((1, 2, 3), correction=0).float()
    if len(mask_pool) == 2 and "seg_mask_head" in rec:
        n = min(10, len(mask_pool[1]))       # the fixtures digest the first <= 10 detections
        ours.update(_digest("seg_mask_pool", mask_pool[1][:n]))
        ours.update(_digest("seg_mask_head", rec["seg_mask_head"][:n]))
    if rec.get("refine_block_apps"):
        apps = [_digest("x", t) for t in rec["refine_block_apps"]]
        ours["refine_block_apps_mean"] = torch.stack([d["x_mean"] for d in apps])
        ours["refine_block_apps_std"] = torch.stack([d["x_std"] for d in apps])
        per_pass = len(apps) // max(1, len([k for k in author if k.startswith("refine_seq") and k.endswith("_mean")]))
        for i in range(len(apps) // per_pass if per_pass else 0):
            ours[f"refine_seq{i}_mean"] = apps[(i + 1) * per_pass - 1]["x_mean"]
            ours[f"refine_seq{i}_std"] = apps[(i + 1) * per_pass - 1]["x_std"]
    ours["fpn"] = rec["features"]
    ours["rpn_proposals"], ours["rpn_proposal_scores"] = rec["proposals"], rec["proposal_logits"]
    ours.update(_digest("backbone_body", rec["body_out"]))
    ours["cls_box_head"] = rec.get("cls_box_features", rec["box_features"])
    ours["seg_box_head"], ours["seg_class_logits"] = rec["box_features"], rec["class_logits"]
    ours["seg_box_regression"] = rec["box_regression"]
    det = out.get("detections")
    if det is not None:
        ours.update(det_boxes=det["boxes"], det_scores=det["scores"], det_labels=det["labels"])
        if "masks" in det:
            ours["det_masks_pasted_sum"] = det["masks"][:, 0].double().sum((1, 2)).float()
            ours["det_masks_pasted_area_gt05"] = (det["masks"][:, 0] > 0.5).sum((1, 2))
            ours["det_masks_pasted"] = det["masks"][:, 0] > 0.5
        if "mask_predictor_out" in rec:
            picked = rec["mask_predictor_out"][torch.arange(len(det["labels"])), det["labels"]]
            ours.update(det_mask_logits=picked, det_mask_logits_28=picked[:, None],
                        det_mask_probs_28=picked.sigmoid()[:, None])
    if "logits" in out:
        ours.update(image_logits=out["logits"], final_logits=out["logits"],
                    image_scores_sigmoid=out["logits"].sigmoid())
    if "roi_batch" in rec:
        rows = rec["roi_batch"]
        ours.update(sel_scores=rows[:, 0], sel_deltas=rows[:, 1:], sel_boxes=rec["roi_batch_boxes"],
                    sel_labels=rec["roi_batch_labels"], sel_boxes_dist_order=rec["ordered_boxes"])
        weights = out.get("roi_weights")
        if weights is not None:
            ours["affinity_Wv" if "affinity_Wv" in author else "attn_pos"] = weights
    if out.get("neg_weights") is not None:
        ours["attn_neg"] = out["neg_weights"]
    if "roi_batch_boxes" in rec and "dist_order" in author:
        boxes, ordered = rec["roi_batch_boxes"], rec["ordered_boxes"]
        ours["dist_from_origin"] = torch.sqrt(boxes[:, 0] ** 2 + boxes[:, 1] ** 2)
        # our order, read back from the rows the head got (distinct boxes: one match each)
        ours["dist_order"] = torch.stack([(boxes == b).all(1).nonzero()[0, 0] for b in ordered])
    if "mask_features" in rec:
        inverse = None
        if "dist_order" in author:        # the fixture keeps cls_mask_* in confidence order
            order = torch.from_numpy(author["dist_order"])
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order))
        for k in ("mask_features", "cls_mask_head", "cls_mask_convT", "cls_mask_conv_reduce"):
            if k in rec:
                t = rec[k] if inverse is None else rec[k][inverse]
                ours.update(_digest(k if k.startswith("cls_") else "cls_mask_features", t))
        if mask_pool:
            t = mask_pool[0] if inverse is None else mask_pool[0][inverse]
            ours.update(_digest("cls_mask_pool", t))
        for k in ("refine_out", "vec_bn1", "vec_bn2"):
            ours.update(_digest(k, rec[k]))
    return ours


def _compare(name: str, ours: torch.Tensor, theirs: np.ndarray) -> StageResult:
    a = ours.detach().cpu().numpy()
    if a.size != theirs.size:
        return StageResult(name, tuple(theirs.shape), float("inf"), False, f"shape {a.shape} vs {theirs.shape}")
    a = a.reshape(theirs.shape)
    if a.dtype == bool or theirs.dtype == bool:
        diff = int((a.astype(bool) != theirs.astype(bool)).sum())
        return StageResult(name, tuple(theirs.shape), float(diff), diff == 0, f"{diff} pixels differ")
    max_abs = float(np.abs(a.astype(np.float64) - theirs.astype(np.float64)).max()) if a.size else 0.0
    return StageResult(name, tuple(theirs.shape), max_abs, bool(np.array_equal(a.astype(theirs.dtype), theirs)))


def _author_masks(author: dict[str, np.ndarray]) -> np.ndarray | None:
    if "det_masks_pasted_bits" not in author:
        return None
    shape = tuple(int(s) for s in author["det_masks_pasted_shape"])
    return np.unpackbits(author["det_masks_pasted_bits"])[: int(np.prod(shape))].reshape(shape).astype(bool)


@torch.no_grad()
def compare_fixture(fixture: str | Path, checkpoint: str | Path | None = None) -> FixtureRun:
    """Convert ``fixture``'s author checkpoint (into ``checkpoint``, kept; default a temporary
    folder), run it on the fixture's slice as a user would, and compare every stage."""

    fixture = Path(fixture)
    author = dict(np.load(fixture / "outputs.npz"))
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(checkpoint) if checkpoint is not None else Path(tmp) / "checkpoint"
        result = convert_author_checkpoint(fixture / AUTHOR_FILE, target)
        model, cfg, _ = load_checkpoint(result.checkpoint)
    model.eval()
    recorder = _Recorder(model)
    recorder.install()
    x = fixture_input(fixture, author)
    torch.manual_seed(int(author.get("fwd_seed", 0)))
    try:
        out: dict[str, Any] = {}
        if hasattr(model, "inference"):
            cls_bn = cfg.train.cls_bn if cfg.train.cls_bn != "auto" else "eval"
            with model.inference(cls_bn=cls_bn):
                co = model([x.clone()], with_detections=True)
            out["logits"] = co.logits[0]
            out["detections"] = co.detections[0] if co.detections else None
            out["roi_weights"] = co.rois[0]["weights"]
            last = getattr(model.head, "last_weights", None)
            out["neg_weights"] = last["neg"] if last else None
        else:
            out["detections"] = model([x.clone()])[0]
    finally:
        recorder.remove()
    ours = _ours(recorder.arrays, out, author)
    masks = _author_masks(author)
    if masks is not None:
        author = {**author, "det_masks_pasted": masks}
    results, missing = [], []
    for key in author:                   # the fixture's own (pipeline) order
        if key in NOT_STAGES or key.startswith("det_masks_pasted_bits"):
            continue
        if key in ours:
            results.append(_compare(key, ours[key], author[key]))
        else:
            missing.append(key)
    return FixtureRun(fixture.name, result.model_name, results, missing, result.checkpoint)
