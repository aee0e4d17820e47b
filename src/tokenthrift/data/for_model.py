"""Data for a given model, timm's way: a pretrained model's cfg decides its normalisation, interpolation and
crop (``timm.data.resolve_data_config``), so a fine-tune feeds it images as it was trained on them."""
from __future__ import annotations

import timm.data
from torch import nn
from torch.utils.data import Dataset

from .build import build_dataset
from .info import DatasetInfo, Preprocess

__all__ = ["dataset_for_model", "model_input_shape", "model_preprocess"]


def model_preprocess(model: nn.Module, hflip: float = 0.5, crop_pad: int | None = None) -> Preprocess:
    """The :class:`Preprocess` of ``model``'s pretrained cfg: its mean / std, interpolation and crop_pct."""
    data_cfg = timm.data.resolve_data_config(model=model)
    tag = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    return Preprocess(tuple(data_cfg["mean"]), tuple(data_cfg["std"]), data_cfg.get("interpolation", "bilinear"),
                      float(data_cfg.get("crop_pct", 0.875)), hflip, crop_pad,
                      source=f"{tag}'s pretrained cfg, as its weights were trained (timm.data.resolve_data_config)")


def model_input_shape(model: nn.Module) -> tuple[int, int, int | None]:
    """(channels, side, frames) ``model`` takes: its patch embedding's when it has one, else its cfg's input
    size; frames None for an image model."""
    c, h, _ = timm.data.resolve_model_data_config(model)["input_size"]
    pe = getattr(model, "patch_embed", None)
    if getattr(pe, "img_size", None):
        h = pe.img_size[0]
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        c = proj.in_channels
    return int(c), int(h), getattr(model, "num_frames", None)


def dataset_for_model(spec: str, model: nn.Module, train: bool = True, pretrained: bool = True,
                      hflip: float = 0.5, crop_pad: int | None = None, **kwargs) -> tuple[Dataset, DatasetInfo]:
    """``build_dataset(spec, train, ...)`` sized, channelled and normalised for ``model``: with ``pretrained``
    (the model holds pretrained weights) the normalisation, interpolation and crop of its pretrained cfg,
    else the dataset's statistics. Other keywords go to :func:`build_dataset` (``subset``, ``data_dir``,
    ``augment``, ...)."""
    c, side, frames = model_input_shape(model)
    pre = model_preprocess(model, hflip, crop_pad) if pretrained else Preprocess(hflip=hflip, crop_pad=crop_pad)
    return build_dataset(spec, train, side, c, frames=frames, preprocess=pre, **kwargs)
