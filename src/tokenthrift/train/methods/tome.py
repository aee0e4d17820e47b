"""ToMe as a training-engine method: the model trains (or fine-tunes) with ToMe applied, as it will run.

Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023 (training with ToMe: their §4.3). docs/methods.md §5.
ToMe adds no parameters, so a ``--method tome`` checkpoint's weights load into the plain model too.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ... import measure, tome
from ...errors import InvalidArgumentError
from ..config import TrainConfig
from ..protocol import Method, Variant

__all__ = ["ToMeMethod"]


class ToMeMethod(Method):
    """ToMe (docs/methods.md §5): ``tome_r`` tokens merged away per block, in training and at inference."""

    name = "tome"
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
                        oracle=measure.TokenCutOracle.of(plain, model, input_size))]

    def macs_rows(self, model: nn.Module, input_size: tuple[int, ...], cfg: TrainConfig) -> list[dict]:
        base, merged = model, self.inference_model(model)
        base_macs, macs = measure.macs(base, input_size), measure.macs(merged, input_size)
        return [{"model": cfg.model, "r": 0, "GMACs": base_macs / 1e9, "MACs_ratio": 1.0},
                {"model": f"ToMe {cfg.model}", "r": self.r, "GMACs": macs / 1e9, "MACs_ratio": macs / base_macs}]

    def bench_rows(self, model: nn.Module, input_size: tuple[int, ...], batch_size: int, warmup: int = 2,
                   repeats: int = 5, dtype: torch.dtype | None = None, compile: bool = False
                   ) -> tuple[list[dict], str]:
        return measure.merging_speed_rows(model, self.inference_model(model), input_size, batch_size, warmup=warmup,
                                          repeats=repeats, dtype=dtype, compile=compile, label=f"ToMe r={self.r}",
                                          oracle=True), "inference (no grad)"

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
