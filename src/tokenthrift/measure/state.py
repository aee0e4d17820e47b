"""Module state around a measurement: every submodule in train or eval mode inside a block (:func:`training_mode`),
the parameters without gradients inside a block (:func:`frozen`), the device a module lives on (:func:`device_of`)
and the input a model takes (:func:`model_input_shape`). Each one restores what it changed. Around a conversion:
the modes a model's modules had (:func:`module_modes`), given back and followed by the modules the conversion
created (:func:`restore_modes`)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["device_of", "frozen", "model_input_shape", "module_modes", "restore_modes", "training_mode"]


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


def module_modes(model: nn.Module) -> dict[nn.Module, bool]:
    """Every submodule's train/eval flag, by module (a module hashes by identity): what :func:`restore_modes` gives
    back after a conversion."""
    return {m: m.training for m in model.modules()}


def restore_modes(root: nn.Module, modes: Mapping[nn.Module, bool], default: bool | None = None) -> nn.Module:
    """After a method patched a model (every ``apply``/``convert`` ends with it): the model runs in the mode it was
    in. Returns ``root``.

    ``modes``: :func:`module_modes` of the model before the call. Each module recorded there gets its own flag back
    (a user's mixed modes stay as they were: BatchNorm frozen in eval mode inside a training model, Monte-Carlo
    dropout on in an eval model). Each module of ``root`` not recorded there, one the call created (LTM's merge
    sites, ReViT's TAL-LN banks and wrapper; a fresh ``nn.Module`` starts in training mode), takes the mode of the
    nearest recorded module above it: the model's own mode, unless the user put that part of the model in another
    (a frozen stage in eval mode keeps merging there deterministic). ``default``: the mode of a new ``root``, a
    wrapper the call put around the model (pass the model's mode before the call)."""
    seen: set[nn.Module] = set()
    stack = [(root, root.training if default is None else default)]
    while stack:
        module, mode = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        module.training = modes.get(module, mode)
        stack.extend((child, module.training) for child in module.children())
    return root


def model_input_shape(model: nn.Module) -> tuple[int, int, int | None]:
    """(channels, side, frames) ``model`` takes, read from the model itself: a transformers encoder's config
    (``image_size``, ``num_channels``; of its ``vision_config`` for a CLIP or SigLIP classifier, of ``hf`` for
    tokenthrift's ``TransformersClassifier``), else its patch embedding's size and channels (timm ViTs and Evas, the
    TimeSformer), else the size timm recorded at its creation (``img_size``: a NaFlexViT built for one), else its
    cfg's input size (a NaFlexViT built without one, which takes any size: its weights' nominal size, as timm's data
    config has it); frames None for an image model."""
    config = _vision_config(model)
    if config is not None:
        size = config.image_size
        return int(getattr(config, "num_channels", 3)), int(size if isinstance(size, int) else size[0]), None
    try:  # recent timm: the size the model was built for where it recorded one, else its cfg's
        from timm.models import get_model_input_config as input_config
    except ImportError:  # older timm: the cfg's
        from timm.data import resolve_model_data_config as input_config
    c, h, _ = input_config(model)["input_size"]
    pe = getattr(model, "patch_embed", None)
    if getattr(pe, "img_size", None):
        h = pe.img_size[0]
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        c = proj.in_channels
    return int(c), int(h), getattr(model, "num_frames", None)


def _vision_config(model: nn.Module):
    """The config of a transformers vision model that states its image size (duck-typed: measure knows no host),
    or None for any other model."""
    for m in (model, getattr(model, "hf", None)):
        config = getattr(m, "config", None)
        config = getattr(config, "vision_config", None) or config
        if config is not None and getattr(config, "image_size", None):
            return config
    return None


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
