"""LTM's cost as a share of the MACs: the per-site keep ratios of a converted model fitted so that its MACs are a
given share of the same model without merging (``tokenthrift.ltm.convert(model, macs=...)``, ``--ltm-macs``, and
the calibration of the registered models, :mod:`.calibration`).

A site's ratio is the share of the tokens it keeps; in ViT and MobileViT the merges persist, so the shares
compound over the sites, and the MACs ratio of a per-site ratio is far from the ratio itself (0.86 at each of
DeiT-S's 12 blocks keeps 0.46 of its MACs). Counting is :func:`tokenthrift.measure.macs` in eval mode, the mask
module's own matmuls included.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import InvalidArgumentError
from ..measure import macs as _macs
from .mask import mergers

__all__ = ["fit_site_ratios", "set_ratios"]


def set_ratios(model: nn.Module, ratios: Sequence[float]) -> None:
    """Set the keep ratio of every merge site of ``model``, in forward order."""
    for m, r in zip(mergers(model), ratios):
        m.ratio = float(r)


def fit_site_ratios(
    ltm: nn.Module,
    target_ratio: float,
    input_size: Sequence[int],
    sites: Sequence[int] | None = None,
    steps: int = 14,
    tol: float = 0.005,
    centred: bool = True,
) -> tuple[list[float], float]:
    """Set the per-site ratios of the LTM model ``ltm`` (in place) so that MACs(ltm) / MACs(ltm without merging),
    counted in eval mode on ``input_size``, is closest to ``target_ratio``; returns the ratios and that MACs ratio.

    The MACs ratio of a uniform ratio r (on ``sites``, 1.0 elsewhere) does not decrease with r and moves in
    steps, because token grids are rounded (and, in ViT and MobileViT, a merge keeps r of the tokens the
    previous one left: the ratios compound). Stage 1 bisects r. If the closest point is still more than
    ``tol`` away, stage 2 mixes the two steps that bracket the target: the first k sites take the milder ratio,
    the rest the stronger one (later blocks merge more), and k is bisected. ``centred``: every ratio returned is
    moved to the middle of its step (found by bisection), so that rounding it to 4 decimals, or a float error,
    cannot flip a grid (what the registered constants need; costs about 30 more counts). A target below what
    the 4-token floor allows (:data:`~tokenthrift.ltm.mask.MIN_TOKENS`) gets the closest reachable ratio.
    """
    if not 0.0 < target_ratio <= 1.0:
        raise InvalidArgumentError(f"LTM MACs ratio {target_ratio} must lie in (0, 1]: the share of the model's MACs "
                                   "to keep")
    merging = mergers(ltm)
    n = len(merging)
    saved = [m.ratio for m in merging]
    set_ratios(ltm, [1.0] * n)
    base_macs = _macs(ltm, input_size)  # ratio 1.0 everywhere is exactly the plain model
    order = list(range(n)) if sites is None else sorted(set(sites))
    history: dict[float, float] = {}

    def ratios_for(mild: float, strong: float, k: int) -> list[float]:
        """The first k chosen sites at ``mild``, the other chosen sites at ``strong``, the rest at 1.0."""
        out = [1.0] * n
        for j, i in enumerate(order):
            out[i] = mild if j < k else strong
        return out

    def measure(ratios: list[float]) -> float:
        set_ratios(ltm, ratios)
        return _macs(ltm, input_size) / base_macs

    def uniform(r: float) -> float:
        if r not in history:
            history[r] = measure(ratios_for(r, r, 0))
        return history[r]

    def centre(r: float) -> float:
        """The middle of the interval of uniform ratios with the same MACs as ``r``, rounded to 4 decimals."""
        if not centred:
            return r
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

    try:
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
    except BaseException:
        set_ratios(ltm, saved)
        raise
    set_ratios(ltm, best_ratios)
    return best_ratios, best
