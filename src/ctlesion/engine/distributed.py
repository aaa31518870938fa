"""Multi-process training on ``torch.distributed`` (``torchrun``): NCCL on GPUs, gloo on CPU.

The loop (:mod:`.loop`) and the steps (:mod:`.steps`) call these few functions; in a single
process every one of them is a no-op, so one process trains exactly as before.

Why gradients are averaged here and not by ``DistributedDataParallel``: DDP's reducer is
armed by a forward through its wrapper, but the joint models' iteration is two updates
(``segmentation_losses``, then the classification forward), each with its own frozen set
(parameters outside the update rule get ``grad=None`` so that Adam leaves them alone). So
after each backward, :func:`average_gradients` all-reduces the gradients with
``torch.distributed.all_reduce`` in one flat buffer, weighted by each rank's sample count
(a rank whose shard is empty, e.g. lesion-free slices skipped, adds nothing), and a
parameter no rank has a gradient for stays ``None`` on every rank. The result is the
gradient of the loss over the global batch, as one process with the whole batch computes it.

BatchNorm statistics stay per rank unless ``train.sync_bn`` (CUDA only); rank 0 writes logs
and checkpoints, every rank's RNG state is saved, and every rank resumes from the same
checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["World", "resolve_device", "setup_world", "average_gradients", "mean_over_ranks", "any_rank", "gather_objects",
           "broadcast_module", "barrier", "shutdown_world"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def setup_world(device_name: str) -> tuple[World, torch.device]:
    """The process group ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``), and this rank's device; one process without them."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), resolve_device(device_name)
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def shutdown_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(params: list[torch.nn.Parameter], world: World, weight: float) -> float:
    """Make every rank's gradients the ``weight``-weighted mean over ranks (``weight``: this
    rank's sample count). Returns the total weight (0: no rank had samples)."""
    if not world.distributed:
        return weight
    device = params[0].device
    has = torch.tensor([float(p.grad is not None) for p in params] + [float(weight)], device=device)
    _sum(has)
    total = float(has[-1])
    present = [p for p, h in zip(params, has[:-1].tolist()) if h > 0]
    if not present or total == 0:
        for p in params:
            p.grad = None
        return total
    flat = torch.cat([(p.grad * weight if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in present])
    _sum(flat).div_(total)
    offset = 0
    for p in present:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    return total


def mean_over_ranks(value: float, weight: float, world: World, device) -> tuple[float, float]:
    """The ``weight``-weighted mean of a per-rank number (a loss) over all ranks, and the
    total weight (0: no rank had a sample; the mean is then NaN)."""
    if not world.distributed:
        return value, weight
    t = _sum(torch.tensor([value * weight, weight], dtype=torch.float64, device=device))
    total = float(t[1])
    return (float(t[0]) / total if total > 0 else float("nan")), total


def any_rank(flag: bool, world: World, device) -> bool:
    """True on every rank if it is true on any (a collective stop decision)."""
    if not world.distributed:
        return flag
    return bool(_sum(torch.tensor([float(flag)], device=device)) > 0)


def gather_objects(obj, world: World) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module, world: World) -> None:
    """Rank 0's parameters and buffers on every rank (identical starting weights)."""
    if world.distributed:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def convert_sync_bn(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``train.sync_bn``: BatchNorm statistics over the global batch (CUDA, NCCL)."""
    if device.type != "cuda":
        raise ConfigError("train.sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if world.distributed else model
