"""EViT-style attentive-token pruning as a training-engine method: the model fine-tunes (or trains) with its tokens
pruned as it will run, and runs off the shelf on any trained model with a class token.

Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations",
ICLR 2022. docs/methods.md §9. Pruning adds no parameters, so a ``--method evit`` checkpoint's weights load into
the plain model too.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ... import evit, measure
from ...errors import InvalidArgumentError
from ...hosts import host_of
from ...tokens import picture_sites
from ..config import TrainConfig, option
from ..protocol import Method, PictureOptions, Variant

__all__ = ["EViTMethod", "EViTOptions"]


@dataclass
class EViTOptions:
    keep_rate: float = option(0.7, "share of the patch tokens each pruning block keeps (those the class token "
                              "attends to most), in (0, 1]", preview=True)
    locations: tuple[int, ...] | None = option(None, "the pruning blocks, by index (default: those at 1/4, 1/2 and "
                                               "3/4 of the depth)", preview=True)
    fuse: bool = option(True, "fuse the pruned tokens into one token (--no-evit-fuse: drop them)", preview=True)
    fusion: str = option("sum", "how the pruned tokens are fused: sum (their sum weighted by the class token's "
                         "attention, the authors' code) or mean (that sum divided by the attention they hold, ours)",
                         preview=True, saved_default="mean")  # a run saved before this option fused by the mean

    def __post_init__(self) -> None:
        self.keep_rate = float(self.keep_rate)
        if not 0.0 < self.keep_rate <= 1.0:
            raise InvalidArgumentError(f"--evit-keep-rate {self.keep_rate}: the share of patch tokens each pruning "
                                       "block keeps, in (0, 1]")
        if self.fusion not in evit.FUSIONS:
            raise InvalidArgumentError(f"--evit-fusion {self.fusion}: one of {', '.join(evit.FUSIONS)}")
        if self.locations is not None:
            self.locations = tuple(int(i) for i in self.locations)

    def apply_kwargs(self) -> dict:
        return {"keep_rate": self.keep_rate, "locations": self.locations, "fuse": self.fuse, "fusion": self.fusion}


class EViTMethod(Method):
    """EViT (docs/methods.md §9): the class token's least attended patch tokens pruned (fused into one) in a few
    blocks, in training and at inference; off the shelf on any trained model with a class token."""

    name = "evit"
    summary = "attentive-token pruning (EViT): keep the tokens the class token attends to, fuse the rest"
    label = "EViT"
    order = 60
    Options = EViTOptions
    picture_flags = ("sites",)
    plain_inference = False  # its inference prunes: a checkpoint is drawn as such
    tasks = ("classification",)
    shelf_option, shelf_values = "keep_rate", (0.9, 0.7)
    legacy_onnx = False  # the TorchScript exporter fails on its boolean scatter (an internal assert in torch)

    def __init__(self, cfg: TrainConfig | None = None):
        super().__init__(cfg)
        self.kwargs = self.options.apply_kwargs()

    def attach(self, model: nn.Module) -> nn.Module:
        self.depth = len(evit.apply(model, **self.kwargs).host.blocks)  # what a default (None) resolves against
        return model

    def inference_model(self, model: nn.Module) -> nn.Module:
        return evit.pruning_copy(_plain(model), **self.kwargs)

    def baseline_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> tuple[float, str]:
        """A training forward of the same model without pruning."""
        return measure.macs(_plain(model), input_size, train=True), "a training forward of the same model unpruned"

    def variants(self, model: nn.Module, input_size: tuple[int, ...]) -> list[Variant]:
        label = f"EViT keep {self.options.keep_rate:g}" + (" (trained with it)" if self.trained else "")
        return [_pruned(_plain(model), model, input_size, label, match=True)]

    def off_the_shelf(self, model: nn.Module, input_size: tuple[int, ...], value: float) -> Variant:
        pruned = evit.pruning_copy(model, **{**self.kwargs, "keep_rate": float(value)})
        return _pruned(model, pruned, input_size, f"EViT keep {float(value):g} (off the shelf)", match=True)

    def draw(self, model: nn.Module, cfg: TrainConfig, images: torch.Tensor, options: PictureOptions) -> Path:
        """The patches kept after each pruning block (or ``options.sites``, ``blocks.K``), one cell each; the pruned
        ones fused into one token, filled with their mean and outlined as one group."""
        from ... import viz

        pruned = model if evit.get_handle(model) is not None else self.inference_model(model)
        handle = evit.get_handle(pruned)
        blocks = list(handle.locations)
        if options.sites:
            names = {f"blocks.{k}": k for k in blocks}
            unknown = [s for s in options.sites if s not in names]
            if unknown:
                raise InvalidArgumentError(f"--sites {' '.join(unknown)}: an EViT site is a pruning block, one of "
                                           f"{', '.join(names)}")
            blocks = [names[s] for s in options.sites]
        else:
            blocks = picture_sites(blocks)
        shown = []
        for block, kept, tokens in evit.kept_patches(pruned, images):
            if block in blocks:
                h, w = kept.shape[1:]
                own = torch.arange(h * w, device=kept.device).view(1, h, w).expand_as(kept)
                shown.append((f"after blocks.{block}\n{tokens} patch tokens", torch.where(kept, own, h * w)))
        title = (f"{options.preview}EViT keep {self.options.keep_rate:g} on {options.label(cfg)}: kept patches, the "
                 "pruned ones fused into one token (filled with their mean)")
        return viz.plot_merge_maps(images, shown, options.out, title, captions=options.captions)

    def state_dict(self) -> dict:
        return dict(self.kwargs)

    def load_state_dict(self, state: dict) -> None:
        def resolved(kwargs: dict) -> dict:  # locations None: the default blocks of the attached model's depth
            out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items() if k in self.kwargs}
            if out.get("locations") is None and hasattr(self, "depth"):
                out["locations"] = evit.default_locations(self.depth)
            return out

        saved = resolved(state)
        if saved != {k: v for k, v in resolved(self.kwargs).items() if k in saved}:
            raise InvalidArgumentError(f"the checkpoint was trained with EViT {saved}, this run asks for "
                                       f"{self.kwargs}; resume with the same --evit-* options")


def _pruned(plain: nn.Module, pruned: nn.Module, input_size: tuple[int, ...], label: str, match: bool) -> Variant:
    """A pruned model against its plain model, with the same-shape oracle."""
    handle = evit.get_handle(pruned)
    return Variant(label, pruned, measure.macs(pruned, input_size), baseline=plain, match=match,
                   columns={"keep_rate": handle.keep_rate, "blocks": " ".join(map(str, handle.locations))},
                   oracle=measure.TokenCutOracle.of(plain, pruned, input_size, host_of(plain)))


def _plain(model: nn.Module) -> nn.Module:
    """``model`` without EViT (a copy when it is patched)."""
    if evit.get_handle(model) is None:
        return model
    return evit.remove(copy.deepcopy(model))
