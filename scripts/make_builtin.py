"""Turn a trained checkpoint into a built-in model shipped with ctlesion.

    python scripts/make_builtin.py runs/semiseg-all/checkpoint --name lesion-semiseg-r18 \
        --card docs/cards/lesion-semiseg-r18.yaml

writes ``src/ctlesion/builtin/NAME/`` (the checkpoint with its parameters in fp16, weights
only; ``card.json`` and ``card.md``) and adds NAME to ``src/ctlesion/builtin/catalogue.json``
(registry model, task, SHA-256 and size of the weights file). The card (YAML or JSON) gives
``summary, training_data, licence, preprocessing, window, metrics {protocol, values: {NAME:
{mean, std, folds}}}, intended_use, limits`` (optional ``title``, ``extra``); the disclaimer,
SHA-256, size, class names and provenance are added. It then loads the new built-in, runs it
and the source checkpoint on one synthetic slice and prints the largest output difference.
``--root DIR`` (or ``CTLESION_BUILTIN_DIR``) writes elsewhere; ``--replace`` overwrites NAME;
``--remove NAME`` takes a built-in out.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ctlesion.engine.builtin_weights import builtin_checkpoint, make_builtin, remove_builtin
from ctlesion.engine.checkpoint import load_checkpoint
from ctlesion.errors import CtlesionError


def _largest_difference(source, built) -> float:
    """Max |difference| of the two models' outputs on one 128-px synthetic slice (eval mode)."""
    a, _, _ = load_checkpoint(source)
    b, _, _ = load_checkpoint(built)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 128, 128, generator=gen)
    a.eval(), b.eval()
    with torch.no_grad():
        out_a, out_b = a([image]), b([image])
        logits_a, logits_b = getattr(out_a, "logits", None), getattr(out_b, "logits", None)
        if logits_a is not None:
            return float((logits_a.softmax(-1) - logits_b.softmax(-1)).abs().max())
        # detectors: compare the raw feature maps (detections may differ in number near a threshold)
        feats_a = a.backbone(image[None]) if hasattr(a, "backbone") else {}
        feats_b = b.backbone(image[None]) if hasattr(b, "backbone") else {}
        return max((float((feats_a[k] - feats_b[k]).abs().max()) for k in feats_a), default=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="trained checkpoint folder")
    parser.add_argument("--name", help="built-in name (not a registry model name), e.g. lesion-semiseg-r18")
    parser.add_argument("--card", help="model card, YAML or JSON")
    parser.add_argument("--root", default=None, help="built-in root (default: $CTLESION_BUILTIN_DIR or the package)")
    parser.add_argument("--replace", action="store_true", help="overwrite an existing built-in of that name")
    parser.add_argument("--remove", metavar="NAME", default=None, help="take built-in NAME out and delete its folder")
    args = parser.parse_args(argv)
    try:
        if args.remove:
            remove_builtin(args.remove, args.root)
            print(f"removed built-in {args.remove}")
            return 0
        if not (args.checkpoint and args.name and args.card):
            parser.error("CHECKPOINT, --name and --card are needed")
        entry = make_builtin(args.checkpoint, args.name, args.card, root=args.root, replace=args.replace)
        folder = builtin_checkpoint(args.name, args.root)
        diff = _largest_difference(args.checkpoint, folder)
        print(f"built-in {args.name}: {entry['model']} ({entry['task']}), {entry['weights_dtype']}, "
              f"{entry['size_bytes'] / 1e6:.2f} MB, SHA-256 {entry['sha256']}")
        print(f"folder {folder}; largest fp16-vs-fp32 output difference on a synthetic slice: {diff:.2e}")
        print(f"check it: ctlesion models --card {args.name}")
        return 0
    except CtlesionError as exc:
        print(f"make_builtin: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
