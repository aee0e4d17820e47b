"""How a method plugs into the engine: a small protocol, no flags in the training loop.

The engine calls, in order: ``model = attach(model)`` once before DDP wrapping (a method may patch the
model in place or return a new module that wraps it), ``on_epoch_start(epoch)``,
``on_step(progress)`` before every step (``progress`` = fractional epoch), ``forward_backward(net,
images, targets, criterion, autocast, backward)`` for every batch (by default: ``loss()`` under
autocast, then ``backward(loss)``; a method may override it to back-propagate in parts, running every
part but the last inside ``with backward.deferred():`` so that DDP all-reduces the gradients once, in the
last part: :class:`Backward`), ``log()`` for the per-epoch record, and ``state_dict()`` /
``load_state_dict()`` for checkpoints. ``net`` is what to call (possibly wrapped for DDP or compiled);
the module the method attached is the one it returned from ``attach``: the engine does the unwrapping.

:class:`Method` itself is plain full-token training; the adapters of :mod:`tokenthrift.train.methods`
extend it. This module imports no method library.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from .. import measure
from ..data import DatasetInfo, Preprocess
from ..errors import InvalidArgumentError
from .build import build_model
from .config import TrainConfig


class Backward:
    """The ``backward(loss)`` the engine hands to a method: gradient scaling, and DDP's gradient all-reduce
    once per step even when a method back-propagates in parts. Such a method runs every part but the last
    (its forward and its backward) inside ``with backward.deferred():``, which is DDP's ``no_sync``; the
    last part's backward then all-reduces what every part accumulated."""

    def __init__(self, net: nn.Module, scaler: torch.amp.GradScaler | None = None):
        self.net, self.scaler = net, scaler
        self._deferring = self._partial = False

    @contextmanager
    def deferred(self, defer: bool = True) -> Iterator[None]:
        """One part of a step without the all-reduce (a no-op when ``defer`` is False or without DDP)."""
        if not defer or not isinstance(self.net, DistributedDataParallel):
            yield
            return
        with self.net.no_sync():
            self._deferring = True
            try:
                yield
            finally:
                self._deferring, self._partial = False, True

    def __call__(self, loss: torch.Tensor) -> None:
        loss = self.scaler.scale(loss) if self.scaler is not None else loss
        if self._partial and not self._deferring:
            # DDP all-reduces only the parameters the synchronised backward reaches; those only earlier
            # parts reached join with weight 0, so their accumulated gradients are all-reduced too
            loss = loss + 0.0 * sum(p.sum() for p in self.net.parameters() if p.requires_grad)
            self._partial = False
        loss.backward()


@dataclass
class EvalContext:
    """What ``tokenthrift eval`` hands a method to score a trained model: ``top1(model, **forward_kwargs)``
    (top-1 % on the evaluation images, model in eval mode), the loader and device behind it, and the options
    only some methods take (``labels``: a token-length label file; ``data``: another dataset than the run's;
    ``test_crops``: views per clip)."""
    top1: Callable[..., float]
    loader: DataLoader
    device: torch.device
    labels: str | None = None
    data: str | None = None
    test_crops: int = 1

    @property
    def images(self) -> int:
        return len(self.loader.dataset)


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

    def preprocess(self, pre: Preprocess) -> Preprocess:
        """A chance to change how images are fed (default: as :func:`~tokenthrift.train.build.resolve_preprocess`
        chose, from the model's pretrained cfg or the dataset)."""
        return pre

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
        """Forward MACs per image of one training step at the method's current state (docs/methods.md §1)."""
        return measure.macs(model, input_size, train=True)

    def baseline_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> tuple[float, str]:
        """What the training MACs of this method are compared with: the MACs per image of a training
        forward of the plain full-token model, and a short description of it for the end-of-run line."""
        return measure.macs(model, input_size, train=True), "a full-token training forward"

    def evaluate(self, model: nn.Module, run: Callable[..., dict]) -> dict:
        """Evaluation metrics of ``model``: ``run(model, **forward_kwargs)`` returns the task's metrics of
        ``model(images, **forward_kwargs)`` over the eval set, the model in eval mode (``{"top1": %}`` for
        classification; COCO box and mask AP for detection)."""
        return run(model)

    def evaluation_rows(self, model: nn.Module, input_size: tuple[int, ...], ctx: EvalContext) -> list[dict]:
        """The rows ``tokenthrift eval`` prints for a trained model of this method: one per inference variant
        it offers (default: the model as it is, its top-1 and MACs)."""
        self.refuse_eval_options(ctx)
        return [{"images": ctx.images, "top1": ctx.top1(model), "GMACs": measure.macs(model, input_size) / 1e9}]

    def refuse_eval_options(self, ctx: EvalContext) -> None:
        if ctx.labels is not None:
            raise InvalidArgumentError(f"--labels scores a token-length assigner; this is a --method {self.name} run")

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
