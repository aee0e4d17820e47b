"""Training-engine methods for ReViT + TLA (the :class:`tokenthrift.train.methods.Method` protocol).

Zhou & Zhu, "Make A Long Image Short: Adaptive Token Length for Vision Transformers", ECML-PKDD 2023
(arXiv 2307.02092). SPEC §3.

- :class:`ReViTMethod` trains a Resizable ViT: every step runs the batch at every grid (TLSD losses,
  summed; one optimiser step), optionally back-propagating grid by grid to cut peak memory.
- :class:`TLAMethod` trains the Token-Length Assigner on token-length labels made by
  :func:`tokenthrift.revit.assign_labels` (class-balanced CE optional).

Config fields read here (with ``getattr(cfg, name, default)``, so a config without them works):
``revit_grids`` (14, 10, 7), ``revit_tal_ln`` True, ``revit_tlsd`` True, ``revit_alpha`` 0.5,
``revit_tau`` 1.0, ``revit_per_grid_backward`` False; ``tla_labels`` (required), ``tla_eval_labels``
(required), ``tla_model`` (default :data:`~tokenthrift.revit.assigner.DEFAULT_ASSIGNER`), ``tla_scale``
0.5, ``tla_balanced`` False, ``tla_max_macs_fraction`` 0.02.
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from .. import measure
from ..data import DatasetInfo
from ..errors import InvalidArgumentError
from ..train.methods import Method
from ..train.models import build_model, model_input_size
from .assigner import (
    DEFAULT_ASSIGNER,
    MAX_MACS_FRACTION,
    TokenLengthAssigner,
    TokenLengthLabels,
    balanced_class_weights,
    check_assigner_budget,
    load_labels,
)
from .distill import TLSDLoss
from .model import DEFAULT_GRIDS, ResizableViT, check_grids, convert

__all__ = ["ReViTMethod", "TLAMethod", "RelabeledDataset"]

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _heads(out) -> tuple[torch.Tensor, ...]:
    """Model output -> tuple of logits (a distilled DeiT in distilled-training mode has two heads)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _unwrap(net: nn.Module) -> nn.Module:
    """The ResizableViT inside a DDP and/or torch.compile wrapper."""
    net = net.module if isinstance(net, DistributedDataParallel) else net
    return getattr(net, "_orig_mod", net)


class ReViTMethod(Method):
    """Train a Resizable ViT with TAL-LN and TLSD (SPEC §3).

    ``attach`` converts the timm ViT (:func:`tokenthrift.revit.convert`). Each step runs the same batch
    at every grid, largest first. Default: one backward of the summed loss. With
    ``revit_per_grid_backward``: the largest grid runs and back-propagates first, its logits detached
    as the teacher; then each smaller grid runs and back-propagates on its own, so only one grid's
    activations are alive at a time. The gradients are the same sum; the engine still takes one
    optimiser step. Under DDP all but the last backward run in ``no_sync()``.
    """

    name = "revit"

    def __init__(self, cfg):
        self.grids = check_grids(getattr(cfg, "revit_grids", DEFAULT_GRIDS))
        self.tal_ln = bool(getattr(cfg, "revit_tal_ln", True))
        self.per_grid_backward = bool(getattr(cfg, "revit_per_grid_backward", False))
        self.tlsd = TLSDLoss(alpha=float(getattr(cfg, "revit_alpha", 0.5)), tau=float(getattr(cfg, "revit_tau", 1.0)),
                             distill=bool(getattr(cfg, "revit_tlsd", True)))
        self.revit: ResizableViT | None = None
        self._loss_sum: torch.Tensor | None = None
        self._steps = 0

    def attach(self, model: nn.Module) -> nn.Module:
        self.revit = convert(model, self.grids, tal_ln=self.tal_ln)
        return self.revit

    def _grid_loss(self, heads: Sequence[torch.Tensor], targets: torch.Tensor,
                   teacher: Sequence[torch.Tensor] | None, criterion: Criterion) -> torch.Tensor:
        # each head is distilled from the same head at the largest grid
        losses = [self.tlsd.grid_loss(h, targets, None if teacher is None else t, criterion)
                  for h, t in zip(heads, teacher or heads)]
        return sum(losses) / len(losses)

    def forward_backward(self, net: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion: Criterion,
                         autocast: Callable[[], ContextManager], backward: Callable[[torch.Tensor], None]
                         ) -> torch.Tensor:
        """Run ``images`` at every grid; returns the summed TLSD loss (detached). ``net`` may be DDP."""
        revit = _unwrap(net)
        grids = revit.grids
        losses: list[torch.Tensor] = []
        if not self.per_grid_backward or len(grids) == 1:
            with autocast():
                teacher = None
                for k, grid in enumerate(grids):
                    heads = _heads(net(images, grid=grid))
                    losses.append(self._grid_loss(heads, targets, teacher, criterion))
                    if k == 0:
                        teacher = tuple(h.detach() for h in heads)
                total = sum(losses)
            backward(total)
        else:
            ddp = isinstance(net, DistributedDataParallel)
            teacher = None
            for k, grid in enumerate(grids):
                last = k == len(grids) - 1
                with net.no_sync() if ddp and not last else nullcontext():
                    with autocast():
                        heads = _heads(net(images, grid=grid))
                        loss = self._grid_loss(heads, targets, teacher, criterion)
                        if k == 0:
                            teacher = tuple(h.detach() for h in heads)
                        if ddp and last:
                            # DDP reduces gradients in the one synchronised backward and expects every
                            # parameter to get a gradient there; the other grids' norm copies are not in
                            # this graph, so add them with weight 0: their accumulated gradients are then
                            # all-reduced too (and unchanged)
                            loss = loss + sum(0.0 * p.sum() for p in revit.bank_parameters(exclude=k))
                    backward(loss)
                losses.append(loss.detach())
            total = sum(losses)
        stacked = torch.stack([loss.detach().float() for loss in losses])
        self._loss_sum = stacked if self._loss_sum is None else self._loss_sum + stacked
        self._steps += 1
        return total.detach()

    def train_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> float:
        """A step runs the batch at every grid: the forward MACs are the sum over grids."""
        return sum(measure.macs(model, input_size, train=True, grid=g) for g in self.grids)

    def baseline_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> tuple[float, str]:
        """One training forward at the largest grid: a ReViT step costs more, it runs every grid."""
        grid = self.grids[0]
        return (measure.macs(model, input_size, train=True, grid=grid),
                f"a training forward at the largest grid only ({grid}x{grid}; each step runs all {len(self.grids)})")

    def evaluate(self, model: nn.Module, run: Callable[..., float]) -> dict:
        """Top-1 at every grid (eval mode); ``top1`` is the largest grid's."""
        scores = {f"top1_g{g}": run(model, grid=g) for g in self.grids}
        return {"top1": scores[f"top1_g{self.grids[0]}"], **scores}

    def log(self) -> dict:
        """``revit_grids`` and, per grid, the mean loss over the steps since the previous ``log()`` call
        (this process only)."""
        record: dict = {"revit_grids": list(self.grids)}
        if self._steps:
            means = (self._loss_sum / self._steps).tolist()
            record.update({f"revit_loss_g{g}": m for g, m in zip(self.grids, means)})
            self._loss_sum, self._steps = None, 0
        return record

    def state_dict(self) -> dict:
        return {"grids": list(self.grids), "tal_ln": self.tal_ln}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state.get("grids", self.grids)) != self.grids or state.get("tal_ln", self.tal_ln) != self.tal_ln:
            raise InvalidArgumentError(f"checkpoint was trained with grids {tuple(state.get('grids'))} and tal_ln "
                             f"{state.get('tal_ln')}, this run asks for {self.grids} / {self.tal_ln}; resume with "
                             "the same --revit-grids and --revit-tal-ln")


class RelabeledDataset(Dataset):
    """``dataset`` with its targets replaced: item i is (image_i, int(labels[i]))."""

    def __init__(self, dataset: Dataset, labels: torch.Tensor):
        if len(dataset) != len(labels):
            raise InvalidArgumentError(f"{len(labels)} labels for a dataset of {len(dataset)} items")
        self.dataset, self.labels = dataset, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.dataset[i][0]
        return image, int(self.labels[i])


class TLAMethod(Method):
    """Train the Token-Length Assigner (SPEC §3) on labels from :func:`tokenthrift.revit.assign_labels`.

    ``create_model`` builds a :class:`~tokenthrift.revit.TokenLengthAssigner` for the backbone the
    config describes (its input size; K = number of grids in the label file) and checks the 2 % MACs
    budget against that backbone. ``datasets`` replaces the class targets of the training and
    evaluation sets with the token-length labels of ``tla_labels`` / ``tla_eval_labels``; each file
    must have been made on exactly those images (same data, split, subset, held-out slice and seed),
    which is checked. Labels of the ReViT run's held-out slice (``assign-labels --split holdout``,
    SPEC §3: labels made on the backbone's own training images lean short) make the assigner train on
    that slice. Augmentation is mild, a horizontal flip only (the labels describe the images as the
    backbone sees them at test time); mixup/cutmix are refused. With ``tla_balanced`` the CE is
    class-balanced (:func:`~tokenthrift.revit.balanced_class_weights` from the training-label histogram;
    the config's label smoothing still applies). A checkpoint is rebuilt without its label files
    (:meth:`from_checkpoint`).
    """

    name = "tla"
    train_augment = "flip"

    def __init__(self, cfg, labels: bool = True):
        self.cfg = cfg
        self.model_name = getattr(cfg, "tla_model", None) or DEFAULT_ASSIGNER
        self.scale = float(getattr(cfg, "tla_scale", 0.5))
        self.balanced = bool(getattr(cfg, "tla_balanced", False))
        self.max_fraction = float(getattr(cfg, "tla_max_macs_fraction", MAX_MACS_FRACTION))
        self.label_smoothing = float(getattr(cfg, "label_smoothing", 0.0) or 0.0)
        if getattr(cfg, "mixup", 0) or getattr(cfg, "cutmix", 0):
            raise InvalidArgumentError("the token-length assigner trains with mild augmentation only: mixup/cutmix "
                                       "blend "
                             "images whose token-length labels do not blend; set --mixup 0 --cutmix 0")
        self.grids: tuple[int, ...] | None = None
        self.train_labels: TokenLengthLabels | None = None
        self.eval_labels: TokenLengthLabels | None = None
        self.weights: torch.Tensor | None = None
        self.assigner_fraction: float | None = None
        self.backbone_macs: float | None = None
        if labels:
            self._load_labels()

    def _load_labels(self) -> None:
        train_path, eval_path = getattr(self.cfg, "tla_labels", None), getattr(self.cfg, "tla_eval_labels", None)
        if not train_path or not eval_path:
            raise InvalidArgumentError(
                "--method tla needs token-length label files for the training and the evaluation images "
                "(--tla-labels, --tla-eval-labels): make them with tokenthrift assign-labels on a --method revit "
                "run (--split train or holdout, and --split eval)")
        self.train_labels = load_labels(train_path)
        self.eval_labels = load_labels(eval_path, grids=self.train_labels.grids)
        self.grids = self.train_labels.grids
        if self.train_labels.meta.get("split") == "holdout":
            self.train_part = "holdout"
        self.weights = balanced_class_weights(self.train_labels.histogram) if self.balanced else None
        self.backbone_macs = self.train_labels.meta.get("backbone_macs")

    @classmethod
    def restore(cls, cfg, state: dict) -> TLAMethod:
        """The assigner of a saved run, rebuilt from its grids and backbone MACs: no label files needed."""
        method = cls(cfg, labels=False)
        method.grids = tuple(state["grids"])
        method.backbone_macs = state.get("backbone_macs")
        return method

    def create_model(self, cfg) -> nn.Module:
        backbone = build_model(cfg)
        input_size = model_input_size(backbone, cfg)
        recorded = self.train_labels.meta.get("input_size") if self.train_labels is not None else None
        if recorded is not None and tuple(recorded) != tuple(input_size):
            raise InvalidArgumentError(f"the labels were made for images of size {tuple(recorded)} but this config's "
                                       f"backbone "
                             f"takes {tuple(input_size)}; use the backbone's --img-size / --in-chans")
        assigner = TokenLengthAssigner(len(self.grids), input_size, self.model_name, self.scale)
        assigner.grids = self.grids
        self.backbone_macs = float(self.backbone_macs or measure.macs(backbone, input_size))
        self.assigner_fraction = check_assigner_budget(assigner, self.backbone_macs, self.max_fraction)
        return assigner

    def relabel(self, dataset: Dataset, file: TokenLengthLabels, flag: str, split: str) -> RelabeledDataset:
        """``dataset`` with the labels of ``file`` as targets, after checking the file was made on exactly
        these images (``flag`` names the file in the error)."""
        meta, cfg = file.meta, self.cfg
        evaluation = split == "eval"
        expected = {"split": split, "data": getattr(cfg, "data", None),
                    "subset": getattr(cfg, "eval_subset" if evaluation else "train_subset", None),
                    "holdout": 0 if evaluation else getattr(cfg, "train_holdout", 0),
                    "seed": getattr(cfg, "seed", None)}
        if not expected["subset"] and not expected["holdout"]:
            del expected["seed"]  # the whole split: the seed picks nothing
        wrong = {k: (meta[k], v) for k, v in expected.items() if k in meta and meta[k] != v}
        if wrong or len(file.labels) != len(dataset):
            found = ", ".join(f"{k}={meta.get(k)!r}" for k in expected if k in meta)
            mine = ", ".join(f"{k}={v!r}" for k, v in expected.items())
            raise InvalidArgumentError(
                f"{flag} holds {len(file.labels)} labels ({found or 'no split recorded'}) but the {split} set has "
                f"{len(dataset)} images ({mine})"
                f"{'; mismatched: ' + ', '.join(wrong) if wrong else ''}. Label exactly the images this run uses "
                "(same --data, --train-subset / --eval-subset, --train-holdout and --seed as the ReViT run).")
        return RelabeledDataset(dataset, file.labels)

    def datasets(self, train_ds: Dataset, eval_ds: Dataset, info: DatasetInfo
                 ) -> tuple[Dataset, Dataset, DatasetInfo]:
        split = self.train_labels.meta.get("split", "train")
        train = self.relabel(train_ds, self.train_labels, "--tla-labels", split)
        evaluation = self.relabel(eval_ds, self.eval_labels, "--tla-eval-labels", "eval")
        return train, evaluation, dataclasses.replace(info, num_classes=len(self.grids))

    def forward_backward(self, net: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion: Criterion,
                         autocast: Callable[[], ContextManager], backward: Callable[[torch.Tensor], None]
                         ) -> torch.Tensor:
        if self.weights is None:
            return super().forward_backward(net, images, targets, criterion, autocast, backward)
        with autocast():
            logits = net(images)
            loss = F.cross_entropy(logits.float(), targets, weight=self.weights.to(logits.device),
                                   label_smoothing=self.label_smoothing)
        backward(loss)
        return loss.detach()

    def baseline_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> tuple[float, str]:
        return measure.macs(model, input_size, train=True), "a training forward of the assigner"

    def log(self) -> dict:
        record = {"tla_grids": list(self.grids), "tla_label_hist": self.train_labels.histogram.tolist()}
        if self.assigner_fraction is not None:
            record["tla_macs_fraction"] = self.assigner_fraction
        return record

    def state_dict(self) -> dict:
        return {"grids": list(self.grids), "backbone_macs": self.backbone_macs}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state.get("grids", self.grids)) != self.grids:
            raise InvalidArgumentError(f"checkpoint's assigner was trained for grids {tuple(state['grids'])}, the "
                                       f"label file "
                             f"has {self.grids}")
