"""How a method plugs into the engine: a small protocol, no flags in the training loop.

The engine calls, in order: ``attach(model)`` once before DDP wrapping, ``on_epoch_start(epoch)``,
``on_step(progress)`` before every step (``progress`` = fractional epoch), ``loss(model, images,
targets, criterion)`` for every batch, ``log()`` for the per-epoch record, and ``state_dict()`` /
``load_state_dict()`` for checkpoints.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import toe
from .config import TrainConfig


class Method:
    """Plain full-token training; the base every method extends."""

    name = "full"

    def attach(self, model: nn.Module) -> None:
        pass

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_step(self, progress: float) -> None:
        pass

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
             criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        out = model(images)
        if isinstance(out, (tuple, list)):  # distilled DeiT in distilled-training mode: both heads
            return sum(criterion(o, targets) for o in out) / len(out)
        return criterion(out, targets)

    def log(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TokenExpansion(Method):
    """ToE (SPEC §2): fewer tokens after block 0 in training, grown stage by stage."""

    name = "toe"

    def __init__(self, cfg: TrainConfig):
        self.kwargs = dict(r0=cfg.toe_r0, keep_rates=cfg.toe_keep_rates, milestones=cfg.toe_milestones,
                           k=cfg.toe_k, distance=cfg.toe_distance)
        self.step_schedule = cfg.toe_step_schedule
        toe.ToESchedule(**self.kwargs)  # validate the flags before any model is built
        self.handle: toe.ToEHandle | None = None

    def attach(self, model: nn.Module) -> None:
        self.handle = toe.apply(model, **self.kwargs)

    def on_epoch_start(self, epoch: int) -> None:
        self.handle.set_epoch(epoch)

    def on_step(self, progress: float) -> None:
        if self.step_schedule:
            self.handle.set_epoch(progress)

    def log(self) -> dict:
        return {"toe_stage": self.handle.stage, "toe_keep_rate": self.handle.keep_rate}

    def state_dict(self) -> dict:
        return {"schedule": self.handle.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.handle.load_state_dict(state["schedule"])


METHODS: dict[str, Callable[[TrainConfig], Method]] = {
    "full": lambda cfg: Method(),
    "toe": TokenExpansion,
}


def build_method(cfg: TrainConfig) -> Method:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg)
