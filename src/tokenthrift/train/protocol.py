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
from .config import NoOptions, TrainConfig


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
    """What an evaluation hands a variant's own scoring (:attr:`Variant.score`, for a model whose outputs are not
    the data's classes): ``top1(model, **forward_kwargs)`` (top-1 % on the evaluation images, model in eval
    mode), the loader and device behind it, and the options only some methods take (``labels``: a token-length
    label file; ``data``: another dataset than the run's; ``test_crops``: views per clip)."""
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
    """One way a model runs under a method (a ReViT grid, an LTM model merged, ToMe at an r, a ToE stage in
    training): a label, the model and the keywords of its forward, its MACs per image, and ``baseline``: the same
    model without the method (what its MACs ratio and its speed are measured against; None: the first variant of
    its list). ``columns``: what only this method's rows show (grid, r, ...); ``match``: the harness also runs the
    reference method (ToMe) at this variant's MACs; ``oracle``: a merging ViT's same-shape oracle, timed beside it
    (:class:`~tokenthrift.measure.TokenCutOracle`); ``train``: a training step (fwd + bwd) is what it changes, so
    that is what ``bench`` times; ``top1``: its accuracy when already known (a cascade scored from the grids'
    outcomes); ``score``: its own scoring for ``eval`` when its outputs are not the data's classes."""
    label: str
    model: nn.Module | None
    macs: float
    kwargs: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)
    baseline: nn.Module | None = None
    baseline_macs: float | None = None  # the baseline's MACs where they are not the whole baseline's (a backbone's)
    match: bool = True
    oracle: nn.Module | None = None
    train: bool = False
    top1: float | None = None
    score: Callable[[EvalContext], dict] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, **self.kwargs)

    def forward_model(self) -> nn.Module:
        """The model with this variant's forward keywords fixed (what is timed and exported)."""
        return measure.FixedForward(self.model, **self.kwargs).eval() if self.kwargs else self.model


@dataclass
class HarnessContext:
    """What ``tokenthrift compare`` hands a method for the variants that need the evaluation data: ``top1(fn)``
    on the shared evaluation images, their loader, the input size, and every loaded run as (model, cfg,
    method), for a method whose variants need another run (an assigner needs its ReViT)."""
    top1: Callable[..., float]
    loader: DataLoader
    input_size: tuple[int, ...]
    runs: Sequence[tuple[nn.Module, TrainConfig, Method]] = ()


@dataclass
class PictureOptions:
    """What ``tokenthrift visualize`` asks of a method's picture: the PNG to write and the options only some
    pictures take (``stage``: a ToE stage; ``sites``: merge sites; ``assigner``: a token-length assigner whose
    picks a ReViT picture marks); ``captions``: a line under each image (its class); ``model``: how the title
    names the model (default the config's model name); ``preview``: a title prefix saying that the picture shows
    a method the drawn model was not trained with."""
    out: str | Path
    stage: int | None = None
    sites: Sequence[str] | None = None
    assigner: nn.Module | None = None
    captions: Sequence[str] | None = None
    model: str | None = None
    preview: str = ""

    def label(self, cfg: TrainConfig) -> str:
        return self.model or cfg.model


PICTURE_OPTIONS = ("stage", "sites", "assigner")  # the visualize options some method's picture takes


class Method:
    """Plain full-token training; the base every method extends.

    A method is described to the configuration by its class attributes (``name``, ``summary``, ``label``,
    ``Options``: the dataclass of its options, each a :func:`~tokenthrift.train.config.option` with its help),
    to the engine by the training hooks, and to the entry points by one inference description: the variants a
    trained model offers (:meth:`variants`; in training, :meth:`training_variants`), from which ``eval``,
    ``compare``, ``export``, ``bench`` and ``macs`` build their rows, and its picture (:meth:`draw`). No entry
    point knows a method by name."""

    name = "full"
    summary = "plain training, every token"
    label = "full tokens"
    order = 0  # where the method is listed
    Options: type = NoOptions
    previewable = True  # macs / bench / export / visualize can show it on an untrained model (:meth:`preview`)
    plain_inference = True  # a trained model runs as the plain model (full tokens, ToE): drawn as another method's preview
    picture_flags: tuple[str, ...] = ()  # the visualize options (of PICTURE_OPTIONS) its picture takes
    tasks: tuple[str, ...] = ("classification", "detection")  # the tasks (train/tasks.py) it trains
    train_augment = "standard"  # the training transform (tokenthrift.data.build_transform)
    train_part = "fit"  # which part of the training split to train on: all but the held-out slice
    data_classes = True  # the trained model's outputs are the data's classes (an assigner's are token grids)
    reference = False  # the harness's reference: compare runs it at every other method's MACs (:meth:`matched`)
    shelf_option: str | None = None  # an option compare varies to show the method off the shelf (:meth:`off_the_shelf`)
    shelf_values: tuple = ()  # ... and its default values there
    legacy_onnx = True  # the TorchScript-based ONNX exporter writes its models right
    default_for: tuple[str, ...] = ()  # the entry points that show it on an untrained model when none is named
    trained = False  # set on the adapter of a loaded run (train.engine.load_run): its model trained with it

    def __init__(self, cfg: TrainConfig | None = None):
        self.options = cfg.options if cfg is not None and isinstance(cfg.options, self.Options) else self.Options()
        self.task = cfg.task if cfg is not None else "classification"

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """A plain run's model is this method's at inference (a registered merging model: it merges by itself)."""
        return False

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
        """The ways a trained model of this method runs at inference (default: the model as it is; a detector's
        MACs are its backbone's, with the FPN)."""
        counted = model.backbone if self.task == "detection" else model
        return [Variant(self.label, model, measure.macs(counted, input_size), match=False)]

    def preview_variants(self, model: nn.Module, input_size: tuple[int, ...]) -> list[Variant]:
        """What ``macs``, ``bench`` and ``export`` show of this method on an untrained (or pretrained) ``model``:
        the variants of its :meth:`inference_model` (the entry points add a row for each one's baseline)."""
        return self.variants(self.inference_model(model), input_size)  # the entry points add the baseline's row

    def training_variants(self, model: nn.Module, input_size: tuple[int, ...]) -> list[Variant]:
        """What a training method changes, step by step (ToE's stages), for ``macs`` and ``bench``; empty for a
        method whose effect is at inference (default)."""
        return []

    def harness_variants(self, model: nn.Module, cfg: TrainConfig, ctx: HarnessContext) -> list[Variant]:
        """Variants that need the evaluation data or another run (a calibrated cascade, an assigner with its
        ReViT), for ``compare``; none by default."""
        return []

    def off_the_shelf(self, model: nn.Module, input_size: tuple[int, ...], value) -> Variant:
        """The method applied to a trained plain ``model`` without training, at ``shelf_option`` = ``value``."""
        raise UnsupportedModelError(f"--method {self.name} is not applied off the shelf")

    def matched(self, model: nn.Module, input_size: tuple[int, ...], macs: float) -> Variant:
        """The reference method on a plain ``model`` at the setting whose MACs come closest to ``macs``."""
        raise UnsupportedModelError(f"--method {self.name} is not the harness's reference")

    def detector_maps(self, detector: nn.Module, images: list[torch.Tensor]) -> list:
        """Pictures of what the method does inside a detector's backbone, for ``visualize`` (none by default)."""
        return []

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
