"""``tokenthrift visualize``: a picture of what a method does to the tokens, for every kind of checkpoint.

Each method draws its own picture (:meth:`~tokenthrift.train.protocol.Method.draw`): a checkpoint as its
method runs it; a model that infers as the plain one (a full-token or ToE run, an untrained or pretrained model)
as the method asked for with ``--method`` previews it (default: the one whose ``default_for`` names
``visualize``). A detector is drawn with its detections, and with what its method draws inside its backbone
(:meth:`~tokenthrift.train.protocol.Method.detector_maps`). :func:`run` prints the PNG's path.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

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
from ..train.config import (
    MODEL_FIELDS,
    add_config_arguments,
    add_method_arguments,
    config_from_args,
    given_flags,
    method_flags,
    method_key,
    refuse_flags,
)
from ..train.engine import load_run
from ..train.methods import inference_method, picture_method, preview_method
from ..train.protocol import PICTURE_OPTIONS, Method, PictureOptions
from .common import default_preview, method_flag, method_of_flags


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
    flags = given_flags(args, method_flags(preview=True))
    inferred = method_of_flags(args)  # the method whose flags were given without --method
    if args.checkpoint:
        refuse_flags(args, [*MODEL_FIELDS, "config"],
                     "describe an untrained model; a checkpoint is drawn as it was trained")
        model, cfg, trained = load_run(args.checkpoint)
        inference = inference_method(cfg, model, trained)
        if cfg.task == "detection":
            refuse_flags(args, ["method", *PICTURE_OPTIONS, *method_flags()],
                         "do not apply to a detector: it is drawn with its detections (and what its method does "
                         "in its backbone)")
            return _detector(model, cfg, inference, args)
        if not inference.plain_inference:
            refuse_flags(args, method_flags(), f"describe a preview; this --method {inference.name} checkpoint is "
                                               "drawn as it was trained")
        requested = args.method or inferred
        # a plain checkpoint previewed with a method takes that method's flags (e.g. --ltm-site-ratio)
        name = requested or (inference.name if type(inference) is not Method else default_preview("visualize"))
        given = {method_key(k)[1]: getattr(args, k) for k in flags if method_key(k)[0] == name}
        shown = cfg.with_method(name, **given) if inference.plain_inference and name != cfg.method else cfg
        method = picture_method(shown, inference, requested, default_preview("visualize"))
        # a method the checkpoint was not trained with is a preview (a full-token run's model runs all its tokens)
        preview = "" if method is inference else f"preview on a --method {cfg.method} run: "
        data_classes = inference.data_classes
    else:
        cfg = config_from_args(args, num_classes=1000, **({"method": inferred} if inferred else {}))
        model = build_model(cfg).eval()
        method = preview_method(cfg, model, args.method, default=default_preview("visualize"))
        preview, data_classes = "" if cfg.pretrained else "untrained weights: ", True
    refuse_flags(args, [k for k in method_flags() if method_key(k)[0] != method.name],
                 f"apply to another method's picture, not to this --method {method.name} one")
    refuse_flags(args, [f for f in PICTURE_OPTIONS if f not in method.picture_flags],
                 f"do not apply to the --method {method.name} picture")
    assigner = load_trained(args.assigner)[0] if args.assigner else None
    images, captions = _images(args, cfg, model, data_classes)
    options = PictureOptions(out=args.out, stage=args.stage, sites=args.sites, assigner=assigner, captions=captions,
                             model=model_label(cfg, model), preview=preview)
    return method.draw(model, cfg, images, options)


def _detector(model: nn.Module, cfg: TrainConfig, method, args: argparse.Namespace) -> Path:
    """The detector's boxes and masks on evaluation images, and what its method draws inside its backbone
    (merge maps, on the images as the backbone sees them: resized and normalised by the detector)."""
    from .. import viz
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
        maps = method.detector_maps(model, images)
    names = {c["id"]: c["name"] for c in ds.coco.cats.values()}
    side = max(max(i.shape[-2:]) for i in images)
    stacked = torch.stack([torch.nn.functional.pad(i, (0, side - i.shape[-1], 0, side - i.shape[-2])) for i in images])
    title = f"{cfg.model} with {cfg.backbone}" + (f" ({method.label}: merge maps below)" if maps else "")
    return viz.plot_detections(stacked, outputs, args.out, title, names, maps)


HELP = "what a method did to the tokens (each method draws its own picture)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    method_flag(p, "visualize", "without --checkpoint, or on a full-token checkpoint: the method to draw: ")
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


def run(args: argparse.Namespace) -> None:
    print(visualize(args))
