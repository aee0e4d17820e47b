"""LTM conversion: the table of model families and the functions that read it (``convert``, ``remove``,
``merge_sites``, ``merge_maps``, ...). One :class:`~tokenthrift.ltm.family.Family` record per family;
the records live with their LTM blocks in :mod:`.vit`, :mod:`.swin`, :mod:`.mobilevit` and
:mod:`.efficientvit`.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, StateError, TokenthriftWarning, UnsupportedModelError
from ..measure import model_input_shape, module_modes, restore_modes, training_mode
from ..tokens import picture_sites
from . import efficientvit, mobilevit, swin, vit
from .budget import fit_site_ratios
from .family import Family
from .mask import MIN_TOKENS, UNMERGE_MODES, TokenMerger, check_ratio, mergers

__all__ = ["FAMILIES", "FAMILY_TABLE", "MergeMap", "convert", "family", "is_ltm", "merge_maps", "merge_sites",
           "mergers", "plain_copy", "remove", "set_macs", "set_temperature"]

MACS_TOLERANCE = 0.01  # set_macs warns when the MACs ratio it reaches is further than this from the one asked

# one row per family (a new family: its file with the LTM block and its Family record, and a row here)
FAMILY_TABLE: tuple[Family, ...] = (vit.FAMILY, swin.FAMILY, mobilevit.FAMILY, efficientvit.FAMILY)
FAMILIES = tuple(f.name for f in FAMILY_TABLE)


def _family(model: nn.Module) -> Family:
    """The :class:`Family` record of a timm model (or of a ``features_only`` wrapper of one)."""
    from timm.models.mobilevit import MobileVitV2Block

    if any(isinstance(m, MobileVitV2Block) for m in model.modules()):
        raise UnsupportedModelError("LTM supports MobileViT v1 (mobilevit_xxs/xs/s), not MobileViT v2 (separable "
                                    "linear attention has no token axis to merge)")
    found = [f for f in FAMILY_TABLE if f.matches(model)]
    if len(found) == 1:
        return found[0]
    raise UnsupportedModelError(
        "LTM supports timm VisionTransformer (vit_*/deit_*), Eva (eva02_*, *_dinov3, vit_pe_*, *rope*), "
        "SwinTransformer (swin_*), MobileViT (mobilevit_xxs/xs/s) and EfficientViT-MIT (efficientvit_b*) models; got {type(model).__name__}. Use tokenthrift.ltm.convert on "
        "one of those, or train this model without --method ltm.")


def family(model: nn.Module) -> str:
    """Which LTM family a timm model (or a ``features_only`` wrapper of one) belongs to: one of
    :data:`FAMILIES`. Raises a ``TypeError`` naming the supported families for anything else."""
    return _family(model).name


def merge_sites(model: nn.Module) -> int:
    """How many ratios ``convert`` expects for this model: ViT blocks, Swin blocks, MobileViT
    transformer layers or EfficientViT attention blocks."""
    return _family(model).num_sites(model)


def _ratios(ratio: float | Sequence[float], sites: int) -> list[float]:
    if isinstance(ratio, (int, float)):
        ratios = [float(ratio)] * sites
    else:
        ratios = [float(r) for r in ratio]
        if len(ratios) != sites:
            raise InvalidArgumentError(f"LTM ratio list has {len(ratios)} entries but this model has {sites} merge "
                                       "sites (one per ViT/Swin/EfficientViT block or MobileViT transformer layer); "
                                       "pass a float or a list of that length")
    for r in ratios:  # before any block is patched: a bad ratio leaves the model as it was
        check_ratio(r)
    return ratios


def is_ltm(model: nn.Module) -> bool:
    """True if LTM is applied to ``model``."""
    return any(isinstance(m, TokenMerger) for m in model.modules())


def convert(
    model: nn.Module,
    site_ratio: float | Sequence[float] | None = None,
    *,
    macs: float | None = None,
    input_size: Sequence[int] | None = None,
    tau_s: float = 0.1,
    tau_g: float = 1.0,
    learn_tau: bool = False,
    affinity: str = "auto",
    unmerge: str = "residual",
    ratio: float | Sequence[float] | None = None,
) -> nn.Module:
    """Apply LTM to a timm model in place and return it (parameters and state_dict keys unchanged).

    Args:
        model: a timm ViT/DeiT, Swin, MobileViT (v1) or EfficientViT-MIT model, or a ``features_only``
            wrapper of one.
        site_ratio: share of the tokens *each merge site* keeps (a float for every site, or one per merge site,
            see :func:`merge_sites`). The shares compound where merges persist: ViT and MobileViT block k keeps
            about r_0·…·r_k of the tokens (0.9 at each of DeiT-S's 12 blocks is 0.28 of the tokens at the last one,
            0.57 of its MACs); Swin and EfficientViT merge and unmerge inside every block. 1.0 everywhere
            gives exactly the plain model. Default 0.9 when ``macs`` is not given either.
        macs: instead of ``site_ratio``, the share of the model's MACs to keep (e.g. 0.86): the per-site ratios
            are calibrated on ``model`` at ``input_size`` as the registered ``ltm_*`` models' are
            (:func:`~tokenthrift.ltm.calibration.fit_site_ratios`; every site merges, to the closest reachable
            ratio above the 4-token floor). ``input_size`` (C, H, W): default the model's own
            (:func:`~tokenthrift.measure.model_input_shape`: a transformers config's size, a patch embedding's, the
            size timm built it for).
        tau_s: soft-mask temperature; tau_g: Gumbel-softmax temperature (training).
        learn_tau: one learnable scalar temperature per merge site (the only parameters LTM may add).
        affinity: ``auto``/``dense``/``sparse`` affinity kernel (see :mod:`tokenthrift.ltm.mask`).
        unmerge: Swin and EfficientViT only: ``residual`` (decision, default) unmerges the update,
            out = Z + broadcast(MLP(X')), keeping every source's own residual; ``broadcast`` replaces the
            sources by their merged token, out = broadcast(X' + MLP(X')).
        ratio: the former name of ``site_ratio`` (deprecated: it read as a MACs ratio, which it is not).

    The model stays in the mode it was in: on a model in eval mode every merge site is in eval mode (argmax, no
    Gumbel noise: deterministic, and compiled or exported copies equal eager with no ``.eval()`` after the call),
    on a training model in training mode. A merge site inside a part the user put in another mode (a stage frozen
    in eval mode) takes that part's mode; no existing module's flag changes
    (:func:`~tokenthrift.measure.state.restore_modes`).
    """
    if ratio is not None:
        if site_ratio is not None:
            raise InvalidArgumentError("give site_ratio (ratio is its former name), not both")
        warnings.warn("tokenthrift.ltm.convert(ratio=...) is now site_ratio=...: the share of tokens each merge site "
                      "keeps, which compounds over the sites; for a share of the MACs pass macs=...",
                      DeprecationWarning, stacklevel=2)
        site_ratio = ratio
    if site_ratio is not None and macs is not None:
        raise InvalidArgumentError("give LTM's cost as site_ratio (per merge site, compounding) or as macs (a share "
                                   "of the model's MACs), not both")
    if is_ltm(model):
        raise StateError("LTM is already applied to this model; call tokenthrift.ltm.remove(model) first")
    if unmerge not in UNMERGE_MODES:
        raise InvalidArgumentError(f"unknown LTM unmerge mode {unmerge!r}; choose one of {', '.join(UNMERGE_MODES)}")
    fam = _family(model)
    if unmerge != "residual" and fam.persistent:
        raise InvalidArgumentError(f"unmerge={unmerge!r} applies to Swin and EfficientViT, whose blocks unmerge what "
                                   f"they merge; {fam.name} merges persist")
    if macs is not None and not 0.0 < macs <= 1.0:  # checked before the model changes
        raise InvalidArgumentError(f"LTM macs={macs} must lie in (0, 1]: the share of the model's MACs to keep")
    ratios = _ratios(0.9 if site_ratio is None else site_ratio, fam.num_sites(model))
    modes = module_modes(model)
    fam.swap_in(model, [1.0] * len(ratios) if macs is not None else ratios, tau_s=tau_s, tau_g=tau_g,
                learn_tau=learn_tau, affinity=affinity, unmerge=unmerge)
    restore_modes(model, modes)  # the merge sites merge as the model runs: argmax in eval mode, Gumbel in training
    if macs is not None:
        set_macs(model, macs, input_size)
    return model


def set_macs(model: nn.Module, macs: float, input_size: Sequence[int] | None = None) -> tuple[list[float], float]:
    """Calibrate the per-site ratios of the LTM model ``model`` (in place) so that its MACs are ``macs`` of the same
    model without merging, on ``input_size`` (default the model's own); returns the ratios and the MACs ratio
    reached (the closest the token grids and the 4-token floor allow)."""
    if not is_ltm(model):
        raise StateError("LTM is not applied to this model; convert it with tokenthrift.ltm.convert(model, macs=...)")
    size = tuple(input_size) if input_size is not None else _input_size(model)
    with training_mode(model, False):
        ratios, reached = fit_site_ratios(model, macs, size, centred=False)
    if abs(reached - macs) > MACS_TOLERANCE:  # the token grids round, and no merge may go below the 4-token floor
        warnings.warn(f"LTM: asked for {macs:g} of the MACs, the closest this model reaches at {size} is "
                      f"{reached:.3f} (token grids are whole, and no merge leaves fewer than {MIN_TOKENS} tokens)",
                      TokenthriftWarning, stacklevel=2)
    return ratios, reached


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) a timm image model is built for (its patch embedding's size where it has one)."""
    c, h, _ = model_input_shape(model)
    pe_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return c, h, int(pe_size[1]) if pe_size else h


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`convert`: the plain timm model again (learned temperatures are dropped)."""
    if not is_ltm(model):
        raise StateError("LTM is not applied to this model; nothing to remove")
    _family(model).swap_out(model)
    return model


def plain_copy(model: nn.Module) -> nn.Module:
    """The plain timm model an LTM model was converted from, as a copy (the LTM model is left as it is): the
    baseline every LTM measurement compares with."""
    return remove(copy.deepcopy(model))


def set_temperature(model: nn.Module, tau_g: float | None = None, tau_s: float | None = None) -> None:
    """Set the Gumbel (``tau_g``) and/or soft-mask (``tau_s``) temperature of every merge site."""
    for m in mergers(model):
        if tau_g is not None:
            if tau_g <= 0:
                raise InvalidArgumentError(f"tau_g={tau_g} must be positive")
            m.tau_g = float(tau_g)
        if tau_s is not None:
            if tau_s <= 0:
                raise InvalidArgumentError(f"tau_s={tau_s} must be positive")
            m.tau_s = float(tau_s)


@dataclass
class MergeMap:
    """Where the tokens of one merge site went, for plotting.

    site: module name of the merge site. grid -> target: the source and target grids. target_index
    (B', N) and weight (B', N): the merged token each source joined and its weight in it (B' = B, or
    B·windows for Swin). patch_target (B', N0) and patch_weight (B', N0): the same for the original
    patches of a persistent chain (ViT: since the patch embedding; MobileViT: since the block's first
    layer), i.e. the composition of all merges so far; equal to target_index/weight elsewhere.
    origin: the (h0, w0) layout of patch_target's N0 tokens (one window for Swin); windows: (rows,
    columns) of Swin windows, (1, 1) elsewhere; size: (H, W) of the token map (windows may overhang it).
    """

    site: str
    grid: tuple[int, int]
    target: tuple[int, int]
    target_index: torch.Tensor
    weight: torch.Tensor
    patch_target: torch.Tensor
    patch_weight: torch.Tensor
    origin: tuple[int, int]
    windows: tuple[int, int] = (1, 1)
    size: tuple[int, int] | None = None

    def spatial(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the merged token every original token joined and its weight, laid out as the token
        map: two (B, H, W) tensors. Merged-token ids are unique within an image (window-major for Swin)."""
        (nh, nw), (h0, w0) = self.windows, self.origin
        H, W = self.size or (nh * h0, nw * w0)
        B = self.patch_target.shape[0] // (nh * nw)
        M = self.target[0] * self.target[1]
        window = torch.arange(nh * nw, device=self.patch_target.device).repeat(B).unsqueeze(1)
        ids = self.patch_target + window * M

        def layout(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(B, nh, nw, h0, w0).permute(0, 1, 3, 2, 4).reshape(B, nh * h0, nw * w0)
            return t[:, :H, :W]

        return layout(ids), layout(self.patch_weight)


@torch.no_grad()
def merge_maps(model: nn.Module, images: torch.Tensor, sites: Sequence[str] | str | None = "all") -> list[MergeMap]:
    """Run ``model`` on ``images`` in eval mode and report every merge that happened (sites whose ratio
    kept the grid are left out), in forward order. The model's train/eval flag is restored.

    ``sites``: ``"all"``; ``None``, the first, middle and last merge (what a picture shows); or site-name
    prefixes (``["blocks.3", "stages.2"]``), an error if none matches."""
    maps = _all_merge_maps(model, images)
    if sites == "all":
        return maps
    if sites is None:
        return picture_sites(maps)
    chosen = [m for m in maps if any(m.site.startswith(s) for s in sites)]
    if not chosen:
        raise InvalidArgumentError(f"sites {list(sites)} matched none of the merge sites: "
                                   f"{', '.join(m.site for m in maps)}")
    return chosen


def _all_merge_maps(model: nn.Module, images: torch.Tensor) -> list[MergeMap]:
    inner = model
    fam = _family(inner)
    named = [(n, m) for n, m in inner.named_modules() if isinstance(m, TokenMerger)]
    if not named:
        raise StateError("LTM is not applied to this model; call tokenthrift.ltm.convert first")
    chain_of = fam.chains(inner)  # site name -> chain id (persistent merges compose)
    for _, m in named:
        m.record, m.last = True, None
    try:
        with training_mode(inner, False):
            inner(images)
    finally:
        masks = []
        for _, m in named:
            masks.append(m.last)
            m.record, m.last = False, None
    maps: list[MergeMap] = []
    chains: dict[Any, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = {}
    for (name, _), mask in zip(named, masks):
        if mask is None:
            continue
        index, weight = mask.assign, mask.chosen_weight
        chain = chain_of.get(name)
        if chain is not None and chain in chains:
            prev_index, prev_weight, origin = chains[chain]
            patch_index = index.gather(1, prev_index)
            patch_weight = prev_weight * weight.gather(1, prev_index)
        else:  # the first merge of a chain runs on the chain's original grid
            patch_index, patch_weight, origin = index, weight, mask.grid
        if chain is not None:
            chains[chain] = (patch_index, patch_weight, origin)
        windows, size = fam.layout(inner, name, mask.grid) if fam.layout is not None else ((1, 1), origin)
        maps.append(MergeMap(site=name, grid=mask.grid, target=mask.target, target_index=index, weight=weight,
                             patch_target=patch_index, patch_weight=patch_weight, origin=origin, windows=windows,
                             size=size))
    return maps
