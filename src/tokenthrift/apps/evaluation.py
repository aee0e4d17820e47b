"""``tokenthrift eval``: what a trained checkpoint does, in the terms of its method.

Every kind of checkpoint gets the numbers that describe it (top-1 always in eval mode, MACs per image by
:func:`tokenthrift.measure.macs`): a full-token or ToE model its top-1 and MACs (ToE only acts in
training); a ReViT every grid's top-1 and MACs; an LTM model its top-1 with the merged-token MACs
against the same model without merging; a token-length assigner its accuracy on the token-length labels
of the evaluation images, the grid shares it predicts and its cost against the backbone.
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import ltm, measure
from ..data import build_dataset, model_classes
from ..errors import InvalidArgumentError
from ..train import TrainConfig, data_shape, evaluate, model_input_size, run_preprocess
from ..train.distributed import DistInfo
from ..train.engine import load_run, resolve_device
from ..train.methods import inference_method
from ..train.protocol import EvalContext


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


def _detection_row(model: nn.Module, cfg: TrainConfig, use_ema: bool, data: str | None, eval_subset: int | None,
                   batch_size: int, workers: int, device: torch.device) -> dict:
    """COCO box and mask AP (pycocotools) of a detector on its run's evaluation images, and the MACs of its
    backbone (with the FPN; merged for LTM, against the same backbone without merging)."""
    from ..train.tasks import DetectionTask

    cfg = dataclasses.replace(cfg, data=data or cfg.data, eval_subset=eval_subset or cfg.eval_subset)
    task = DetectionTask(cfg)
    _, eval_ds, _ = task.datasets(model_input_size(model, cfg), None)
    loader = DataLoader(eval_ds, batch_size, num_workers=workers, collate_fn=task.collate)
    row = {"weights": "EMA" if use_ema else "model", "method": cfg.method, "images": len(eval_ds),
           **task.evaluate(model, loader, device, DistInfo(), nullcontext)}
    size = model_input_size(model, cfg)
    macs = measure.macs(model.backbone, size)
    row["backbone_GMACs"] = macs / 1e9
    if ltm.is_ltm(model):
        base = measure.macs(ltm.plain_copy(model.backbone), size)
        row.update(backbone_GMACs_unmerged=base / 1e9, MACs_ratio=macs / base)
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
        if cfg.task == "detection":
            rows.append(_detection_row(model, cfg, use_ema, data, eval_subset, batch_size, workers, dev))
            continue
        crops = cfg.test_crops if test_crops is None else test_crops
        loader = _loader(cfg, model, data, data_dir, eval_subset, batch_size, workers, crops, trained.data_classes)
        ctx = EvalContext(top1=lambda net, **kw: evaluate(net, loader, dev, **kw), loader=loader, device=dev,
                          labels=None if labels is None else str(labels), data=data, test_crops=crops)
        method = inference_method(cfg, model, trained)  # the method owns its rows (grids, merged/unmerged, ...)
        weights = {"weights": "EMA" if use_ema else "model", "method": cfg.method}
        rows += [{**weights, **row} for row in method.evaluation_rows(model, model_input_size(model, cfg), ctx)]
    return rows
