"""ToMe as a training-engine method: the model trains (or fine-tunes) with ToMe applied, as it will run.

Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023 (training with ToMe: their §4.3). docs/methods.md §5.
ToMe adds no parameters, so a ``--method tome`` checkpoint's weights load into the plain model too.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ... import measure, tome
from ...errors import InvalidArgumentError
from ...hosts import host_of
from ...tokens import picture_sites
from ..config import TrainConfig, option
from ..protocol import Method, PictureOptions, Variant

__all__ = ["ToMeMethod", "ToMeOptions", "r_for_macs"]


@dataclass
class ToMeOptions:
    r: int = option(8, "tokens merged away per block (training and inference)", preview=True)
    prop_kernel: str = option("auto", "how proportional attention reaches the fused kernel: fold (a q/k channel), "
                              "mask, or auto (fold on CUDA, mask elsewhere)", preview=True)

    def __post_init__(self) -> None:
        self.r = int(self.r)
        if self.r < 0:
            raise InvalidArgumentError(f"--tome-r {self.r}: the tokens merged per block, 0 or more")
        if self.prop_kernel not in tome.PROP_KERNELS:
            raise InvalidArgumentError(f"--tome-prop-kernel {self.prop_kernel!r}: choose one of "
                                       f"{', '.join(tome.PROP_KERNELS)}")


def r_for_macs(model: nn.Module, size: tuple[int, ...], target_macs: float, max_r: int) -> tuple[int, float]:
    """The uniform ToMe r whose MACs come closest to ``target_macs``, and those MACs (MACs fall as r grows:
    bisection, then the better of the two neighbours)."""
    cache: dict[int, float] = {}

    def macs_at(r: int) -> float:
        if r not in cache:
            cache[r] = measure.macs(tome.merging_copy(model, r), size)
        return cache[r]

    lo, hi = 0, max_r  # macs_at(lo) >= target, as far as known
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if macs_at(mid) >= target_macs:
            lo = mid
        else:
            hi = mid
    r = min((lo, hi), key=lambda q: abs(macs_at(q) - target_macs))
    return r, macs_at(r)


class ToMeMethod(Method):
    """ToMe (docs/methods.md §5): ``--tome-r`` tokens merged away per block, in training and at inference; the
    harness's reference (compare runs it off the shelf and at every other method's MACs)."""

    name = "tome"
    summary = "Token Merging, training-free or trained with it"
    label = "ToMe"
    order = 50
    Options = ToMeOptions
    picture_flags = ("sites",)
    plain_inference = False  # its inference merges: a checkpoint is not drawn as another method's preview
    tasks = ("classification",)
    reference = True
    shelf_option, shelf_values = "r", (2, 4, 8)

    def __init__(self, cfg: TrainConfig | None = None):
        super().__init__(cfg)
        self.r, self.prop_kernel = self.options.r, self.options.prop_kernel

    def attach(self, model: nn.Module) -> nn.Module:
        tome.apply(model, self.r, prop_kernel=self.prop_kernel)
        return model

    def inference_model(self, model: nn.Module) -> nn.Module:
        return tome.merging_copy(model, self.r, prop_kernel=self.prop_kernel)

    def baseline_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> tuple[float, str]:
        """A training forward of the same model without merging."""
        return measure.macs(_plain(model), input_size, train=True), "a training forward of the same model unmerged"

    def variants(self, model: nn.Module, input_size: tuple[int, ...]) -> list[Variant]:
        label = f"ToMe r={self.r}" + (" (trained with it)" if self.trained else "")
        return [_merged(_plain(model), model, input_size, label, self.r, match=True)]

    def off_the_shelf(self, model: nn.Module, input_size: tuple[int, ...], value: int) -> Variant:
        return _merged(model, tome.merging_copy(model, int(value), prop_kernel=self.prop_kernel), input_size,
                       f"ToMe r={value} (off the shelf)", int(value))

    def matched(self, model: nn.Module, input_size: tuple[int, ...], macs: float) -> Variant:
        """ToMe at the uniform r whose MACs come closest to ``macs`` (:func:`r_for_macs`)."""
        host = host_of(model, "ToMe")
        P = host.num_prefix_tokens
        r, _ = r_for_macs(model, input_size, macs, tome.largest_r(host.num_patches + P, P, len(host.blocks)))
        return _merged(model, tome.merging_copy(model, r, prop_kernel=self.prop_kernel), input_size,
                       f"ToMe r={r}", r)

    def draw(self, model: nn.Module, cfg: TrainConfig, images: torch.Tensor, options: PictureOptions) -> Path:
        """Where the patches went: after the first, middle and last merging block (or ``options.sites``,
        ``blocks.K``), every token's patches filled with their mean and outlined, with the agreement of the
        partitions across the images drawn (:func:`measure.merge_agreement`)."""
        from ... import viz

        merged = model if tome.get_handle(model) is not None else self.inference_model(model)
        merging = [k for k, r in enumerate(tome.get_handle(merged).schedule()) if r > 0]
        if options.sites:
            names = {f"blocks.{k}": k for k in range(len(merged.blocks))}
            unknown = [s for s in options.sites if s not in names]
            if unknown:
                raise InvalidArgumentError(f"--sites {' '.join(unknown)}: a ToMe site is a block, blocks.0 to "
                                           f"blocks.{len(merged.blocks) - 1}")
            blocks = [names[s] for s in options.sites]
        elif merging:
            blocks = picture_sites(merging)
        else:
            raise InvalidArgumentError("ToMe merges nothing at --tome-r 0: give --tome-r 1 or more")
        groups = tome.patch_groups(merged, images, blocks)
        rows = [(f"after blocks.{k}\n{tokens} tokens", ids) for k, ids, tokens in groups]
        agreement = [measure.merge_agreement(ids.flatten(1)) for _, ids in rows] if len(images) > 1 else None
        title = (f"{options.preview}ToMe r={self.r} on {options.label(cfg)}: each token's patches, filled with their "
                 "mean and outlined")
        return viz.plot_merge_maps(images, rows, options.out, title, agreement, captions=options.captions)

    def state_dict(self) -> dict:
        return {"r": self.r}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("r", self.r)) != self.r:
            raise InvalidArgumentError(f"the checkpoint was trained with --tome-r {state['r']}, this run asks for "
                                       f"{self.r}; resume with the same --tome-r")

    @classmethod
    def restore(cls, cfg: TrainConfig, state: dict) -> ToMeMethod:
        return cls(cfg)


def _merged(plain: nn.Module, merged: nn.Module, input_size: tuple[int, ...], label: str, r: int,
            match: bool = False) -> Variant:
    """A ToMe model against its plain model, with the same-shape oracle."""
    return Variant(label, merged, measure.macs(merged, input_size), columns={"r": r}, baseline=plain,
                   oracle=measure.TokenCutOracle.of(plain, merged, input_size, host_of(plain)), match=match)


def _plain(model: nn.Module) -> nn.Module:
    """``model`` without ToMe (a copy when it is patched)."""
    if tome.get_handle(model) is None:
        return model
    return tome.remove(copy.deepcopy(model))
