"""An LTM model of a transformers encoder saved and loaded the transformers way (a ``save_pretrained`` folder), so that
it travels like any transformers model and comes back computing the same function, bit for bit.

config.json is the plain model's (``architectures`` names the transformers class, e.g. ``ViTForImageClassification``)
with the LTM settings under ``tokenthrift_ltm``: every merge site's ratio, temperatures (a learned one as the value of
its ``log_tau``, exactly), affinity and unmerge mode, in forward order. The weights are the plain model's tensors, in
``model.tokenthrift-ltm.safetensors`` (a transformers *variant* of the folder's weights).

Why the variant: LTM adds no tensor to the model (its learnable temperatures are scalars, kept in config.json), so the
plain class would load the weights without a complaint and silently compute another function (no merging). With no
default weights file in the folder, every plain route (the class's or an Auto class's ``from_pretrained``,
``--model hf:<folder>``) stops instead (transformers: "no file named model.safetensors"; ``hf:<folder>`` names
:func:`from_pretrained`). Asking transformers for ``variant="tokenthrift-ltm"`` by hand gives the plain model, the
weights without LTM. A plain ``model.save_pretrained`` of an LTM model is refused for the same reason.

    ltm = tt.ltm.convert(model, site_ratio=0.9); ...train...
    tt.ltm.save_pretrained(ltm, "my-ltm")
    ltm = tt.ltm.from_pretrained("my-ltm")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, StateError, UnsupportedModelError
from ..hosts.transformers import load_saved, save_as_plain
from .conversion import convert, is_ltm
from .mask import TokenMerger, mergers

__all__ = ["CONFIG_KEY", "VARIANT", "from_pretrained", "save_pretrained"]

CONFIG_KEY = "tokenthrift_ltm"
VARIANT = "tokenthrift-ltm"  # the weights file: model.tokenthrift-ltm.safetensors


def _site(merger: TokenMerger) -> dict[str, Any]:
    """One merge site's settings, as JSON values that give back the same floats."""
    site = {"ratio": merger.ratio, "tau_g": merger.tau_g, "affinity": merger.affinity, "unmerge": merger.unmerge}
    if merger.log_tau is not None:
        site["log_tau"] = merger.log_tau.item()  # a float32 (or lower) value: a Python float holds it exactly
    else:
        site["tau_s"] = merger.tau_s
    return site


def _refuse_own(kwargs: dict, allowed: str) -> None:
    for name in ("variant", "state_dict"):
        if name in kwargs:
            raise InvalidArgumentError(f"tokenthrift.ltm.{allowed} chooses {name} itself (the weights are the plain "
                                       f"model's, in the {VARIANT!r} variant); call it without {name}=")


def save_pretrained(model: nn.Module, folder: str | Path, **kwargs) -> None:
    """Save an LTM model of a transformers encoder as a transformers folder (``kwargs``: those of the model's
    ``save_pretrained``, e.g. ``safe_serialization``, ``max_shard_size``): the plain model's weights in the
    ``tokenthrift-ltm`` variant and the merge sites' settings in config.json, which :func:`from_pretrained` reads."""
    if not is_ltm(model):
        raise StateError("LTM is not applied to this model; save a plain transformers model with its own "
                         "save_pretrained")
    if not hasattr(model, "save_pretrained"):
        raise UnsupportedModelError(f"tokenthrift.ltm.save_pretrained saves an LTM model of a transformers encoder; "
                                    f"this is a {type(model).__name__} (a timm model is saved with "
                                    "torch.save(model.state_dict()) or a tokenthrift checkpoint)")
    _refuse_own(kwargs, "save_pretrained")
    learned = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, TokenMerger)
               for p, _ in m.named_parameters()}  # the learned temperatures: in config.json
    state = {key: value for key, value in model.state_dict().items() if key not in learned}
    save_as_plain(model, folder, settings={CONFIG_KEY: {"sites": [_site(m) for m in mergers(model)]}},
                  state_dict=state, variant=VARIANT, **kwargs)


def from_pretrained(folder: str | Path, **kwargs) -> nn.Module:
    """The LTM model :func:`save_pretrained` wrote to ``folder``, in eval mode: the transformers class config.json
    names, loaded with its own ``from_pretrained`` (``kwargs``: e.g. ``attn_implementation="eager"``), converted with
    the saved ratios, and every merge site given its saved temperatures, affinity and unmerge mode."""
    _refuse_own(kwargs, "from_pretrained")
    model, settings = load_saved(folder, CONFIG_KEY, "LTM", variant=VARIANT, **kwargs)
    sites = settings["sites"]
    learned = {"log_tau" in site for site in sites}
    if len(learned) != 1:
        raise InvalidArgumentError(f"{folder}/config.json: {CONFIG_KEY} mixes learned and fixed temperatures, which "
                                   "tokenthrift.ltm.convert does not make (learn_tau is one setting for every site)")
    convert(model, [site["ratio"] for site in sites], learn_tau=learned.pop(), affinity=sites[0]["affinity"],
            unmerge=sites[0]["unmerge"])
    device = next(model.parameters()).device
    with torch.no_grad():
        for merger, site in zip(mergers(model), sites):
            merger.to(device)
            merger.tau_g, merger.affinity, merger.unmerge = site["tau_g"], site["affinity"], site["unmerge"]
            if merger.log_tau is not None:
                merger.log_tau.fill_(site["log_tau"])
            else:
                merger.tau_s = site["tau_s"]
    return model.eval()
