"""A ReViT of a transformers encoder saved and loaded the transformers way (``save_pretrained`` folder: config.json
and model.safetensors), so that it travels like any transformers model.

Each TAL-LN bank is saved under its norm's own names with one row per grid (``...layernorm_before.weight`` of
shape (K, D), largest grid first), and config.json records the ReViT settings (``tokenthrift_revit``). A plain
``from_pretrained`` of the folder therefore stops on the shape mismatch instead of loading norms it does not have
(transformers refuses mismatched shapes unless told to ignore them); :func:`from_pretrained` rebuilds the ReViT.

    revit = tt.revit.convert(model, grids=(14, 10, 7)); ...train...
    tt.revit.save_pretrained(revit, "my-revit")
    revit = tt.revit.from_pretrained("my-revit")
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InvalidArgumentError, UnsupportedModelError
from .model import ResizableViT, TALayerNorm, convert

__all__ = ["from_pretrained", "save_pretrained"]

CONFIG_KEY = "tokenthrift_revit"


def _banks(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, TALayerNorm)]


def save_pretrained(revit: ResizableViT, folder: str | Path, **kwargs) -> None:
    """Save a ReViT of a transformers model as a transformers folder (``kwargs``: those of the model's
    ``save_pretrained``), its TAL-LN banks stacked per norm, its settings in config.json."""
    vit = revit.vit
    if not hasattr(vit, "save_pretrained"):
        raise UnsupportedModelError("save_pretrained saves a ReViT of a transformers model; a timm one is saved with "
                                    "torch.save(revit.state_dict()) or a tokenthrift checkpoint")
    state = vit.state_dict()
    for name in _banks(vit):
        for part in ("weight", "bias"):
            rows = [state.pop(f"{name}.norms.{k}.{part}") for k in range(len(revit.grids))]
            state[f"{name}.{part}"] = torch.stack(rows)
    vit.config.tokenthrift_revit = {"grids": list(revit.grids), "tal_ln": revit.tal_ln,
                                    "interpolation": revit.interpolation, "antialias": revit.antialias}
    try:
        vit.save_pretrained(folder, state_dict=state, **kwargs)
    finally:
        del vit.config.tokenthrift_revit


def _saved_name(model: torch.nn.Module, key: str) -> str:
    """The name transformers writes ``key`` of ``model``'s state under (its save reverts its renames, e.g. ViT's
    ``vit.layers.0`` back to the checkpoints' ``vit.encoder.layer.0``)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without renames on save
        return key
    return next(iter(revert_weight_conversion(model, {key: torch.zeros(1)})))


def from_pretrained(folder: str | Path, **kwargs) -> ResizableViT:
    """The ReViT :func:`save_pretrained` wrote to ``folder``: the transformers class config.json names, loaded with
    its own ``from_pretrained`` (``kwargs``: e.g. ``attn_implementation="eager"``), converted with the saved
    grids, and every TAL-LN copy set from the stacked norms."""
    import transformers
    from safetensors import safe_open

    from ..hosts.transformers import load_saved

    folder = Path(folder)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the stacked norms do not fit the plain model: set below, not lost
    try:
        model, settings = load_saved(folder, CONFIG_KEY, "ReViT", ignore_mismatched_sizes=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.eval()
    revit = convert(model, grids=settings["grids"], tal_ln=settings["tal_ln"],
                    interpolation=settings["interpolation"], antialias=settings["antialias"])
    stacked = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            stacked.update({key: f.get_tensor(key) for key in f.keys()})
    with torch.no_grad():
        for name in _banks(model):
            bank = model.get_submodule(name)
            for part in ("weight", "bias"):
                rows = stacked[_saved_name(model, f"{name}.{part}")]
                if rows.shape[0] != bank.num_grids:
                    raise InvalidArgumentError(f"{folder}: {name}.{part} holds {rows.shape[0]} grids' norms, the "
                                               f"config {bank.num_grids}")
                for norm, row in zip(bank.norms, rows):
                    getattr(norm, part).copy_(row)
    return revit
