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
from ..data import build_dataset, model_classes
from ..errors import InvalidArgumentError
from ..measure import training_mode
from ..train import (
    TrainConfig,
    build_model,
    data_shape,
    load_trained,
    model_input_size,
    resolve_preprocess,
    run_preprocess,
)
from ..train.checkpoint import check_writable
from ..train.config import MODEL_FIELDS, config_from_args, refuse_flags
from ..train.engine import load_run
from ..train.methods import METHODS, inference_method, picture_method, preview_method
from ..train.protocol import PictureOptions


def _images(args: argparse.Namespace, cfg: TrainConfig, model: nn.Module, data_classes: bool = True
            ) -> tuple[torch.Tensor, list[str]]:
    """``args.images`` evaluation images, one of each class in turn (the first image of every class, then the
    second, ...), and a caption per image: its class name, and, for a checkpoint whose outputs are the data's
    classes (``data_classes``; an assigner's are grids), what it predicts."""
    c, h, frames = data_shape(model_input_size(model, cfg))
    # a checkpoint's images as it was trained on them; an untrained or --pretrained model as timm would feed it
    pre = run_preprocess(cfg) if args.checkpoint else resolve_preprocess(cfg, model)
    classes = model_classes(model) if data_classes else None
    ds, info = build_dataset(args.data or cfg.data, False, h, c, args.data_dir or cfg.data_dir, frames=frames,
                             preprocess=pre, classes=classes)
    if len(ds) < args.images:
        raise InvalidArgumentError(f"--images {args.images} but the dataset has {len(ds)} images")
    index = spread_over_classes(dataset_targets(ds), args.images)
    items = [ds[i] for i in index]
    images = torch.stack([x for x, _ in items])
    names = classes or info.classes
    captions = [str(names[y]) if names and y < len(names) else f"class {y}" for _, y in items]
    if classes and args.checkpoint:  # the checkpoint's prediction beside the truth
        with torch.no_grad(), training_mode(model, False):
            out = model(images)
        if torch.is_tensor(out) and out.shape[-1] == len(classes):
            captions = [f"{c}\n(predicted: {classes[p]})" for c, p in zip(captions, out.argmax(-1).tolist())]
    return images, captions


def spread_over_classes(targets: list[int] | None, count: int) -> list[int]:
    """Indices of ``count`` items taking the classes in turn (the first item of each class in class order, then
    the second of each, ...); the first ``count`` items when the labels are not known."""
    if targets is None:
        return list(range(count))
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(targets):
        by_class.setdefault(int(y), []).append(i)
    order = [members[k] for k in range(max(map(len, by_class.values()), default=0))
             for _, members in sorted(by_class.items()) if k < len(members)]
    return order[:count]


def dataset_targets(ds) -> list[int] | None:
    """The label of every item of a dataset without loading its images, where the dataset holds them (``targets``
    of torchvision's and tokenthrift's datasets, through subsets and class re-mapping); None otherwise."""
    from torch.utils.data import Subset

    from ..data import ClassMapped

    if isinstance(ds, Subset):
        inner = dataset_targets(ds.dataset)
        return None if inner is None else [inner[i] for i in ds.indices]
    if isinstance(ds, ClassMapped):
        inner = dataset_targets(ds.ds)
        return None if inner is None else [ds.mapping[y] for y in inner]
    targets = getattr(ds, "targets", None)
    if targets is None and hasattr(ds, "samples"):
        targets = [y for _, y in ds.samples]
    return None if targets is None else [int(y) for y in targets]


def model_label(cfg: TrainConfig, model: nn.Module) -> str:
    """How a picture's title names the model: the timm name, and the sizes that overrides changed (a
    ``vit_tiny_patch16_224`` built at 28 px with patch 2 is not the 224 px model its name says)."""
    size = model_input_size(model, cfg)
    changed = [f"{size[-1]} px"] if cfg.img_size else []
    pe = getattr(model, "patch_embed", None)
    if cfg.patch_size and pe is not None:
        changed.append(f"patch {pe.patch_size[0]}")
    for name, label in (("embed_dim", "width"), ("depth", "depth"), ("in_chans", "channels")):
        if getattr(cfg, name):
            changed.append(f"{label} {getattr(cfg, name)}")
    return cfg.model + (f" ({', '.join(changed)})" if changed else "")


def visualize(args: argparse.Namespace) -> Path:
    """Draw what ``args`` asks for (the ``visualize`` subcommand's namespace); returns the PNG's path."""
    check_writable(args.out, "--out", directory=False)
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
        # a plain checkpoint previewed with a method takes that method's flags (e.g. --ltm-site-ratio)
        given = {f: getattr(args, f) for f in METHOD_FIELDS if getattr(args, f, None) is not None}
        method = picture_method(dataclasses.replace(cfg, **given), inference, args.method)
        # a method the checkpoint was not trained with is a preview (a full-token run's model runs all its tokens)
        preview = "" if method is inference else f"preview on a --method {cfg.method} run: "
        data_classes = inference.data_classes
    else:
        cfg = config_from_args(args, num_classes=1000)
        model = build_model(cfg).eval()
        method = preview_method(cfg, args.method, default="toe")
        preview, data_classes = "" if cfg.pretrained else "untrained weights: ", True
    owned = set(method.picture_flags)
    for other in METHODS.values():
        refuse_flags(args, [f for f in other.picture_flags if f not in owned],
                     f"apply to --method {other.name} pictures, not to this --method {method.name} one")
    assigner = load_trained(args.assigner)[0] if args.assigner else None
    images, captions = _images(args, cfg, model, data_classes)
    options = PictureOptions(out=args.out, stage=args.stage, sites=args.sites, assigner=assigner, captions=captions,
                             model=model_label(cfg, model), preview=preview)
    return method.draw(model, cfg, images, options)


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
