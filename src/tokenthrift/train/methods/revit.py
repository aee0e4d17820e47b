"""ReViT as a training-engine method: every step runs the batch at every grid (TLSD losses, summed; one
optimiser step), optionally back-propagating grid by grid to cut peak memory.

Zhou & Zhu, "Make A Long Image Short: Adaptive Token Length for Vision Transformers", ECML-PKDD 2023
(arXiv 2307.02092). docs/methods.md §3.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn

from ... import measure
from ...errors import InvalidArgumentError, TokenthriftWarning
from ...revit import (
    ResizableViT,
    TLSDLoss,
    calibrate_cascade,
    cascade_exits,
    check_grids,
    convert,
    default_budgets,
    executed_macs,
    grid_outcomes,
)
from ..config import TrainConfig, option
from ..protocol import Backward, HarnessContext, Method, PictureOptions, Variant
from ..splits import calibration_source, split_loader

__all__ = ["ReViTMethod", "ReViTOptions"]


@dataclass
class ReViTOptions:
    grids: tuple[int, ...] = option((14, 10, 7), "token grids (tokens per side), largest first")
    tal_ln: bool = option(True, "token-length-aware LayerNorm, one LayerNorm copy per grid")
    tlsd: bool = option(True, "token-length self-distillation from the largest grid")
    alpha: float = option(0.5, "weight of the distillation term of every smaller grid")
    tau: float = option(1.0, "distillation temperature")
    per_grid_backward: bool = option(False, "back-propagate grid by grid to cut peak memory")

    def __post_init__(self) -> None:
        self.grids = tuple(int(g) for g in self.grids)

CALIBRATION_IMAGES = 5000  # held-out training images a compared cascade is calibrated on, at most

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _heads(out) -> tuple[torch.Tensor, ...]:
    """Model output -> tuple of logits (a distilled DeiT in distilled-training mode has two heads)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class ReViTMethod(Method):
    """Train a Resizable ViT with TAL-LN and TLSD (docs/methods.md §3).

    ``attach`` converts the timm ViT (:func:`tokenthrift.revit.convert`). Each step runs the same batch
    at every grid, largest first. Default: one backward of the summed loss. With
    ``revit_per_grid_backward``: the largest grid runs and back-propagates first, its logits detached
    as the teacher; then each smaller grid runs and back-propagates on its own, so only one grid's
    activations are alive at a time. The gradients are the same sum; the engine still takes one
    optimiser step; under DDP the engine all-reduces the gradients once, in the last backward.
    """

    name = "revit"
    summary = "Resizable ViT: every grid each step"
    label = "ReViT"
    order = 20
    Options = ReViTOptions
    tasks = ("classification",)
    previewable = False
    plain_inference = False
    picture_flags = ("assigner",)

    def __init__(self, cfg):
        super().__init__(cfg)
        o = self.options
        self.grids = check_grids(o.grids)
        self.tal_ln = bool(o.tal_ln)
        self.per_grid_backward = bool(o.per_grid_backward)
        self.tlsd = TLSDLoss(alpha=float(o.alpha), tau=float(o.tau), distill=bool(o.tlsd))
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
                         autocast: Callable[[], ContextManager], backward: Backward) -> torch.Tensor:
        """Run ``images`` at every grid; returns the summed TLSD loss (detached)."""
        grids = self.grids
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
            teacher = None
            for k, grid in enumerate(grids):
                # gradients accumulate over the grids; under DDP they are all-reduced once, in the last part
                with backward.deferred(k < len(grids) - 1):
                    with autocast():
                        heads = _heads(net(images, grid=grid))
                        loss = self._grid_loss(heads, targets, teacher, criterion)
                        if k == 0:
                            teacher = tuple(h.detach() for h in heads)
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

    def evaluate(self, model: nn.Module, run: Callable[..., dict]) -> dict:
        """Top-1 at every grid (eval mode); ``top1`` is the largest grid's."""
        scores = {f"top1_g{g}": run(model, grid=g)["top1"] for g in self.grids}
        return {"top1": scores[f"top1_g{self.grids[0]}"], **scores}

    def variants(self, model: nn.Module, input_size: tuple[int, ...]) -> list[Variant]:
        """One per grid, measured against the largest grid (ToMe is matched to the smaller ones)."""
        return [Variant(f"ReViT {g}x{g}", model, measure.macs(model, input_size, grid=g), kwargs={"grid": g},
                        match=k > 0, columns={"grid": f"{g}x{g}"}) for k, g in enumerate(model.grids)]

    def harness_variants(self, model: nn.Module, cfg: TrainConfig, ctx: HarnessContext) -> list[Variant]:
        """The confidence cascade (max probability) at each of :func:`~tokenthrift.revit.default_budgets`,
        calibrated on training images the run never trained on (never the compared evaluation images); MACs
        per image as executed, top-1 from every grid's outcome on the compared images."""
        source = calibration_source(cfg)
        if source is None:
            warnings.warn(f"compare: no cascade rows for the ReViT run {cfg.name or cfg.model}: it trained on every "
                          "training image, so none is left to calibrate on; train it with --train-holdout N",
                          TokenthriftWarning)
            return []
        device = next(model.parameters()).device
        limit = min(CALIBRATION_IMAGES, len(ctx.loader.dataset))  # as many as the compared images, at most 5000
        calib = grid_outcomes(model, split_loader(cfg, "calibration", ctx.input_size, ctx.loader.batch_size, None,
                                                  limit=limit), device=device)
        seen = grid_outcomes(model, ctx.loader, device=device)
        grid_macs = [v.macs for v in self.variants(model, ctx.input_size)]
        out = []
        for budget in default_budgets(grid_macs):
            cascade, _ = calibrate_cascade(model, calib, budget)
            exits = cascade_exits(seen.conf["max_prob"], cascade.thresholds)
            top1 = 100.0 * seen.correct.gather(1, exits[:, None]).double().mean().item()
            out.append(Variant(f"ReViT cascade, budget {budget:g}", cascade, executed_macs(exits, grid_macs).mean().item(),
                               columns={"grid": "cascade", "calibrated_on": f"{len(calib.correct)} {source}"},
                               baseline=model, baseline_macs=grid_macs[0], top1=top1))
        return out

    def draw(self, model: nn.Module, cfg: TrainConfig, images: torch.Tensor, options: PictureOptions) -> Path:
        """Every image as the patch embedding sees it at each grid (with an assigner: its pick framed)."""
        from ... import viz

        probs = None
        if options.assigner is not None:
            if getattr(options.assigner, "grids", None) not in (None, tuple(model.grids)):
                raise InvalidArgumentError(f"the assigner was trained for grids {options.assigner.grids}, this ReViT "
                                           f"has {tuple(model.grids)}")
            with torch.no_grad():
                probs = options.assigner(images).float().softmax(-1)
        views = [(g, model.resize(images, g)) for g in model.grids]
        title = f"ReViT {options.label(cfg)}: the image at each token grid" + (" (red: the assigner's pick)"
                                                                               if probs is not None else "")
        return viz.plot_revit_grids(views, options.out, title, probs=probs, grids=model.grids,
                                    captions=options.captions)

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
                                       f"{state.get('tal_ln')}, this run asks for {self.grids} / {self.tal_ln}; resume "
                                       "with the same --revit-grids and --revit-tal-ln")
