"""Model construction for the engine: any timm model by name, with size/width/depth overrides."""
from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

from ..data import dataset_info, split_folder
from ..errors import InvalidArgumentError
from .config import TrainConfig

MODEL_OVERRIDES = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
                   "mlp_ratio", "num_frames")


def _num_classes(cfg: TrainConfig) -> int:
    if cfg.num_classes:
        return cfg.num_classes
    if cfg.data.startswith(("imagefolder:", "videofolder:")):
        root = split_folder(Path(cfg.data.split(":", 1)[1]), True)
        return sum(1 for p in root.iterdir() if p.is_dir())
    return dataset_info(cfg.data).num_classes


def build_model(cfg: TrainConfig) -> nn.Module:
    """``timm.create_model(cfg.model, pretrained=cfg.pretrained, **overrides)`` with clear errors."""
    kwargs = {k: getattr(cfg, k) for k in MODEL_OVERRIDES if getattr(cfg, k) is not None}
    kwargs["num_classes"] = _num_classes(cfg)
    clash = sorted(set(cfg.model_kwargs or {}) & set(kwargs))
    if clash:
        raise InvalidArgumentError(f"model_kwargs repeats {clash}, which have flags of their own; set them with those "
                                   f"flags")
    kwargs.update(cfg.model_kwargs or {})
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.img_size and cfg.patch_size and cfg.img_size % cfg.patch_size:
        raise InvalidArgumentError(f"image size {cfg.img_size} is not divisible by patch size {cfg.patch_size}; pick "
                         f"--img-size as a multiple of --patch-size")
    if not timm.is_model(cfg.model):
        close = timm.list_models(f"*{cfg.model.split('_')[0]}*")[:8]
        raise InvalidArgumentError(f"unknown timm model {cfg.model!r}; similar names: {', '.join(close) or 'none'} "
                         "(timm.list_models() lists all)")
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
    except TypeError as err:
        raise InvalidArgumentError(f"model {cfg.model!r} does not accept one of the overrides {sorted(kwargs)}: {err}. "
                         "Drop the flags this architecture has no parameter for.") from err
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def model_input_size(model: nn.Module, cfg: TrainConfig | None = None) -> tuple[int, ...]:
    """(C, H, W) the model is built for, (C, T, H, W) for a video model: a model that states its
    ``input_size`` (ResizableViT, token-length assigner) as it says; otherwise explicit overrides first,
    then the model's own config."""
    stated = getattr(model, "input_size", None)
    if isinstance(stated, tuple):
        return stated
    data_cfg = timm.data.resolve_model_data_config(model)
    c, h, w = data_cfg["input_size"]
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None):
        h, w = pe.img_size
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        c = proj.in_channels
    frames = getattr(model, "num_frames", None)
    if cfg is not None:
        c = cfg.in_chans or c
        h = w = cfg.img_size or h
        frames = cfg.num_frames or frames
    return (int(c), int(frames), int(h), int(w)) if frames else (int(c), int(h), int(w))


def data_shape(input_size: tuple[int, ...]) -> tuple[int, int, int | None]:
    """(channels, side, frames) of a model's input size (C, H, W) or (C, T, H, W); frames None for images:
    what :func:`tokenthrift.data.build_dataset` needs to match the data to the model."""
    return input_size[0], input_size[-1], (input_size[1] if len(input_size) == 4 else None)
