"""ToMe as a training-engine method: the model trains (or fine-tunes) with ToMe applied, as it will run.

Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023 (training with ToMe: their §4.3). docs/methods.md §5.
ToMe adds no parameters, so a ``--method tome`` checkpoint's weights load into the plain model too.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ... import measure, tome
from ...errors import InvalidArgumentError
from ...hosts import host_of
from ...tokens import picture_sites
from ..config import TOME_FIELDS, TrainConfig
from ..protocol import Method, PictureOptions, Variant

__all__ = ["ToMeMethod"]


class ToMeMethod(Method):
    """ToMe (docs/methods.md §5): ``tome_r`` tokens merged away per block, in training and at inference."""

    name = "tome"
    picture_flags = ("sites", *TOME_FIELDS)
    plain_inference = False  # its inference merges: a checkpoint is not drawn as another method's preview
    tasks = ("classification",)

    def __init__(self, cfg: TrainConfig):
        self.r = int(cfg.tome_r)
        self.prop_kernel = cfg.tome_prop_kernel
        if self.r < 0:
            raise InvalidArgumentError(f"tome_r={self.r}: the tokens merged per block, 0 or more")

    def attach(self, model: nn.Module) -> nn.Module:
        tome.apply(model, self.r, prop_kernel=self.prop_kernel)
        return model

    def inference_model(self, model: nn.Module) -> nn.Module:
        return tome.merging_copy(model, self.r, prop_kernel=self.prop_kernel)

    def baseline_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> tuple[float, str]:
        """A training forward of the same model without merging."""
        return measure.macs(_plain(model), input_size, train=True), "a training forward of the same model unmerged"

    def variants(self, model: nn.Module, input_size: tuple[int, ...]) -> list[Variant]:
        plain = _plain(model)
        base, macs = measure.macs(plain, input_size), measure.macs(model, input_size)
        return [Variant(f"ToMe r={self.r} (trained with it)", model, macs,
                        columns={"r": self.r, "GMACs_unmerged": base / 1e9, "MACs_ratio": macs / base},
                        oracle=measure.TokenCutOracle.of(plain, model, input_size, host_of(plain)))]

    def macs_rows(self, model: nn.Module, input_size: tuple[int, ...], cfg: TrainConfig) -> list[dict]:
        base, merged = model, self.inference_model(model)
        base_macs, macs = measure.macs(base, input_size), measure.macs(merged, input_size)
        return [{"model": cfg.model, "r": 0, "GMACs": base_macs / 1e9, "MACs_ratio": 1.0},
                {"model": f"ToMe {cfg.model}", "r": self.r, "GMACs": macs / 1e9, "MACs_ratio": macs / base_macs}]

    def bench_rows(self, model: nn.Module, input_size: tuple[int, ...], batch_size: int, warmup: int = 2,
                   repeats: int = 5, dtype: torch.dtype | None = None, compile: bool = False
                   ) -> tuple[list[dict], str]:
        plain = _plain(model)  # a trained --method tome checkpoint is patched already
        return measure.merging_speed_rows(plain, self.inference_model(plain), input_size, batch_size, warmup=warmup,
                                          repeats=repeats, dtype=dtype, compile=compile, label=f"ToMe r={self.r}",
                                          oracle=host_of(plain)), "inference (no grad)"

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


def _plain(model: nn.Module) -> nn.Module:
    """``model`` without ToMe (a copy when it is patched)."""
    if tome.get_handle(model) is None:
        return model
    return tome.remove(copy.deepcopy(model))
