"""``ctlesion`` command line: models, train, evaluate, predict, verify-data, demo, compare, benchmark, export.

``train`` / ``evaluate`` / ``predict`` serve every model: detectors (segmentation), slice
classifiers (CTM, CNNs) and joint models (SSM, mask-feature models); the checkpoint's
task decides what is computed.

Errors a user can fix (:class:`~ctlesion.errors.CtlesionError`: bad config key, corrupt
checkpoint, unreadable DICOM; or a missing file) print one clear line and exit with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

from .config import INFERENCE_PRECISIONS as PRECISIONS
from .config import INFERENCE_ROI_ALIGN_KERNELS as ROI_ALIGN_KERNELS
from .errors import ConfigError, CtlesionError

# Problems the user can fix print one line (exit 2): ctlesion's own errors and missing or
# unreadable paths. Anything else (a ValueError inside torch, a bug) keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (CtlesionError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError, PermissionError)


def _cmd_models(args: argparse.Namespace) -> int:
    from .builtin import builtin_for_model, read_card, render_card
    from .registry import list_models, model_table

    if args.card is not None:
        card = read_card(args.card, registry_names=list_models())
        print(json.dumps(card, indent=2) if args.json else render_card(card), end="\n" if args.json else "")
        return 0
    rows = model_table(args.filter)
    builtin = builtin_for_model()
    if args.json:
        print(json.dumps([{**{k: r[k] for k in ("name", "params", "description", "task")},
                           "builtin_weights": r["name"] in builtin, "builtin": builtin.get(r["name"], [])}
                          for r in rows], indent=2))
        return 0
    width = max(len(r["name"]) for r in rows) if rows else 10
    weights = {r["name"]: ",".join(builtin.get(r["name"], [])) or "-" for r in rows}
    wide = max([len("built-in")] + [len(w) for w in weights.values()])
    print(f"{'name':<{width}}  {'params':>8}  {'built-in':<{wide}}  description")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['params'] / 1e6:>7.2f}M  {weights[r['name']]:<{wide}}  {r['description']}")
    if builtin:
        print("built-in: weights shipped with ctlesion; run them with --model NAME, read them with "
              "`ctlesion models --card NAME`")
    return 0


def _checkpoint_arg(args: argparse.Namespace):
    """``--checkpoint PATH`` as given, or ``--model NAME``'s verified built-in folder."""
    if args.model is None:
        return args.checkpoint
    from .engine.builtin_weights import builtin_checkpoint

    return builtin_checkpoint(args.model)


def _launch_torchrun(args: argparse.Namespace) -> int:
    """``ctlesion train --nproc N``: the same command on N processes under torchrun."""
    import os
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "ctlesion", "train", args.config, "--out", args.out,
               *(f"--set={item}" for item in args.set), *(["--quiet"] if args.quiet else [])]
    if args.resume is not None:
        command += ["--resume"] + ([] if args.resume == "latest" else [args.resume])
    return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from .engine.train import train
    from .experiment import load_experiment
    from .registry import get_entry

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args)
    cfg = load_experiment(args.config, args.set)
    resume = False
    if args.resume is not None:
        resume = True if args.resume == "latest" else Path(args.resume)
    result = train(cfg, args.out, resume=resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if get_entry(cfg.model.name).task == "segmentation":
        last = f"last loss {result.last_losses.get('loss', float('nan')):.4f}"
    else:
        last = f"last classification loss {result.last_losses.get('cls_loss', float('nan')):.4f}"
        if "seg_loss" in result.last_losses:
            last += f", segmentation loss {result.last_losses['seg_loss']:.4f}"
    state = "stopped at its time limit" if result.stopped_early else "finished"
    print(f"training {state}: {result.epochs_done} epochs, {result.steps} steps, {result.seconds:.0f} s; {last}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _f1_weights(text: str | None):
    if text is None or text == "shares":
        return None
    if text == "paper":
        return "paper"  # classification_report knows it (and refuses it without three classes)
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--f1-weights must be 'shares', 'paper' or comma-separated numbers, not {text!r}") from None


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _print_segmentation(metrics: dict, out: Path) -> None:
    leg, coco = metrics["legacy"], metrics["coco"]
    print(f"{metrics['num_images']} images ({metrics['num_negative_images']} without lesions), "
          f"score threshold {metrics['settings']['score_thresh']}")
    print(f"legacy (papers' per-image AP): AP50 {leg['AP50']:.4f}  AP75 {leg['AP75']:.4f}  mAP {leg['mAP']:.4f}")
    print(f"COCO segm: AP {coco['segm']['AP']:.4f}  AP50 {coco['segm']['AP50']:.4f}  AP75 {coco['segm']['AP75']:.4f}")
    print(f"COCO bbox: AP {coco['bbox']['AP']:.4f}  AP50 {coco['bbox']['AP50']:.4f}  AP75 {coco['bbox']['AP75']:.4f}")
    if "pixel" in metrics:
        px = metrics["pixel"]["lesion"]
        print(f"lesion mask (per slice, score >= {metrics['pixel']['score_thresh']}): "
              f"Dice {_num(px['dice'])}  sensitivity {_num(px['sensitivity'])}  specificity {_num(px['specificity'])}")
    written = len(metrics.get("overlay_files", []))
    print(f"wrote {out / 'metrics.json'}" + (f" and {written} overlays in {out / 'overlays'}" if written else ""))


def _print_classification(metrics: dict, out: Path) -> None:
    from .metrics import format_report

    print(format_report(metrics))
    if "segmentation" in metrics:
        leg = metrics["segmentation"]["legacy"]
        print(f"segmentation (legacy per-image AP): AP50 {leg['AP50']:.4f}  AP75 {leg['AP75']:.4f}  "
              f"mAP {leg['mAP']:.4f}; COCO segm AP {metrics['segmentation']['coco']['segm']['AP']:.4f}")
    print(f"wrote {out / 'metrics.json'}, {out / 'confusion_matrix.png'} and {out / 'predictions.jsonl'}")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .engine.api import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        _checkpoint_arg(args), args.data, args.out, seg_data=args.seg_data, split=args.split, min_area=args.min_area,
        size=args.size, window=args.window, score_thresh=args.score_thresh, nms_thresh=args.nms_thresh,
        max_detections=args.max_detections, f1_weights=_f1_weights(args.f1_weights), overlays=args.overlays,
        device=args.device, progress=not args.quiet, precision=args.precision,
        channels_last=args.channels_last, torch_compile=args.compile, roi_align=args.roi_align)
    (_print_segmentation if metrics["task"] == "segmentation" else _print_classification)(metrics, Path(args.out))
    return 0


def _volume_outputs(args: argparse.Namespace):
    from .outputs.writer import VolumeOutputOptions

    if args.no_volume_outputs:
        return None
    return VolumeOutputOptions(labels=not args.no_label_volume, instances=not args.no_instances,
                               dicom_seg=not args.no_dicom_seg, summary=not args.no_summary,
                               report=not args.no_report)


def _print_volume_outputs(summary) -> None:
    for vol in summary.volumes:
        burden = vol["burden"]
        pct = burden["percent_lung_affected"]
        classes = ", ".join(f"{n} {b['volume_ml']:.1f} mL ({b['lesions']} lesions)" for n, b in burden["classes"].items())
        print(f"{vol['source']}: lung {burden['lung']['volume_ml']:.0f} mL, "
              f"{'n/a' if pct is None else f'{pct:.2f}'} % affected; {classes or 'no lesion classes'}; "
              f"outputs in {Path(summary.predictions_file).parent / vol['folder']}")
    if summary.report is not None:
        print(f"report: {summary.report}")


def _cmd_predict(args: argparse.Namespace) -> int:
    from .engine.api import predict_checkpoint

    summary = predict_checkpoint(
        _checkpoint_arg(args), args.inputs, args.out, window=args.window, size=args.size, score_thresh=args.score_thresh,
        overlays=args.overlays, volume_outputs=_volume_outputs(args), aggregate=args.aggregate,
        min_abnormal_fraction=args.min_abnormal_fraction, device=args.device, progress=not args.quiet,
        skip_existing=args.skip_existing, batch_size=args.batch_size, precision=args.precision,
        channels_last=args.channels_last, torch_compile=args.compile, roi_align=args.roi_align)
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} volumes already done (--skip-existing): "
              f"{', '.join(summary.skipped[:5])}{' ...' if len(summary.skipped) > 5 else ''}")
    if hasattr(summary, "class_counts"):     # a slice classifier
        counts = ", ".join(f"{n} {c}" for n, c in summary.class_counts.items())
        print(f"{summary.slices} slices: {counts}")
        for source, verdict in summary.patients.items():
            probs = "  ".join(f"{n} {p:.2f}" for n, p in verdict["probabilities"].items())
            print(f"{source}: {verdict['class']} ({verdict['abnormal_slices']}/{verdict['num_slices']} "
                  f"abnormal slices; {probs})")
        print(f"predictions: {summary.predictions_file}; per-volume verdicts: {summary.patients_file}")
    else:
        print(f"{summary.slices} slices, {summary.slices_with_lesions} with lesions, "
              f"{summary.detections} detections")
        print(f"predictions: {summary.predictions_file}")
    if summary.overlay_dir is not None:
        print(f"overlays: {summary.overlay_dir}")
    _print_volume_outputs(summary)
    return 0


def _flatten(tree: dict, prefix: str = ""):
    """``{"a": {"b": 1}}`` -> ``[("a.b", 1)]``."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _cmd_convert_weights(args: argparse.Namespace) -> int:
    from .convert.author import convert_author_checkpoint

    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    result = convert_author_checkpoint(args.author_checkpoint, args.out, model_name=args.model, class_names=names)
    print(f"{args.author_checkpoint}: {result.family} weights -> {result.model_name} "
          f"({result.num_tensors} tensors, every key mapped)")
    print(f"source SHA-256 {result.source_sha256}")
    for note in result.notes:
        print(f"note: {note}")
    print("the author's evaluation settings: " + ", ".join(f"{k}={v}" for k, v in _flatten(result.settings)))
    print(f"checkpoint: {result.checkpoint} (use with `ctlesion predict/evaluate --checkpoint`)")
    return 0


def _cmd_verify_data(args: argparse.Namespace) -> int:
    from .data.verify import format_verify_report, verify_data

    report = verify_data(args.paths, fmt=args.format, min_area=args.min_area, progress=not args.quiet)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_verify_report(report))
    return 0 if report.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.quiet)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare

    families = args.families.split(",") if args.families else None
    run_compare(args.out, budget_s=args.budget, families=families, quick=args.quick, progress=not args.quiet)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from .engine import benchmark as bench

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else list(bench.DEFAULT_MODELS)
    result = {}
    if not args.volume_only:
        result = bench.run_benchmark(models, device=args.device, threads=args.threads, batch=args.batch,
                                     detections=args.detections, repeats=args.repeats, warmup=args.warmup,
                                     size=args.size, precision=args.precision, channels_last=args.channels_last,
                                     torch_compile=args.compile, roi_align=args.roi_align,
                                     progress=not args.quiet)
        print(bench.format_table(result))
    if args.volume is not None or args.volume_only:
        series = None if args.volume in (None, "synthetic") else args.volume
        volume = bench.volume_benchmark(args.volume_model, series=series, num_slices=args.volume_slices,
                                        size=args.size, detections=args.detections, device=args.device,
                                        threads=args.threads, repeats=args.volume_repeats, precision=args.precision,
                                        channels_last=args.channels_last, torch_compile=args.compile,
                                        roi_align=args.roi_align, progress=not args.quiet)
        print(bench.format_volume(volume))
        result["volume"] = volume
    if args.json:
        bench.save_result(args.json, result)
        print(f"wrote {args.json}")
    return 0


def _add_roi_align_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--roi-align", choices=ROI_ALIGN_KERNELS, default=ROI_ALIGN_KERNELS[0],
                   help="RoI Align of the fast path: gather (default; one weighted gather on all threads, "
                        "boxes and scores move by float32 summation order, ~1e-6) or torchvision "
                        "(torchvision's kernel, bitwise the stock pooling; slower)")


def _add_benchmark_parser(sub) -> None:
    p = sub.add_parser("benchmark", help="inference time per slice (and per DICOM volume) against stock "
                                         "torchvision, interleaved in one process; table + JSON")
    p.add_argument("--models", default=None,
                   help="comma-separated registry names (default: maskrcnn-r18-s2, ssm-detector-r18-s3, ssm-r18-s3, "
                        "ssm-2branch-r18-s3, ctm-r50-fpn, affinity-r18, lstm2-r18)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--batch", type=int, default=1, help="slices per forward (default 1)")
    p.add_argument("--detections", type=int, default=128,
                   help="force N masked detections per slice (score threshold 0, NMS IoU 1.0, cap N; "
                        "the worst case; default 128); 0: the models' own thresholds")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds (default 1)")
    p.add_argument("--size", type=int, default=512, help="slice size (default 512)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="ctlesion models' precision (opt-in bf16-mask: the mask branch in bfloat16; "
                        "bf16: autocast over the whole forward); stock runs in float32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="ctlesion models with channels-last weights (default; --no-channels-last: as stored)")
    p.add_argument("--compile", action="store_true",
                   help="ctlesion models with torch.compile on the backbone (opt-in; the warm-up includes compiling)")
    _add_roi_align_option(p)
    p.add_argument("--volume", nargs="?", const="synthetic", default=None, metavar="SERIES",
                   help="also time `predict` end to end on a DICOM series (default: a synthetic one written here)")
    p.add_argument("--volume-only", action="store_true", help="only the volume benchmark")
    p.add_argument("--volume-model", default="ssm-2branch-r18-s3", help="model of the volume benchmark")
    p.add_argument("--volume-slices", type=int, default=30, help="slices of the synthetic series (default 30)")
    p.add_argument("--volume-repeats", type=int, default=1, help="volume runs, each followed by stock's (default 1)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-round lines")
    p.set_defaults(func=_cmd_benchmark)


def _cmd_export(args: argparse.Namespace) -> int:
    from .engine.export import export_onnx

    result = export_onnx(args.checkpoint, args.out, size=args.size, opset=args.opset, verify=not args.no_verify)
    print(f"{result['model']}: wrote {result['onnx']} (opset {result['opset']}, input image [1, H, W] in [0, 1]; "
          f"outputs boxes, labels, scores, masks)")
    if "note" in result:
        print(f"note: {result['note']}")
    check = result.get("verify")
    if check is None:
        return 0
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in check["max_abs_diff"].items())
    print(f"verified with onnxruntime on a {result['size']}x{result['size']} slice: {check['onnx_detections']} vs "
          f"{check['detections']} detections, max |diff| {diffs} (tolerance "
          + ", ".join(f"{k} {v:g}" for k, v in check["tolerance"].items()) + f"): {'ok' if check['ok'] else 'FAILED'}")
    return 0 if check["ok"] else 1


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint's detector to ONNX, verified against PyTorch "
                                      "with onnxruntime (needs the onnx extra)")
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format (onnx)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--size", type=int, default=None, help="slice size of the trace and the check (default: as trained)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctlesion",
        description="Lung-lesion instance segmentation for chest CT (Ter-Sarkisov model family).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models with parameter counts and built-in weights")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {name, params, description, task, builtin_weights, builtin}")
    p.add_argument("--filter", default="*", help="shell-style name pattern, e.g. 'maskrcnn-r18-*'")
    p.add_argument("--card", default=None, metavar="NAME",
                   help="print the model card of built-in model NAME (with --json: the card as JSON)")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", required=True, help="output folder (config, log, checkpoints)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from OUT/checkpoint, or from the given checkpoint folder")
    p.add_argument("--nproc", type=int, default=1,
                   help="train on N processes (torchrun, DistributedDataParallel-style gradient averaging: "
                        "NCCL on GPUs, gloo on CPU); train.batch_size is per process")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    def data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--window", default=None,
                       help="lung | mediastinum | as_stored | W:L (default: by the input's units)")
        p.add_argument("--size", type=int, default=None, help="resize slices to SIZE x SIZE (default: as trained)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        p.add_argument("--score-thresh", type=float, default=None, help="detection confidence threshold")
        p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="fp32 (default); bf16-mask: the mask branch in bfloat16 (boxes, scores and "
                            "classes unchanged, masks change by rounding); bf16: autocast over the whole "
                            "forward (experimental: re-ranks low-score detections; see docs/benchmarks.md)")
        p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                       help="channels-last weights for the run (default: oneDNN's faster convolutions; outputs "
                            "change by float32 rounding). With --no-channels-last --roi-align torchvision the "
                            "detections are bitwise torchvision's (slower)")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the backbone (opt-in: seconds to compile at the first slice, then "
                            "faster convolutions; pays off for models run at 512 px on long series, not for "
                            "256-px ones such as lesion-semiseg-r18; float rounding changes; needs a C++ "
                            "compiler, else a warning and eager)")
        _add_roi_align_option(p)
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    def model_options(p: argparse.ArgumentParser) -> None:
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("--checkpoint", help="checkpoint folder")
        which.add_argument("--model", metavar="NAME",
                           help="a built-in model (weights shipped with ctlesion, verified by SHA-256; "
                                "`ctlesion models` marks them)")

    p = sub.add_parser("evaluate", help="score a checkpoint on labelled data (segmentation: legacy + COCO "
                                        "mAP; classifiers: sensitivity, PPV, accuracy, F1, ROC AUC)")
    model_options(p)
    p.add_argument("--data", required=True,
                   help="labelled data: a folder (imgs/+masks/ or Imgs/+GT/), FORMAT:PATH, "
                        "or phantom:n=32,size=128,seed=7")
    p.add_argument("--split", default=None, help="split file naming the images to use")
    p.add_argument("--min-area", type=int, default=None, help="minimum instance area in px (default: as trained)")
    p.add_argument("--nms-thresh", type=float, default=None, help="detection NMS IoU")
    p.add_argument("--max-detections", type=int, default=None, help="detections per image cap")
    p.add_argument("--overlays", type=int, default=8, help="write overlays for the first N images (0: none)")
    p.add_argument("--f1-weights", default=None,
                   help="classifiers: weights of the class-weighted F1: 'shares' (test-set class shares, "
                        "default), 'paper' (0.45,0.35,0.20) or comma-separated numbers")
    p.add_argument("--seg-data", default=None,
                   help="joint models: labelled segmentation data, also scored (legacy + COCO mAP)")
    p.add_argument("--out", required=True, help="output folder for metrics.json and overlays")
    data_options(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="find lesions in PNG/JPG slices, DICOM series or NIfTI volumes")
    model_options(p)
    p.add_argument("inputs", nargs="+", help="image files, DICOM files or series folders, NIfTI volumes")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overlays", choices=("all", "lesions", "abnormal", "none"), default="all",
                   help="which slices get an overlay PNG: all, those with lesions / predicted abnormal, none")
    p.add_argument("--aggregate", choices=("abnormal_fraction", "mean", "max"), default="abnormal_fraction",
                   help="classifiers: how slice probabilities become one verdict per volume (default: "
                        "abnormal_fraction: Normal unless enough slices are abnormal, then the most likely "
                        "abnormal class over those slices)")
    p.add_argument("--min-abnormal-fraction", type=float, default=0.1,
                   help="classifiers, abnormal_fraction: share of abnormal slices that makes a volume abnormal")
    p.add_argument("--batch-size", type=int, default=1,
                   help="detectors: slices per forward pass (memory holds one batch, not a volume; default 1)")
    vol = p.add_argument_group("volume outputs (DICOM series and NIfTI inputs; all on by default)")
    vol.add_argument("--no-label-volume", action="store_true", help="no OUT/<volume>/lesions.nii.gz")
    vol.add_argument("--no-instances", action="store_true", help="no OUT/<volume>/instances.nii.gz (3-D lesion ids)")
    vol.add_argument("--no-dicom-seg", action="store_true", help="no OUT/<volume>/seg.dcm (DICOM-SEG, DICOM input)")
    vol.add_argument("--no-summary", action="store_true", help="no OUT/<volume>/summary.json (lesion burden)")
    vol.add_argument("--no-report", action="store_true", help="no OUT/report.html")
    vol.add_argument("--no-volume-outputs", action="store_true", help="none of the above")
    vol.add_argument("--skip-existing", action="store_true",
                     help="resume a killed run: skip volumes whose OUT/<volume>/ is complete and was made from "
                          "the same input files, model and options (others are predicted again, with a warning)")
    data_options(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("convert-weights",
                       help="convert one of the author's released checkpoints (torch 1.1 .pth, .xz/.gz) "
                            "into a ctlesion checkpoint; nothing in the file is executed")
    p.add_argument("author_checkpoint", help="the author's checkpoint file (.pth, .pth.xz, .pth.gz)")
    p.add_argument("--model", default=None,
                   help="ctlesion model name (default: inferred from the weights; `ctlesion models` lists them)")
    p.add_argument("--class-names", default=None,
                   help="comma-separated slice class names, in logit order (default: normal,cp,covid for 3 logits)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.set_defaults(func=_cmd_convert_weights)

    p = sub.add_parser("verify-data", help="check a dataset folder or split files before training; "
                                           "exit 0 when clean, 1 with the problems listed")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a dataset folder (or FORMAT:PATH), or one or more split files (.txt)")
    p.add_argument("--format", default=None,
                   help="force the format: cncb, semiseg, dicom, nifti, images, covid-ct-md, covidx, "
                        "classfirst, class_folders, or split (default: detected)")
    p.add_argument("--min-area", type=int, default=100,
                   help="report lesion instances of at most this many pixels (training's min_area; default 100)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_verify_data)

    p = sub.add_parser("demo", help="train and evaluate on built-in synthetic phantoms (CPU, minutes)")
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("compare", help="train every classifier family on the same phantoms with the same "
                                       "time budget; one table + comparison.json (CPU, ~15 min)")
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--budget", type=float, default=150.0, help="training seconds per family (default: 150)")
    p.add_argument("--families", default=None,
                   help="comma-separated subset of ssm,affinity,attention,lstm2,resnet18 (default: all)")
    p.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)

    _add_benchmark_parser(sub)
    _add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"ctlesion {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
