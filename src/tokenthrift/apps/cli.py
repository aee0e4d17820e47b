"""Command line: ``tokenthrift train|eval|assign-labels|macs|bench|visualize|demo|recipes``. Argument parsing
only; the work happens in the modules it calls.

A flag that does not apply to what was asked (an adaptive-only flag without ``--adaptive``, a ToE flag for
an LTM run, ...) is an error, never silently ignored. Mistakes (:class:`tokenthrift.errors.TokenthriftError`
and missing files) print as one line; anything else is a bug and keeps its traceback. ``--debug`` (anywhere
on the line) shows the traceback of a mistake too.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ..errors import InvalidArgumentError, TokenthriftError
from ..train.config import (
    LTM_FIELDS,
    MODEL_FIELDS,
    TOE_FIELDS,
    TOME_FIELDS,
    add_config_arguments,
    config_from_args,
    recipe_names,
    refuse_flags,
)


def _check_method_flags(args, method: str) -> None:
    """Method-specific flags (``--<method>-*``, TrainConfig's ``<method>_*`` fields) given on the command line
    must belong to the run's method."""
    from ..train.methods import METHODS

    for owner in METHODS:
        if owner != method:
            refuse_flags(args, [k for k in vars(args) if k.startswith(f"{owner}_")],
                         f"apply to --method {owner}, but this run is --method {method}")


def _model(args):
    """Model, input size and config for macs/bench/export: timm's defaults (the class count of the model's
    pretrained cfg, 1000 without one) unless overridden by a recipe or flags."""
    import dataclasses

    from timm.models import get_pretrained_cfg

    from ..train import build_model, model_input_size

    cfg = config_from_args(args, num_classes=None, data="imagefolder:-")
    if cfg.num_classes is None:
        pretrained_cfg = get_pretrained_cfg(cfg.model) if cfg.task == "classification" else None
        cfg = dataclasses.replace(cfg, num_classes=getattr(pretrained_cfg, "num_classes", None) or 1000)
    model = build_model(cfg)
    return model, model_input_size(model, cfg), cfg


def _preview(args, cfg, default: str = "full", epochs: int | None = None):
    """The method adapter that shows the untrained model of macs/bench/export/visualize (see
    :func:`~tokenthrift.train.methods.preview_method`); its flags must belong to it."""
    from ..train.methods import preview_method

    method = preview_method(cfg, args.method, default, epochs)
    _check_method_flags(args, method.name)
    return method


def cmd_train(args) -> None:
    from ..train import train
    from . import report

    cfg = config_from_args(args)
    _check_method_flags(args, cfg.method)
    summary = train(cfg)
    metric = summary["metric"]
    extra = ("mask_AP",) if metric == "box_AP" else ()
    ema = "top1_ema" if metric == "top1" else f"{metric}_ema"
    rows = [{k: r.get(k, "-") for k in ("epoch", "train_loss", metric, *extra, ema, "train_time_s", "images_per_s",
                                         "train_macs")} for r in summary["history"]]
    for r in rows:
        r["train_macs"] = r["train_macs"] / 1e6
    print(report.table(rows).replace("train_macs", "train_MMACs"))
    what = "backbone " if cfg.task == "detection" else ""
    print(f"{metric} {summary[metric]:.2f}  training {summary['train_time_s']:.1f} s  mean training {what}MACs per "
          f"image "
          f"{summary['mean_train_macs'] / 1e6:.4g} M = {summary['macs_ratio']:.3f} x {summary['baseline']} "
          f"({summary['baseline_macs'] / 1e6:.4g} M)  ->  {summary['run_dir']}")


def cmd_assign_labels(args) -> None:
    from ..train.checkpoint import check_writable
    from .labels import label_split

    check_writable(args.out, "--out", directory=False)
    labels, info = label_split(args.checkpoint, args.split, args.out, margin=args.margin, batch_size=args.batch_size,
                               data_dir=args.data_dir, ema=args.ema, device=_device(args.device),
                               workers=args.workers, unsolved=args.unsolved)
    total = max(len(labels), 1)
    print("grid  images  share")
    for g, count in zip(info["grids"], info["histogram"]):
        print(f"{g:>4}  {count:>6}  {count / total:.3f}")
    print(f"{len(labels)} labels ({args.split} split) -> {args.out}")


def _device(name: str) -> str:
    from ..train.engine import resolve_device

    return str(resolve_device(name))


ADAPTIVE_ONLY = ("assigner", "gamma", "oracle_labels", "throughput_batch", "budget", "thresholds", "confidence",
                 "calibration_images", "plot")


def cmd_eval(args) -> None:
    from . import report

    if args.adaptive:
        refuse_flags(args, ["ema", "data", "eval_subset", "labels", "test_crops"],
                     "do not apply to eval --adaptive (it evaluates the ReViT run's own evaluation images, one "
                     "view each, with the model weights)")
        if args.gamma and not args.assigner:
            raise InvalidArgumentError("--gamma thresholds an assigner's probabilities: give --assigner CHECKPOINT")
        if args.budget and args.thresholds:
            raise InvalidArgumentError("--budget calibrates the cascade's thresholds, --thresholds gives them: pass one")
        from ..revit import CONFIDENCES
        from .labels import adaptive_report

        gammas = [None] + list(args.gamma or [])
        plot = args.plot or str(Path(args.checkpoint).parent / "adaptive.png")
        from ..train.checkpoint import check_writable

        check_writable(plot, "--plot", directory=False)
        rows = adaptive_report(args.checkpoint, args.assigner, gammas, batch_size=args.batch_size,
                               data_dir=args.data_dir, oracle_labels=args.oracle_labels,
                               throughput_batch=256 if args.throughput_batch is None else args.throughput_batch,
                               device=_device(args.device), workers=args.workers, budgets=args.budget,
                               thresholds=args.thresholds, kinds=args.confidence or CONFIDENCES,
                               calibration_images=args.calibration_images or 5000, plot=plot, progress=True)
        print(report.table(rows))
        print(f"plot: {plot}")
        return
    else:
        refuse_flags(args, ADAPTIVE_ONLY, "apply to eval --adaptive only")
        from ..train.checkpoint import read_checkpoint
        from .evaluation import evaluate_checkpoint

        from ..data import name_list

        ckpt = read_checkpoint(args.checkpoint)
        written = ", ".join(f"{k} {v}" for k, v in ckpt["versions"].items()) or "versions not recorded"
        classes = ckpt.get("classes") or []
        named = f"; {len(classes)} classes ({name_list(classes)})" if classes else ""
        print(f"{args.checkpoint}: checkpoint format {ckpt['format_version']}, written with {written}; "
              f"epoch {ckpt['epoch']}, --method {ckpt['method']['name']}{named}")
        rows = evaluate_checkpoint(args.checkpoint, ema=args.ema, data=args.data, data_dir=args.data_dir,
                                   eval_subset=args.eval_subset, batch_size=args.batch_size, workers=args.workers,
                                   device=args.device, labels=args.labels, test_crops=args.test_crops)
    print(report.table(rows))


def cmd_export(args) -> None:
    from ..data import model_classes, model_preprocess, name_list
    from ..train import load_trained, model_input_size
    from ..train.build import run_normalisation
    from ..train.checkpoint import check_writable
    from . import report
    from .export import export

    check_writable(args.out, "--out", directory=False)
    if args.checkpoint:
        refuse_flags(args, [*MODEL_FIELDS, "pretrained", "config", *LTM_FIELDS, *TOME_FIELDS, "method"],
                     "describe a model to build; a checkpoint is exported as it was trained")
        model, cfg = load_trained(args.checkpoint, ema=args.ema)
        size, (mean, std) = model_input_size(model, cfg), run_normalisation(cfg)
    else:
        model, size, cfg = _model(args)
        model = _preview(args, cfg).inference_model(model)
        pre = model_preprocess(model) if cfg.pretrained else None  # an untrained model expects nothing in particular
        mean, std = (pre.mean, pre.std) if pre is not None else (None, None)
    grids = getattr(model, "grids", None)
    if args.grid is not None and not grids:
        raise InvalidArgumentError("--grid picks a grid of a ReViT checkpoint; this model has one token grid")
    kwargs = {"grid": args.grid or grids[0]} if grids else {}
    names = model_classes(model)
    result = export(model, size, args.out, batch_size=args.batch_size, legacy=args.legacy, label_names=names,
                    mean=mean, std=std, **kwargs)
    reason = result.pop("dynamic_error", None)
    print(report.table([{**result, "max_abs_diff": f"{result['max_abs_diff']:.2e}",
                         "tolerance": f"{result['tolerance']:.0e}"}]))
    if reason:
        print(f"this file takes batches of {result['batch'].split()[-1]} images only: an export with a dynamic batch "
              f"failed ({reason}); export to .pt2 or drop --legacy for any batch size")
    shown = f"{len(names)} class names ({name_list(names, 4)})" if names else "no class names (the model records none)"
    print(f"stored in the file: {shown}, the input size{' and normalisation' if mean else ''} "
          "(tokenthrift.apps.export.read_metadata)")


def cmd_macs(args) -> None:
    from . import report

    model, size, cfg = _model(args)
    print(report.table(_preview(args, cfg, epochs=args.epochs).macs_rows(model, size, cfg)))


def cmd_bench(args) -> None:
    import torch

    from ..train.engine import amp_dtype
    from . import report

    if args.checkpoint:  # a trained model, timed as its method runs it (every ReViT grid, LTM merged, ...)
        from ..train import model_input_size
        from ..train.engine import load_run
        from ..train.methods import inference_method

        refuse_flags(args, [*MODEL_FIELDS, "config", *TOE_FIELDS, *LTM_FIELDS, *TOME_FIELDS, "method"],
                     "describe a model to build; a checkpoint is timed as it was trained")
        model, cfg, trained = load_run(args.checkpoint)
        size, method = model_input_size(model, cfg), inference_method(cfg, model, trained)
    else:
        model, size, cfg = _model(args)
        method = _preview(args, cfg, default="toe")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(_device(args.device))
    dtype = amp_dtype(args.amp, device)
    model, rows = model.to(device), []
    for compiled in (False, True) if args.compile else (False,):
        for batch in args.batch_sizes:
            timed, step = method.bench_rows(model, size, batch, warmup=max(args.warmup, 2 if compiled else 0),
                                            repeats=args.repeats, dtype=dtype, compile=compiled)
            rows += timed
    precision = "fp32" if dtype is None else f"autocast {str(dtype).removeprefix('torch.')}"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"{cfg.model} {'x'.join(map(str, size))}, batch {' and '.join(map(str, args.batch_sizes))}, {step}, {device}, "
          f"{precision}{threads}, median of {args.repeats}")
    print(report.table(rows))


def cmd_visualize(args) -> None:
    from .visualize import visualize

    print(visualize(args))


def cmd_demo(args) -> None:
    from ..train.checkpoint import check_writable
    from . import demo

    check_writable(args.output, "--output")
    demo.main(epochs=args.epochs, finetune_epochs=args.finetune_epochs, train_subset=args.train_subset,
              eval_subset=args.eval_subset, output=args.output, seed=args.seed, progress=not args.quiet,
              data_dir=args.data_dir, adaptive=not args.no_adaptive, merging=not args.no_ltm)


def cmd_compare(args) -> None:
    from ..train.checkpoint import check_writable
    from . import report
    from .compare import compare

    check_writable(args.output, "--output")
    result = compare(args.full, args.output, args.runs, tome_r=tuple(args.tome_r), data=args.data,
                     eval_subset=args.eval_subset, batch_sizes=(1, args.batch_size), repeats=args.repeats,
                     data_dir=args.data_dir, compile=args.compile, progress=True)
    meta = result["meta"]
    print(f"{meta['data']}, {meta['eval_images']} evaluation images; {meta['device']} ({meta['cpu']}, "
          f"{meta['threads']} threads), {meta['dtype']}; speed against the full model in alternating rounds")
    print(report.table(result["rows"]))
    print("\nEach trained method against ToMe at equal MACs (ToMe r chosen to match):")
    print(report.table(result["verdicts"]))
    print(f"\n-> {args.output}/compare.json, compare.md, compare.png")


def cmd_make_collage(args) -> None:
    from ..data.coco import make_collage

    summary = make_collage(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed,
                           max_objects=args.max_objects, data_dir=args.data_dir)
    for split, counts in summary.items():
        print(f"{split}: {counts['images']} images, {counts['instances']} instances")
    print(f"COCO layout in {args.out}: train with --task detection --data coco:{args.out}")


def cmd_recipes(args) -> None:
    for name in recipe_names():
        print(name)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without --debug must not reset a --debug given before it
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of errors")
    parser = argparse.ArgumentParser(prog="tokenthrift", description="Spend fewer tokens in timm ViTs.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, helptext: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext, parents=[common])
        p.set_defaults(func=func)
        return p

    def runtime(p, device: str = "auto", batch: int = 256) -> None:
        p.add_argument("--device", default=device,
                       help=f"auto (CUDA if present), cpu, cuda or cuda:N (default: {device})")
        p.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default: 0)")
        p.add_argument("--batch-size", type=int, default=batch, help=f"images per batch (default: {batch})")

    p = command("train", cmd_train, "train a timm model: full tokens or a tokenthrift method")
    p.add_argument("-c", "--config", help="YAML recipe file, or a shipped recipe name (tokenthrift recipes)")
    add_config_arguments(p)

    p = command("eval", cmd_eval, "top-1 and MACs of a checkpoint, per grid for ReViT, merged for LTM; "
                                  "the assigner's accuracy for TLA; --adaptive: ReViT + TLA together")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--ema", action="store_true", help="also evaluate the EMA weights")
    p.add_argument("--data", help="dataset (default: the one it was trained on)")
    p.add_argument("--data-dir", help="dataset folder (default: the run's)")
    p.add_argument("--eval-subset", type=int, help="evaluate on a fixed random subset of N images (default: the "
                                                    "run's own evaluation images)")
    p.add_argument("--labels", help="token-length labels of the evaluation images, to score an assigner "
                                    "checkpoint (default: the run's --tla-eval-labels)")
    p.add_argument("--test-crops", type=int, choices=[1, 3], help="videofolder clips: 1 centre crop, or 3 crops "
                                                                  "along the longer side averaged (default: the run's)")
    runtime(p)
    p.add_argument("--adaptive", action="store_true",
                   help="adaptive token length on a --method revit checkpoint: the fixed grids, the confidence "
                        "cascade, and with --assigner the TLA and TLA + cascade; a table and a Pareto plot")
    p.add_argument("--assigner", help="with --adaptive: checkpoint of the --method tla run")
    p.add_argument("--budget", type=float, nargs="+",
                   help="with --adaptive: MACs budgets (share of the largest grid's) the cascade's thresholds are "
                        "calibrated to, on training images the ReViT never trained on (default: each middle "
                        "grid's cost, and 0.6)")
    p.add_argument("--thresholds", type=float, nargs="+",
                   help="with --adaptive: the cascade's thresholds, one per grid but the largest, largest first")
    p.add_argument("--confidence", nargs="+", choices=["max_prob", "margin"],
                   help="with --adaptive: the cascade's confidence (default: both, one row each)")
    p.add_argument("--calibration-images", type=int,
                   help="with --adaptive: at most this many held-out training images to calibrate on (default 5000)")
    p.add_argument("--plot", help="with --adaptive: the Pareto figure (default: adaptive.png beside --checkpoint)")
    p.add_argument("--gamma", type=float, nargs="+",
                   help="with --adaptive: also evaluate these cumulative-probability thresholds")
    p.add_argument("--oracle-labels", help="with --adaptive: assign-labels file of the eval split (oracle row)")
    p.add_argument("--throughput-batch", type=int, help="with --adaptive: batch of the timed run (default: 256)")

    p = command("assign-labels", cmd_assign_labels, "ReViT: token-length label of each image (smallest correct grid)")
    p.add_argument("--checkpoint", required=True, help="checkpoint of a --method revit run")
    p.add_argument("--split", choices=["train", "holdout", "eval"], default="train",
                   help="label the images the run trained on, the ones it held out (--train-holdout) or its "
                        "evaluation images")
    p.add_argument("--out", required=True, help="label file to write (read by train --method tla)")
    p.add_argument("--margin", type=float, default=0.0, help="also require this true-class probability")
    p.add_argument("--unsolved", choices=["smallest", "largest"], default="smallest",
                   help="label of images no grid gets right: the smallest grid (default: no pick helps them, the "
                        "smallest wastes the fewest MACs) or the largest (the rule before 2026-12)")
    p.add_argument("--ema", action="store_true", help="label with the EMA weights")
    p.add_argument("--data-dir", help="dataset folder (default: the run's)")
    runtime(p)

    for name, func, helptext in (("macs", cmd_macs, "MACs per image (per ToE stage, or LTM against its base)"),
                                 ("bench", cmd_bench, "measured speed of a method against its baseline, same run")):
        p = command(name, func, helptext)
        p.add_argument("-c", "--config", help="take the model and method settings from a recipe")
        add_config_arguments(p, only=MODEL_FIELDS + TOE_FIELDS + LTM_FIELDS + TOME_FIELDS)
        default = "full" if name == "macs" else "toe"
        p.add_argument("--method", help=f"full, toe, ltm or tome (default: the recipe's method if it is one of "
                                        f"these, ltm for an ltm_* model, else {default})")
        if name == "macs":
            p.add_argument("--epochs", type=int, help="ToE: training length for the mean over the schedule")
        else:
            p.add_argument("--checkpoint", help="time a trained tokenthrift checkpoint as its method runs it (ReViT: "
                                                "every grid; LTM or ToMe: against the model unmerged) instead of a "
                                                "model built from the flags")
            p.add_argument("--batch-size", dest="batch_sizes", type=int, nargs="+", default=[64],
                           help="images per timed step; several: one set of rows each (e.g. 1 32; default: 64)")
            p.add_argument("--compile", action="store_true",
                           help="also time every model through torch.compile (each against its plain model compiled)")
            p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default: 2)")
            p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default: 5)")
            p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
            p.add_argument("--threads", type=int, help="torch CPU threads")
            p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"],
                           help="run under autocast with this dtype (default: off, fp32)")

    p = command("export", cmd_export, "a model as torch.export (.pt2) or ONNX (.onnx), checked against eager: the "
                                      "difference is printed")
    p.add_argument("--out", required=True, help="output file: .pt2 (torch.export) or .onnx (the dynamo exporter)")
    p.add_argument("--checkpoint", help="a tokenthrift last.pth (else a timm model from the flags below)")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights")
    p.add_argument("-c", "--config", help="take the model settings from a recipe")
    add_config_arguments(p, only=MODEL_FIELDS + ("pretrained",) + LTM_FIELDS + TOME_FIELDS)
    p.add_argument("--method", help="ltm: convert the model (--ltm-macs or --ltm-site-ratio) first; tome: apply ToMe "
                                    "with --tome-r "
                                    "first (default: full, or ltm for an ltm_* model)")
    p.add_argument("--grid", type=int, help="ReViT checkpoint: the grid to export (default: its largest)")
    p.add_argument("--batch-size", type=int, help="export for this one batch size instead of any (default: a dynamic "
                                                   "batch dimension, checked at batch 1, 3 and 17)")
    p.add_argument("--legacy", action="store_true", help="the TorchScript-based ONNX exporter instead of the dynamo "
                                                         "one (checked the same way; refused for LTM models)")

    p = command("visualize", cmd_visualize, "what a method did to the tokens: ToE kept patches and merge groups, "
                                            "LTM merge maps, ReViT grids and the assigner's choice")
    p.add_argument("--method", help="toe or ltm; without --checkpoint: what to draw for an untrained "
                                                             "model (default: ltm for an LTM recipe, else toe)")
    p.add_argument("--checkpoint", help="trained tokenthrift checkpoint (default: an untrained model)")
    p.add_argument("--assigner", help="with a ReViT --checkpoint: a --method tla checkpoint, to mark its choices")
    p.add_argument("-c", "--config", help="recipe for the model and method settings when no checkpoint is given")
    add_config_arguments(p, only=MODEL_FIELDS + ("pretrained",) + TOE_FIELDS + LTM_FIELDS + TOME_FIELDS)
    p.add_argument("--data", help="dataset to draw images from (default: the run's)")
    p.add_argument("--data-dir", help="dataset folder")
    p.add_argument("--images", type=int, default=6, help="how many test images to draw (default: 6)")
    p.add_argument("--stage", type=int, help="ToE: stage to show (default: the first)")
    p.add_argument("--sites", nargs="+", help="LTM: merge sites to show, by module-name prefix; ToMe: blocks, "
                                              "e.g. blocks.3 (default: the first, middle and last merge)")
    p.add_argument("--out", default="runs/tokens.png", help="PNG file to write (default: runs/tokens.png)")

    p = command("demo", cmd_demo, "the main job: a Fashion-MNIST ViT: ToE training race, ReViT + TLA and LTM "
                                  "fine-tuned from the shipped pretrained model, one table against the full model")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the ToE race (each run, from scratch)")
    p.add_argument("--finetune-epochs", type=int, default=1,
                   help="epochs of the ReViT and LTM fine-tuning from the pretrained ViT")
    p.add_argument("--train-subset", type=int, default=7000, help="training images (a fixed random subset)")
    p.add_argument("--eval-subset", type=int, default=5000, help="test images (a fixed random subset)")
    p.add_argument("--output", default="runs/demo", help="folder for the runs, tables and plot")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: Debian's package location)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-adaptive", action="store_true", help="skip the ReViT + TLA part")
    p.add_argument("--no-ltm", action="store_true", help="skip the LTM part")

    p = command("compare", cmd_compare, "every method on one harness: top-1, MACs and measured speed of the full "
                                        "model, ToMe, and the trained methods' checkpoints, against ToMe at equal MACs")
    p.add_argument("--full", required=True, help="the full-token model: a checkpoint, or a timm model name with "
                                                 "pretrained weights on this machine (e.g. vit_fmnist_tiny_patch2_28)")
    p.add_argument("--runs", nargs="+", default=[], metavar="CHECKPOINT",
                   help="checkpoints of runs on the same data; each adds its method's rows (a ReViT its grids, its "
                        "assigner the adaptive row, LTM its merged model, ToE its model with and without ToMe, a "
                        "full-token run, e.g. the one with ToE's training budget, its model)")
    p.add_argument("--tome-r", type=int, nargs="+", default=[2, 4, 8], help="ToMe r values off the shelf")
    p.add_argument("--data", help="dataset (default: the full checkpoint's)")
    p.add_argument("--data-dir", help="dataset folder")
    p.add_argument("--eval-subset", type=int, help="evaluation images (default: the full checkpoint's)")
    p.add_argument("--batch-size", type=int, default=64, help="the throughput batch (batch 1 is always timed)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    p.add_argument("--compile", action="store_true", help="also time every row through torch.compile, against the "
                                                          "full model compiled (columns *_compiled)")
    p.add_argument("--output", default="runs/compare", help="folder for compare.json/.md/.png")

    p = command("make-collage", cmd_make_collage, "write the offline instance-segmentation set (Fashion-MNIST "
                                                  "garments on canvases) in the COCO layout")
    p.add_argument("--out", required=True, help="folder to write (annotations/, train2017/, val2017/)")
    p.add_argument("--train", type=int, default=2000, help="training canvases (default: 2000)")
    p.add_argument("--val", type=int, default=500, help="evaluation canvases (default: 500)")
    p.add_argument("--size", type=int, default=128, help="canvas side in pixels (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--max-objects", type=int, default=6, help="garments per canvas, at most (default: 6)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: Debian's package location)")

    command("recipes", cmd_recipes, "list the shipped recipes (use with train --config NAME)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        if not args.debug:  # a warning is a short line, as an error is (--debug: Python's own, with file and line)
            warnings.showwarning = lambda message, *_, **__: print(f"tokenthrift {args.command}: warning: {message}",
                                                                  file=sys.stderr, flush=True)
        try:
            args.func(args)
        except (TokenthriftError, OSError) as err:  # OSError: a file or folder the system refused (permissions,
            if args.debug:                           # a full or read-only disk, a file where a folder should be)
                raise
            print(f"tokenthrift {args.command}: error: {_message(err)}", file=sys.stderr)
            sys.exit(2)


def _message(err: BaseException) -> str:
    """A user error's message; for an operating-system error, what the system said and the path."""
    if isinstance(err, OSError) and not isinstance(err, TokenthriftError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return str(err)


if __name__ == "__main__":
    main()
