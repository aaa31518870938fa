"""The training loop every task runs (detectron2's ``TrainerBase`` shape: one loop, a
pluggable step).

:func:`run_loop` owns the run: the batch plan, seeding of the loaders, resume position,
the time limit, the JSONL log, checkpoints (``epoch-NNNN/`` and ``checkpoint/``) and
validation. What one iteration does is a *step* (``engine/steps.py``): an object with
``run(samples, index, total, epoch, step) -> record | None`` (``None``: nothing was
learned from the batch, e.g. a lesion-free segmentation batch, and the step counter stays),
``resume_state()`` (extra state saved with each checkpoint) and ``validate(dataset, ...)``.

Exact resume rests on three things: the sample order of an epoch is a pure function of
``(seed, epoch)``; the global torch RNG (torchvision's RPN/RoI samplers draw from it) is
saved with each checkpoint; and the position inside the epoch is saved too, so a run
stopped by its time limit continues with the very next batch.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.sample import collate_samples
from ..errors import ConfigError, NonFiniteLossError
from .checkpoint import save_checkpoint
from .curves import write_learning_curves
from .distributed import World, any_rank, barrier, gather_objects, resolve_device
from .io import write_json

__all__ = [
    "NonFiniteLossError", "TrainResult", "TrainStep", "LoopState", "run_loop", "resolve_device", "epoch_order",
    "scheduled_lr", "seed_everything", "rng_state", "set_rng_state", "save_epoch", "check_finite",
]


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    epochs_done: int
    steps: int
    stopped_early: bool
    seconds: float
    last_losses: dict[str, float]


@dataclass
class LoopState:
    """Where a run is: completed epochs, batches done in the current epoch, optimiser steps."""

    epoch: int = 0
    batch_pos: int = 0
    step: int = 0


class TrainStep(Protocol):
    """One training iteration of a task (see ``engine/steps.py``)."""

    def run(self, samples: list, index: int, total: int, epoch: int, step: int) -> dict | None: ...

    def resume_state(self) -> dict: ...

    def validate(self, dataset, device: torch.device, progress: bool) -> tuple[dict, dict, str]: ...


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
    raise ConfigError(f"train.lr_schedule must be 'constant' or 'cosine', not {tc.lr_schedule!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_finite(loss: float, what: str, epoch: int, step: int, ids: list[str], terms: dict) -> None:
    """Raise :class:`NonFiniteLossError` naming the batch when ``loss`` is NaN or infinite."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"non-finite {what}loss at epoch {epoch + 1}, step {step + 1}, "
                                 f"samples {ids}: {terms}")


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


def _batch_plan(num_samples: int, tc, world: World) -> int:
    """Iterations per epoch: the whole dataset in global batches of ``batch_size`` x ranks,
    capped by ``max_steps_per_epoch``. Under torchrun a last global batch too small to
    give every rank a slice is left out."""
    size = tc.batch_size * world.size
    per_epoch = math.ceil(num_samples / size) if world.size == 1 else (num_samples - world.size) // size + 1
    return per_epoch if tc.max_steps_per_epoch is None else min(per_epoch, tc.max_steps_per_epoch)


def _epoch_loader(dataset, tc, epoch: int, per_epoch: int, first: int, world: World) -> DataLoader:
    """This rank's batches of epoch ``epoch`` from batch ``first`` on: the same global order
    as one process (``epoch_order``), each global batch of ``batch_size`` x ranks split
    into consecutive per-rank slices."""
    order = epoch_order(len(dataset), tc.seed, epoch)
    if hasattr(dataset, "set_epoch"):   # augmentation draws depend on (seed, epoch, index)
        dataset.set_epoch(epoch)
    size = tc.batch_size * world.size
    batches = [order[i:i + size] for i in range(0, len(order), size)][:per_epoch]
    if world.distributed:
        batches = [_rank_slice(b, world) for b in batches]
    # The loader gets its own generator: creating an iterator otherwise draws a seed from
    # the global RNG, and a resumed run creates one more iterator than a straight run.
    return DataLoader(dataset, batch_sampler=batches[first:], collate_fn=collate_samples,
                      num_workers=tc.num_workers, generator=torch.Generator().manual_seed(tc.seed + epoch))


def _rank_slice(batch: list[int], world: World) -> list[int]:
    """Rank ``r``'s consecutive share of a global batch (sizes differ by at most one)."""
    per, extra = divmod(len(batch), world.size)
    start = world.rank * per + min(world.rank, extra)
    return batch[start:start + per + (world.rank < extra)]


class _Log:
    """``train_log.jsonl`` (and TensorBoard) and its learning curves ``curves.png``, written
    by rank 0 only."""

    def __init__(self, out_dir: Path, world: World, tensorboard: bool, title: str | None = None) -> None:
        self.out_dir, self.title = out_dir, title
        self.file = open(out_dir / "train_log.jsonl", "a", buffering=1) if world.main else None
        self.board = None
        if tensorboard and world.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.board = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.board is not None and "step" in record:
            prefix = "validation/" if record.get("event") == "validation" else "train/"
            for key, value in record.items():
                if isinstance(value, float) and key not in ("epoch", "step"):
                    self.board.add_scalar(prefix + key, value, record["step"])

    def curves(self) -> None:
        """Redraw ``curves.png`` from the log so far (after each epoch and validation)."""
        if self.file is not None:
            self.file.flush()
            write_learning_curves(self.out_dir, self.title)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def _validation(step: TrainStep, dataset, device, log, progress: bool, world: World) -> Callable[[Path, int, int], None]:
    """``validate(saved_folder, epoch, step)``: score, log a summary line, write ``metrics.json``.

    Runs after the checkpoint is written, and draws nothing from the global RNG, so a
    resumed run trains exactly as an uninterrupted one.
    """

    def validate(saved: Path, epoch: int, step_count: int) -> None:
        if world.main:
            metrics, summary, message = step.validate(dataset, device, progress)
            write_json(saved / "metrics.json", metrics)
            log.write({"event": "validation", "epoch": epoch, "step": step_count, **summary})
            if progress:
                tqdm.write(f"epoch {epoch}: validation {message}")
        barrier(world)

    return validate


def _snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    """What a forward changes before a non-finite loss is noticed: the RNG and the buffers
    (BatchNorm running statistics). Parameters only change at the optimiser step, after the
    check."""
    return rng_state(), {name: buf.detach().clone() for name, buf in model.named_buffers()}


def _restore_snapshot(model: torch.nn.Module, snapshot: tuple[dict, dict]) -> None:
    set_rng_state(snapshot[0])
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in snapshot[1].items():
            buffers[name].copy_(value)


def run_loop(cfg, out_dir: Path, model: torch.nn.Module, dataset, step: TrainStep, optimizer, *,
             task: str, start: float, state: LoopState, val_dataset=None, device=None,
             progress: bool = True, resumed: bool = False, world: World = World()) -> TrainResult:
    """Run ``step`` over the batch plan of ``dataset`` from ``state`` to ``cfg.train.epochs``.

    Writes ``train_log.jsonl`` (the step's records, one per iteration), ``curves.png`` (its
    learning curves, redrawn after every epoch and at a time-limit stop), ``epoch-NNNN/`` and
    ``checkpoint/`` (with the optimiser, RNG, position and the step's resume state), and at
    a time-limit stop ``checkpoint/`` at the exact position reached.
    """
    tc = cfg.train
    log = _Log(out_dir, world, tc.tensorboard, title=f"{cfg.model.name}: {out_dir.name}")
    if resumed:
        log.write({"event": "resume", "epoch": state.epoch, "batch_pos": state.batch_pos, "step": state.step})

    def checkpoint(path: Path, epoch_: int, batch_pos_: int) -> Path:
        train_state: dict[str, Any] = {"epoch": epoch_, "batch_pos": batch_pos_, "step": state.step,
                                       "optimizer": optimizer.state_dict(), "rng": rng_state(),
                                       **step.resume_state()}
        if world.distributed:   # every rank's RNG, so a resumed run samples as an uninterrupted one
            train_state["rng_ranks"] = gather_objects(train_state["rng"], world)
        if world.main:
            save_checkpoint(path, model, cfg, epoch=epoch_, step=state.step, train_state=train_state, task=task)
        barrier(world)
        return path

    validate = None if val_dataset is None else _validation(step, val_dataset, device, log, progress, world)
    per_epoch = _batch_plan(len(dataset), tc, world)
    total = tc.epochs * per_epoch
    last: dict = {}
    stopped_early = False
    bar = tqdm(total=total, initial=state.epoch * per_epoch + state.batch_pos, disable=not (progress and world.main),
               desc="train", unit="step", dynamic_ncols=True)
    try:
        while state.epoch < tc.epochs:
            for samples in _epoch_loader(dataset, tc, state.epoch, per_epoch, state.batch_pos, world):
                late = tc.time_limit_s is not None and time.monotonic() - start > tc.time_limit_s
                if any_rank(late, world, device):      # every rank stops at the same batch
                    stopped_early = True
                    break
                index = state.epoch * per_epoch + state.batch_pos
                state.batch_pos += 1
                bar.update(1)
                good = _snapshot(model)
                try:
                    record = step.run(samples, index, total, state.epoch, state.step)
                except NonFiniteLossError as exc:
                    _restore_snapshot(model, good)
                    state.batch_pos -= 1           # resume retries this batch, once its data is fixed
                    checkpoint(out_dir / "checkpoint", state.epoch, state.batch_pos)
                    raise NonFiniteLossError(f"{exc}; the last good state is saved in {out_dir / 'checkpoint'}: "
                                             "fix the data, then --resume") from None
                if record is None:
                    continue
                state.step += 1
                last = record
                log.write(record)
                bar.set_postfix(epoch=state.epoch + 1, **{k: f"{record[k]:.3f}" for k in ("loss", "cls_loss", "seg_loss")
                                                          if k in record})
            if stopped_early:
                break
            state.epoch, state.batch_pos = state.epoch + 1, 0
            epoch = state.epoch
            save_epoch(out_dir, epoch, tc, checkpoint,
                       None if validate is None else lambda saved: validate(saved, epoch, state.step))
            log.curves()
        if stopped_early:
            log.curves()
    finally:
        bar.close()
        log.close()
    if stopped_early:
        checkpoint(out_dir / "checkpoint", state.epoch, state.batch_pos)
    losses = {k: v for k, v in last.items() if isinstance(v, float)}
    return TrainResult(out_dir, out_dir / "checkpoint", state.epoch, state.step, stopped_early,
                       time.monotonic() - start, losses)
