"""A/B of the inference fast path's levers, in one process, interleaved round by round with
the stock torchvision reference of the same shape (``docs/benchmarks.md``).

    python scripts/bench_levers.py --models ssm-2branch-r18-s3,maskrcnn-r18-s2 --repeats 5 \
        --threads 2 --json levers.json

Variants, each timed through ``ctlesion benchmark``'s own per-batch call (512², 128 forced
masked detections, random weights): the path before the levers (mask branch on contiguous
features, one RoI Align call), + the mask branch on channels-last features, + torchvision's
RoI Align in threads, + RoI Align as one gather, + the mask predictor as blocked GEMMs, +
channels-last weights, + the box heads' fc6 as 7x7 convolutions (= the default), the
bitwise-stock settings (``--roi-align torchvision --no-channels-last``), and the default
with the opt-in ``--precision bf16-mask`` / ``bf16`` and ``--compile`` (``torch.compile`` of
the backbone; compiled in the warm-up round), and bf16 with the float32 pooling it had
before. The "before" variants switch the levers off by patching
``ctlesion.models.rcnn_parts`` and ``roi_align_gather`` for the duration of their call
(``--variants`` picks them by number, 1-based in this order), which is why this is a
script and not a ``ctlesion benchmark`` option. Prints the medians and the median per-round
ratio to stock; ``--json`` keeps them with the machine and load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from dataclasses import dataclass

import torch

import ctlesion.models.rcnn_parts as parts
import ctlesion.models.roi_align_gather as gather
from ctlesion.engine import benchmark as bm
from ctlesion.models.inference import speed_options
from ctlesion.registry import create_model, default_model_config, get_entry

@dataclass(frozen=True)
class Variant:
    """One setting of the levers; the defaults are the default path."""
    name: str
    roi_align: str = "gather"           # "one" (torchvision's pooler as built) / "torchvision" (in threads) / "gather"
    mask_channels_last: bool = True      # the mask branch on channels-last features
    gemm_predictor: bool = True          # the mask predictor as blocked GEMMs
    precision: str = "fp32"
    channels_last: bool = True           # channels-last weights
    compiled: bool = False
    box_conv: bool = True                # the box heads' fc6 as a 7x7 convolution
    bf16_pooling: bool = True            # under bf16 autocast, the gather pools in bfloat16


BEFORE = dict(mask_channels_last=False, gemm_predictor=False, channels_last=False, box_conv=False)
VARIANTS = [
    Variant("before (one RoI Align call, contiguous mask branch)", roi_align="one", **BEFORE),
    Variant("+ mask branch channels-last", roi_align="one", **{**BEFORE, "mask_channels_last": True}),
    Variant("+ torchvision's RoI Align in threads", roi_align="torchvision", **{**BEFORE, "mask_channels_last": True}),
    Variant("+ RoI Align as one gather", **{**BEFORE, "mask_channels_last": True}),
    Variant("+ mask predictor as GEMMs", channels_last=False, box_conv=False),
    Variant("+ channels-last weights", box_conv=False),
    Variant("+ box heads' fc6 as 7x7 convolutions (the default)"),
    Variant("--roi-align torchvision --no-channels-last (bitwise stock)", roi_align="torchvision", channels_last=False),
    Variant("default + --precision bf16-mask", precision="bf16-mask"),
    Variant("default + --precision bf16", precision="bf16"),
    Variant("default + --compile", compiled=True),
    Variant("default + --compile --precision bf16-mask", precision="bf16-mask", compiled=True),
    Variant("default + --compile --precision bf16", precision="bf16", compiled=True),
    Variant("default + --precision bf16, float32 pooling (before)", precision="bf16", bf16_pooling=False),
]


@contextlib.contextmanager
def levers(v: Variant):
    """The fast path with the levers of ``v`` off where it says so (patched for the block)."""
    fast_pools, mask_logits = parts._fast_pools, parts.LesionRoIHeads.mask_logits
    fast_predictor = parts.LesionMaskPredictor._fast
    conv_min_rois = parts.LesionBoxHead.conv_min_rois
    gather_forward = gather.GatherRoIAlign.forward

    def contiguous_mask_logits(self, *args):
        saved, self.mask_channels_last = self.mask_channels_last, False
        try:
            return mask_logits(self, *args)
        finally:
            self.mask_channels_last = saved

    def float32_pooling(self, features, boxes, image_shapes):
        dtype = next(iter(features.values())).dtype
        return gather_forward(self, {k: f.float() for k, f in features.items()}, boxes, image_shapes).to(dtype)

    if v.roi_align == "one":
        parts._fast_pools = lambda heads, workers, kernel: []
    else:
        parts._fast_pools = lambda heads, workers, kernel: fast_pools(heads, workers, v.roi_align)
    if not v.mask_channels_last:
        parts.LesionRoIHeads.mask_logits = contiguous_mask_logits
    if not v.gemm_predictor:
        parts.LesionMaskPredictor._fast = lambda self, x: False
    if not v.box_conv:
        parts.LesionBoxHead.conv_min_rois = float("inf")
    if not v.bf16_pooling:
        gather.GatherRoIAlign.forward = float32_pooling
    try:
        yield
    finally:
        parts._fast_pools, parts.LesionRoIHeads.mask_logits = fast_pools, mask_logits
        parts.LesionMaskPredictor._fast = fast_predictor
        parts.LesionBoxHead.conv_min_rois = conv_min_rois
        gather.GatherRoIAlign.forward = gather_forward


def bench_model(name: str, repeats: int, size: int, detections: int, variants: list[Variant]) -> dict:
    cfg, task = default_model_config(name), get_entry(name).task
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    stock_name, stock = bm.stock_reference(cfg)
    stock.eval()
    bm.force_detections(model, detections)
    bm.force_detections(stock, detections)
    call = bm._ctlesion_call(model, task)
    images = [torch.rand((1, size, size), generator=torch.Generator().manual_seed(0))]
    cpu = torch.device("cpu")
    times = {v.name: [] for v in variants}
    stock_times = []
    with torch.inference_mode():
        for round_ in range(repeats + 1):          # round 0: warm-up
            t = bm._time(lambda: stock(images), cpu)
            if round_:
                stock_times.append(t)
            for v in variants:
                with levers(v), bm._inference_modes(model, task), \
                        speed_options(model, cpu, v.precision, v.channels_last, v.compiled):
                    t = bm._time(lambda: call(images), cpu)
                if round_:
                    times[v.name].append(t)
    return {"stock": stock_name, "stock_median_ms": round(1000 * statistics.median(stock_times), 1),
            "variants": {v: {"median_ms": round(1000 * statistics.median(ts), 1),
                             "ratio": round(statistics.median([a / b for a, b in zip(ts, stock_times)]), 3)}
                         for v, ts in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ssm-2branch-r18-s3,maskrcnn-r18-s2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--detections", type=int, default=128)
    parser.add_argument("--variants", default=None,
                        help="comma-separated variant numbers to run (1-based, in the order above; default all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = (VARIANTS if args.variants is None
                else [VARIANTS[int(i) - 1] for i in args.variants.split(",")])
    result = {"machine_before": bm.machine_info(torch.device("cpu")), "models": {}}
    for name in args.models.split(","):
        row = result["models"][name] = bench_model(name, args.repeats, args.size, args.detections, variants)
        print(f"{name} (stock {row['stock']}: {row['stock_median_ms']} ms/slice)")
        for variant, v in row["variants"].items():
            print(f"  {variant:52s} {v['median_ms']:8.1f} ms  {v['ratio']:.2f}x")
    result["loadavg_after"] = bm.machine_info(torch.device("cpu"))["loadavg"]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
