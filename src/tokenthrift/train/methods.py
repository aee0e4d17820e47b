"""How a method plugs into the engine: a small protocol, no flags in the training loop.

The engine calls, in order: ``model = attach(model)`` once before DDP wrapping (a method may patch the
model in place or return a new module that wraps it), ``on_epoch_start(epoch)``,
``on_step(progress)`` before every step (``progress`` = fractional epoch), ``forward_backward(net,
images, targets, criterion, autocast, backward)`` for every batch (by default: ``loss()`` under
autocast, then ``backward(loss)``; a method may override it to back-propagate in parts), ``log()`` for
the per-epoch record, and ``state_dict()`` / ``load_state_dict()`` for checkpoints.
"""
from __future__ import annotations

from typing import Callable, ContextManager

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import measure, toe
from ..data import DatasetInfo
from ..errors import InvalidArgumentError
from .config import TrainConfig
from .models import build_model


class Method:
    """Plain full-token training; the base every method extends."""

    def __init__(self, cfg: TrainConfig | None = None):
        pass

    name = "full"
    train_augment = "standard"  # the training transform (tokenthrift.data.build_transform)
    train_part = "fit"  # which part of the training split to train on: all but the held-out slice

    def create_model(self, cfg: TrainConfig) -> nn.Module:
        """The model to train (default: ``timm.create_model`` with the config's overrides)."""
        return build_model(cfg)

    def datasets(self, train_ds: Dataset, eval_ds: Dataset, info: DatasetInfo) -> tuple[Dataset, Dataset, DatasetInfo]:
        """A chance to relabel or wrap the datasets (default: unchanged)."""
        return train_ds, eval_ds, info

    def attach(self, model: nn.Module) -> nn.Module:
        return model

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

    def forward_backward(self, net: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                         criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         autocast: Callable[[], ContextManager], backward: Callable[[torch.Tensor], None]
                         ) -> torch.Tensor:
        """One step's forward and backward; returns the (detached) loss to log. ``backward(loss)``
        applies the engine's gradient scaling; ``net`` may be DDP-wrapped (``net.no_sync()``)."""
        with autocast():
            loss = self.loss(net, images, targets, criterion)
        backward(loss)
        return loss.detach()

    def train_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> float:
        """Forward MACs per image of one training step at the method's current state (SPEC §1)."""
        return measure.macs(model, input_size, train=True)

    def baseline_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> tuple[float, str]:
        """What the training MACs of this method are compared with: the MACs per image of a training
        forward of the plain full-token model, and a short description of it for the end-of-run line."""
        return measure.macs(model, input_size, train=True), "a full-token training forward"

    def evaluate(self, model: nn.Module, run: Callable[..., float]) -> dict:
        """Top-1 metrics of ``model``; ``run(model, **forward_kwargs)`` returns the top-1 (%) of
        ``model(images, **forward_kwargs)`` over the eval set, with the model in eval mode."""
        return {"top1": run(model)}

    def log(self) -> dict:
        """Extra fields for the epoch's record, called after the epoch's training steps."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @classmethod
    def restore(cls, cfg: TrainConfig, state: dict) -> Method:
        """The method of a saved run (``state``: its ``state_dict()``), ready for ``create_model`` and
        ``attach`` to rebuild the trained model without the inputs only its training needed
        (:func:`~tokenthrift.train.load_trained`)."""
        return cls(cfg)


class TokenExpansion(Method):
    """ToE (SPEC §2): fewer tokens after block 0 in training, grown stage by stage."""

    name = "toe"

    def __init__(self, cfg: TrainConfig):
        self.kwargs = dict(r0=cfg.toe_r0, keep_rates=cfg.toe_keep_rates, milestones=cfg.toe_schedule_milestones(),
                           k=cfg.toe_k, distance=cfg.toe_distance)
        self.step_schedule = cfg.toe_step_schedule
        toe.ToESchedule(**self.kwargs)  # validate the flags before any model is built
        self.handle: toe.ToEHandle | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        self.handle = toe.apply(model, **self.kwargs)
        return model

    def on_epoch_start(self, epoch: int) -> None:
        self.handle.set_epoch(epoch)

    def on_step(self, progress: float) -> None:
        if self.step_schedule:
            self.handle.set_epoch(progress)

    def baseline_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> tuple[float, str]:
        """The same model without the ToE reduction (its eval-mode forward keeps every token)."""
        return measure.macs(model, input_size), "a full-token training forward of the same model"

    def log(self) -> dict:
        return {"toe_stage": self.handle.stage, "toe_keep_rate": self.handle.keep_rate}

    def state_dict(self) -> dict:
        return {"schedule": self.handle.state_dict(), "step_schedule": self.step_schedule}

    def load_state_dict(self, state: dict) -> None:
        saved = state["schedule"]
        flags = {"toe_r0": "r0", "toe_keep_rates": "keep_rates", "toe_milestones": "milestones", "toe_k": "k",
                 "toe_distance": "distance"}
        ours = toe.ToESchedule(**self.kwargs).state_dict()
        differ = [f"--{flag.replace('_', '-')} {_show(saved[key])} (this run: {_show(ours[key])})"
                  for flag, key in flags.items() if saved[key] != ours[key]]
        if state.get("step_schedule", self.step_schedule) != self.step_schedule:
            differ.append(f"--toe-step-schedule {state['step_schedule']} (this run: {self.step_schedule})")
        if differ:
            raise InvalidArgumentError("the checkpoint was trained with other ToE settings: " + "; ".join(differ) +
                             ". Resume with the checkpoint's settings (a different schedule is a different run)")
        self.handle.load_state_dict(saved)


def _show(value) -> str:
    return " ".join(f"{v:g}" for v in value) if isinstance(value, (tuple, list)) else str(value)


def method_class(name: str) -> type[Method]:
    """The Method class registered as ``name`` (revit, tla and ltm are imported on demand: their packages
    import the engine's pieces)."""
    if name == "full":
        return Method
    if name == "toe":
        return TokenExpansion
    if name in ("revit", "tla"):
        from ..revit.methods import ReViTMethod, TLAMethod
        return ReViTMethod if name == "revit" else TLAMethod
    if name == "ltm":
        from ..ltm.methods import LTMMethod
        return LTMMethod
    raise InvalidArgumentError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")


METHODS = ("full", "toe", "revit", "tla", "ltm")


def build_method(cfg: TrainConfig) -> Method:
    return method_class(cfg.method)(cfg)
