"""One engine for every slice classifier: CTM stage 2, the Single-Shot Model, the
mask-feature models and the benchmark CNNs (spec §4.5, §5.2, §6.3, §7.5).

Each iteration takes one batch of classification images (``train.batch_size``: 8 for CTM,
1 for the joint models). For joint models (``has_segmentation`` and ``train.joint``) a
segmentation step comes first:

1. **Segmentation step.** One image drawn uniformly, with replacement, from ``seg_data``
   (a pure function of ``(seed, step)``, so resume is exact). Lesion-free images are
   skipped, as in the original. Model in train mode, stock Mask R-CNN losses, backward.
   The copy rule (``train.copy_rule``) may copy the segmentation RoI branch into the
   classification branch, *before* the optimiser step (spec §5.2, §11.9). Adam step.
2. **Classification step.** ``model.classification_mode(train.cls_bn)``: everything in
   eval mode except the head (and, for ``cls_bn="batch"``, the backbone). Per-class BCE on
   one-hot labels. Parameters outside ``train.update_rule`` get ``grad=None``, so Adam
   neither moves them nor applies weight decay (zeroed gradients would still move them).

One Adam optimiser over all parameters is stepped by both steps (the original's design).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import ExperimentConfig, save_config
from ..data.sample import Sample, collate_samples
from ..models.classifier import SliceClassifier, trainable_names
from ..models.rcnn_classifier import one_hot_bce
from .checkpoint import WEIGHTS, _read_meta, load_checkpoint, load_train_state, save_checkpoint
from .train import (
    NonFiniteLossError, TrainResult, _rng_state, _seed_everything, _set_rng_state, epoch_order,
    resolve_device, save_epoch, scheduled_lr,
)

__all__ = ["COPY_RULES", "CopyRule", "train_classifier", "init_from_checkpoint", "seg_index",
           "resolve_auto_settings", "FAMILY_DEFAULTS"]

COPY_RULES = ("none", "once", "running_min", "previous", "every")

# What the original code (or, where there is none, the paper) does per family, used for
# the "auto" settings: (update_rule, copy_rule for a separate branch, cls_bn).
FAMILY_DEFAULTS = {
    "ctm": ("s_bn", "none", "eval"),              # spec §4.5: S+BN is the mode in code
    "ssm": ("s_backbone", "running_min", "eval"),  # spec §5.2: rule 2, running-minimum copy
    "affinity": ("s_backbone", "every", "eval"),   # spec §6.3, §10 #14: paper copies every step
    "attention": ("s_backbone", "previous", "batch"),  # spec §7.5: LSTM code
    "lstm1": ("s_backbone", "previous", "batch"),
    "lstm2": ("s_backbone", "previous", "batch"),
    "cnn": ("full", "none", "batch"),             # an ordinary CNN: train all, BN batch statistics
}


def resolve_auto_settings(cfg: ExperimentConfig) -> None:
    """Replace ``"auto"`` in ``train.update_rule / copy_rule / cls_bn`` by the family's
    original setting (in place; the resolved values are what config.yaml records)."""
    kind = cfg.model.classifier.kind
    if kind not in FAMILY_DEFAULTS:
        raise ValueError(f"model {cfg.model.name!r} is not a slice classifier (classifier.kind={kind!r})")
    update, copy_rule, cls_bn = FAMILY_DEFAULTS[kind]
    tc = cfg.train
    if tc.update_rule == "auto":
        tc.update_rule = update
    if tc.copy_rule == "auto":
        tc.copy_rule = copy_rule if cfg.model.classifier.branch == "separate" else "none"
    if tc.cls_bn == "auto":
        tc.cls_bn = cls_bn


class CopyRule:
    """When the segmentation branch is copied into the classification branch.

    ``running_min`` (SSM code): copy when L_SEG is below the lowest value seen so far
    (initially 10,000, carried across epochs). ``previous`` (LSTM code): copy when L_SEG is
    below the previous iteration's value (initially 1,000; overwritten every time).
    ``every`` (Affinity paper): every segmentation step. ``once``: before training only.
    """

    def __init__(self, rule: str, state: dict | None = None) -> None:
        if rule not in COPY_RULES:
            raise ValueError(f"train.copy_rule must be one of {COPY_RULES}, not {rule!r}")
        self.rule = rule
        self.reference = {"running_min": 10_000.0, "previous": 1_000.0}.get(rule)
        if state is not None:
            self.reference = state.get("reference", self.reference)

    def should_copy(self, seg_loss: float) -> bool:
        if self.rule == "every":
            return True
        if self.rule == "running_min":
            if seg_loss < self.reference:
                self.reference = seg_loss
                return True
            return False
        if self.rule == "previous":
            better = seg_loss < self.reference
            self.reference = seg_loss
            return better
        return False

    def state(self) -> dict:
        return {"rule": self.rule, "reference": self.reference}


def seg_index(num_samples: int, seed: int, step: int) -> int:
    """The segmentation image of iteration ``step``: uniform with replacement, a pure
    function of (seed, step) so that a resumed run draws the same images."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 7)
    return int(torch.randint(num_samples, (1,), generator=gen))


def init_from_checkpoint(model: torch.nn.Module, path: str | Path) -> dict:
    """Copy every weight of checkpoint ``path`` whose name and shape match ``model``.

    A segmentation checkpoint's keys are looked up under ``detector.`` (it fills the
    detector of a CTM/SSM/mask-feature model). Returns ``{"loaded", "skipped_shape",
    "missing"}`` name lists: ``skipped_shape`` are weights present in both with different
    shapes (e.g. the last layer when fine-tuning 3 classes -> 2), ``missing`` are the
    model's weights the checkpoint does not have (they keep their initialisation).
    """
    path = Path(path)
    meta = _read_meta(path)
    source = load_file(str(path / WEIGHTS))
    target = model.state_dict()
    if meta.get("task") == "segmentation" and any(k.startswith("detector.") for k in target):
        source = {f"detector.{k}": v for k, v in source.items()}
    loaded, skipped = [], []
    new_state = {}
    for name, value in source.items():
        if name not in target:
            continue
        if target[name].shape != value.shape:
            skipped.append(name)
            continue
        new_state[name] = value
        loaded.append(name)
    if not loaded:
        raise ValueError(f"{path}: no weight of this checkpoint ({meta.get('model_name')}) fits "
                         f"model {getattr(model.config, 'name', type(model).__name__)}")
    model.load_state_dict(new_state, strict=False)
    missing = [n for n in target if n not in new_state and not n.endswith("num_batches_tracked")]
    return {"source": str(path), "source_model": meta.get("model_name"), "loaded": loaded,
            "skipped_shape": skipped, "missing": missing}


def check_class_names(dataset, model, what: str = "data") -> None:
    """The dataset's label set must be the model's: same number of classes (an error), and
    the same names in the same order (a warning when names differ, e.g. 'ncp' vs 'covid')."""
    names = getattr(dataset, "slice_class_names", None)
    if names is None:
        return
    if len(names) != model.num_classes:
        raise ValueError(f"{what} has {len(names)} classes {list(names)} but the model has {model.num_classes} "
                         f"{list(model.class_names)}; map them with data.class_map or set "
                         "model.classifier.class_names")
    if [n.lower() for n in names] != [n.lower() for n in model.class_names]:
        import warnings

        warnings.warn(f"{what} class names {list(names)} differ from the model's {list(model.class_names)}; "
                      "labels are matched by index", stacklevel=2)


def slice_labels(samples: list[Sample], class_names, what: str = "classification training") -> torch.Tensor:
    """The samples' class labels as a tensor; a missing label or one outside the model's
    classes is an error naming the sample."""
    for s in samples:
        if s.label is None:
            raise ValueError(f"{s.source}: {what} needs a class label for {s.sample_id}")
        if not 0 <= s.label < len(class_names):
            raise ValueError(f"{s.source}: label {s.label} of {s.sample_id} is outside the model's "
                             f"{len(class_names)} classes {list(class_names)}; map labels with data.class_map")
    return torch.tensor([s.label for s in samples], dtype=torch.int64)


def _check_finite(loss: torch.Tensor, what: str, epoch: int, step: int, ids: list[str], terms: dict) -> None:
    if not math.isfinite(float(loss.detach())):
        raise NonFiniteLossError(f"non-finite {what} loss at epoch {epoch + 1}, step {step + 1}, "
                                 f"samples {ids}: {terms}")


def _validate(model, dataset, cfg, device, epoch, step, log, ckpt: Path, progress: bool) -> None:
    from .evaluate_classifier import evaluate_classifier
    from .evaluate import write_json

    metrics, _ = evaluate_classifier(model, dataset, device, eval_cfg=cfg.eval, cls_bn=cfg.train.cls_bn,
                                     progress=progress)
    write_json(ckpt / "metrics.json", metrics)
    summary = {"overall_accuracy": metrics["overall_accuracy"], "f1_weighted": metrics["f1_weighted"],
               "f1_macro": metrics["f1_macro"]}
    log.write(json.dumps({"event": "validation", "epoch": epoch, "step": step, **summary}) + "\n")
    if progress:
        tqdm.write(f"epoch {epoch}: validation accuracy {summary['overall_accuracy']:.4f}, "
                   f"weighted F1 {summary['f1_weighted']:.4f}")


def train_classifier(
    cfg: ExperimentConfig, out_dir: str | Path, *, resume: str | Path | bool = False,
    progress: bool = True, dataset=None, seg_dataset=None,
) -> TrainResult:
    """Train a slice classifier (or a joint model) as ``cfg`` says; outputs under ``out_dir``.

    Writes ``config.yaml``, ``train_log.jsonl`` (one line per iteration: the segmentation
    terms, the classification loss, whether the branch was copied, the sample ids),
    ``epoch-NNNN/`` every ``save_every`` epochs and ``checkpoint/`` (latest). With
    ``train.init_from`` the matching weights of that checkpoint initialise the model
    (``init.json`` lists what was loaded and skipped).
    """
    from ..data.datasets import build_dataset
    from ..registry import create_model, get_entry

    start = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolve_auto_settings(cfg)
    tc = cfg.train
    device = resolve_device(tc.device)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)
    _seed_everything(tc.seed)
    task = get_entry(cfg.model.name).task

    if dataset is None:
        dataset = build_dataset(cfg.data, cfg.model.detector.mask_type)
    if len(dataset) == 0:
        raise ValueError("the classification training dataset is empty")

    epoch, batch_pos, step, copy_state = 0, 0, 0, None
    if resume:
        ckpt = out_dir / "checkpoint" if resume is True else Path(resume)
        model, ckpt_cfg, _ = load_checkpoint(ckpt)
        if ckpt_cfg.model != cfg.model:
            raise ValueError(f"cannot resume from {ckpt}: it holds a different model config than this "
                             "run's; resume with the checkpoint's config.yaml")
        state = load_train_state(ckpt)
        epoch, batch_pos, step = state["epoch"], state["batch_pos"], state["step"]
        copy_state = state.get("copy")
    else:
        model = create_model(cfg.model)
    if not isinstance(model, SliceClassifier):
        raise ValueError(f"{cfg.model.name} is a {task} model; use train_segmentation for detectors")

    joint = model.has_segmentation and tc.joint
    check_class_names(dataset, model, "data")
    if joint and seg_dataset is None:
        if cfg.seg_data is None:
            raise ValueError(f"{cfg.model.name} trains jointly: give seg_data (segmentation images), "
                             "or set train.joint=false to train the classification step only")
        seg_dataset = build_dataset(cfg.seg_data, cfg.model.detector.mask_type)
    if joint and len(seg_dataset) == 0:
        raise ValueError("the segmentation dataset (seg_data) is empty")
    val_dataset = None
    if tc.eval_every is not None and cfg.val_data is not None:
        val_dataset = build_dataset(cfg.val_data, cfg.model.detector.mask_type)

    copier = CopyRule(tc.copy_rule, copy_state)
    if not resume:
        if tc.init_from:
            report = init_from_checkpoint(model, tc.init_from)
            (out_dir / "init.json").write_text(json.dumps(report, indent=2) + "\n")
            if progress:
                tqdm.write(f"initialised {len(report['loaded'])} tensors from {tc.init_from}; "
                           f"{len(report['skipped_shape'])} skipped (shape differs): "
                           f"{report['skipped_shape'][:4]}")
        if tc.copy_rule == "once" or (tc.copy_rule != "none" and tc.init_from):
            model.copy_segmentation_branch()
    trainable = trainable_names(model, tc.update_rule, tc.bn_params)
    model.to(device)
    params = dict(model.named_parameters())
    detector_names = {n for n in params if n.startswith("detector.")}
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if resume:
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
    save_config(cfg, out_dir / "config.yaml")

    log = open(out_dir / "train_log.jsonl", "a", buffering=1)
    if resume:
        log.write(json.dumps({"event": "resume", "epoch": epoch, "batch_pos": batch_pos, "step": step}) + "\n")

    def checkpoint(path: Path, epoch_: int, batch_pos_: int) -> Path:
        state_ = {"epoch": epoch_, "batch_pos": batch_pos_, "step": step, "optimizer": optimizer.state_dict(),
                  "rng": _rng_state(), "copy": copier.state()}
        return save_checkpoint(path, model, cfg, epoch=epoch_, step=step, train_state=state_, task=task)

    def set_lr(index: int, total: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(tc, index, total)

    batches_per_epoch = math.ceil(len(dataset) / tc.batch_size)
    if tc.max_steps_per_epoch is not None:
        batches_per_epoch = min(batches_per_epoch, tc.max_steps_per_epoch)
    total_batches = tc.epochs * batches_per_epoch
    scheduled_lr(tc, 0, total_batches)
    last: dict = {}
    stopped_early = False
    bar = tqdm(total=total_batches, initial=epoch * batches_per_epoch + batch_pos, disable=not progress,
               desc="train", unit="it", dynamic_ncols=True)
    try:
        while epoch < tc.epochs:
            order = epoch_order(len(dataset), tc.seed, epoch)
            batches = [order[i:i + tc.batch_size] for i in range(0, len(order), tc.batch_size)][:batches_per_epoch]
            loader = DataLoader(dataset, batch_sampler=batches[batch_pos:], collate_fn=collate_samples,
                                num_workers=tc.num_workers,
                                generator=torch.Generator().manual_seed(tc.seed + epoch))
            for samples in loader:
                if tc.time_limit_s is not None and time.monotonic() - start > tc.time_limit_s:
                    stopped_early = True
                    break
                index = epoch * batches_per_epoch + batch_pos
                batch_pos += 1
                bar.update(1)
                record: dict = {"epoch": epoch + 1, "step": step + 1}

                # 1. segmentation step
                if joint:
                    seg_sample = seg_dataset[seg_index(len(seg_dataset), tc.seed, step)]
                    if seg_sample.target is None:
                        raise ValueError(f"{seg_sample.source}: seg_data needs masks ({seg_sample.sample_id})")
                    record["seg_sample"] = seg_sample.sample_id
                    if len(seg_sample.target["boxes"]) > 0:
                        model.train()
                        losses = model.segmentation_losses(
                            [seg_sample.image.to(device)], [{k: v.to(device) for k, v in seg_sample.target.items()}])
                        seg_total = sum(losses.values())
                        terms = {k: float(v.detach()) for k, v in losses.items()}
                        _check_finite(seg_total, "segmentation", epoch, step, [seg_sample.sample_id], terms)
                        optimizer.zero_grad(set_to_none=True)
                        seg_total.backward()
                        for name, p in params.items():
                            if name not in detector_names:
                                p.grad = None  # only the detector learns from L_SEG
                        copied = copier.should_copy(float(seg_total.detach())) and model.copy_segmentation_branch()
                        set_lr(index, total_batches)
                        optimizer.step()
                        record.update({"seg_loss": float(seg_total.detach()), **terms, "copied": bool(copied)})

                # 2. classification step
                labels = slice_labels(samples, model.class_names).to(device)
                ids = [s.sample_id for s in samples]
                # A NaN pixel empties the RPN's output, and an empty RoI batch is all zeros:
                # the loss would stay finite and the step train on nothing. Stop here instead.
                bad = [s.sample_id for s in samples if not bool(torch.isfinite(s.image).all())]
                if bad:
                    raise NonFiniteLossError(f"non-finite pixels in classification samples {bad} at epoch "
                                             f"{epoch + 1}, step {step + 1}")
                model.classification_mode(tc.cls_bn)
                out = model([s.image.to(device) for s in samples])
                cls_loss = one_hot_bce(out.logits, labels)
                _check_finite(cls_loss, "classification", epoch, step, ids, {"cls_loss": float(cls_loss.detach())})
                optimizer.zero_grad(set_to_none=True)
                cls_loss.backward()
                for name, p in params.items():
                    if name not in trainable:
                        p.grad = None  # frozen for this step: no momentum, no weight decay
                set_lr(index, total_batches)
                optimizer.step()
                step += 1
                accuracy = float((out.logits.detach().argmax(1) == labels).float().mean())
                record.update({"samples": ids, "cls_loss": float(cls_loss.detach()), "cls_accuracy": accuracy,
                               "lr": optimizer.param_groups[0]["lr"]})
                last = record
                log.write(json.dumps(record) + "\n")
                bar.set_postfix(epoch=epoch + 1, cls=f"{record['cls_loss']:.3f}",
                                **({"seg": f"{record['seg_loss']:.3f}"} if "seg_loss" in record else {}))
            if stopped_early:
                break
            epoch, batch_pos = epoch + 1, 0
            save_epoch(out_dir, epoch, tc, checkpoint, None if val_dataset is None else
                       lambda saved: _validate(model, val_dataset, cfg, device, epoch, step, log, saved, progress))
    finally:
        bar.close()
        log.close()
    if stopped_early:
        checkpoint(out_dir / "checkpoint", epoch, batch_pos)
    losses = {k: v for k, v in last.items() if isinstance(v, float)}
    return TrainResult(out_dir, out_dir / "checkpoint", epoch, step, stopped_early, time.monotonic() - start, losses)
