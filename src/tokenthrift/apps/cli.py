"""Command line: ``tokenthrift train|eval|assign-labels|macs|bench|visualize|demo|recipes``. Argument parsing
only; the work happens in the modules it calls.

A flag that does not apply to what was asked (one method's option for another method's run, a model flag
with a checkpoint, ...) is an error, never silently ignored. The methods' flags, help texts and the
``compare`` off-the-shelf values come from the registered adapters (:data:`tokenthrift.train.methods.METHODS`);
this module names no method. Mistakes (:class:`tokenthrift.errors.TokenthriftError`
and missing files) print as one line; anything else is a bug and keeps its traceback. ``--debug`` (anywhere
on the line) shows the traceback of a mistake too. Warnings print as one line each, once; tokenthrift's own
(:class:`tokenthrift.errors.TokenthriftWarning`) are the command's messages and show even under ``-W ignore``.
An argument the subcommand does not know is that subcommand's error, under its usage line.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

from ..errors import InvalidArgumentError, TokenthriftError, TokenthriftWarning
from ..train.config import (
    MODEL_FIELDS,
    add_config_arguments,
    add_method_arguments,
    config_from_args,
    given_flags,
    method_flags,
    method_key,
    recipe_names,
    refuse_flags,
)
from ..train.methods import METHODS, previewable


def _method_of_flags(args) -> str | None:
    """The method whose option flags were given without ``--method`` (one method's only), for a preview."""
    owners = {method_key(k)[0] for k in given_flags(args, method_flags())}
    return owners.pop() if len(owners) == 1 and not getattr(args, "method", None) else None


def _default_preview(command: str) -> str:
    """The method a command shows on an untrained model when nothing names one (``Method.default_for``)."""
    return next((name for name, adapter in METHODS.items() if command in adapter.default_for), "full")


def _model(args):
    """Model, input size and config for macs/bench/export: timm's defaults (the class count of the model's
    pretrained cfg, 1000 without one) unless overridden by a recipe or flags."""
    import dataclasses

    from timm.models import get_pretrained_cfg

    from ..train import build_model, model_input_size

    inferred = _method_of_flags(args)
    cfg = config_from_args(args, num_classes=None, data="imagefolder:-", **({"method": inferred} if inferred else {}))
    if cfg.num_classes is None:
        pretrained_cfg = get_pretrained_cfg(cfg.model) if cfg.task == "classification" else None
        cfg = dataclasses.replace(cfg, num_classes=getattr(pretrained_cfg, "num_classes", None) or 1000)
    model = build_model(cfg)
    return model, model_input_size(model, cfg), cfg


def _preview(args, cfg, model, default: str = "full", epochs: int | None = None):
    """The method adapter that shows the untrained model of macs/bench/export/visualize (see
    :func:`~tokenthrift.train.methods.preview_method`); its flags must belong to it."""
    from ..train.methods import preview_method

    method = preview_method(cfg, model, args.method, default, epochs)
    refuse_flags(args, [k for k in method_flags() if method_key(k)[0] != method.name],
                 f"apply to another method than the --method {method.name} shown")
    return method


def cmd_train(args) -> None:
    from ..train import train
    from . import report

    cfg = config_from_args(args)
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


class _Moved(argparse.Action):
    """``eval --adaptive``, before its own command: says where it went, before any of its flags is refused."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("eval --adaptive is now its own command: tokenthrift adaptive --checkpoint REVIT [--assigner "
                     "TLA] (tokenthrift adaptive --help)")


def cmd_eval(args) -> None:
    from ..data import name_list
    from ..train.checkpoint import read_checkpoint
    from . import report
    from .evaluation import evaluate_checkpoint

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


def cmd_adaptive(args) -> None:
    from ..train.checkpoint import check_writable
    from . import report
    from .labels import CONFIDENCES, adaptive_report

    if args.gamma and not args.assigner:
        raise InvalidArgumentError("--gamma thresholds an assigner's probabilities: give --assigner CHECKPOINT")
    if args.budget and args.thresholds:
        raise InvalidArgumentError("--budget calibrates the cascade's thresholds, --thresholds gives them: pass one")
    gammas = [None] + list(args.gamma or [])
    plot = args.plot or str(Path(args.checkpoint).parent / "adaptive.png")
    check_writable(plot, "--plot", directory=False)
    rows = adaptive_report(args.checkpoint, args.assigner, gammas, batch_size=args.batch_size,
                           data_dir=args.data_dir, oracle_labels=args.oracle_labels,
                           throughput_batch=args.throughput_batch, device=_device(args.device), workers=args.workers,
                           budgets=args.budget, thresholds=args.thresholds, kinds=args.confidence or CONFIDENCES,
                           calibration_images=args.calibration_images, plot=plot, progress=True)
    print(report.table(rows))
    print(f"plot: {plot}")


def _variant(variants, wanted: str | None, flag: str = "--variant"):
    """The variant named ``wanted`` (its label, or its index in ``eval``'s order); the first by default."""
    if wanted is None:
        return variants[0]
    for k, v in enumerate(variants):
        if wanted in (v.label, str(k)):
            return v
    listed = "; ".join(f"{k}: {v.label}" for k, v in enumerate(variants))
    raise InvalidArgumentError(f"{flag} {wanted}: this model runs as {listed} (give the label or the number)")


def cmd_export(args) -> None:
    from ..data import model_classes, model_preprocess, name_list
    from ..train import model_input_size
    from ..train.build import run_normalisation
    from ..train.checkpoint import check_writable
    from ..train.engine import load_run
    from ..train.methods import inference_method
    from . import report
    from .export import export

    check_writable(args.out, "--out", directory=False)
    if args.checkpoint:
        refuse_flags(args, [*MODEL_FIELDS, "pretrained", "config", *method_flags(preview=True), "method"],
                     "describe a model to build; a checkpoint is exported as it was trained")
        model, cfg, trained = load_run(args.checkpoint, ema=args.ema)
        size, (mean, std) = model_input_size(model, cfg), run_normalisation(cfg)
        method = inference_method(cfg, model, trained)
        variants = method.variants(model, size)
    else:
        model, size, cfg = _model(args)
        method = _preview(args, cfg, model)
        variants = method.preview_variants(model, size)
        pre = model_preprocess(model) if cfg.pretrained else None  # an untrained model expects nothing in particular
        mean, std = (pre.mean, pre.std) if pre is not None else (None, None)
    chosen = _variant(variants, args.variant)
    if args.legacy and not method.legacy_onnx:
        raise InvalidArgumentError(f"the legacy ONNX exporter (dynamo=False) does not write --method {method.name} "
                                   "models right (onnxruntime rejects the file at batch sizes above one); drop "
                                   "--legacy (the default dynamo exporter is exact) or export to .pt2")
    names = model_classes(chosen.model)
    result = export(chosen.model, size, args.out, batch_size=args.batch_size, legacy=args.legacy, label_names=names,
                    mean=mean, std=std, **chosen.kwargs)
    reason = result.pop("dynamic_error", None)
    print(f"{chosen.label}: {chosen.macs / 1e9:.4g} GMACs per image")
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
    from .variants import macs_rows

    model, size, cfg = _model(args)
    method = _preview(args, cfg, model, epochs=args.epochs)
    variants = method.training_variants(model, size) or method.preview_variants(model, size)
    print(report.table(macs_rows(variants, size, detector=cfg.task == "detection")))


def cmd_bench(args) -> None:
    import torch

    from ..train.engine import amp_dtype
    from . import report
    from .variants import bench_rows

    if args.checkpoint:  # a trained model, timed as its method runs it (every variant against its baseline)
        from ..train import model_input_size
        from ..train.engine import load_run
        from ..train.methods import inference_method

        refuse_flags(args, [*MODEL_FIELDS, "config", *method_flags(preview=True), "method"],
                     "describe a model to build; a checkpoint is timed as it was trained")
        model, cfg, trained = load_run(args.checkpoint)
        size, method = model_input_size(model, cfg), inference_method(cfg, model, trained)
        variants = lambda: method.training_variants(model, size) or method.variants(model, size)  # noqa: E731
    else:
        model, size, cfg = _model(args)
        method = _preview(args, cfg, model, default=_default_preview("bench"))
        variants = lambda: method.training_variants(model, size) or method.preview_variants(model, size)  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(_device(args.device))
    dtype = amp_dtype(args.amp, device)
    model, rows = model.to(device), []
    shown = variants()
    for compiled in (False, True) if args.compile else (False,):
        for batch in args.batch_sizes:
            rows += bench_rows(shown, size, batch, warmup=max(args.warmup, 2 if compiled else 0),
                               repeats=args.repeats, dtype=dtype, compile=compiled)
    step = "training step (fwd+bwd+AdamW)" if any(v.train for v in shown) else "inference (no grad)"
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
    shelf = {name: tuple(getattr(args, f"{name}_{a.shelf_option}")) for name, a in METHODS.items() if a.shelf_option}
    result = compare(args.full, args.output, args.runs, shelf=shelf, data=args.data,
                     eval_subset=args.eval_subset, batch_sizes=(1, args.batch_size), repeats=args.repeats,
                     data_dir=args.data_dir, compile=args.compile, progress=True)
    meta = result["meta"]
    print(f"{meta['data']}, {meta['eval_images']} evaluation images; {meta['device']} ({meta['cpu']}, "
          f"{meta['threads']} threads), {meta['dtype']}; speed against the full model in alternating rounds")
    print(report.table(result["rows"]))
    print(f"\nEach row that saves MACs against {meta['reference']} at equal MACs (its setting chosen to match):")
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


class _Command(argparse.ArgumentParser):
    """A subcommand's parser: a mistake on its line (an unknown flag, a bad value, a missing argument) is one line,
    as every other mistake is, pointing at the subcommand's ``--help`` (its usage runs to dozens of lines)."""

    def error(self, message):
        hint = "" if "--help" in message else f" ({self.prog} --help lists its flags)"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


class _Parser(argparse.ArgumentParser):
    """The top-level parser: an argument that the chosen subcommand does not know is that subcommand's error
    (argparse leaves it to the top level, whose usage lists the commands instead)."""
    commands: dict[str, argparse.ArgumentParser]

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.commands.get(getattr(parsed, "command", None), self).error(
                f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without --debug must not reset a --debug given before it
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of errors")
    parser = _Parser(prog="tokenthrift", description="Spend fewer tokens in timm ViTs.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Command)
    parser.commands = sub.choices  # name -> subcommand parser, filled as they are added

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
    add_method_arguments(p)

    p = command("eval", cmd_eval, "top-1 and MACs of a checkpoint, one row per variant of its method (each grid, "
                                  "the merged model, ...; an assigner's accuracy on its labels)")
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
    p.add_argument("--adaptive", nargs=0, action=_Moved, help=argparse.SUPPRESS)  # moved: tokenthrift adaptive

    p = command("adaptive", cmd_adaptive, "adaptive token length on a ReViT checkpoint: the fixed grids, the "
                                          "confidence cascade, and with --assigner the TLA and TLA + cascade; a "
                                          "table and a Pareto plot")
    p.add_argument("--checkpoint", required=True, help="checkpoint of a --method revit run")
    p.add_argument("--assigner", help="checkpoint of the --method tla run")
    p.add_argument("--budget", type=float, nargs="+",
                   help="MACs budgets (share of the largest grid's) the cascade's thresholds are calibrated to, on "
                        "training images the ReViT never trained on (default: each middle grid's cost, and 0.6)")
    p.add_argument("--thresholds", type=float, nargs="+",
                   help="the cascade's thresholds, one per grid but the largest, largest first")
    p.add_argument("--confidence", nargs="+", choices=["max_prob", "margin"],
                   help="the cascade's confidence (default: both, one row each)")
    p.add_argument("--calibration-images", type=int, default=5000,
                   help="at most this many held-out training images to calibrate on (default 5000)")
    p.add_argument("--plot", help="the Pareto figure (default: adaptive.png beside --checkpoint)")
    p.add_argument("--gamma", type=float, nargs="+", help="also evaluate these cumulative-probability thresholds")
    p.add_argument("--oracle-labels", help="assign-labels file of the eval split (oracle row)")
    p.add_argument("--throughput-batch", type=int, default=256, help="batch of the timed run (default: 256)")
    p.add_argument("--data-dir", help="dataset folder (default: the run's)")
    runtime(p)

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

    shown = ", ".join(previewable())

    def preview_method_flag(p, command: str, what: str = "") -> None:
        p.add_argument("--method", choices=previewable(),
                       help=f"{what}{shown} (default: the recipe's method if it is one of these, the method of a "
                            f"registered model that merges by itself (ltm_*), else {_default_preview(command)})")

    for name, func, helptext in (("macs", cmd_macs, "MACs per image of a method's variants against the model "
                                                    "without it (training stages for a training method)"),
                                 ("bench", cmd_bench, "measured speed of a method against its baseline, same run")):
        p = command(name, func, helptext)
        p.add_argument("-c", "--config", help="take the model and method settings from a recipe")
        add_config_arguments(p, only=MODEL_FIELDS)
        preview_method_flag(p, name)
        add_method_arguments(p, preview=True)
        if name == "macs":
            p.add_argument("--epochs", type=int, help="a method with a training schedule: the training length for the "
                                                      "mean over the schedule")
        else:
            p.add_argument("--checkpoint", help="time a trained tokenthrift checkpoint as its method runs it (every "
                                                "variant against the model without the method) instead of a model "
                                                "built from the flags")
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
    add_config_arguments(p, only=MODEL_FIELDS + ("pretrained",))
    preview_method_flag(p, "export", "apply this method (with its flags below) before exporting: ")
    add_method_arguments(p, preview=True)
    p.add_argument("--variant", help="which of the model's variants to export (as tokenthrift eval lists them: the "
                                     "label or its number, e.g. a ReViT grid; default: the first)")
    p.add_argument("--batch-size", type=int, help="export for this one batch size instead of any (default: a dynamic "
                                                   "batch dimension, checked at batch 1, 3 and 17)")
    p.add_argument("--legacy", action="store_true", help="the TorchScript-based ONNX exporter instead of the dynamo "
                                                         "one (checked the same way; refused for methods it writes "
                                                         "wrong)")

    p = command("visualize", cmd_visualize, "what a method did to the tokens (each method draws its own picture)")
    preview_method_flag(p, "visualize", "without --checkpoint, or on a full-token checkpoint: the method to draw: ")
    p.add_argument("--checkpoint", help="trained tokenthrift checkpoint (default: an untrained model)")
    p.add_argument("--assigner", help="with a ReViT --checkpoint: a --method tla checkpoint, to mark its choices")
    p.add_argument("-c", "--config", help="recipe for the model and method settings when no checkpoint is given")
    add_config_arguments(p, only=MODEL_FIELDS + ("pretrained",))
    add_method_arguments(p, preview=True)
    p.add_argument("--data", help="dataset to draw images from (default: the run's)")
    p.add_argument("--data-dir", help="dataset folder")
    p.add_argument("--images", type=int, default=6, help="how many test images to draw (default: 6)")
    p.add_argument("--stage", type=int, help="a method with training stages: the stage to show (default: the first)")
    p.add_argument("--sites", nargs="+", help="merging methods: merge sites to show, by module-name prefix, e.g. "
                                              "blocks.3 (default: the first, middle and last merge)")
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
                                        "model, the methods off the shelf and the trained methods' checkpoints, against the "
                                        "reference method (ToMe) at equal MACs")
    p.add_argument("--full", required=True, help="the full-token model: a checkpoint, or a timm model name with "
                                                 "pretrained weights on this machine (e.g. vit_fmnist_tiny_patch2_28)")
    p.add_argument("--runs", nargs="+", default=[], metavar="CHECKPOINT",
                   help="checkpoints of runs on the same data; each adds its method's variants (and a run whose model "
                        "infers as the plain one, its model with every off-the-shelf method)")
    for name, adapter in METHODS.items():
        if adapter.shelf_option:
            option = next(f for f in dataclasses.fields(adapter.Options) if f.name == adapter.shelf_option)
            p.add_argument(f"--{name}-{adapter.shelf_option.replace('_', '-')}", dest=f"{name}_{adapter.shelf_option}",
                           type=type(adapter.shelf_values[0]), nargs="*", default=list(adapter.shelf_values),
                           help=f"{adapter.label} off the shelf at these values of {option.name} ({option.metadata['help']}; "
                                f"none: no such rows; default: {' '.join(map(str, adapter.shelf_values))})")
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


def _show_warnings(prefix: str, debug: bool) -> None:
    """Inside ``warnings.catch_warnings()``: every warning shown once, as a short line ``<prefix>: warning: ...``
    as an error is (``debug``: Python's own format, with file and line). Tokenthrift's own warnings are this
    command's messages, not a library's notes to its programmer: they show whatever ``-W`` / ``PYTHONWARNINGS``
    say; other libraries' warnings follow Python's filters."""
    warnings.simplefilter("always", TokenthriftWarning)  # first in the filter list, so it wins over an "ignore"
    python_format, shown = warnings.showwarning, set()

    def show(message, category, filename, lineno, file=None, line=None):
        if (category, str(message)) in shown:  # a message repeated (each split, each export) is said once
            return
        shown.add((category, str(message)))
        if debug:
            python_format(message, category, filename, lineno, file, line)
        else:
            print(f"{prefix}: warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")  # the top level's flags take no value
    with warnings.catch_warnings():  # from the parsing on: a renamed flag warns as it is read
        _show_warnings(f"tokenthrift {command}".rstrip(), debug="--debug" in argv)
        args = build_parser().parse_args(argv)
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
