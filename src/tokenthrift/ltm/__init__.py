"""LTM: Learnable Token Merging for timm models.

Wang & Yang, "Efficient Visual Transformer by Learnable Token Merging", TPAMI 2025 (arXiv 2407.15219).
The paper released no model code: the mask module and the per-family blocks here are this project's
reconstruction from the paper's figure and text (docs/methods.md §4), with the open choices marked *decision* in
each module's docstring.

Public API::

    ltm = tokenthrift.ltm.convert(model, macs=0.86)     # in place; keep 0.86 of the MACs (ratios calibrated)
    ltm = tokenthrift.ltm.convert(model, site_ratio=0.9)  # or the share each merge site keeps (compounds)
    tokenthrift.ltm.remove(ltm)                          # back to the plain timm model
    timm.create_model("ltm_vit_small_patch16_224")       # registered names, calibrated ratios
    maps = tokenthrift.ltm.merge_maps(ltm, images)       # which sources feed which merged token

Families (one file each, with its LTM block and its :class:`~.family.Family` record): ViT/DeiT (:mod:`.vit`,
persistent merging), Swin (:mod:`.swin`, merge/unmerge inside every window), MobileViT (:mod:`.mobilevit`,
one mask per image shared by the pixel groups), EfficientViT-MIT (:mod:`.efficientvit`, MBConv on the
merged grid). :mod:`.conversion` holds the family table and ``convert``/``remove``/``merge_maps``;
:mod:`.mask` the mask module and the persistent merge step, :mod:`.ib` the IB loss, :mod:`.registry` the
registered models, :mod:`.calibration` the calibration of their ratios. The training-engine adapter is
:mod:`tokenthrift.train.methods.ltm`. This package only re-exports.
"""
from . import calibration, ib, registry  # registry registers the ltm_* names with timm
from .conversion import (
    FAMILIES,
    FAMILY_TABLE,
    MergeMap,
    convert,
    family,
    is_ltm,
    merge_maps,
    merge_sites,
    mergers,
    plain_copy,
    remove,
    set_macs,
    set_temperature,
)
from .family import Family
from .ib import IBLoss
from .mask import (
    MIN_TOKENS,
    MergeState,
    TokenMerger,
    merge,
    merge_mask,
    merge_step,
    stencil,
    target_grid,
    unmerge,
)
from .transformers_io import from_pretrained, save_pretrained

__all__ = [
    "FAMILIES",
    "FAMILY_TABLE",
    "Family",
    "IBLoss",
    "MIN_TOKENS",
    "MergeMap",
    "MergeState",
    "TokenMerger",
    "convert",
    "family",
    "from_pretrained",
    "ib",
    "is_ltm",
    "merge",
    "merge_mask",
    "merge_maps",
    "merge_sites",
    "merge_step",
    "mergers",
    "registry",
    "calibration",
    "plain_copy",
    "remove",
    "save_pretrained",
    "set_macs",
    "set_temperature",
    "stencil",
    "target_grid",
    "unmerge",
]
