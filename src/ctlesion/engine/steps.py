"""What one training iteration does, per task; :func:`~ctlesion.engine.loop.run_loop` runs them.

* :class:`SegmentationStep`: a batch of labelled slices, stock Mask R-CNN losses, Adam
  (lesion-free slices skipped, as the papers did).
* :class:`ClassificationStep`: every slice classifier, CTM stage 2, the Single-Shot Model,
  the mask-feature models and the benchmark CNNs (spec §4.5, §5.2, §6.3, §7.5). Each
  iteration takes one batch of classification images (``train.batch_size``: 8 for CTM, 1 for
  the joint models). For joint models (``has_segmentation`` and ``train.joint``) a
  segmentation step comes first:

  1. **Segmentation step.** One image drawn uniformly, with replacement, from ``seg_data``
     (a pure function of ``(seed, step)``, so resume is exact). Lesion-free images are
     skipped, as in the original. Model in train mode, stock Mask R-CNN losses, backward;
     only the detector keeps its gradients. The copy rule (``train.copy_rule``) may copy the
     segmentation RoI branch into the classification branch *before* the optimiser step
     (spec §5.2, §11.9). Adam step.
  2. **Classification step.** ``model.classification_mode(train.cls_bn)``: everything in eval
     mode except the head (and, for ``cls_bn="batch"``, the backbone). Per-class BCE on one-hot
     labels. Parameters outside ``train.update_rule`` get ``grad=None``, so Adam neither moves
     them nor applies weight decay (zeroed gradients would still move them).

  One Adam optimiser over all parameters is stepped by both (the original's design).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import ExperimentConfig
from ..data.sample import Sample
from ..errors import ConfigError, DataError, NonFiniteLossError
from ..models.classifier import SliceClassifier, trainable_names
from ..models.rcnn_classifier import one_hot_bce
from .builtin_weights import resolve_checkpoint
from .checkpoint import load_weights, read_meta
from .evaluate import evaluate_segmentation
from .evaluate_classifier import evaluate_classifier
from .labels import check_dataset_classes, slice_labels
from .distributed import World, average_gradients, mean_over_ranks
from .loop import check_finite, scheduled_lr

__all__ = [
    "COPY_RULES", "FAMILY_DEFAULTS", "CopyRule", "SegmentationStep", "ClassificationStep", "seg_index",
    "init_from_checkpoint", "initialise", "resolve_auto_settings", "prepare_classifier", "Updater", "SEG_TERMS",
]

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
        raise ConfigError(f"model {cfg.model.name!r} is not a slice classifier (classifier.kind={kind!r})")
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
            raise ConfigError(f"train.copy_rule must be one of {COPY_RULES}, not {rule!r}")
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
    """Copy every weight of checkpoint ``path`` (a folder, or a built-in model name, verified
    against the catalogue's SHA-256) whose name and shape match ``model``.

    A segmentation checkpoint's keys are looked up under ``detector.`` (it fills the
    detector of a CTM/SSM/mask-feature model). Returns ``{"loaded", "skipped_shape",
    "missing"}`` name lists: ``skipped_shape`` are weights present in both with different
    shapes (e.g. the last layer when fine-tuning 3 classes -> 2), ``missing`` are the
    model's weights the checkpoint does not have (they keep their initialisation).
    """
    given = path
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    source = load_weights(path, meta)
    target = model.state_dict()
    if meta.get("task") == "segmentation" and any(k.startswith("detector.") for k in target):
        source = {f"detector.{k}": v for k, v in source.items()}
    elif meta.get("task") != "segmentation" and not any(k.startswith("detector.") for k in target):
        # a joint model's detector fills a plain detector
        source = {k[len("detector."):]: v for k, v in source.items() if k.startswith("detector.")} or source
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
        raise ConfigError(f"{path}: no weight of this checkpoint ({meta.get('model_name')}) fits "
                          f"model {getattr(model.config, 'name', type(model).__name__)}")
    model.load_state_dict(new_state, strict=False)
    missing = [n for n in target if n not in new_state and not n.endswith("num_batches_tracked")]
    return {"source": str(given), "source_path": str(path), "source_model": meta.get("model_name"), "loaded": loaded,
            "skipped_shape": skipped, "missing": missing}


# The stock Mask R-CNN loss terms (in this order in logs averaged over ranks).
SEG_TERMS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def _on_device(sample: Sample, device) -> tuple[torch.Tensor, dict]:
    return sample.image.to(device), {k: v.to(device) for k, v in sample.target.items()}


class Updater:
    """One optimiser update from a loss, the same for every step: fresh gradients, backward
    (scaled under fp16), only the ``keep`` parameters keep their gradients (the others get
    ``grad=None``: no Adam step, no weight decay), gradients averaged over ranks, the lr of
    the schedule, the optimiser step. Under ``train.amp`` the forward runs in :meth:`autocast`.

    ``update(loss, weight)``: ``loss`` is this rank's mean loss over ``weight`` samples
    (``None`` and 0 when it has none; the rank still takes part). The global mean loss is
    checked for NaN/inf on every rank, so all of them stop together with the batch named.
    """

    def __init__(self, model, optimizer, cfg: ExperimentConfig, device, world: World,
                 scaler_state: dict | None = None) -> None:
        self.optimizer, self.tc, self.device, self.world = optimizer, cfg.train, device, world
        self.named = dict(model.named_parameters())
        self.params = list(self.named.values())
        amp = cfg.train.amp
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def mean(self, values: dict[str, float], weight: float) -> dict[str, float]:
        """Per-rank numbers as their sample-weighted mean over ranks (for the log)."""
        return {k: mean_over_ranks(v, weight, self.world, self.device)[0] for k, v in values.items()}

    def update(self, loss, weight: float, keep: set[str] | None, *, what: str, epoch: int, step: int, ids: list[str],
               terms: dict, index: int, total: int, before_step=None) -> float | None:
        """Returns the global mean loss (``None``: no rank had a sample, nothing changed).
        ``before_step(mean)`` runs after the gradients are final, before the optimiser step."""
        local = float(loss.detach()) if loss is not None else 0.0
        mean, total_weight = mean_over_ranks(local, weight, self.world, self.device)
        if not total_weight:
            return None
        check_finite(mean, what, epoch, step, ids, terms)
        self.optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if keep is not None:
            for name, p in self.named.items():
                if name not in keep:
                    p.grad = None
        average_gradients(self.params, self.world, weight)
        if before_step is not None:
            before_step(mean)
        for group in self.optimizer.param_groups:
            group["lr"] = scheduled_lr(self.tc, index, total)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return mean

    def state(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}


def _segmentation_forward(forward, samples: list[Sample], updater: Updater, device) -> tuple:
    """Mask R-CNN training losses of ``samples`` (model in train mode, under autocast):
    ``(loss or None, terms)``; under torchrun the terms are averaged over ranks for the log."""
    loss, terms = None, {k: 0.0 for k in SEG_TERMS}
    if samples:
        images, targets = zip(*(_on_device(s, device) for s in samples))
        with updater.autocast():
            losses = forward(list(images), list(targets))
        loss = sum(losses.values())
        terms = {k: float(v.detach()) for k, v in losses.items()}
    if updater.world.distributed:
        terms = updater.mean({k: terms.get(k, 0.0) for k in SEG_TERMS}, len(samples))
    return loss, terms


class SegmentationStep:
    """One detector update on a batch of labelled slices (``train.skip_negatives`` drops
    lesion-free slices; a batch left empty on every rank makes no step)."""

    def __init__(self, model, updater: Updater, cfg: ExperimentConfig, device) -> None:
        self.model, self.updater, self.cfg, self.device = model, updater, cfg, device

    def run(self, samples: list[Sample], index: int, total: int, epoch: int, step: int) -> dict | None:
        for s in samples:
            if s.target is None:
                raise DataError(f"{s.source}: training needs labelled slices, but {s.sample_id} has no mask")
        if self.cfg.train.skip_negatives:
            samples = [s for s in samples if len(s.target["boxes"]) > 0]
        self.model.train()
        ids = [s.sample_id for s in samples]
        loss, terms = _segmentation_forward(self.model, samples, self.updater, self.device)
        mean = self.updater.update(loss, len(samples), None, what="", epoch=epoch, step=step, ids=ids, terms=terms,
                                   index=index, total=total)
        if mean is None:
            return None
        return {"epoch": epoch + 1, "step": step + 1, "samples": ids, "loss": mean, **terms,
                "lr": self.updater.optimizer.param_groups[0]["lr"]}

    def resume_state(self) -> dict:
        return self.updater.state()

    def validate(self, dataset, device, progress: bool) -> tuple[dict, dict, str]:
        metrics, _ = evaluate_segmentation(self.model, dataset, self.cfg.eval, device, progress=progress)
        summary = {f"legacy_{k}": metrics["legacy"][k] for k in ("AP50", "AP75", "mAP")}
        summary.update({f"coco_segm_{k}": metrics["coco"]["segm"][k] for k in ("AP", "AP50", "AP75")})
        summary["pixel_dice"] = metrics["pixel"]["lesion"]["dice"]
        return metrics, summary, (f"legacy mAP {summary['legacy_mAP']:.4f}, "
                                  f"COCO segm AP {summary['coco_segm_AP']:.4f}, lesion Dice {summary['pixel_dice']:.4f}")


def initialise(model, cfg: ExperimentConfig, out_dir: Path, progress: bool) -> dict | None:
    """A new run's ``train.init_from`` (a checkpoint folder or a built-in name): copy the
    weights that fit and write ``init.json`` (what was loaded and skipped)."""
    init_from = cfg.train.init_from
    if not init_from:
        return None
    report = init_from_checkpoint(model, init_from)
    (out_dir / "init.json").write_text(json.dumps(report, indent=2) + "\n")
    if progress:
        tqdm.write(f"initialised {len(report['loaded'])} tensors from {init_from}; "
                   f"{len(report['skipped_shape'])} skipped (shape differs): {report['skipped_shape'][:4]}")
    return report


def prepare_classifier(model, cfg: ExperimentConfig, dataset, out_dir: Path, resumed: bool, progress: bool) -> None:
    """Before the optimiser exists: check the model and labels, then (new runs) initialise
    from ``train.init_from`` (``init.json`` lists what was loaded and skipped) and make the
    ``once`` / initialised copy of the segmentation branch."""
    tc = cfg.train
    if not isinstance(model, SliceClassifier):
        raise ConfigError(f"{cfg.model.name} is a segmentation model; use train_segmentation for detectors")
    check_dataset_classes(dataset, model, "data")
    if resumed:
        return
    initialise(model, cfg, out_dir, progress)
    if tc.copy_rule == "once" or (tc.copy_rule != "none" and tc.init_from):
        model.copy_segmentation_branch()


class ClassificationStep:
    """One classifier iteration: for joint models a segmentation step on one ``seg_data``
    image (with the copy rule), then the classification step (see the module docstring).
    Under ``torchrun`` each rank draws its own segmentation image, and the copy decision
    reads the loss averaged over ranks, so every rank copies at the same iterations."""

    def __init__(self, model, updater: Updater, cfg: ExperimentConfig, device, seg_dataset=None,
                 copy_state: dict | None = None) -> None:
        self.model, self.updater, self.cfg, self.device = model, updater, cfg, device
        self.seg_dataset = seg_dataset
        self.copier = CopyRule(cfg.train.copy_rule, copy_state)
        self.detector_names = {n for n in updater.named if n.startswith("detector.")}
        self.trainable = trainable_names(model, cfg.train.update_rule, cfg.train.bn_params)

    def _segmentation(self, index: int, total: int, epoch: int, step: int) -> dict:
        tc, world = self.cfg.train, self.updater.world
        draw = step * world.size + world.rank if world.distributed else step
        chosen = seg_index(len(self.seg_dataset), tc.seed, draw)
        # An augmented seg_data draws by the draw number, so one image drawn twice differs.
        augmented = getattr(self.seg_dataset, "draw", None)
        sample = augmented(chosen, draw) if augmented is not None else self.seg_dataset[chosen]
        if sample.target is None:
            raise DataError(f"{sample.source}: seg_data needs masks ({sample.sample_id})")
        record: dict = {"seg_sample": sample.sample_id}
        lesions = [sample] if len(sample.target["boxes"]) > 0 else []
        if not lesions and not world.distributed:
            return record              # lesion-free: no segmentation update (the original skips it)
        self.model.train()
        loss, terms = _segmentation_forward(self.model.segmentation_losses, lesions, self.updater, self.device)
        copied = []

        def copy(mean: float) -> None:
            copied.append(self.copier.should_copy(mean) and self.model.copy_segmentation_branch())

        seg_loss = self.updater.update(loss, len(lesions), self.detector_names, what="segmentation ", epoch=epoch,
                                       step=step, ids=[sample.sample_id], terms=terms, index=index, total=total,
                                       before_step=copy)   # only the detector learns from L_SEG; copy before the step
        if seg_loss is None:
            return record
        return {**record, "seg_loss": seg_loss, **terms, "copied": bool(copied[0])}

    def run(self, samples: list[Sample], index: int, total: int, epoch: int, step: int) -> dict:
        tc = self.cfg.train
        record: dict = {"epoch": epoch + 1, "step": step + 1}
        if self.seg_dataset is not None:
            record.update(self._segmentation(index, total, epoch, step))
        labels = slice_labels(samples, self.model.class_names).to(self.device)
        ids = [s.sample_id for s in samples]
        # A NaN pixel empties the RPN's output, and an empty RoI batch is all zeros:
        # the loss would stay finite and the step train on nothing. Stop here instead.
        bad = [s.sample_id for s in samples if not bool(torch.isfinite(s.image).all())]
        if bad:
            raise NonFiniteLossError(f"non-finite pixels in classification samples {bad} at epoch "
                                     f"{epoch + 1}, step {step + 1}")
        self.model.classification_mode(tc.cls_bn)
        with self.updater.autocast():
            out = self.model([s.image.to(self.device) for s in samples])
        cls_loss = one_hot_bce(out.logits.float(), labels)
        n = len(samples)
        mean = self.updater.update(cls_loss, n, self.trainable, what="classification ", epoch=epoch, step=step,
                                   ids=ids, terms={"cls_loss": float(cls_loss.detach())}, index=index, total=total)
        accuracy = float((out.logits.detach().argmax(1) == labels).float().mean())
        record.update({"samples": ids, "cls_loss": mean,
                       "cls_accuracy": self.updater.mean({"a": accuracy}, n)["a"],
                       "lr": self.updater.optimizer.param_groups[0]["lr"]})
        return record

    def resume_state(self) -> dict:
        return {"copy": self.copier.state(), **self.updater.state()}

    def validate(self, dataset, device, progress: bool) -> tuple[dict, dict, str]:
        metrics, _ = evaluate_classifier(self.model, dataset, device, eval_cfg=self.cfg.eval,
                                         cls_bn=self.cfg.train.cls_bn, progress=progress)
        summary = {k: metrics[k] for k in ("overall_accuracy", "f1_weighted", "f1_macro")}
        return metrics, summary, (f"accuracy {summary['overall_accuracy']:.4f}, "
                                  f"weighted F1 {summary['f1_weighted']:.4f}")
