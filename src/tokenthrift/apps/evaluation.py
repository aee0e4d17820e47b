"""``tokenthrift eval``: what a trained checkpoint does, in the terms of its method.

Every checkpoint gets one row per variant its method offers (:meth:`~tokenthrift.train.protocol.Method.variants`:
the model as trained, each grid of a resizable model, a merging model against the same model without
merging, ...): top-1 always in eval mode (or the variant's own score, e.g. an assigner's accuracy on its
token-length labels), MACs per image by :func:`tokenthrift.measure.macs` and the ratio to the variant's
baseline. A detector: its COCO AP and its backbone's MACs.

``tokenthrift eval`` (:func:`run`): the checkpoint's format and provenance on one line, then those rows.
"""
from __future__ import annotations

import argparse
import dataclasses
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import build_dataset, model_classes
from ..errors import InvalidArgumentError
from ..train import TrainConfig, data_shape, evaluate, model_input_size, run_preprocess
from ..train.distributed import DistInfo
from ..train.engine import load_run, resolve_device
from ..train.methods import inference_method
from ..train.protocol import EvalContext, Method
from .common import runtime_flags
from .variants import baseline_macs, evaluation_rows

def _loader(cfg: TrainConfig, model: nn.Module, data: str | None, data_dir: str | None, subset: int | None,
            batch_size: int, workers: int, test_crops: int = 1, data_classes: bool = True) -> DataLoader:
    """The evaluation images, their labels matched by name to the classes the checkpoint's model predicts
    (``data_classes``: its outputs are the data's classes; an assigner's are grids)."""
    c, h, frames = data_shape(model_input_size(model, cfg))
    subset = subset if subset is not None else (cfg.eval_subset if data in (None, cfg.data) else None)
    classes = model_classes(model) if data_classes else None
    ds, info = build_dataset(data or cfg.data, False, h, c, data_dir or cfg.data_dir, subset=subset, seed=cfg.seed,
                             frames=frames, test_crops=test_crops, preprocess=run_preprocess(cfg), classes=classes)
    outputs = getattr(model, "num_classes", None)
    if data_classes and classes is None and outputs and info.num_classes != outputs:  # a checkpoint without names
        raise InvalidArgumentError(f"{data or cfg.data} has {info.num_classes} classes, the checkpoint's model "
                                   f"predicts {outputs}: evaluate it on data with the classes it was trained on")
    return DataLoader(ds, batch_size, num_workers=workers)


def _detection_row(model: nn.Module, cfg: TrainConfig, method: Method, use_ema: bool, data: str | None,
                   eval_subset: int | None, batch_size: int, workers: int, device: torch.device) -> dict:
    """COCO box and mask AP (pycocotools) of a detector on its run's evaluation images, and the MACs of its
    backbone (with the FPN; with a method, against the same backbone without it)."""
    from ..train.tasks import DetectionTask

    cfg = dataclasses.replace(cfg, data=data or cfg.data, eval_subset=eval_subset or cfg.eval_subset)
    task = DetectionTask(cfg)
    _, eval_ds, _ = task.datasets(model_input_size(model, cfg), None)
    loader = DataLoader(eval_ds, batch_size, num_workers=workers, collate_fn=task.collate)
    row = {"weights": "EMA" if use_ema else "model", "method": cfg.method, "images": len(eval_ds),
           **task.evaluate(model, loader, device, DistInfo(), nullcontext)}
    size = model_input_size(model, cfg)
    variants = method.variants(model, size)  # a detector's: its backbone's MACs
    v = variants[0]
    row["backbone_GMACs"] = v.macs / 1e9
    if v.baseline is not None:
        base = baseline_macs(v, variants, size)
        row.update(backbone_GMACs_without_method=base / 1e9, MACs_ratio=v.macs / base)
    return row


def evaluate_checkpoint(checkpoint: str | Path, *, ema: bool = False, data: str | None = None,
                        data_dir: str | None = None, eval_subset: int | None = None, batch_size: int = 256,
                        workers: int = 0, device: str = "auto", labels: str | Path | None = None,
                        test_crops: int | None = None) -> list[dict]:
    """One row per (weights, variant) of a tokenthrift checkpoint: the model's weights and, with ``ema``,
    the EMA weights; ReViT: one row per grid. By default on the run's own evaluation images (its data and
    ``eval_subset``); ``eval_subset=N`` picks another fixed subset (N = the split's size: all of it).
    ``labels``: token-length label file for an assigner checkpoint (default: the run's
    ``--tla-eval-labels``). ``test_crops``: views per clip of videofolder data (default: the run's)."""
    dev = resolve_device(device)
    rows = []
    for use_ema in ([False, True] if ema else [False]):
        model, cfg, trained = load_run(checkpoint, ema=use_ema, device=str(dev))
        method = inference_method(cfg, model, trained)  # the method owns its variants (grids, merged, ...)
        if cfg.task == "detection":
            rows.append(_detection_row(model, cfg, method, use_ema, data, eval_subset, batch_size, workers, dev))
            continue
        crops = cfg.test_crops if test_crops is None else test_crops
        loader = _loader(cfg, model, data, data_dir, eval_subset, batch_size, workers, crops, trained.data_classes)
        ctx = EvalContext(top1=lambda net, **kw: evaluate(net, loader, dev, **kw), loader=loader, device=dev,
                          labels=None if labels is None else str(labels), data=data, test_crops=crops)
        method.refuse_eval_options(ctx)
        size = model_input_size(model, cfg)
        weights = {"weights": "EMA" if use_ema else "model", "method": cfg.method}
        rows += [{**weights, **row} for row in evaluation_rows(method.variants(model, size), size, ctx)]
    return rows


HELP = ("top-1 and MACs of a checkpoint, one row per variant of its method (each grid, the merged model, ...; an "
        "assigner's accuracy on its labels)")


class _Moved(argparse.Action):
    """``eval --adaptive``, before its own command: says where it went, before any of its flags is refused."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("eval --adaptive is now its own command: tokenthrift adaptive --checkpoint REVIT [--assigner "
                     "TLA] (tokenthrift adaptive --help)")


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    runtime_flags(p)
    p.add_argument("--adaptive", nargs=0, action=_Moved, help=argparse.SUPPRESS)  # moved: tokenthrift adaptive


def run(args: argparse.Namespace) -> None:
    from ..data import name_list
    from ..train.checkpoint import read_checkpoint
    from . import report

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
