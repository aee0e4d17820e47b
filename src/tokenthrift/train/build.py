"""Model construction for the engine: any timm model by name, with size/width/depth overrides, or a detector
(``--task detection``: torchvision Mask/Faster R-CNN around a timm backbone)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import timm
from torch import nn

from ..data import Preprocess, dataset_info, model_input_shape, model_preprocess, split_folder
from ..errors import InvalidArgumentError
from .config import TrainConfig

MODEL_OVERRIDES = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
                   "mlp_ratio", "num_frames")


def _num_classes(cfg: TrainConfig) -> int:
    if cfg.num_classes:
        return cfg.num_classes
    if cfg.data.startswith("coco:"):  # torchvision's convention: labels are the category ids, 0 the background
        import json

        from ..data.coco import annotation_file
        categories = json.loads(annotation_file(Path(cfg.data.split(":", 1)[1]), "train").read_text())["categories"]
        return max(c["id"] for c in categories) + 1
    if cfg.data.startswith(("imagefolder:", "videofolder:")):
        root = split_folder(Path(cfg.data.split(":", 1)[1]), True)
        return sum(1 for p in root.iterdir() if p.is_dir())
    return dataset_info(cfg.data).num_classes


def build_detector(cfg: TrainConfig) -> nn.Module:
    """``tokenthrift.detection.{maskrcnn,fasterrcnn}(cfg.backbone, ...)``: ``model_kwargs`` (and
    ``pretrained``, ``drop_path``) go to the timm backbone, ``det_kwargs`` to torchvision; the detector's
    input size is ``img_size`` on the shorter side (default 800, torchvision's), at most 1333/800 of it."""
    from ..detection import DETECTORS, load_backbone_weights
    from .checkpoint import read_weights

    if cfg.model not in DETECTORS:
        raise InvalidArgumentError(f"--task detection builds --model {' or '.join(DETECTORS)}; got {cfg.model!r} (the "
                                   "timm network goes to --backbone)")
    if cfg.initial_checkpoint:
        raise InvalidArgumentError("--initial-checkpoint starts a classifier; start a detector's backbone from a "
                                   "classifier's weights with --init-backbone")
    if not cfg.backbone:
        raise InvalidArgumentError("--task detection needs --backbone, a timm model name (e.g. "
                                   "swin_tiny_patch4_window7_224 or ltm_swin_tiny_patch4_window7_224)")
    given = [k for k in MODEL_OVERRIDES if k not in ("img_size", "num_classes") and getattr(cfg, k) is not None]
    if given:
        raise InvalidArgumentError(f"{', '.join('--' + k.replace('_', '-') for k in given)} describe a classifier; "
                                   "give a detector's backbone its keywords with --model-kwargs")
    backbone_kwargs = dict(cfg.model_kwargs or {}, pretrained=cfg.pretrained)
    if cfg.drop_path:
        backbone_kwargs["drop_path_rate"] = cfg.drop_path
    size = cfg.img_size or 800
    kwargs = dict({"min_size": size, "max_size": round(size * 1333 / 800)}, **(cfg.det_kwargs or {}))
    detector = DETECTORS[cfg.model](cfg.backbone, _num_classes(cfg), backbone_kwargs=backbone_kwargs,
                                    head_width=cfg.det_head_width, **kwargs)
    if cfg.init_backbone:
        load_backbone_weights(detector, read_weights(cfg.init_backbone))
    return detector


TRANSFORMERS_PREFIX = "hf:"  # --model hf:<class>:<config.json> or hf:<save_pretrained folder>


def run_stem(model: str) -> str:
    """A run folder's name for ``--model``: the name itself, or for a transformers model its class or folder name."""
    if not model.startswith(TRANSFORMERS_PREFIX):
        return model
    spec = model.removeprefix(TRANSFORMERS_PREFIX)
    name = Path(spec).name if Path(spec).exists() or ":" not in spec else spec.split(":", 1)[0]
    return f"hf-{name}"


def build_transformers(cfg: TrainConfig) -> nn.Module:
    """A transformers image classifier (``--model hf:<class>:<config.json>``, random weights, or ``hf:<folder>``, a
    ``save_pretrained`` folder's weights) with timm's face (:class:`tokenthrift.hosts.TransformersClassifier`), its
    labels the data's classes; ``model_kwargs`` set config attributes (e.g. ``attn_implementation``). The config
    decides the architecture, so timm's size flags are refused."""
    from ..hosts.transformers import TransformersClassifier, load_model

    given = [k for k in MODEL_OVERRIDES if k != "num_classes" and getattr(cfg, k) is not None]
    given += ["drop_path"] if cfg.drop_path else []
    given += ["initial_checkpoint"] if cfg.initial_checkpoint else []
    if given:
        raise InvalidArgumentError(f"{', '.join('--' + k.replace('_', '-') for k in given)} describe a timm model; a "
                                   "transformers model's config decides its shape (edit config.json, or start from a "
                                   "save_pretrained folder: --model hf:<folder>)")
    kwargs = dict(cfg.model_kwargs or {})
    model = load_model(cfg.model.removeprefix(TRANSFORMERS_PREFIX), _num_classes(cfg),
                       kwargs.pop("attn_implementation", None))
    for key, value in kwargs.items():
        setattr(model.config, key, value)
    model = TransformersClassifier(model)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_model(cfg: TrainConfig) -> nn.Module:
    """``timm.create_model(cfg.model, pretrained=cfg.pretrained, **overrides)`` with clear errors (a detector
    for ``task="detection"``: :func:`build_detector`; a transformers classifier for ``hf:`` models:
    :func:`build_transformers`)."""
    if cfg.task == "detection":
        return build_detector(cfg)
    if cfg.model.startswith(TRANSFORMERS_PREFIX):
        return build_transformers(cfg)
    for name in ("backbone", "det_head_width", "det_kwargs", "init_backbone"):
        if getattr(cfg, name) is not None:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} applies to --task detection")
    kwargs = {k: getattr(cfg, k) for k in MODEL_OVERRIDES if getattr(cfg, k) is not None}
    kwargs["num_classes"] = _num_classes(cfg)
    clash = sorted(set(cfg.model_kwargs or {}) & set(kwargs))
    if clash:
        raise InvalidArgumentError(f"model_kwargs repeats {clash}, which have flags of their own; set them with those "
                                   "flags")
    kwargs.update(cfg.model_kwargs or {})
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    if not timm.is_model(cfg.model):
        close = timm.list_models(f"*{cfg.model.split('_')[0]}*")[:8]
        raise InvalidArgumentError(f"unknown timm model {cfg.model!r}; similar names: {', '.join(close) or 'none'} "
                                   "(timm.list_models() lists all)")
    if cfg.initial_checkpoint:
        kwargs["pretrained_cfg_overlay"] = _initial_weights(cfg)
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained or bool(cfg.initial_checkpoint), **kwargs)
    except TypeError as err:
        raise InvalidArgumentError(f"model {cfg.model!r} does not accept one of the overrides {sorted(kwargs)}: {err}. "
                                   "Drop the flags this architecture has no parameter for.") from err
    except RuntimeError as err:  # load_state_dict: keys or shapes of --initial-checkpoint that do not fit
        if not cfg.initial_checkpoint:
            raise
        first = str(err).splitlines()[0]
        raise InvalidArgumentError(f"--initial-checkpoint {cfg.initial_checkpoint} does not fit --model {cfg.model} "
                                   f"({first}); give weights of the same architecture (a method's checkpoint, such "
                                   "as a ReViT's, continues with --resume)") from err
    _check_patch_grid(model)
    if cfg.initial_checkpoint:  # the overlay's weights are loaded: do not keep them alive in the model's cfg
        model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "state_dict"}
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _check_patch_grid(model: nn.Module) -> None:
    """A patch embedding whose image size is not a multiple of its patch size silently drops the border pixels
    (the stride-p convolution leaves the remainder out): an error that names the sizes that fit."""
    pe = getattr(model, "patch_embed", None)
    size, patch = getattr(pe, "img_size", None), getattr(pe, "patch_size", None)
    if not size or not patch or getattr(pe, "dynamic_img_pad", False):
        return
    for side, p, what in zip(size, patch, ("height", "width")):
        if side % p:
            below, above = side - side % p, side - side % p + p
            raise InvalidArgumentError(f"image {what} {side} is not a multiple of the patch size {p}: the last "
                                       f"{side % p} pixel(s) would never reach the model; use --img-size {below} or "
                                       f"{above} (or another --patch-size)")


def _initial_weights(cfg: TrainConfig) -> dict:
    """The pretrained-cfg overlay that makes timm load ``--initial-checkpoint`` as it loads pretrained weights
    (``state_dict``: its weights; ``num_classes``: its classifier's, so that timm starts a classifier of another
    class count fresh)."""
    from timm.models import get_pretrained_cfg

    from .checkpoint import read_weights

    weights = read_weights(cfg.initial_checkpoint)
    overlay: dict = {"state_dict": weights}
    default = get_pretrained_cfg(cfg.model.removeprefix("ltm_")) if cfg.model.startswith("ltm_") else None
    default = default or get_pretrained_cfg(cfg.model)
    classifier = (default.classifier if default is not None else None) or "head"
    name = classifier if isinstance(classifier, str) else classifier[0]
    head = weights.get(f"{name}.weight")
    if head is not None:
        overlay["num_classes"] = int(head.shape[0])
    return overlay


def model_input_size(model: nn.Module, cfg: TrainConfig | None = None) -> tuple[int, ...]:
    """(C, H, W) the model is built for, (C, T, H, W) for a video model: a model that states its
    ``input_size`` (ResizableViT, token-length assigner) as it says; otherwise explicit overrides first,
    then the model's own config."""
    stated = getattr(model, "input_size", None)
    if isinstance(stated, tuple):
        return stated
    if hasattr(model, "roi_heads"):  # a torchvision detector: images resized to min_size on the shorter side
        side = int(model.transform.min_size[0])
        return 3, side, side
    c, h, frames = model_input_shape(model)
    pe_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    w = pe_size[1] if pe_size else h  # a non-square patch grid keeps its width
    if cfg is not None:
        c = cfg.in_chans or c
        h = w = cfg.img_size or h
        frames = cfg.num_frames or frames
    return (int(c), int(frames), int(h), int(w)) if frames else (int(c), int(h), int(w))


def data_shape(input_size: tuple[int, ...]) -> tuple[int, int, int | None]:
    """(channels, side, frames) of a model's input size (C, H, W) or (C, T, H, W); frames None for images:
    what :func:`tokenthrift.data.build_dataset` needs to match the data to the model."""
    return input_size[0], input_size[-1], (input_size[1] if len(input_size) == 4 else None)


def resolve_preprocess(cfg: TrainConfig, model: nn.Module) -> Preprocess:
    """How a run at its start feeds images to ``model``: a ``--pretrained`` model as its pretrained cfg says
    (timm's convention: mean / std, interpolation, crop), a model trained from scratch with the dataset's
    statistics; ``--mean`` / ``--std`` / ``--interpolation`` / ``--crop-pct`` override either."""
    if cfg.pretrained:
        pre = model_preprocess(model, cfg.hflip, cfg.crop_pad)
    elif cfg.initial_checkpoint and _recorded_preprocess(cfg.initial_checkpoint) is not None:
        pre = replace(_recorded_preprocess(cfg.initial_checkpoint), hflip=cfg.hflip, crop_pad=cfg.crop_pad)
    elif cfg.initial_checkpoint:
        pre = Preprocess(hflip=cfg.hflip, crop_pad=cfg.crop_pad,
                         source=f"{cfg.data}'s statistics (--initial-checkpoint {cfg.initial_checkpoint} records none: "
                                "give --mean / --std if its weights were trained with others)")
    else:
        pre = Preprocess(hflip=cfg.hflip, crop_pad=cfg.crop_pad,
                         source=f"{cfg.data}'s statistics (trained from scratch: no pretrained cfg applies)")
    given = {k: getattr(cfg, k) for k in ("mean", "std", "interpolation", "crop_pct") if getattr(cfg, k) is not None}
    if cfg.mean is not None or cfg.std is not None:
        given["source"] = "given with --mean / --std"
    return replace(pre, **given)


def _recorded_preprocess(path: str) -> Preprocess | None:
    """How the run behind a tokenthrift checkpoint fed its images (None for another kind of weights file)."""
    from ..errors import TokenthriftError
    from .checkpoint import read_checkpoint

    try:
        recorded = TrainConfig.from_saved(read_checkpoint(path)["config"])
    except (TokenthriftError, TypeError):
        return None
    mean, std = run_normalisation(recorded)
    return replace(run_preprocess(recorded), mean=mean, std=std,
                   source=f"as the run of --initial-checkpoint {path} was trained (its config)")


def run_normalisation(cfg: TrainConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std a trained run normalised its images with: the recorded ones, or its data's statistics
    (what a run that records none used)."""
    pre = run_preprocess(cfg)
    if pre.mean is not None:
        return tuple(pre.mean), tuple(pre.std)
    info = dataset_info(cfg.data)
    return tuple(info.mean), tuple(info.std)


def run_preprocess(cfg: TrainConfig) -> Preprocess:
    """How a trained run's config says its images were fed (:func:`resolve_preprocess` recorded it); configs
    from before it was recorded hold None: the dataset's statistics, which those runs used."""
    defaults = Preprocess()
    recorded = cfg.mean is not None
    return Preprocess(cfg.mean, cfg.std, cfg.interpolation or defaults.interpolation,
                      cfg.crop_pct or defaults.crop_pct, cfg.hflip, cfg.crop_pad,
                      source="as the run was trained (its config)" if recorded else f"{cfg.data}'s statistics, as "
                      "the run was trained")
