"""Training throughput of a segmentation step: a ctlesion detector against the stock
torchvision Mask R-CNN of the same shape (``ctlesion.engine.benchmark.stock_reference``),
interleaved step by step in one process (``docs/benchmarks.md``).

    python scripts/bench_train.py --model maskrcnn-r18-s3 --size 512 --batch 2 --steps 6 --threads 2

Each step: forward in train mode on ``--batch`` random slices with two square lesions each
(class 1), the sum of the losses, backward, SGD. Random weights; the first step of
each model is a warm-up. Prints images/s (median over steps) and the ratio ctlesion / stock
of step times.

``--joint``: a joint model's whole training iteration as ``ctlesion train`` runs it
(:class:`~ctlesion.engine.steps.ClassificationStep`: a segmentation step on one phantom
slice with lesions, the copy rule, then the classification step on a batch of phantom slices, Adam),
timed for each of ``--batches`` classification batch sizes, each against the stock Mask
R-CNN's segmentation step on one slice (stock has no classification step)::

    python scripts/bench_train.py --joint --model ssm-2branch-r18-s3 --batches 1,2,4 --steps 5 --threads 2

``--roi-align-backward torchvision`` times the model with torchvision's own RoI Align
gradient instead of the default separable one (``ctlesion.models.roi_align_grad``).
``--device cuda`` and ``--amp bf16|fp16`` run both models there and in mixed precision
(ctlesion's through ``train.amp``, stock's under the same autocast); times are taken after a
device synchronisation.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ctlesion.engine.benchmark import machine_info, stock_reference
from ctlesion.registry import create_model, default_model_config


def batch(size: int, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand((1, size, size), generator=gen))
        boxes, masks = [], []
        for k, (y, x) in enumerate([(size // 4, size // 4), (size // 2, size // 2)]):
            side = size // 8
            m = torch.zeros((size, size), dtype=torch.uint8)
            m[y:y + side, x:x + side] = 1
            masks.append(m)
            boxes.append([x, y, x + side, y + side])
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([1, 1]),
                        "masks": torch.stack(masks)})
    return images, targets


AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model, optimizer, images, targets, device=torch.device("cpu"), amp: str | None = None) -> float:
    """One stock-style training step (forward, summed losses, backward, optimiser), timed."""
    images = [i.to(device) for i in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    _sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=AMP.get(amp, torch.float32), enabled=amp is not None):
        losses = model(images, targets)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def joint_iterations(name: str, size: int, batches: list[int], steps: int, roi_align_backward: str,
                     device: torch.device, amp: str | None) -> None:
    """Time ``ClassificationStep.run`` (segmentation step + copy rule + classification step)
    for each classification batch size, interleaved with stock's one-slice segmentation step."""
    from ctlesion.data.factory import build_dataset
    from ctlesion.engine.distributed import World
    from ctlesion.engine.steps import ClassificationStep, Updater, resolve_auto_settings
    from ctlesion.experiment import experiment_from_dict

    for b in batches:
        cfg = experiment_from_dict({"train": {"batch_size": b, **({"amp": amp} if amp else {})},
                                    "data": {"format": "phantom", "num_samples": 16, "size": size}})
        cfg.model = default_model_config(name)
        cfg.model.detector.roi_align_backward = roi_align_backward
        resolve_auto_settings(cfg)
        torch.manual_seed(0)
        model = create_model(cfg.model).to(device)
        data = build_dataset(cfg.data, cfg.model.detector.mask_type)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
        lesions = [x for x in data if len(x.target["boxes"])]      # every iteration makes a segmentation update
        joint = ClassificationStep(model, Updater(model, optimizer, cfg, device, World()), cfg, device,
                                   seg_dataset=lesions)
        stock_name, stock = stock_reference(cfg.model)
        stock.to(device).train()
        stock_opt = torch.optim.SGD(stock.parameters(), lr=1e-4)
        ours, ref, segs = [], [], 0
        for s in range(steps + 1):
            samples = [data[(s * b + i) % len(data)] for i in range(b)]
            _sync(device)
            start = time.perf_counter()
            record = joint.run(samples, s, steps + 1, 0, s)
            _sync(device)
            t = time.perf_counter() - start
            images, targets = batch(size, 1, s)
            t_stock = step(stock, stock_opt, images, targets, device, amp)
            if s:
                ours.append(t)
                ref.append(t_stock)
                segs += "seg_loss" in record
        med, med_ref = statistics.median(ours), statistics.median(ref)
        print(f"{name} joint iteration, classification batch {b}: {1000 * med:.0f} ms, {1 / med:.2f} iterations/s "
              f"({b / med:.2f} classification images/s, {(b + 1) / med:.2f} images/s counting the "
              f"segmentation slice; {segs}/{steps} iterations had a segmentation update); "
              f"{stock_name} segmentation step on 1 slice {1000 * med_ref:.0f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="maskrcnn-r18-s3")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--joint", action="store_true", help="a joint model's whole training iteration")
    parser.add_argument("--batches", default="1,2,4", help="--joint: classification batch sizes")
    parser.add_argument("--roi-align-backward", default="separable", choices=["separable", "torchvision"],
                        help="ctlesion model's RoI Align gradient (model.detector.roi_align_backward)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--amp", default=None, choices=sorted(AMP), help="mixed precision (default: float32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.joint:
        info = machine_info(device)
        print(f"torch {info['torch']}, {info['cpu']}, device {info['device']}, {args.threads} threads, "
              f"load {info['loadavg']}, {args.size}², {args.amp or 'fp32'}, {args.steps} iterations after 1 warm-up")
        joint_iterations(args.model, args.size, [int(b) for b in args.batches.split(",")], args.steps,
                         args.roi_align_backward, device, args.amp)
        return
    cfg = default_model_config(args.model)
    cfg.detector.roi_align_backward = args.roi_align_backward
    torch.manual_seed(0)
    ours = create_model(cfg).to(device).train()
    name, stock = stock_reference(cfg)
    stock.to(device).train()
    opts = [torch.optim.SGD(m.parameters(), lr=1e-4) for m in (ours, stock)]
    times = ([], [])
    info = machine_info(device)
    for s in range(args.steps + 1):
        images, targets = batch(args.size, args.batch, s)
        for i, (model, opt) in enumerate(zip((ours, stock), opts)):
            t = step(model, opt, images, targets, device, args.amp)
            if s:
                times[i].append(t)
    med = [statistics.median(t) for t in times]
    ratio = statistics.median([a / b for a, b in zip(*times)])
    print(f"torch {info['torch']}, {info['cpu']}, device {info['device']}, {args.threads} threads, "
          f"load {info['loadavg']}, {args.amp or 'fp32'}")
    print(f"{args.model}: {args.batch / med[0]:.2f} images/s ({1000 * med[0]:.0f} ms per step of {args.batch}); "
          f"{name}: {args.batch / med[1]:.2f} images/s ({1000 * med[1]:.0f} ms); step-time ratio {ratio:.2f}x "
          f"({args.size}², {args.steps} steps after 1 warm-up)")


if __name__ == "__main__":
    main()
