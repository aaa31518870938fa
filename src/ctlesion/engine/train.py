"""``ctlesion train``: build the run (model, data, step, optimiser) and hand it to the loop.

:func:`train` serves every task the registry knows: ``segmentation`` (detectors) runs
:class:`~ctlesion.engine.steps.SegmentationStep`; ``classification`` and ``joint`` (CTM, SSM,
mask-feature models, CNNs) run :class:`~ctlesion.engine.steps.ClassificationStep`. The loop
(:func:`~ctlesion.engine.loop.run_loop`) owns resume, the batch plan, checkpoints,
validation, the time limit and the log. Pass ``model`` (a new run's model; it must be what
``cfg.model`` describes, since checkpoints rebuild it from there), ``dataset`` or
``seg_dataset`` to train objects of your own instead of what the config names.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import registry
from ..config import ExperimentConfig
from ..data.augment import AugmentedDataset
from ..data.factory import build_dataset
from ..errors import ConfigError, DataError, NonFiniteLossError
from .checkpoint import load_checkpoint, load_train_state
from .io import save_config
from .distributed import World, broadcast_module, convert_sync_bn, setup_world, shutdown_world
from .loop import LoopState, TrainResult, epoch_order, resolve_device, run_loop, scheduled_lr, seed_everything, set_rng_state
from .steps import (ClassificationStep, SegmentationStep, Updater, initialise, prepare_classifier,
                    resolve_auto_settings)

__all__ = ["train", "train_segmentation", "train_classifier", "TrainResult", "NonFiniteLossError",
           "resolve_device", "epoch_order", "scheduled_lr"]


def _model_and_state(cfg: ExperimentConfig, out_dir: Path, resume, model=None) -> tuple[torch.nn.Module, dict | None]:
    """A new model (``model``, else the registry's), or the checkpoint's with its train state (resume)."""
    if not resume:
        return (registry.create_model(cfg.model) if model is None else model), None
    ckpt = out_dir / "checkpoint" if resume is True else Path(resume)
    model, ckpt_cfg, _ = load_checkpoint(ckpt)
    if ckpt_cfg.model != cfg.model:
        raise ConfigError(f"cannot resume from {ckpt}: it holds model {ckpt_cfg.model.name!r} with a different "
                          "model config than this run's; resume with the checkpoint's config.yaml")
    return model, load_train_state(ckpt)


def _datasets(cfg: ExperimentConfig, task: str, model, dataset, seg_dataset):
    """``(dataset, seg_dataset or None, val_dataset or None)`` for the run."""
    mask_type = cfg.model.detector.mask_type
    dataset = _augmented(build_dataset(cfg.data, mask_type), cfg.data, cfg.train.seed) if dataset is None else dataset
    if len(dataset) == 0:
        raise DataError("the training dataset is empty" if task == "segmentation"
                        else "the classification training dataset is empty")
    joint = task != "segmentation" and getattr(model, "has_segmentation", False) and cfg.train.joint
    if not joint:
        seg_dataset = None
    elif seg_dataset is None:
        if cfg.seg_data is None:
            raise ConfigError(f"{cfg.model.name} trains jointly: give seg_data (segmentation images), "
                              "or set train.joint=false to train the classification step only")
        seg_dataset = _augmented(build_dataset(cfg.seg_data, mask_type), cfg.seg_data, cfg.train.seed + 1)
    if seg_dataset is not None and len(seg_dataset) == 0:
        raise DataError("the segmentation dataset (seg_data) is empty")
    val = None
    if cfg.train.eval_every is not None and cfg.val_data is not None:
        val = build_dataset(cfg.val_data, mask_type)
    return dataset, seg_dataset, val


def _augmented(dataset, data_cfg, seed: int):
    """``dataset`` augmented as ``data_cfg.augment`` says (training data only; None: as it is)."""
    if data_cfg.augment is None:
        return dataset
    return AugmentedDataset(dataset, data_cfg.augment, seed, min_area=data_cfg.min_area)


def train(cfg: ExperimentConfig, out_dir: str | Path, *, resume: str | Path | bool = False, progress: bool = True,
          model: torch.nn.Module | None = None, dataset=None, seg_dataset=None) -> TrainResult:
    """Train the model ``cfg`` describes and write everything under ``out_dir``.

    Writes ``config.yaml`` (resolved), ``train_log.jsonl`` (one line per step: every loss
    term, the sample ids, the lr), ``curves.png`` (per-epoch loss means and validation
    metrics, redrawn after every epoch), ``epoch-NNNN/`` every ``save_every`` epochs and
    ``checkpoint/`` (the latest, also at the end or on the time limit). With
    ``train.eval_every`` and ``val_data``, the validation set is scored at those epochs:
    a ``validation`` line in the log and ``metrics.json`` in that epoch's folder.
    ``resume=True`` continues from ``out_dir/checkpoint``; a path continues from there.
    A non-finite loss raises :class:`NonFiniteLossError` naming the batch.
    """
    start = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = registry.get_entry(cfg.model.name).task
    if task != "segmentation":
        resolve_auto_settings(cfg)
    tc = cfg.train
    world, device = setup_world(tc.device)
    try:
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(tc.seed)  # the same on every rank: the same initial weights
        model, state = _model_and_state(cfg, out_dir, resume, model)
        dataset, seg_dataset, val_dataset = _datasets(cfg, task, model, dataset, seg_dataset)
        if task != "segmentation":
            prepare_classifier(model, cfg, dataset, out_dir, resumed=state is not None, progress=progress and world.main)
        elif state is None:
            initialise(model, cfg, out_dir, progress=progress and world.main)
        scheduled_lr(tc, 0, 1)  # fail early on a bad schedule name
        model = _placed(model, tc, world, device)
        optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        updater = Updater(model, optimizer, cfg, device, world, (state or {}).get("scaler"))
        if task == "segmentation":
            step = SegmentationStep(model, updater, cfg, device)
        else:
            step = ClassificationStep(model, updater, cfg, device, seg_dataset,
                                      copy_state=state.get("copy") if state else None)
        loop_state = _restore(state, optimizer, tc, world)
        if world.main:
            save_config(cfg, out_dir / "config.yaml")
        return run_loop(cfg, out_dir, model, dataset, step, optimizer, task=task, start=start, state=loop_state,
                        val_dataset=val_dataset, device=device, progress=progress, resumed=state is not None,
                        world=world)
    finally:
        shutdown_world(world)


def _placed(model: torch.nn.Module, tc, world: World, device: torch.device) -> torch.nn.Module:
    """On this rank's device, in the configured memory format, with rank 0's weights everywhere."""
    if tc.sync_bn:
        model = convert_sync_bn(model, world, device)
    model.to(device)
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
    broadcast_module(model, world)
    return model


def _restore(state: dict | None, optimizer, tc, world: World) -> LoopState:
    """Resume position, optimiser and this rank's RNG; a new run seeds each rank apart."""
    if state is None:
        if world.distributed:
            seed_everything(tc.seed + world.rank)  # different RoI/anchor sampling on each rank
        return LoopState()
    optimizer.load_state_dict(state["optimizer"])
    ranks = state.get("rng_ranks")
    if world.distributed and ranks is not None and len(ranks) == world.size:
        set_rng_state(ranks[world.rank])
    else:  # a single-process checkpoint under torchrun (or another rank count): rank 0 as saved
        set_rng_state(state["rng"])
        if world.rank:
            seed_everything(tc.seed + world.rank + 1_000_003 * state["step"])
    return LoopState(state["epoch"], state["batch_pos"], state["step"])


def train_segmentation(cfg: ExperimentConfig, out_dir: str | Path, **kwargs) -> TrainResult:
    """:func:`train` for a detector (kept for the Python API; the registry decides the task)."""
    if registry.get_entry(cfg.model.name).task != "segmentation":
        raise ConfigError(f"{cfg.model.name} is a slice classifier; use train_classifier")
    return train(cfg, out_dir, **kwargs)


def train_classifier(cfg: ExperimentConfig, out_dir: str | Path, **kwargs) -> TrainResult:
    """:func:`train` for a slice classifier or joint model (kept for the Python API)."""
    resolve_auto_settings(cfg)  # a detector's config fails here: "not a slice classifier"
    return train(cfg, out_dir, **kwargs)
