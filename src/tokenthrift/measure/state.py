"""Module state around a measurement: every submodule in train or eval mode inside a block (:func:`training_mode`),
the parameters without gradients inside a block (:func:`frozen`), the device a module lives on (:func:`device_of`)
and the input a model takes (:func:`model_input_shape`). Each one restores what it changed."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["device_of", "frozen", "model_input_shape", "training_mode"]


@contextmanager
def training_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Every submodule in train (or eval) mode inside the block; each one's own flag restored afterwards
    (the one helper for this: measurement, evaluation, ToE's and LTM's pictures use it)."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def model_input_shape(model: nn.Module) -> tuple[int, int, int | None]:
    """(channels, side, frames) ``model`` takes: its patch embedding's when it has one, else its cfg's input
    size; frames None for an image model."""
    from timm.data import resolve_model_data_config

    c, h, _ = resolve_model_data_config(model)["input_size"]
    pe = getattr(model, "patch_embed", None)
    if getattr(pe, "img_size", None):
        h = pe.img_size[0]
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        c = proj.in_channels
    return int(c), int(h), getattr(model, "num_frames", None)


@contextmanager
def frozen(model: nn.Module, frozen: bool = True) -> Iterator[None]:
    """The parameters without ``requires_grad`` inside the block (restored afterwards). An eval count needs it:
    without gradients a view of a parameter (an attention-pool head's latent query, ``latent.expand(B, ...)``)
    still says it requires grad but has no graph, and the module tracker of torch's FLOP counter fails on it."""
    flags = [(p, p.requires_grad) for p in model.parameters()] if frozen else []
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


_frozen = frozen  # its name before measure was a package (tokenthrift.measure._frozen)


def device_of(model: nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
