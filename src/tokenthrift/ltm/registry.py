"""Registered LTM models (``timm.create_model("ltm_...")``), the calibration of their ratios, and the helpers
that turn a model name and ratio flags into the LTM model to train or measure (``prepare``, ``parse_ratio``).

Wang & Yang, "Efficient Visual Transformer by Learnable Token Merging", TPAMI 2025 (arXiv 2407.15219).
Each ``ltm_<base>`` builds the timm model ``<base>`` (any timm keyword passes through) and converts it with
:func:`tokenthrift.ltm.convert` and the calibrated per-site ratios below. Its pretrained cfg is the base's
(same tag, same weights: LTM adds no parameters), so ``pretrained=True`` loads the base model's timm weights
into the LTM model, from the hub or from ``pretrained_cfg_overlay=dict(file=...)``.
The ratios are calibrated so that MACs(LTM) / MACs(base), counted by :func:`tokenthrift.measure.macs`
on a 224x224 input in eval mode (the mask module's own matmuls included), matches the paper's table
(SPEC §4); :func:`calibrate_ratio` re-derives them. The parameter count is exactly the base model's
(the mask module is parameter-free unless ``ltm_learn_tau=True``).

Extra keywords of the registered models: ``ltm_ratio`` (replace the calibrated ratios), ``ltm_tau_s``,
``ltm_tau_g``, ``ltm_learn_tau``, ``ltm_unmerge`` (see :func:`tokenthrift.ltm.convert`).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model, resolve_pretrained_cfg
from torch import nn

from ..errors import InvalidArgumentError
from ..measure import macs as _macs
from .conversion import convert, is_ltm, merge_sites, mergers, set_temperature

__all__ = ["CALIBRATION_SITES", "DEFAULT_RATIOS", "PAPER_RATIOS", "calibrate_ratio", "create_ltm", "default_ratio",
           "macs_ratio", "parse_ratio", "prepare"]

# MACs(LTM) / MACs(base) reported by the paper (SPEC §4 table)
PAPER_RATIOS: dict[str, float] = {
    "mobilevit_xs": 0.743,
    "mobilevit_s": 0.836,
    "efficientvit_b1": 0.846,
    "vit_small_patch16_224": 0.860,
    "vit_base_patch16_224": 0.733,
    "swin_tiny_patch4_window7_224": 0.844,
    "swin_base_patch4_window7_224": 0.779,
}

CALIBRATION_INPUT = (3, 224, 224)

# Which merge sites a calibration shrinks (the others keep ratio 1.0); None: all of them. *Decision*: Swin
# merges only in its two wide stages (blocks after the first 2 + 2): at 56x56x96 and 28x28x192 the MLP is
# so cheap per token that the mask's memory traffic cancels its saving in wall-clock time (measured on
# one CPU core, batch 64), so the same MACs are better saved in stages 3-4.
CALIBRATION_SITES: dict[str, Sequence[int] | None] = {name: None for name in PAPER_RATIOS}
CALIBRATION_SITES["swin_tiny_patch4_window7_224"] = range(4, 12)  # depths (2, 2, 6, 2)
CALIBRATION_SITES["swin_base_patch4_window7_224"] = range(4, 24)  # depths (2, 2, 18, 2)

# Calibrated per-site ratios (regenerate with calibrate_ratio(name, PAPER_RATIOS[name]))
DEFAULT_RATIOS: dict[str, tuple[float, ...]] = {
    # reached at the 4-token floor: the attention sequences of its 9 layers are 196, 39, 49, 10, 4, 4, 16, 4, 4
    "mobilevit_xs": (0.1986,) * 9,  # measured 0.7429
    "mobilevit_s": (0.6757,) * 9,  # measured 0.8355
    "efficientvit_b1": (0.5306,) * 7,  # measured 0.8467
    "vit_small_patch16_224": (0.9748,) * 2 + (0.9732,) * 10,  # measured 0.8599
    "vit_base_patch16_224": (0.9471,) * 12,  # measured 0.7331
    "swin_tiny_patch4_window7_224": (1.0,) * 4 + (0.6276,) * 8,  # measured 0.8438
    "swin_base_patch4_window7_224": (1.0,) * 4 + (0.5663,) * 20,  # measured 0.7751
}


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


def default_ratio(model: nn.Module, model_name: str) -> tuple[float, ...]:
    """The calibrated per-site ratios of ``model_name`` (a base name such as ``vit_small_patch16_224``),
    or a ValueError that says how to choose ratios when there are none for this architecture."""
    ratio = DEFAULT_RATIOS.get(model_name)
    if ratio is None or len(ratio) != merge_sites(model):
        raise InvalidArgumentError(f"no calibrated LTM ratio for {model_name!r} as configured; pass --ltm-ratio (a "
                                   f"float, or {merge_sites(model)} values, one per merge site) or use a registered "
                                   f"ltm_* model ({', '.join('ltm_' + k for k in DEFAULT_RATIOS)})")
    return ratio


def prepare(model: nn.Module, model_name: str, ratio: float | Sequence[float] | None = None,
            tau_s: float | None = None, tau_g: float | None = None) -> nn.Module:
    """The LTM model to train or measure: an ``ltm_*`` model as it is (its calibrated ratios; temperatures
    set), any other supported model converted with ``ratio`` or, if None, its calibrated default."""
    if is_ltm(model):
        if ratio is not None:
            raise InvalidArgumentError(f"{model_name} is already an LTM model with calibrated ratios; drop --ltm-ratio "
                                       "or start from the plain timm model to choose your own")
        set_temperature(model, tau_g=tau_g, tau_s=tau_s)
        return model
    kwargs = {k: v for k, v in dict(tau_s=tau_s, tau_g=tau_g).items() if v is not None}
    return convert(model, ratio if ratio is not None else list(default_ratio(model, model_name)), **kwargs)


_LTM_KWARGS = {"ltm_tau_s": "tau_s", "ltm_tau_g": "tau_g", "ltm_learn_tau": "learn_tau", "ltm_unmerge": "unmerge",
               "ltm_affinity": "affinity"}


def create_ltm(base_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``base_name`` with timm (with ``pretrained``, its timm weights: the LTM model has the same
    parameters) and convert it with its calibrated ratios; the model carries the ``ltm_*`` pretrained cfg."""
    ltm_cfg = resolve_pretrained_cfg(f"ltm_{base_name}", pretrained_cfg=kwargs.pop("pretrained_cfg", None),
                                     pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None)).to_dict()
    base_cfg = {**ltm_cfg, "architecture": base_name}
    if kwargs.get("features_only") and str(kwargs.get("feature_cls", "")).lower() == "fx":
        return _fx_features(base_name, pretrained, ltm_cfg, kwargs)
    ratio = kwargs.pop("ltm_ratio", None)
    options = {_LTM_KWARGS[k]: kwargs.pop(k) for k in list(kwargs) if k in _LTM_KWARGS}
    model = timm.create_model(base_name, pretrained=pretrained, pretrained_cfg=base_cfg, **kwargs)
    if ratio is None:
        ratio = list(DEFAULT_RATIOS[base_name])
        sites = merge_sites(model)
        if kwargs.get("features_only") and sites < len(ratio):
            ratio = ratio[:sites]  # features_only pruned the blocks after the last feature
        elif sites != len(ratio):
            raise InvalidArgumentError(f"the calibrated ratios of ltm_{base_name} are for its default architecture "
                                       f"({len(ratio)} merge sites), this one has {sites}; pass ltm_ratio=...")
    model = convert(model, ratio, **options)
    # what the model is, for timm.data.resolve_data_config and timm's tests: the ltm_* cfg
    model.pretrained_cfg = model.default_cfg = {**ltm_cfg, "num_classes": getattr(model, "num_classes", None)}
    return model


def _fx_features(base_name: str, pretrained: bool, ltm_cfg: dict, kwargs: dict) -> nn.Module:
    """``features_only=True, feature_cls="fx"``: the LTM blocks must exist before timm traces the model, so
    the whole model is converted first and then wrapped in timm's FeatureGraphNet, at the feature indices
    timm picks for the base model."""
    from timm.models import FeatureGraphNet

    ltm_keys = {"ltm_ratio", *_LTM_KWARGS}
    plain = {k: v for k, v in kwargs.items() if k not in ltm_keys and k != "pretrained"}
    with torch.random.fork_rng():  # a probe for timm's choice of feature indices: it leaves the weights' draw alone
        out_indices = timm.create_model(base_name, **plain).feature_info.out_indices
    whole = {k: v for k, v in kwargs.items() if k not in ("features_only", "feature_cls", "out_indices",
                                                         "output_fmt")}
    model = create_ltm(base_name, pretrained, pretrained_cfg=ltm_cfg, **whole)
    features = FeatureGraphNet(model, out_indices=out_indices, **({"output_fmt": kwargs["output_fmt"]}
                                                                  if "output_fmt" in kwargs else {}))
    features.pretrained_cfg = features.default_cfg = model.pretrained_cfg
    return features


def parse_ratio(value: Any) -> float | list[float] | None:
    """``ltm_ratio`` as given by a recipe or the command line: None, a number, a string such as "0.9" or
    "0.9,0.95", or a sequence of numbers (one of length 1 counts as a float)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if isinstance(value, (int, float)):
        return float(value)
    values = [float(v) for v in value]
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _register(base_name: str) -> None:
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_ltm(base_name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = f"ltm_{base_name}"
    entry.__module__ = __name__
    entry.__doc__ = (f"LTM-{base_name}: timm {base_name} with learnable token merging, MACs ratio "
                     f"{PAPER_RATIOS[base_name]} of the base (calibrated).")
    globals()[entry.__name__] = entry
    register_model(entry)


def _base_cfgs() -> dict:
    """``ltm_<base>.<tag>`` -> the base model's default pretrained cfg (its weights fit the LTM model)."""
    out = {}
    for base in PAPER_RATIOS:
        cfg = get_pretrained_cfg(base)
        values = {k: v for k, v in cfg.to_dict().items() if k not in ("architecture", "tag")} if cfg else {}
        out[f"ltm_{base}" + (f".{cfg.tag}" if cfg and cfg.tag else "")] = values
    return out


default_cfgs = generate_default_cfgs(_base_cfgs())  # read by timm's register_model below

for _name in PAPER_RATIOS:
    _register(_name)
