"""What several subcommands share, written once: the runtime flags (``--device``, ``--workers``, ``--batch-size``),
the flags that describe a model to build (a recipe, timm's model flags, a preview's ``--method`` and its options),
and the choice between a trained checkpoint and a model built from those flags (:func:`resolve_model`).

A flag that does not apply to what was asked (a model flag with a checkpoint, one method's option for another
method's preview) is an error, never silently ignored. The methods' flags and help texts come from the registered
adapters (:data:`tokenthrift.train.methods.METHODS`); this module names no method.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

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
from ..train.methods import METHODS, previewable

if TYPE_CHECKING:
    from torch import nn

    from ..train import TrainConfig
    from ..train.protocol import Method, Variant


def runtime_flags(p: argparse.ArgumentParser, device: str = "auto", batch: int = 256) -> None:
    """``--device``, ``--workers`` and ``--batch-size`` of a command that runs a checkpoint over a dataset."""
    p.add_argument("--device", default=device, help=f"auto (CUDA if present), cpu, cuda or cuda:N (default: {device})")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    p.add_argument("--batch-size", type=int, default=batch, help=f"images per batch (default: {batch})")


def default_preview(command: str) -> str:
    """The method a command shows on an untrained model when nothing names one (``Method.default_for``)."""
    return next((name for name, adapter in METHODS.items() if command in adapter.default_for), "full")


def method_flag(p: argparse.ArgumentParser, command: str, what: str = "") -> None:
    """``--method``: the method a preview shows on an untrained model (one of the previewable methods)."""
    p.add_argument("--method", choices=previewable(),
                   help=f"{what}{', '.join(previewable())} (default: the recipe's method if it is one of these, the "
                        f"method of a registered model that merges by itself (ltm_*), else {default_preview(command)})")


def model_flags(p: argparse.ArgumentParser, command: str, recipe: str, pretrained: bool = False,
                what: str = "") -> None:
    """The flags that describe a model to build: ``-c/--config`` (``recipe``: its help), timm's model flags
    (``pretrained``: and ``--pretrained``), ``--method`` (``what``: the start of its help) and the preview options
    of every previewable method."""
    p.add_argument("-c", "--config", help=recipe)
    add_config_arguments(p, only=MODEL_FIELDS + (("pretrained",) if pretrained else ()))
    method_flag(p, command, what)
    add_method_arguments(p, preview=True)


def device(name: str) -> str:
    """``--device`` resolved (``auto``: CUDA if present)."""
    from ..train.engine import resolve_device

    return str(resolve_device(name))


def method_of_flags(args: argparse.Namespace) -> str | None:
    """The method whose option flags were given without ``--method`` (one method's only), for a preview."""
    owners = {method_key(k)[0] for k in given_flags(args, method_flags())}
    return owners.pop() if len(owners) == 1 and not getattr(args, "method", None) else None


@dataclasses.dataclass
class ResolvedModel:
    """The model a command shows: a trained checkpoint as its method runs it (``trained``), or an untrained (or
    ``--pretrained``) model built from the flags, as the method that previews it shows it."""
    model: nn.Module
    cfg: TrainConfig
    size: tuple[int, ...]
    method: Method
    trained: bool

    def variants(self) -> list[Variant]:
        """The ways the model runs: a checkpoint's variants, or the preview's."""
        return (self.method.variants if self.trained else self.method.preview_variants)(self.model, self.size)


def resolve_model(args: argparse.Namespace, doing: str = "shown", default: str = "full",
                  epochs: int | None = None) -> ResolvedModel:
    """``--checkpoint`` (where the command has it, ``--ema`` its EMA weights) as it was trained, the flags that
    describe a model to build refused ("a checkpoint is ``doing`` as it was trained"); else the model the recipe and
    flags build, with the method that previews it (:func:`~tokenthrift.train.methods.preview_method`: ``--method``,
    the recipe's, the adapter that claims the model, else ``default``; ``epochs``: the training length a schedule
    is shown over), whose flags must belong to it."""
    if getattr(args, "checkpoint", None):
        from ..train import model_input_size
        from ..train.engine import load_run
        from ..train.methods import inference_method

        refuse_flags(args, [*MODEL_FIELDS, "pretrained", "config", *method_flags(preview=True), "method"],
                     f"describe a model to build; a checkpoint is {doing} as it was trained")
        model, cfg, trained = load_run(args.checkpoint, ema=getattr(args, "ema", False))
        return ResolvedModel(model, cfg, model_input_size(model, cfg), inference_method(cfg, model, trained), True)
    from ..train.methods import preview_method

    model, size, cfg = _built(args)
    method = preview_method(cfg, model, args.method, default, epochs)
    refuse_flags(args, [k for k in method_flags() if method_key(k)[0] != method.name],
                 f"apply to another method than the --method {method.name} shown")
    return ResolvedModel(model, cfg, size, method, False)


def _built(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, ...], TrainConfig]:
    """Model, input size and config from the recipe and flags: timm's defaults (the class count of the model's
    pretrained cfg, 1000 without one) unless overridden."""
    from timm.models import get_pretrained_cfg

    from ..train import build_model, model_input_size

    inferred = method_of_flags(args)
    cfg = config_from_args(args, num_classes=None, data="imagefolder:-", **({"method": inferred} if inferred else {}))
    if cfg.num_classes is None:
        pretrained_cfg = get_pretrained_cfg(cfg.model) if cfg.task == "classification" else None
        cfg = dataclasses.replace(cfg, num_classes=getattr(pretrained_cfg, "num_classes", None) or 1000)
    model = build_model(cfg)
    return model, model_input_size(model, cfg), cfg
