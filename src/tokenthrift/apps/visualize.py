"""``tokenthrift visualize``: a picture of what a method does to the tokens, for every kind of checkpoint.

- full-token or ToE ViT: the patches ToE keeps after block 0 and the groups merged into them;
- ReViT: every image as the patch embedding sees it at each grid (with ``--assigner``, the grid the
  token-length assigner picks is framed);
- token-length assigner: the same, with the assigner's pick;
- LTM (ViT, Swin, MobileViT, EfficientViT): merge maps, which original patches feed each merged token.

Anything else (a plain Swin or CNN checkpoint) has no tokenthrift method to draw: the error says so and
how to preview LTM on it.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from torch import nn

from .. import ltm, viz
from ..data import build_dataset
from ..errors import InvalidArgumentError
from ..train import TrainConfig, build_model, data_shape, load_trained, model_input_size, resolve_preprocess, run_preprocess
from ..train.config import MODEL_FIELDS, config_from_args, refuse_flags
from ..train.engine import load_run
from ..train.methods import METHODS, inference_method, picture_method, preview_method
from ..train.protocol import PictureOptions


def _images(args: argparse.Namespace, cfg: TrainConfig, model: nn.Module) -> torch.Tensor:
    c, h, frames = data_shape(model_input_size(model, cfg))
    # a checkpoint's images as it was trained on them; an untrained or --pretrained model as timm would feed it
    pre = run_preprocess(cfg) if args.checkpoint else resolve_preprocess(cfg, model)
    ds, _ = build_dataset(args.data or cfg.data, False, h, c, args.data_dir or cfg.data_dir, frames=frames,
                          preprocess=pre)
    if len(ds) < args.images:
        raise InvalidArgumentError(f"--images {args.images} but the dataset has {len(ds)} images")
    return torch.stack([ds[i][0] for i in range(args.images)])


def visualize(args: argparse.Namespace) -> Path:
    """Draw what ``args`` asks for (the ``visualize`` subcommand's namespace); returns the PNG's path."""
    if args.checkpoint:
        refuse_flags(args, [*MODEL_FIELDS, "config"],
                     "describe an untrained model; a checkpoint is drawn as it was trained")
        model, cfg, trained = load_run(args.checkpoint)
        if cfg.task == "detection":
            refuse_flags(args, ["method", *PICTURE_FLAGS, *METHOD_FIELDS],
                         "do not apply to a detector: it is drawn with its detections (and its backbone's merge maps)")
            return _detector(model, cfg, args)
        inference = inference_method(cfg, model, trained)
        if not inference.plain_inference:
            refuse_flags(args, [*METHOD_FIELDS], f"describe a preview; this --method {inference.name} "
                                                          "checkpoint is drawn as it was trained")
        # a plain checkpoint previewed with a method takes that method's flags (e.g. --ltm-ratio)
        given = {f: getattr(args, f) for f in METHOD_FIELDS if getattr(args, f, None) is not None}
        method = picture_method(dataclasses.replace(cfg, **given), inference, args.method)
    else:
        cfg = config_from_args(args, num_classes=1000)
        model = build_model(cfg).eval()
        method = preview_method(cfg, args.method, default="toe")
    owned = set(method.picture_flags)
    for other in METHODS.values():
        refuse_flags(args, [f for f in other.picture_flags if f not in owned],
                     f"apply to --method {other.name} pictures, not to this --method {method.name} one")
    assigner = load_trained(args.assigner)[0] if args.assigner else None
    options = PictureOptions(out=args.out, stage=args.stage, sites=args.sites, assigner=assigner)
    return method.draw(model, cfg, _images(args, cfg, model), options)


# every option some method's picture takes (refused for a detector), and the method settings a preview takes
# (what the methods' picture flags name beyond those)
PICTURE_FLAGS = ("stage", "sites", "assigner")
METHOD_FIELDS = tuple(dict.fromkeys(f for m in METHODS.values() for f in m.picture_flags if f not in PICTURE_FLAGS))


def _detector(model: nn.Module, cfg: TrainConfig, args: argparse.Namespace) -> Path:
    """The detector's boxes and masks on evaluation images, and, for an LTM backbone, its merge maps on the
    same images as the backbone sees them (resized and normalised by the detector)."""
    from ..data.coco import CocoInstances

    data = args.data or cfg.data
    if not data.startswith("coco:"):
        raise InvalidArgumentError(f"a detector is drawn on COCO-layout images: --data coco:PATH (got {data})")
    ds = CocoInstances(data.split(":", 1)[1], "val")
    if len(ds) < args.images:
        raise InvalidArgumentError(f"--images {args.images} but the evaluation split has {len(ds)} images")
    images = [ds[i][0] for i in range(args.images)]
    with torch.no_grad():
        outputs = model.eval()(images)
        maps = []
        if ltm.is_ltm(model):
            batch, _ = model.transform(images)
            maps = ltm.merge_maps(model.backbone.body, batch.tensors, sites=None)
    names = {c["id"]: c["name"] for c in ds.coco.cats.values()}
    side = max(max(i.shape[-2:]) for i in images)
    stacked = torch.stack([torch.nn.functional.pad(i, (0, side - i.shape[-1], 0, side - i.shape[-2])) for i in images])
    title = f"{cfg.model} with {cfg.backbone}" + (" (LTM: merge maps below)" if maps else "")
    return viz.plot_detections(stacked, outputs, args.out, title, names, maps)
