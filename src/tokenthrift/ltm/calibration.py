"""Calibration of the registered LTM models' per-site ratios: the ratios whose MACs(LTM) / MACs(base),
counted by :func:`tokenthrift.measure.macs` on a 224x224 input in eval mode (the mask module's own matmuls
included), match the paper's table (:data:`~.registry.PAPER_RATIOS`). :data:`~.registry.DEFAULT_RATIOS`
holds the result; ``calibrate_ratio(name, PAPER_RATIOS[name])`` re-derives it.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import timm
from torch import nn

from ..measure import macs as _macs
from .conversion import convert, merge_sites, mergers
from .registry import PAPER_RATIOS

__all__ = ["CALIBRATION_INPUT", "CALIBRATION_SITES", "calibrate_ratio", "macs_ratio"]

CALIBRATION_INPUT = (3, 224, 224)

# Which merge sites a calibration shrinks (the others keep ratio 1.0); None: all of them. *Decision*: Swin
# merges only in its two wide stages (blocks after the first 2 + 2): at 56x56x96 and 28x28x192 the MLP is
# so cheap per token that the mask's memory traffic cancels its saving in wall-clock time (measured on
# one CPU core, batch 64), so the same MACs are better saved in stages 3-4.
CALIBRATION_SITES: dict[str, Sequence[int] | None] = {name: None for name in PAPER_RATIOS}
CALIBRATION_SITES["swin_tiny_patch4_window7_224"] = range(4, 12)  # depths (2, 2, 6, 2)
CALIBRATION_SITES["swin_base_patch4_window7_224"] = range(4, 24)  # depths (2, 2, 18, 2)

def _set_ratios(model: nn.Module, ratios: Sequence[float]) -> None:
    for m, r in zip(mergers(model), ratios):
        m.ratio = float(r)


def macs_ratio(base: nn.Module, ratio: float | Sequence[float], input_size: Sequence[int] = CALIBRATION_INPUT,
               base_macs: float | None = None) -> float:
    """MACs(LTM(base, ratio)) / MACs(base), both counted in eval mode on ``input_size``."""
    ltm = convert(copy.deepcopy(base), ratio)
    return _macs(ltm, input_size) / (base_macs if base_macs is not None else _macs(base, input_size))


def calibrate_ratio(
    base_name: str,
    target_ratio: float,
    sites: Sequence[int] | None | str = "default",
    input_size: Sequence[int] = CALIBRATION_INPUT,
    steps: int = 14,
    tol: float = 0.005,
    **model_kwargs: Any,
) -> tuple[list[float], float]:
    """Per-site ratios whose MACs ratio (LTM / base, eval mode, ``input_size``) is closest to ``target_ratio``.

    ``sites``: the merge sites to shrink (None: all; ``"default"``: ``CALIBRATION_SITES[base_name]``).
    The MACs ratio of a uniform ratio r (on ``sites``, 1.0 elsewhere) does not decrease with r and moves
    in steps, because token grids are rounded. Stage 1 bisects r. If the closest point is still more
    than ``tol`` away, stage 2 mixes the two steps that bracket the target: the first k sites take the
    milder ratio, the rest the stronger one (later blocks merge more), and k is bisected. Every ratio
    returned is moved to the middle of its step (found by bisection), so that rounding it to 4 decimals,
    or a float error, cannot flip a grid. Returns the per-site list and its measured MACs ratio.
    """
    if isinstance(sites, str):
        sites = CALIBRATION_SITES.get(base_name)
    base = timm.create_model(base_name, pretrained=False, **model_kwargs).eval()
    base_macs = _macs(base, input_size)
    ltm = convert(copy.deepcopy(base), 1.0)
    n = merge_sites(ltm)
    order = list(range(n)) if sites is None else sorted(set(sites))
    history: dict[float, float] = {}

    def ratios_for(mild: float, strong: float, k: int) -> list[float]:
        """The first k chosen sites at ``mild``, the other chosen sites at ``strong``, the rest at 1.0."""
        out = [1.0] * n
        for j, i in enumerate(order):
            out[i] = mild if j < k else strong
        return out

    def measure(ratios: list[float]) -> float:
        _set_ratios(ltm, ratios)
        return _macs(ltm, input_size) / base_macs

    def uniform(r: float) -> float:
        if r not in history:
            history[r] = measure(ratios_for(r, r, 0))
        return history[r]

    def centre(r: float) -> float:
        """The middle of the interval of uniform ratios with the same MACs as ``r``, rounded to 4 decimals."""
        level = uniform(r)
        edges = []
        for outside in (max([1.0] + [q for q in history if q > r and history[q] != level], default=1.0),
                        min([0.05] + [q for q in history if q < r and history[q] != level])):
            if uniform(outside) == level:  # the step reaches the end of the search range
                edges.append(outside)
                continue
            inside = r
            for _ in range(16):
                mid = (inside + outside) / 2
                if uniform(mid) == level:
                    inside = mid
                else:
                    outside = mid
            edges.append(inside)
        return round(sum(edges) / 2, 4)

    lo, hi = 0.05, 1.0  # uniform(lo) <= target < uniform(hi), as far as known
    for _ in range(steps):
        mid = (lo + hi) / 2
        if uniform(mid) > target_ratio:
            hi = mid
        else:
            lo = mid
    r = min(history, key=lambda q: abs(history[q] - target_ratio))
    best_ratios = ratios_for(centre(r), 1.0, len(order))
    best = measure(best_ratios)
    if abs(best - target_ratio) > tol and uniform(lo) <= target_ratio < uniform(hi):
        mild, strong = centre(hi), centre(lo)
        k_lo, k_hi = 0, len(order)  # the MACs ratio grows with k
        while k_hi - k_lo > 1:
            k = (k_lo + k_hi) // 2
            ratios = ratios_for(mild, strong, k)
            got = measure(ratios)
            if abs(got - target_ratio) < abs(best - target_ratio):
                best, best_ratios = got, ratios
            if got > target_ratio:
                k_hi = k
            else:
                k_lo = k
    return best_ratios, best
