"""``ctlesion`` command line: models, train, evaluate, predict, demo.

Errors a user can fix (bad config key, missing file, corrupt checkpoint, unreadable
DICOM) print one clear line and exit with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, NotADirectoryError)


def _cmd_models(args: argparse.Namespace) -> int:
    from .registry import model_table

    rows = model_table(args.filter)
    if args.json:
        print(json.dumps([{k: r[k] for k in ("name", "params", "description")} for r in rows], indent=2))
        return 0
    width = max(len(r["name"]) for r in rows) if rows else 10
    print(f"{'name':<{width}}  {'params':>8}  description")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['params'] / 1e6:>7.2f}M  {r['description']}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_experiment
    from .engine.train import train_segmentation

    cfg = load_experiment(args.config, args.set)
    resume = False
    if args.resume is not None:
        resume = True if args.resume == "latest" else Path(args.resume)
    result = train_segmentation(cfg, args.out, resume=resume, progress=not args.quiet)
    state = "stopped at its time limit" if result.stopped_early else "finished"
    print(f"training {state}: {result.epochs_done} epochs, {result.steps} steps, "
          f"{result.seconds:.0f} s; last loss {result.last_losses.get('loss', float('nan')):.4f}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _data_config_for(spec: str, ckpt_cfg, args: argparse.Namespace):
    """Parse ``--data`` and inherit the checkpoint's preprocessing unless overridden."""
    from .data.datasets import parse_data_spec

    data = parse_data_spec(spec)
    train_data = ckpt_cfg.data
    data.min_area = args.min_area if args.min_area is not None else train_data.min_area
    data.size = args.size if args.size is not None else train_data.size
    if args.window is not None:
        data.window = args.window
    if getattr(args, "split", None):
        data.split = args.split
    return data


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .data.datasets import build_dataset
    from .engine.checkpoint import load_checkpoint
    from .engine.evaluate import evaluate_segmentation, write_json
    from .engine.predict import safe_filename
    from .engine.train import resolve_device
    from .viz import save_overlay

    model, cfg, meta = load_checkpoint(args.checkpoint)
    data = _data_config_for(args.data, cfg, args)
    dataset = build_dataset(data, cfg.model.detector.mask_type)
    eval_cfg = replace(
        cfg.eval,
        **{k: v for k, v in (("score_thresh", args.score_thresh), ("nms_thresh", args.nms_thresh),
                             ("detections_per_img", args.max_detections)) if v is not None},
    )
    device = resolve_device(args.device)
    metrics, kept = evaluate_segmentation(model, dataset, eval_cfg, device, progress=not args.quiet,
                                          keep=args.overlays)
    metrics["checkpoint"] = str(args.checkpoint)
    metrics["data"] = args.data
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    for sample, pred in kept:
        save_overlay(out / "overlays" / f"{safe_filename(sample.sample_id)}.png", sample.image,
                     prediction=pred, class_names=model.class_names, target=sample.target,
                     score_threshold=eval_cfg.score_thresh, title=sample.sample_id)
    leg, coco = metrics["legacy"], metrics["coco"]
    print(f"{metrics['num_images']} images ({metrics['num_negative_images']} without lesions), "
          f"score threshold {eval_cfg.score_thresh}")
    print(f"legacy (papers' per-image AP): AP50 {leg['AP50']:.4f}  AP75 {leg['AP75']:.4f}  mAP {leg['mAP']:.4f}")
    print(f"COCO segm: AP {coco['segm']['AP']:.4f}  AP50 {coco['segm']['AP50']:.4f}  AP75 {coco['segm']['AP75']:.4f}")
    print(f"COCO bbox: AP {coco['bbox']['AP']:.4f}  AP50 {coco['bbox']['AP50']:.4f}  AP75 {coco['bbox']['AP75']:.4f}")
    print(f"wrote {out / 'metrics.json'}" + (f" and {len(kept)} overlays in {out / 'overlays'}" if kept else ""))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .data.datasets import VolumeDataset
    from .engine.checkpoint import load_checkpoint
    from .engine.predict import predict_inputs
    from .engine.train import resolve_device

    model, cfg, _ = load_checkpoint(args.checkpoint)
    dataset = VolumeDataset(args.inputs, window=args.window or "auto",
                            mask_type=cfg.model.detector.mask_type,
                            size=args.size if args.size is not None else cfg.data.size)
    summary = predict_inputs(model, dataset, args.out, resolve_device(args.device),
                             score_thresh=args.score_thresh, overlays=args.overlays,
                             progress=not args.quiet)
    print(f"{summary.slices} slices, {summary.slices_with_lesions} with lesions, "
          f"{summary.detections} detections")
    print(f"predictions: {summary.predictions_file}")
    if summary.overlay_dir is not None:
        print(f"overlays: {summary.overlay_dir}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctlesion",
        description="Lung-lesion instance segmentation for chest CT (Ter-Sarkisov model family).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models with parameter counts")
    p.add_argument("--json", action="store_true", help="print a JSON list of {name, params, description}")
    p.add_argument("--filter", default="*", help="shell-style name pattern, e.g. 'maskrcnn-r18-*'")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", required=True, help="output folder (config, log, checkpoints)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from OUT/checkpoint, or from the given checkpoint folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    def data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--window", default=None,
                       help="lung | mediastinum | as_stored | W:L (default: by the input's units)")
        p.add_argument("--size", type=int, default=None, help="resize slices to SIZE x SIZE (default: as trained)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        p.add_argument("--score-thresh", type=float, default=None, help="detection confidence threshold")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("evaluate", help="score a checkpoint on labelled data (legacy + COCO mAP)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder")
    p.add_argument("--data", required=True,
                   help="labelled data: a folder (imgs/+masks/ or Imgs/+GT/), FORMAT:PATH, "
                        "or phantom:n=32,size=128,seed=7")
    p.add_argument("--split", default=None, help="split file naming the images to use")
    p.add_argument("--min-area", type=int, default=None, help="minimum instance area in px (default: as trained)")
    p.add_argument("--nms-thresh", type=float, default=None, help="detection NMS IoU")
    p.add_argument("--max-detections", type=int, default=None, help="detections per image cap")
    p.add_argument("--overlays", type=int, default=8, help="write overlays for the first N images (0: none)")
    p.add_argument("--out", required=True, help="output folder for metrics.json and overlays")
    data_options(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="find lesions in PNG/JPG slices, DICOM series or NIfTI volumes")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder")
    p.add_argument("inputs", nargs="+", help="image files, DICOM files or series folders, NIfTI volumes")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overlays", choices=("all", "lesions", "none"), default="all",
                   help="which slices get an overlay PNG (default: all)")
    data_options(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("demo", help="train and evaluate on built-in synthetic phantoms (CPU, minutes)")
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .engine.checkpoint import CheckpointError
    from .engine.train import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, NonFiniteLossError, *USER_ERRORS) as exc:
        print(f"ctlesion {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
