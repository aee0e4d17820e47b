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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from .. import measure
from ..data import DatasetInfo, Preprocess
from ..errors import InvalidArgumentError, UnsupportedModelError
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


@dataclass
class Variant:
    """One way a trained model runs at inference (a ReViT grid, an LTM model merged): a label, the model and the
    keywords of its forward, its MACs per image, and the columns only this method's ``eval`` rows have."""
    label: str
    model: nn.Module
    macs: float
    kwargs: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)
    match_tome: bool = True  # compare: also run ToMe at this variant's MACs
    oracle: nn.Module | None = None  # a merging ViT: its same-shape oracle (measure.TokenCutOracle), to time

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, **self.kwargs)


@dataclass
class CompareContext:
    """What ``tokenthrift compare`` hands a method: ``top1(fn)`` on the shared evaluation images, their loader,
    the input size, the ToMe r values of the off-the-shelf rows, and every loaded run as (model, cfg, method),
    for a method whose rows need another run (an assigner needs its ReViT)."""
    top1: Callable[..., float]
    loader: DataLoader
    input_size: tuple[int, ...]
    tome_r: tuple[int, ...]
    runs: Sequence[tuple[nn.Module, TrainConfig, Method]] = ()


@dataclass
class PictureOptions:
    """What ``tokenthrift visualize`` asks of a method's picture: the PNG to write and the options only some
    pictures take (``stage``: a ToE stage; ``sites``: LTM merge-site prefixes; ``assigner``: a token-length
    assigner whose picks a ReViT picture marks); ``captions``: a line under each image (its class); ``model``:
    how the title names the model (default the config's model name); ``preview``: a title prefix saying that
    the picture shows a method the drawn model was not trained with."""
    out: str | Path
    stage: int | None = None
    sites: Sequence[str] | None = None
    assigner: nn.Module | None = None
    captions: Sequence[str] | None = None
    model: str | None = None
    preview: str = ""

    def label(self, cfg: TrainConfig) -> str:
        return self.model or cfg.model


def comparison_row(label: str, kind: str, variant: Variant, top1: float, match_tome: bool = True, **extra) -> dict:
    """One ``compare`` row: label, method, top-1, MACs, the callable to time and whether ToMe is matched to it."""
    return {"model": label, "kind": kind, "top1": top1, "MMACs": variant.macs / 1e6, "net": variant,
            "match_tome": match_tome, **extra}


class Method:
    """Plain full-token training; the base every method extends.

    Besides the training hooks, every method owns its inference side: the variants a trained model offers
    (:meth:`variants`), its rows for ``eval`` (:meth:`evaluation_rows`), ``compare`` (:meth:`comparison_rows`),
    ``macs`` (:meth:`macs_rows`) and ``bench`` (:meth:`bench_rows`), and its ``visualize`` picture
    (:meth:`draw`), so that no entry point needs to know a method by name."""

    def __init__(self, cfg: TrainConfig | None = None):
        pass

    name = "full"
    previewable = True  # macs / bench / visualize can show it on an untrained model (:meth:`preview`)
    plain_inference = True  # a trained model runs as the plain model (full tokens, ToE): drawn as another method's preview
    picture_flags: tuple[str, ...] = ()  # the visualize options its picture takes (others are refused)
    tasks: tuple[str, ...] = ("classification", "detection")  # the tasks (train/tasks.py) it trains
    train_augment = "standard"  # the training transform (tokenthrift.data.build_transform)
    train_part = "fit"  # which part of the training split to train on: all but the held-out slice
    data_classes = True  # the trained model's outputs are the data's classes (an assigner's are token grids)

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

    # ------------------------------------------------------------------ inference side
    @classmethod
    def preview(cls, cfg: TrainConfig, epochs: int | None = None) -> Method:
        """The method as ``macs``, ``bench`` and ``visualize`` show it on an untrained model built from ``cfg``
        (``epochs``: a training length, for methods with a schedule)."""
        if epochs is not None:
            raise InvalidArgumentError(f"--epochs sets the length of a training schedule; --method {cls.name} has none")
        return cls(cfg)

    def inference_model(self, model: nn.Module) -> nn.Module:
        """What an untrained ``model`` runs at inference under this method (default: itself)."""
        return model

    def variants(self, model: nn.Module, input_size: tuple[int, ...]) -> list[Variant]:
        """The ways a trained model of this method runs at inference (default: the model as it is)."""
        return [Variant("full tokens", model, measure.macs(model, input_size), match_tome=False)]

    def evaluation_rows(self, model: nn.Module, input_size: tuple[int, ...], ctx: EvalContext) -> list[dict]:
        """The rows ``tokenthrift eval`` prints for a trained model of this method: one per variant, its
        top-1 and MACs."""
        self.refuse_eval_options(ctx)
        return [{**v.columns, "images": ctx.images, "top1": ctx.top1(v.model, **v.kwargs), "GMACs": v.macs / 1e9}
                for v in self.variants(model, input_size)]

    def comparison_rows(self, model: nn.Module, cfg: TrainConfig, ctx: CompareContext) -> list[dict]:
        """The rows ``tokenthrift compare`` adds for a trained run of this method: one per variant, with what
        to time (``net``) and whether ToMe is run at its MACs (``match_tome``)."""
        return [comparison_row(v.label if v.label != "full tokens" else f"full tokens, run {cfg.name or cfg.model} "
                               f"({cfg.epochs} epochs)", self.name, v, ctx.top1(v.model, **v.kwargs), v.match_tome)
                for v in self.variants(model, ctx.input_size)]

    def macs_rows(self, model: nn.Module, input_size: tuple[int, ...], cfg: TrainConfig) -> list[dict]:
        """``tokenthrift macs``: inference MACs and parameters (a detector: its backbone's and the whole one's)."""
        if cfg.task == "detection":
            return measure.detector_macs_rows(model, input_size=input_size, label=f"{cfg.model} + {cfg.backbone}")
        return [{"model": cfg.model, "input": "x".join(map(str, input_size)), "GMACs": measure.macs(model, input_size) / 1e9,
                 "params_M": sum(p.numel() for p in model.parameters()) / 1e6}]

    def bench_rows(self, model: nn.Module, input_size: tuple[int, ...], batch_size: int, warmup: int = 2,
                   repeats: int = 5, dtype: torch.dtype | None = None, compile: bool = False
                   ) -> tuple[list[dict], str]:
        """``tokenthrift bench``: measured speed of what the method changes against the model without it, in
        the same run (``compile``: both through ``torch.compile``), and what one timed step is (default: the
        model's inference throughput alone)."""
        ips = measure.throughput(model, input_size, batch_size, warmup=warmup, repeats=repeats, dtype=dtype,
                                 compile=compile)
        return [{"model": "full tokens", "mode": "compiled" if compile else "eager", "batch": batch_size,
                 "GMACs": measure.macs(model, input_size) / 1e9, "img_s": ips}], "inference (no grad)"

    def draw(self, model: nn.Module, cfg: TrainConfig, images: torch.Tensor, options: PictureOptions) -> Path:
        """``tokenthrift visualize``: a picture of what the method does to the tokens of ``images``."""
        raise UnsupportedModelError(f"--method {self.name} has no picture of its own")

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
