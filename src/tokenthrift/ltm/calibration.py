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
from .budget import fit_site_ratios
from .conversion import convert
from .registry import PAPER_RATIOS

__all__ = ["CALIBRATION_INPUT", "CALIBRATION_SITES", "calibrate_ratio", "fit_site_ratios", "macs_ratio"]

CALIBRATION_INPUT = (3, 224, 224)

# Which merge sites a calibration shrinks (the others keep ratio 1.0); None: all of them. *Decision*: Swin
# merges only in its two wide stages (blocks after the first 2 + 2): at 56x56x96 and 28x28x192 the MLP is
# so cheap per token that the mask's memory traffic cancels its saving in wall-clock time (measured on
# one CPU core, batch 64), so the same MACs are better saved in stages 3-4.
CALIBRATION_SITES: dict[str, Sequence[int] | None] = {name: None for name in PAPER_RATIOS}
CALIBRATION_SITES["swin_tiny_patch4_window7_224"] = range(4, 12)  # depths (2, 2, 6, 2)
CALIBRATION_SITES["swin_base_patch4_window7_224"] = range(4, 24)  # depths (2, 2, 18, 2)


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
    """Per-site ratios of the timm model ``base_name`` whose MACs ratio (LTM / base, eval mode, ``input_size``)
    is closest to ``target_ratio``: :func:`fit_site_ratios` on a fresh model, its ratios moved to the middle of
    their steps (``centred``). ``sites``: the merge sites to shrink (None: all; ``"default"``:
    ``CALIBRATION_SITES[base_name]``). Returns the per-site list and its measured MACs ratio."""
    if isinstance(sites, str):
        sites = CALIBRATION_SITES.get(base_name)
    base = timm.create_model(base_name, pretrained=False, **model_kwargs).eval()
    return fit_site_ratios(convert(base, 1.0), target_ratio, input_size, sites=sites, steps=steps, tol=tol)
