"""Registered LTM models (``timm.create_model("ltm_...")``) with their calibrated ratios and timm cfgs.

Wang & Yang, "Efficient Visual Transformer by Learnable Token Merging", TPAMI 2025 (arXiv 2407.15219).
Each ``ltm_<base>`` builds the timm model ``<base>`` (any timm keyword passes through) and converts it with
:func:`tokenthrift.ltm.convert` and the calibrated per-site ratios below. Its pretrained cfg is the base's
(same tag, same weights: LTM adds no parameters), so ``pretrained=True`` loads the base model's timm weights
into the LTM model, from the hub or from ``pretrained_cfg_overlay=dict(file=...)``.
The ratios are calibrated so that MACs(LTM) / MACs(base), counted by :func:`tokenthrift.measure.macs`
on a 224x224 input in eval mode (the mask module's own matmuls included), matches the paper's table
(:mod:`.calibration` re-derives them). The parameter count is exactly the base model's
(the mask module is parameter-free unless ``ltm_learn_tau=True``).

``ltm_vit_fmnist_tiny_patch2_28`` is the one LTM model trained by tokenthrift and shipped with it: the
Fashion-MNIST tiny ViT (:mod:`tokenthrift.pretrained`) with the ``fmnist_vit_tiny_ltm`` recipe's ratios (0.851
of the base's MACs), trained from scratch with the base model's recipe and schedule (30 epochs, all 60 000
images, IB on); ``pretrained=True`` loads its packaged weights (``weights/ltm_vit_fmnist_tiny_patch2_28.*``,
written by ``python benchmarks/converge_fmnist.py --ship``).

Extra keywords of the registered models: ``ltm_macs`` (another share of the base's MACs: the ratios calibrated
again for this model and input size), ``ltm_site_ratio`` (replace the calibrated ratios: the share of tokens each
merge site keeps; ``ltm_ratio`` is its deprecated former name), ``ltm_tau_s``, ``ltm_tau_g``, ``ltm_learn_tau``,
``ltm_unmerge`` (see :func:`tokenthrift.ltm.convert`).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model, resolve_pretrained_cfg
from torch import nn

from ..errors import InvalidArgumentError, MissingFileError
from ..pretrained import FMNIST_VIT, weights_path
from .conversion import convert, merge_sites

__all__ = ["DEFAULT_RATIOS", "FMNIST_LTM", "PAPER_RATIOS", "SHIPPED_RATIOS", "create_ltm"]

# MACs(LTM) / MACs(base) reported by the paper (docs/methods.md §4 table)
PAPER_RATIOS: dict[str, float] = {
    "mobilevit_xs": 0.743,
    "mobilevit_s": 0.836,
    "efficientvit_b1": 0.846,
    "vit_small_patch16_224": 0.860,
    "vit_base_patch16_224": 0.733,
    "swin_tiny_patch4_window7_224": 0.844,
    "swin_base_patch4_window7_224": 0.779,
}

# Calibrated per-site ratios (regenerate with tokenthrift.ltm.calibration.calibrate_ratio(name, PAPER_RATIOS[name]))
DEFAULT_RATIOS: dict[str, tuple[float, ...]] = {
    # reached at the 4-token floor: the attention sequences of its 9 layers are 196, 39, 49, 10, 4, 4, 16, 4, 4
    "mobilevit_xs": (0.1986,) * 9,  # measured 0.7429
    "mobilevit_s": (0.6757,) * 9,  # measured 0.8355
    "efficientvit_b1": (0.5306,) * 7,  # measured 0.8467
    "vit_small_patch16_224": (0.9748,) * 2 + (0.9732,) * 10,  # measured 0.8599
    "vit_base_patch16_224": (0.9471,) * 12,  # measured 0.7331
    "swin_tiny_patch4_window7_224": (1.0,) * 4 + (0.6276,) * 8,  # measured 0.8438
    "swin_base_patch4_window7_224": (1.0,) * 4 + (0.5663,) * 20,  # measured 0.7751
    FMNIST_VIT: (0.9127,) * 3 + (0.9109,) * 3,  # the fmnist_vit_tiny_ltm recipe's, measured 0.851
}

# LTM models trained by tokenthrift, weights in the package: base -> MACs ratio of the shipped model
SHIPPED_RATIOS: dict[str, float] = {FMNIST_VIT: 0.851}
FMNIST_LTM = f"ltm_{FMNIST_VIT}"
SHIP_COMMAND = "python benchmarks/converge_fmnist.py --runs ltm_ib --ship"


_LTM_KWARGS = {"ltm_tau_s": "tau_s", "ltm_tau_g": "tau_g", "ltm_learn_tau": "learn_tau", "ltm_unmerge": "unmerge",
               "ltm_affinity": "affinity"}


def create_ltm(base_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``base_name`` with timm (with ``pretrained``, its timm weights: the LTM model has the same
    parameters) and convert it with its calibrated ratios; the model carries the ``ltm_*`` pretrained cfg."""
    ltm_cfg = resolve_pretrained_cfg(f"ltm_{base_name}", pretrained_cfg=kwargs.pop("pretrained_cfg", None),
                                     pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None)).to_dict()
    if pretrained and base_name in SHIPPED_RATIOS and not Path(ltm_cfg.get("file") or "").is_file():
        raise MissingFileError(f"the weights of ltm_{base_name} ({ltm_cfg.get('file')}) are not in this checkout: "
                               f"they are written by `{SHIP_COMMAND}` once its training run has finished")
    base_cfg = {**ltm_cfg, "architecture": base_name}
    if kwargs.get("features_only") and str(kwargs.get("feature_cls", "")).lower() == "fx":
        return _fx_features(base_name, pretrained, ltm_cfg, kwargs)
    if "ltm_ratio" in kwargs:
        if "ltm_site_ratio" in kwargs:
            raise InvalidArgumentError("give ltm_site_ratio (ltm_ratio is its former name), not both")
        warnings.warn("ltm_ratio is now ltm_site_ratio (the share of tokens each merge site keeps, compounding); for a "
                      "share of the MACs pass ltm_macs", DeprecationWarning, stacklevel=3)
        kwargs["ltm_site_ratio"] = kwargs.pop("ltm_ratio")
    ratio, macs = kwargs.pop("ltm_site_ratio", None), kwargs.pop("ltm_macs", None)
    if ratio is not None and macs is not None:
        raise InvalidArgumentError("give ltm_site_ratio or ltm_macs, not both")
    options = {_LTM_KWARGS[k]: kwargs.pop(k) for k in list(kwargs) if k in _LTM_KWARGS}
    model = timm.create_model(base_name, pretrained=pretrained, pretrained_cfg=base_cfg, **kwargs)
    if macs is not None:
        model = convert(model, macs=macs, **options)
    elif ratio is None:
        ratio = list(DEFAULT_RATIOS[base_name])
        sites = merge_sites(model)
        if kwargs.get("features_only") and sites < len(ratio):
            ratio = ratio[:sites]  # features_only pruned the blocks after the last feature
        elif sites != len(ratio):
            raise InvalidArgumentError(f"the calibrated ratios of ltm_{base_name} are for its default architecture "
                                       f"({len(ratio)} merge sites), this one has {sites}; pass ltm_macs=... or "
                                       "ltm_site_ratio=...")
    if macs is None:
        model = convert(model, ratio, **options)
    # what the model is, for timm.data.resolve_data_config and timm's tests: the ltm_* cfg
    model.pretrained_cfg = model.default_cfg = {**ltm_cfg, "num_classes": getattr(model, "num_classes", None)}
    return model


def _fx_features(base_name: str, pretrained: bool, ltm_cfg: dict, kwargs: dict) -> nn.Module:
    """``features_only=True, feature_cls="fx"``: the LTM blocks must exist before timm traces the model, so
    the whole model is converted first and then wrapped in timm's FeatureGraphNet, at the feature indices
    timm picks for the base model."""
    from timm.models import FeatureGraphNet

    ltm_keys = {"ltm_ratio", "ltm_site_ratio", "ltm_macs", *_LTM_KWARGS}
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


def _register(base_name: str) -> None:
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_ltm(base_name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = f"ltm_{base_name}"
    entry.__module__ = __name__
    macs = PAPER_RATIOS.get(base_name) or SHIPPED_RATIOS[base_name]
    entry.__doc__ = (f"LTM-{base_name}: timm {base_name} with learnable token merging, MACs ratio {macs} of the "
                     "base (calibrated)" + ("; pretrained=True: its weights shipped with tokenthrift."
                                            if base_name in SHIPPED_RATIOS else "."))
    globals()[entry.__name__] = entry
    register_model(entry)


def _base_cfgs() -> dict:
    """``ltm_<base>.<tag>`` -> the base model's default pretrained cfg (its weights fit the LTM model)."""
    out = {}
    for base in PAPER_RATIOS:
        cfg = get_pretrained_cfg(base)
        values = {k: v for k, v in cfg.to_dict().items() if k not in ("architecture", "tag")} if cfg else {}
        out[f"ltm_{base}" + (f".{cfg.tag}" if cfg and cfg.tag else "")] = values
    for base in SHIPPED_RATIOS:  # the base's cfg (input size, normalisation), the LTM model's own weights
        cfg = get_pretrained_cfg(base)
        values = {k: v for k, v in cfg.to_dict().items() if k not in ("architecture", "tag")}
        out[f"ltm_{base}.{cfg.tag}"] = {**values, "file": str(weights_path(f"ltm_{base}"))}
    return out


default_cfgs = generate_default_cfgs(_base_cfgs())  # read by timm's register_model below

for _name in (*PAPER_RATIOS, *SHIPPED_RATIOS):
    _register(_name)
