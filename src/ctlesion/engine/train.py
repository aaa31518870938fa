"""Segmentation training: Adam, JSONL loss log, atomic checkpoints, exact resume.

Exact resume rests on three things: the sample order of an epoch is a pure function of
``(seed, epoch)``; the global torch RNG (used by torchvision's RPN/RoI samplers) is saved
with each checkpoint; and the position inside the epoch is saved too, so a run stopped by
its time limit continues with the very next batch.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import ExperimentConfig, save_config
from ..data.sample import Sample, collate_samples
from .checkpoint import load_checkpoint, load_train_state, save_checkpoint

__all__ = [
    "NonFiniteLossError", "TrainResult", "train_segmentation", "resolve_device", "epoch_order", "scheduled_lr",
    "save_epoch",
]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the epoch, step, samples and terms."""


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    epochs_done: int
    steps: int
    stopped_early: bool
    seconds: float
    last_losses: dict[str, float]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled sample order of one epoch, a pure function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=gen).tolist()


def scheduled_lr(tc, step: int, total_steps: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based): a pure function of the step,
    so a resumed run needs no scheduler state."""
    if tc.lr_schedule == "constant":
        return tc.lr
    if tc.lr_schedule == "cosine":
        progress = min(step / max(total_steps, 1), 1.0)
        return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"train.lr_schedule must be 'constant' or 'cosine', not {tc.lr_schedule!r}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _require_labels(samples: list[Sample]) -> None:
    for s in samples:
        if s.target is None:
            raise ValueError(f"{s.source}: training needs labelled slices, but {s.sample_id} has no mask")


def _to_device(samples: list[Sample], device: torch.device):
    images = [s.image.to(device) for s in samples]
    targets = [{k: v.to(device) for k, v in s.target.items()} for s in samples]
    return images, targets


def _has_lesions(sample: Sample) -> bool:
    return len(sample.target["boxes"]) > 0


def save_epoch(out_dir: Path, epoch: int, tc, checkpoint, validate=None) -> None:
    """End of epoch ``epoch`` (counted from 1): write ``epoch-NNNN/`` and ``checkpoint/``
    every ``save_every`` epochs, at the last one, and whenever ``validate`` runs (every
    ``eval_every`` epochs and at the last), so a ``metrics.json`` sits next to the weights it
    scored. ``checkpoint(path, epoch, batch_pos)`` saves; ``validate(saved_folder)`` scores."""
    final = epoch == tc.epochs
    scoring = validate is not None and (epoch % tc.eval_every == 0 or final)
    if epoch % tc.save_every == 0 or final or scoring:
        saved = checkpoint(out_dir / f"epoch-{epoch:04d}", epoch, 0)
        checkpoint(out_dir / "checkpoint", epoch, 0)
        if scoring:
            validate(saved)


def _validate(model, dataset, cfg: ExperimentConfig, device, epoch: int, step: int, log, ckpt: Path,
              progress: bool) -> None:
    """Score the validation set; log a summary line and write ``metrics.json`` into ``ckpt``.

    Runs after the checkpoint is written, and draws nothing from the global RNG, so a
    resumed run trains exactly as an uninterrupted one.
    """
    from .evaluate import evaluate_segmentation, write_json

    metrics, _ = evaluate_segmentation(model, dataset, cfg.eval, device, progress=progress)
    model.train()
    write_json(ckpt / "metrics.json", metrics)
    summary = {f"legacy_{k}": metrics["legacy"][k] for k in ("AP50", "AP75", "mAP")}
    summary.update({f"coco_segm_{k}": metrics["coco"]["segm"][k] for k in ("AP", "AP50", "AP75")})
    log.write(json.dumps({"event": "validation", "epoch": epoch, "step": step, **summary}) + "\n")
    if progress:
        tqdm.write(f"epoch {epoch}: validation legacy mAP {summary['legacy_mAP']:.4f}, "
                   f"COCO segm AP {summary['coco_segm_AP']:.4f}")


def train_segmentation(
    cfg: ExperimentConfig, out_dir: str | Path, *, resume: str | Path | bool = False,
    progress: bool = True, dataset=None,
) -> TrainResult:
    """Train a detector as ``cfg`` says and write everything under ``out_dir``.

    Writes ``config.yaml`` (resolved), ``train_log.jsonl`` (one line per step with every
    loss term and the sample ids), ``epoch-NNNN/`` every ``save_every`` epochs and
    ``checkpoint/`` (the latest, also written at the end or on the time limit). With
    ``train.eval_every`` and ``val_data`` set, the validation set is scored at those
    epochs (and at the end): a ``validation`` line in the log and ``metrics.json`` in
    that epoch's folder.
    ``resume=True`` continues from ``out_dir/checkpoint``; a path continues from there.
    A non-finite loss raises :class:`NonFiniteLossError` naming the batch.
    """
    from ..data.datasets import build_dataset
    from ..registry import create_model

    start = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    device = resolve_device(tc.device)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)
    _seed_everything(tc.seed)

    if dataset is None:
        dataset = build_dataset(cfg.data, cfg.model.detector.mask_type)
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    val_dataset = None
    if tc.eval_every is not None and cfg.val_data is not None:
        val_dataset = build_dataset(cfg.val_data, cfg.model.detector.mask_type)

    epoch, batch_pos, step = 0, 0, 0
    if resume:
        ckpt = out_dir / "checkpoint" if resume is True else Path(resume)
        model, ckpt_cfg, _ = load_checkpoint(ckpt)
        if ckpt_cfg.model != cfg.model:
            raise ValueError(
                f"cannot resume from {ckpt}: it holds model {ckpt_cfg.model.name!r} with a different "
                "model config than this run's; resume with the checkpoint's config.yaml"
            )
        state = load_train_state(ckpt)
        epoch, batch_pos, step = state["epoch"], state["batch_pos"], state["step"]
    else:
        model = create_model(cfg.model)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if resume:
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
    save_config(cfg, out_dir / "config.yaml")

    log_path = out_dir / "train_log.jsonl"
    log = open(log_path, "a", buffering=1)
    if resume:
        log.write(json.dumps({"event": "resume", "epoch": epoch, "batch_pos": batch_pos, "step": step}) + "\n")

    def checkpoint(path: Path, epoch_: int, batch_pos_: int) -> Path:
        state = {
            "epoch": epoch_, "batch_pos": batch_pos_, "step": step,
            "optimizer": optimizer.state_dict(), "rng": _rng_state(),
        }
        return save_checkpoint(path, model, cfg, epoch=epoch_, step=step, train_state=state)

    batches_per_epoch = math.ceil(len(dataset) / tc.batch_size)
    if tc.max_steps_per_epoch is not None:
        batches_per_epoch = min(batches_per_epoch, tc.max_steps_per_epoch)
    total_batches = tc.epochs * batches_per_epoch
    scheduled_lr(tc, 0, total_batches)  # fail early on a bad schedule name
    last_losses: dict[str, float] = {}
    stopped_early = False
    bar = tqdm(total=total_batches, initial=epoch * batches_per_epoch + batch_pos,
               disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    try:
        while epoch < tc.epochs:
            order = epoch_order(len(dataset), tc.seed, epoch)
            batches = [order[i:i + tc.batch_size] for i in range(0, len(order), tc.batch_size)]
            batches = batches[:batches_per_epoch]
            # The loader gets its own generator: creating an iterator otherwise draws a seed
            # from the global RNG, and a resumed run creates one more iterator than a straight run.
            loader = DataLoader(dataset, batch_sampler=batches[batch_pos:], collate_fn=collate_samples,
                                num_workers=tc.num_workers,
                                generator=torch.Generator().manual_seed(tc.seed + epoch))
            model.train()
            for samples in loader:
                batch_index = epoch * batches_per_epoch + batch_pos
                if tc.time_limit_s is not None and time.monotonic() - start > tc.time_limit_s:
                    stopped_early = True
                    break
                batch_pos += 1
                bar.update(1)
                _require_labels(samples)
                if tc.skip_negatives:
                    samples = [s for s in samples if _has_lesions(s)]
                if not samples:
                    continue
                images, targets = _to_device(samples, device)
                losses = model(images, targets)
                total = sum(losses.values())
                values = {k: float(v.detach()) for k, v in losses.items()}
                ids = [s.sample_id for s in samples]
                if not math.isfinite(float(total.detach())):
                    raise NonFiniteLossError(
                        f"non-finite loss at epoch {epoch + 1}, step {step + 1}, samples {ids}: {values}"
                    )
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                for group in optimizer.param_groups:
                    group["lr"] = scheduled_lr(tc, batch_index, total_batches)
                optimizer.step()
                step += 1
                last_losses = {"loss": float(total.detach()), **values, "lr": optimizer.param_groups[0]["lr"]}
                log.write(json.dumps({"epoch": epoch + 1, "step": step, "samples": ids, **last_losses}) + "\n")
                bar.set_postfix(epoch=epoch + 1, loss=f"{last_losses['loss']:.3f}")
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
    return TrainResult(out_dir, out_dir / "checkpoint", epoch, step, stopped_early,
                       time.monotonic() - start, last_losses)
