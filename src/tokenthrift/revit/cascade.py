"""Confidence cascade over a ReViT's grids: run an image at the smallest grid (or where an assigner says to
start), stop where the prediction is confident enough, else run it again at the next larger grid.

A ReViT's small grids tell when they are unsure, so no assigner is needed for a per-image token length
(docs/methods.md §3, "cascade"). Grid index convention as everywhere in ``tokenthrift.revit``: 0 = the largest
grid, K-1 the smallest; a cascade runs from high indices to low ones. Thresholds are given per grid except
the largest (which always decides): ``thresholds[j]`` belongs to ``grids[j + 1]``.

Pure tensor functions (:func:`confidence`, :func:`cascade_exits`, :func:`executed_macs`,
:func:`calibrate_thresholds`) compute what :class:`CascadeViT` does, from every grid's outputs at once, so a
rule can be evaluated and calibrated without running the model once per rule.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .adaptive import AdaptiveViT

__all__ = ["CONFIDENCES", "Calibration", "CascadeViT", "GridOutcomes", "calibrate_cascade", "calibrate_thresholds",
           "cascade_exits", "default_budgets", "confidence", "executed_macs", "grid_outcomes"]

CONFIDENCES = ("max_prob", "margin")


def _check_kind(kind: str) -> None:
    if kind not in CONFIDENCES:
        raise InvalidArgumentError(f"unknown confidence {kind!r}; choose one of {', '.join(CONFIDENCES)}")


def confidence(logits: torch.Tensor, kind: str = "max_prob") -> torch.Tensor:
    """(B, C) logits -> (B,) confidence: ``max_prob`` the top softmax probability, ``margin`` the gap between
    the top two probabilities."""
    _check_kind(kind)
    top = logits.float().softmax(-1).topk(min(2, logits.shape[-1]), dim=-1).values
    if kind == "max_prob" or top.shape[-1] == 1:
        return top[:, 0]
    return top[:, 0] - top[:, 1]


def _limits(thresholds: Sequence[float] | torch.Tensor, num_grids: int) -> torch.Tensor:
    """Thresholds of grids 1..K-1 -> (K,) limit per grid index, -inf for the largest (it always decides)."""
    t = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
    if t.numel() != num_grids - 1:
        raise InvalidArgumentError(f"a cascade over {num_grids} grids takes {num_grids - 1} thresholds (one per grid "
                                   f"but the largest, largest first); got {t.tolist()}")
    if torch.isnan(t).any():
        raise InvalidArgumentError(f"cascade thresholds must be numbers; got {t.tolist()}")
    return torch.cat([t.new_full((1,), float("-inf")), t])


def _starts(start: torch.Tensor | None, n: int, num_grids: int, device) -> torch.Tensor:
    if start is None:
        return torch.full((n,), num_grids - 1, dtype=torch.long, device=device)
    start = start.to(device).long()
    if start.shape != (n,) or (start < 0).any() or (start >= num_grids).any():
        raise InvalidArgumentError(f"start must be ({n},) grid indices in [0, {num_grids}); got shape "
                                   f"{tuple(start.shape)}")
    return start


def cascade_exits(conf: torch.Tensor, thresholds: Sequence[float] | torch.Tensor,
                  start: torch.Tensor | None = None) -> torch.Tensor:
    """Where each image leaves the cascade. conf (N, K): its confidence at every grid (column 0 = largest);
    ``start`` (N,) the grid index each image begins at (default the smallest grid, K-1). An image stops at
    the first grid, from its start towards larger ones, whose confidence reaches that grid's threshold;
    the largest grid always stops it. Returns (N,) grid indices."""
    N, K = conf.shape
    limits = _limits(thresholds, K).to(conf.device)
    start = _starts(start, N, K, conf.device)
    k = torch.arange(K, device=conf.device)
    stops = (conf.float() >= limits) & (k <= start[:, None])  # column 0 always stops (limit -inf)
    return (K - 1) - stops.flip(1).int().argmax(dim=1)  # the highest grid index that stops, i.e. reached first


def executed_macs(exit_index: torch.Tensor, grid_macs: Sequence[float] | torch.Tensor,
                  start: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) MACs each image costs as executed: the sum of the grids it ran, from ``start`` (default the
    smallest grid) to its exit, both included."""
    macs = torch.as_tensor(grid_macs, dtype=torch.float64, device=exit_index.device)
    K = macs.numel()
    start = _starts(start, exit_index.numel(), K, exit_index.device)
    if (exit_index > start).any():
        raise InvalidArgumentError("an image exits at a grid index above its start: exits run from start to larger "
                                   "grids (lower indices)")
    tail = torch.cat([macs.flip(0).cumsum(0).flip(0), macs.new_zeros(1)])  # tail[k] = sum of macs[k:]
    return tail[exit_index] - tail[start + 1]


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate_thresholds` chose, and what it saw on the calibration images.

    ``thresholds``: one per grid but the largest (largest first); ``top1`` and ``macs_ratio`` on the
    calibration images (MACs per image as executed, over the largest grid's); ``front``: the
    (macs_ratio, top1, thresholds) rows of every threshold pair no other beats on both, cheapest first."""

    thresholds: tuple[float, ...]
    top1: float
    macs_ratio: float
    budget: float | None
    front: tuple[tuple[float, float, tuple[float, ...]], ...]


def _candidates(conf: torch.Tensor, steps: int) -> torch.Tensor:
    """Threshold candidates for one grid: quantiles of its confidences, plus +inf (never stop here)."""
    q = torch.quantile(conf.double(), torch.linspace(0, 1, steps, dtype=torch.float64))
    return torch.cat([q.unique(), q.new_full((1,), float("inf"))])


@torch.no_grad()
def calibrate_thresholds(conf: torch.Tensor, correct: torch.Tensor, grid_macs: Sequence[float],
                         budget: float | None = None, start: torch.Tensor | None = None, extra_macs: float = 0.0,
                         steps: int = 41, chunk_elements: int = 1 << 24) -> Calibration:
    """Thresholds of the most accurate cascade within a MACs budget, searched on calibration images.

    conf (N, K) and correct (N, K) bool: every calibration image's confidence and correctness at every grid
    (column 0 = largest); ``grid_macs`` (K,) MACs per image of each grid; ``budget``: mean MACs per image as
    executed, plus ``extra_macs`` (an assigner's), over the largest grid's (0.45 = 45 %); None: the most
    accurate cascade whatever its cost. ``start``: as in :func:`cascade_exits`. Every combination of
    ``steps`` quantiles of each grid's confidences (and "never stop") is scored, vectorised over images;
    ties go to the cheaper one. Raises if no combination fits the budget."""
    N, K = conf.shape
    if correct.shape != (N, K):
        raise InvalidArgumentError(f"correct must be (N, K) = {(N, K)} like conf; got {tuple(correct.shape)}")
    if K < 2:
        raise InvalidArgumentError("a cascade needs at least two grids")
    if N == 0:
        raise InvalidArgumentError("no calibration images")
    if budget is not None and not budget > 0:
        raise InvalidArgumentError(f"budget={budget} is a share of the largest grid's MACs: give a number above 0")
    macs = torch.as_tensor(grid_macs, dtype=torch.float64)
    start = _starts(start, N, K, conf.device)
    cands = [_candidates(conf[:, k], steps) for k in range(1, K)]
    combos = torch.tensor(list(itertools.product(*[c.tolist() for c in cands])), dtype=torch.float64)  # (C, K-1)
    limits = torch.cat([combos.new_full((len(combos), 1), float("-inf")), combos], dim=1)  # (C, K)
    k = torch.arange(K)
    reachable = (k <= start[:, None].cpu())  # (N, K)
    conf64, right = conf.double().cpu(), correct.cpu()
    tail = torch.cat([macs.flip(0).cumsum(0).flip(0), macs.new_zeros(1)])
    top1, cost = [], []
    per = max(1, chunk_elements // (N * K))
    for part in limits.split(per):
        stops = (conf64[None] >= part[:, None]) & reachable[None]  # (c, N, K)
        exits = (K - 1) - stops.flip(2).int().argmax(dim=2)  # (c, N)
        top1.append(right.gather(1, exits.T).double().mean(0) * 100.0)
        cost.append((tail[exits] - tail[start.cpu() + 1]).mean(1))
    top1, cost = torch.cat(top1), (torch.cat(cost) + extra_macs) / macs[0]
    feasible = torch.ones_like(cost, dtype=torch.bool) if budget is None else cost <= budget + 1e-12
    if not feasible.any():
        raise InvalidArgumentError(f"no cascade fits a budget of {budget:g} of the largest grid's MACs: the cheapest "
                                   f"costs {cost.min().item():.3f} (every image stopping where it starts"
                                   f"{', assigner included' if extra_macs else ''}); raise --budget")
    # the most accurate feasible combination; among equals the cheapest
    best_top1 = top1.masked_fill(~feasible, float("-inf")).max()
    best = int(cost.masked_fill(~(feasible & (top1 == best_top1)), float("inf")).argmin())
    # the front: cheapest first (more accurate first among equal costs), each strictly above all cheaper ones
    order = torch.argsort(-top1, stable=True)
    order = order[torch.argsort(cost[order], stable=True)]
    ranked = top1[order]
    above = torch.cat([ranked.new_ones(1, dtype=torch.bool), ranked[1:] > ranked.cummax(0).values[:-1]])
    front = tuple((cost[i].item(), top1[i].item(), tuple(combos[i].tolist())) for i in order[above].tolist())
    return Calibration(tuple(combos[best].tolist()), top1[best].item(), cost[best].item(), budget, front)


class CascadeViT(AdaptiveViT):
    """A ReViT run as a confidence cascade: each image starts at the smallest grid (or at the assigner's pick,
    when ``assigner`` is given), and the images whose confidence stays below the grid's threshold run again
    at the next larger grid; the largest grid decides the rest. Each stage runs once, on the undecided images
    only (grouped, never per image); the logits are the ones of the grid each image stopped at.

    forward(x (B, C, H, W)) -> logits (B, num_classes). After a call, ``last_grid_index`` (B,) holds each
    image's exit grid, ``last_start_index`` its start, and :meth:`last_macs` the (B,) MACs each cost as
    executed (assigner included).

    Args:
        revit: the :class:`~tokenthrift.revit.ResizableViT`.
        thresholds: one per grid but the largest, largest first (e.g. (0.8, 0.6) for grids 14, 10, 7); a
            threshold above 1 (or ``inf``) never stops there.
        kind: the confidence, ``max_prob`` or ``margin`` (:func:`confidence`).
        assigner: optional :class:`TokenLengthAssigner`: its pick (argmax, or ``gamma``) is where an image starts.
    """

    def __init__(self, revit: nn.Module, thresholds: Sequence[float], kind: str = "max_prob",
                 assigner: nn.Module | None = None, gamma: float | None = None):
        super().__init__(revit, assigner, gamma)
        _check_kind(kind)  # now, not at the first batch
        self.kind = kind
        self.register_buffer("limits", _limits(thresholds, len(self.grids)), persistent=False)
        self.last_start_index: torch.Tensor | None = None

    @property
    def thresholds(self) -> tuple[float, ...]:
        return tuple(self.limits[1:].tolist())

    def starts(self, x: torch.Tensor) -> torch.Tensor:
        if self.assigner is None:
            return torch.full((x.shape[0],), len(self.grids) - 1, dtype=torch.long, device=x.device)
        return self.choose(x)

    def forward(self, x: torch.Tensor, grid_index: torch.Tensor | None = None) -> torch.Tensor:
        if grid_index is not None:
            raise InvalidArgumentError("a cascade picks its grids itself; run fixed grids with AdaptiveViT")
        start = self.starts(x)
        exits = start.clone()
        undecided = torch.ones_like(start, dtype=torch.bool)
        out = None
        for k in reversed(range(len(self.grids))):  # smallest grid first; one forward per stage
            members = (undecided & (start >= k)).nonzero().squeeze(1)
            if members.numel() == 0:
                continue
            logits = self._run(x.index_select(0, members), self.grids[k])
            if out is None:
                out = logits.new_empty((x.shape[0], *logits.shape[1:]))
            out.index_copy_(0, members, logits)
            stop = confidence(logits, self.kind) >= self.limits[k]
            exits.index_fill_(0, members, k)
            undecided.index_fill_(0, members[stop], False)
        self.last_grid_index, self.last_start_index = exits.detach(), start.detach()
        if out is None:  # empty batch
            out = x.new_empty((0, self.num_classes))
        return out

    def last_macs(self) -> torch.Tensor:
        """(B,) MACs per image of the latest call as executed: every grid it ran, plus the assigner's."""
        if self.last_grid_index is None:
            raise InvalidArgumentError("no cascade run yet: call the model on a batch first")
        extra = self.assigner_macs() if self.assigner is not None else 0.0
        return executed_macs(self.last_grid_index, self.grid_macs(), self.last_start_index) + extra


@dataclass
class GridOutcomes:
    """What a ReViT does with each image of a set at every grid: ``correct`` (N, K) bool, ``conf`` one (N, K)
    tensor per confidence kind, ``probs`` (N, K) the assigner's probabilities (None without one), and
    ``sample`` the first batch of images (to time a rule on)."""

    correct: torch.Tensor
    conf: dict[str, torch.Tensor]
    probs: torch.Tensor | None
    sample: torch.Tensor | None


@torch.no_grad()
def grid_outcomes(revit: nn.Module, loader: Iterable, assigner: nn.Module | None = None,
                  device: torch.device | str | None = None) -> GridOutcomes:
    """One pass over ``loader`` ((images, targets) batches): every image's correctness and confidences at every
    grid of ``revit`` (eval mode, as given), and the assigner's probabilities."""
    correct, conf, probs, sample = [], {kind: [] for kind in CONFIDENCES}, [], None
    for images, targets in loader:
        if device is not None:
            images, targets = images.to(device), targets.to(device)
        sample = images if sample is None else sample
        logits = [revit(images, grid=g) for g in revit.grids]
        correct.append(torch.stack([out.argmax(-1) == targets for out in logits], 1).cpu())
        for kind in CONFIDENCES:
            conf[kind].append(torch.stack([confidence(out, kind) for out in logits], 1).cpu())
        if assigner is not None:
            probs.append(assigner(images).float().softmax(-1).cpu())
    if not correct:
        raise InvalidArgumentError("no images to run the grids on: the loader is empty")
    return GridOutcomes(torch.cat(correct), {k: torch.cat(v) for k, v in conf.items()},
                        torch.cat(probs) if probs else None, sample)


def calibrate_cascade(revit: nn.Module, seen: GridOutcomes, budget: float | None, kind: str = "max_prob",
                      assigner: nn.Module | None = None, decimals: int = 4) -> tuple[CascadeViT, Calibration]:
    """The :class:`CascadeViT` whose thresholds, calibrated on ``seen`` (:func:`grid_outcomes` of images the model
    never trained on), are the most accurate within ``budget`` (:func:`calibrate_thresholds`); with an assigner
    the cascade starts at its argmax and its MACs count. Thresholds are rounded to ``decimals`` so that the
    printed ones are the ones used."""
    cascade = CascadeViT(revit, [0.0] * (len(revit.grids) - 1), kind, assigner)
    if assigner is not None and seen.probs is None:
        raise InvalidArgumentError("the calibration outcomes hold no assigner probabilities: run grid_outcomes with "
                                   "the assigner")
    start = None if assigner is None else seen.probs.argmax(-1)
    chosen = calibrate_thresholds(seen.conf[kind], seen.correct, cascade.grid_macs(), budget, start,
                                  cascade.assigner_macs())
    cascade.limits.copy_(_limits([round(t, decimals) for t in chosen.thresholds], len(revit.grids)))
    return cascade.eval(), chosen


def default_budgets(grid_macs: Sequence[float]) -> list[float]:
    """MACs budgets worth calibrating a cascade to: each grid's cost between the smallest and the largest (the
    cascade against that fixed grid, at its cost; rounded to 3 decimals), and 0.6."""
    ratios = [m / grid_macs[0] for m in grid_macs[1:-1]]
    return sorted({round(r, 3) for r in ratios} | {0.6})
