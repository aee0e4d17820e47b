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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import ltm, toe
from ..data import build_dataset
from ..errors import InvalidArgumentError, UnsupportedModelError
from ..train import (TrainConfig, build_model, data_shape, load_trained, model_input_size, resolve_preprocess,
                     run_preprocess)
from ..train.config import DEIT_EPOCHS, LTM_FIELDS, MODEL_FIELDS, TOE_FIELDS, config_from_args, refuse_flags
from . import viz
from .bench import ltm_pair


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
        model, cfg = load_trained(args.checkpoint)
        if cfg.task == "detection":
            refuse_flags(args, ["method", "stage", "sites", "assigner", *LTM_FIELDS, *TOE_FIELDS],
                    "do not apply to a detector: it is drawn with its detections (and its backbone's merge maps)")
            return _detector(model, cfg, args)
        kind = "ltm" if ltm.is_ltm(model) else cfg.method
        if args.method and kind in ("revit", "tla", "ltm") and args.method != kind:
            raise InvalidArgumentError(f"{args.checkpoint} is a --method {kind} run; it is drawn as such (drop "
                                       "--method)")
        if args.method == "ltm" and kind != "ltm":  # preview merging on a plain checkpoint with the flags' ratio
            for field in LTM_FIELDS:
                if getattr(args, field, None) is not None:
                    setattr(cfg, field, getattr(args, field))
            kind = "ltm"
    else:
        cfg = config_from_args(args, num_classes=1000)
        model = build_model(cfg).eval()
        kind = args.method or ("ltm" if cfg.method == "ltm" or ltm.is_ltm(model) else "toe")
    if kind != "ltm":
        refuse_flags(args, ["sites", *LTM_FIELDS], "apply to LTM merge maps only")
    if kind not in ("full", "toe"):
        refuse_flags(args, ["stage", *TOE_FIELDS], "apply to ToE pictures only")
    if kind != "revit":
        refuse_flags(args, ["assigner"], "marks the assigner's choices on a ReViT checkpoint's grids")
    images = _images(args, cfg, model)
    if kind == "ltm":
        return _ltm(model, cfg, images, args)
    if kind == "revit":
        return _revit(model, cfg, images, args)
    if kind == "tla":
        return _assigner(model, cfg, images, args)
    return _toe(model, cfg, images, args)


def _toe(model: nn.Module, cfg: TrainConfig, images: torch.Tensor, args: argparse.Namespace) -> Path:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"this is a plain {type(model).__name__}: visualize draws ToE token groups of timm VisionTransformers, "
            "ReViT grids and LTM merge maps. To preview learnable token merging on it, add --method ltm (with "
            "--ltm-ratio, or the calibrated ratios of a registered base)")
    # a checkpoint's own schedule; an untrained model's over DeiT's 300 epochs
    schedule = toe.ToESchedule(**cfg.toe_kwargs(cfg.epochs if args.checkpoint else DEIT_EPOCHS))
    x = toe.block0_output(model, images)
    rates = schedule.keep_rates[: args.stage] if args.stage is not None else schedule.rates(0)
    kept, groups = toe.expansion_groups(x, rates, schedule.r0, schedule.k, model.num_prefix_tokens,
                                        schedule.distance)
    title = f"ToE {cfg.model}: keep {rates[-1] if rates else schedule.r0} ({kept.shape[1]} of {groups.shape[1]} tokens)"
    return viz.plot_token_groups(images, groups, kept, tuple(model.patch_embed.grid_size), args.out, title)


def _revit(model: nn.Module, cfg: TrainConfig, images: torch.Tensor, args: argparse.Namespace) -> Path:
    probs = None
    if args.assigner:
        assigner, _ = load_trained(args.assigner)
        if getattr(assigner, "grids", None) not in (None, tuple(model.grids)):
            raise InvalidArgumentError(f"the assigner {args.assigner} was trained for grids {assigner.grids}, this "
                                       f"ReViT has {tuple(model.grids)}")
        with torch.no_grad():
            probs = assigner(images).float().softmax(-1)
    views = [(g, model.resize(images, g)) for g in model.grids]
    title = f"ReViT {cfg.model}: the image at each token grid" + (" (red: the assigner's "
                                                                  "pick)" if args.assigner else "")
    return viz.plot_revit_grids(views, args.out, title, probs=probs, grids=model.grids)


def _assigner(model: nn.Module, cfg: TrainConfig, images: torch.Tensor, args: argparse.Namespace) -> Path:
    backbone = build_model(cfg)
    patch = backbone.patch_embed.patch_size[0] if hasattr(backbone, "patch_embed") else None
    if patch is None or model.grids is None:
        raise UnsupportedModelError("this assigner checkpoint does not record its grids or its backbone's patch size; "
                                    "draw it with its ReViT: visualize --checkpoint REVIT --assigner THIS")
    with torch.no_grad():
        probs = model(images).float().softmax(-1)
    views = [(g, F.interpolate(images, size=(g * patch, g * patch), mode="bilinear", antialias=True,
                               align_corners=False) if g * patch != images.shape[-1] else images) for g in model.grids]
    title = f"token-length assigner ({model.model_name}): the grid it picks per image (red)"
    return viz.plot_revit_grids(views, args.out, title, probs=probs, grids=model.grids)


def _ltm(model: nn.Module, cfg: TrainConfig, images: torch.Tensor, args: argparse.Namespace) -> Path:
    if not ltm.is_ltm(model):
        model = ltm_pair(model, cfg)[1]
    maps = ltm.merge_maps(model, images)
    if not maps:
        raise InvalidArgumentError("no merge site of this model merged anything at this input size (every ratio kept "
                                   "its grid); lower --ltm-ratio")
    if args.sites:
        chosen = [m for m in maps if any(m.site.startswith(s) for s in args.sites)]
        if not chosen:
            raise InvalidArgumentError(f"--sites {args.sites} matched none of the merge sites: "
                                       f"{', '.join(m.site for m in maps)}")
        maps = chosen
    elif len(maps) > 3:  # first, middle and last merge
        maps = [maps[0], maps[len(maps) // 2], maps[-1]]
    title = f"LTM {cfg.model}: colour = merged token, brightness = weight in it"
    return viz.plot_merge_maps(images, maps, args.out, title)


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
            maps = ltm.merge_maps(model.backbone.body, batch.tensors)
            maps = [maps[0], maps[len(maps) // 2], maps[-1]] if len(maps) > 3 else maps
    names = {c["id"]: c["name"] for c in ds.coco.cats.values()}
    side = max(max(i.shape[-2:]) for i in images)
    stacked = torch.stack([torch.nn.functional.pad(i, (0, side - i.shape[-1], 0, side - i.shape[-2])) for i in images])
    title = f"{cfg.model} with {cfg.backbone}" + (" (LTM: merge maps below)" if maps else "")
    return viz.plot_detections(stacked, outputs, args.out, title, names, maps)
