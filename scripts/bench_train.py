"""Training throughput of a segmentation step: a ctlesion detector against the stock
torchvision Mask R-CNN of the same shape (``ctlesion.engine.benchmark.stock_reference``),
interleaved step by step in one process (``docs/benchmarks.md``).

    python scripts/bench_train.py --model maskrcnn-r18-s3 --size 512 --batch 2 --steps 6 --threads 2

Each step: forward in train mode on ``--batch`` random slices with two square lesions each
(class 1), the sum of the losses, backward, SGD. Random weights; the first step of
each model is a warm-up. Prints images/s (median over steps) and the ratio ctlesion / stock
of step times. The joint models' classification step has no stock counterpart and is not
timed here.
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


def step(model, optimizer, images, targets) -> float:
    start = time.perf_counter()
    losses = model(images, targets)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="maskrcnn-r18-s3")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = default_model_config(args.model)
    torch.manual_seed(0)
    ours = create_model(cfg).train()
    name, stock = stock_reference(cfg)
    stock.train()
    opts = [torch.optim.SGD(m.parameters(), lr=1e-4) for m in (ours, stock)]
    times = ([], [])
    info = machine_info(torch.device("cpu"))
    for s in range(args.steps + 1):
        images, targets = batch(args.size, args.batch, s)
        for i, (model, opt) in enumerate(zip((ours, stock), opts)):
            t = step(model, opt, images, targets)
            if s:
                times[i].append(t)
    med = [statistics.median(t) for t in times]
    ratio = statistics.median([a / b for a, b in zip(*times)])
    print(f"torch {info['torch']}, {info['cpu']}, {args.threads} threads, load {info['loadavg']}")
    print(f"{args.model}: {args.batch / med[0]:.2f} images/s ({1000 * med[0]:.0f} ms per step of {args.batch}); "
          f"{name}: {args.batch / med[1]:.2f} images/s ({1000 * med[1]:.0f} ms); step-time ratio {ratio:.2f}x "
          f"({args.size}², {args.steps} steps after 1 warm-up)")


if __name__ == "__main__":
    main()
