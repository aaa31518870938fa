"""This CPU's fp32 rates for the two kinds of work in a Mask R-CNN forward: oneDNN
convolutions and MKL matrix products (``docs/benchmarks.md``, "the floor, measured").

    python scripts/bench_rates.py --threads 2

Prints GFLOP/s (median of 7 after a warm-up) for a 4096³ GEMM, the box head's first layer
(1,000 × 12,544 × 128) as ``F.linear`` and as a 1×1 convolution, and 3×3 convolutions of
the backbone's shapes at 512² input.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def rate(fn, flop: float) -> tuple[float, float]:
    """(GFLOP/s, ms) of the median of 7 calls after one warm-up."""
    fn()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    t = statistics.median(times)
    return flop / t / 1e9, 1000 * t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn((4096, 4096), generator=g), torch.randn((4096, 4096), generator=g)
    x, w, bias = torch.randn((1000, 12544), generator=g), torch.randn((128, 12544), generator=g), torch.randn(128)
    fc_flop = 2 * 1000 * 12544 * 128
    cases = [
        ("GEMM 4096^3 (MKL)", lambda: a @ b, 2 * 4096 ** 3),
        ("box head fc6 1000x12544x128, F.linear (MKL)", lambda: F.linear(x, w, bias), fc_flop),
        ("the same as a 1x1 convolution (oneDNN)",
         lambda: F.conv2d(x.view(1000, 12544, 1, 1), w.view(128, 12544, 1, 1), bias), fc_flop),
    ]
    for channels, side in ((64, 128), (256, 32)):
        feat = torch.randn((1, channels, side, side), generator=g)
        kernel = torch.randn((channels, channels, 3, 3), generator=g)
        flop = 2 * channels * channels * 9 * side * side
        cases.append((f"3x3 convolution {channels} ch at {side}^2 (oneDNN)",
                      lambda f=feat, k=kernel: F.conv2d(f, k, padding=1), flop))
        cl_feat, cl_kernel = (t.contiguous(memory_format=torch.channels_last) for t in (feat, kernel))
        cases.append(("  the same, channels-last",
                      lambda f=cl_feat, k=cl_kernel: F.conv2d(f, k, padding=1), flop))
    print(f"torch {torch.__version__}, {args.threads} threads")
    with torch.inference_mode():
        for name, fn, flop in cases:
            gflops, ms = rate(fn, flop)
            print(f"{name:52s} {gflops:6.0f} GFLOP/s  {ms:7.1f} ms")


if __name__ == "__main__":
    main()
