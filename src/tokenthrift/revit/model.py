"""Resizable ViT (ReViT): one set of weights that runs at several token grids, with TAL-LN.

Zhou & Zhu, "Make A Long Image Short: Adaptive Token Length for Vision Transformers", ECML-PKDD 2023
(arXiv 2307.02092). docs/methods.md §3.

How a grid is run (docs/methods.md §3 decisions): the full-size image is resized (bilinear, antialias) to
``grid * patch`` pixels and goes through the unchanged patch embedding; the single learnable position
table stays at the largest grid and is resampled bicubically to the current grid on every forward, so
every grid trains it. Every LayerNorm of the token stream becomes a :class:`TALayerNorm`, a bank of K
copies (one per grid); everything else is shared.

Grid index convention, used by every ``tokenthrift.revit`` module: ``k`` indexes ``revit.grids``,
which is sorted from the largest grid down, so ``k = 0`` is the largest grid (the full-token model)
and ``k = K - 1`` the smallest.

Public API: :class:`TALayerNorm`, :class:`ResizableViT`, :func:`convert`, :func:`check_grids`,
:func:`norm_positions`.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidArgumentError, UnsupportedModelError
from ..hosts import host_of
from ..measure import module_modes, restore_modes

__all__ = ["TALayerNorm", "ResizableViT", "convert", "check_grids", "norm_positions", "DEFAULT_GRIDS"]

DEFAULT_GRIDS = (14, 10, 7)


class TALayerNorm(nn.Module):
    """Token-length-aware LayerNorm: K independent copies of one norm layer, one per grid.

    ``index`` (an index into ``ResizableViT.grids``, 0 = largest grid) picks the copy that runs.
    :class:`ResizableViT` sets it for the duration of each forward and restores it afterwards; outside
    a ReViT forward it stays at 0, so the wrapped model behaves like the plain model at its native size.

    x (..., D) -> (..., D), exactly ``norms[index](x)``.
    """

    def __init__(self, norm: nn.Module, num_grids: int):
        super().__init__()
        if num_grids < 1:
            raise InvalidArgumentError(f"TALayerNorm needs at least one grid; got num_grids={num_grids}")
        # every copy starts as the original norm (docs/methods.md §3: initialise each copy from the original LN)
        self.norms = nn.ModuleList(copy.deepcopy(norm) for _ in range(num_grids))
        self.index = 0

    @property
    def num_grids(self) -> int:
        return len(self.norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norms[self.index](x)

    def extra_repr(self) -> str:
        return f"num_grids={self.num_grids}, index={self.index}"


def norm_positions(vit: nn.Module) -> list[str]:
    """Dotted names of the norm layers TAL-LN banks in a host-described encoder (a timm ``VisionTransformer``,
    ``Eva`` or ``NaFlexVit``, a transformers ViT / DeiT / DINOv2 / CLIP / SigLIP, the TimeSformer:
    :meth:`tokenthrift.hosts.Host.token_norms`).

    These are the norms of the token stream, all of width D: ``norm_pre`` (CLIP-style pre-norm),
    ``blocks.i.norm1`` / ``blocks.i.norm2`` (and ``blocks.i.temporal_norm1`` in a TimeSformer), the final
    ``norm`` and ``fc_norm`` (avg-pool models), wherever they are not ``nn.Identity``. DeiT has 25,
    TimeSformer-B 37. Norms inside attention or the MLP (q/k norm, ``scale_attn_norm``,
    ``scale_mlp_norm``) and the attention-pool head stay shared.
    """
    return host_of(vit, "ReViT", reduces=False).token_norms()


def check_grids(grids: Sequence[int] | int) -> tuple[int, ...]:
    """Validate grids (tokens per side) and return them sorted largest first, the order every index uses."""
    grids = (grids,) if isinstance(grids, int) else tuple(grids)
    if not grids:
        raise InvalidArgumentError("ReViT needs at least one grid, e.g. grids=(14, 10, 7)")
    if any(not isinstance(g, (int, float)) or int(g) != g or g < 1 for g in grids):
        raise InvalidArgumentError(f"grids must be positive integers (tokens per side); got {grids}")
    if len(set(grids)) != len(grids):
        raise InvalidArgumentError(f"grids must be distinct; got {grids}")
    return tuple(sorted((int(g) for g in grids), reverse=True))


def _square(value, what: str) -> int:
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        raise InvalidArgumentError(f"ReViT supports square {what}s only; this model has {what} {tuple(value)}")
    return int(a)


class ResizableViT(nn.Module):
    """A timm ``VisionTransformer`` that runs at several token grids (ReViT, docs/methods.md §3), or any encoder a
    host describes (:mod:`tokenthrift.hosts`: the model runs through its host, a video model's clips as any image
    model's images).

    Build it with :func:`convert`. ``forward(x, grid=None)`` takes full-size images (B, C, H, W) (or clips (B, C, T,
    H, W): every frame resized) at the model's native size and returns the logits (B, num_classes) of the model run at
    ``grid`` x ``grid`` tokens (default: the largest grid, i.e. the plain model). A distilled DeiT in
    distilled-training mode returns its (head, dist-head) pair, as timm does.

    Attributes: ``vit`` (the wrapped timm model; its state_dict keys keep timm's names under ``vit.``,
    each banked norm as ``....norms.<k>.weight``), ``grids`` (largest first), ``patch_size``,
    ``img_size``, ``input_size``, ``tal_ln``, ``interpolation``, ``antialias``.
    """

    def __init__(self, vit: nn.Module, grids: Sequence[int] = DEFAULT_GRIDS, tal_ln: bool = True,
                 interpolation: str = "bilinear", antialias: bool = True):
        super().__init__()
        if isinstance(vit, ResizableViT):
            raise UnsupportedModelError("this model is already a ResizableViT; convert the plain timm model once")
        try:
            self.host = host_of(vit, "ReViT", reduces=False)  # ReViT runs every block whole
        except UnsupportedModelError:
            raise UnsupportedModelError(
                "ReViT supports the encoders tokenthrift's hosts describe (timm VisionTransformer: vit_*, deit_*, "
                "registers; timm Eva: eva02_*, *_dinov3, vit_pe_*, *_rope_*; timm NaFlexVit: naflexvit_*) and "
                "tokenthrift's TimeSformer "
                f"(timesformer_*); got {type(vit).__name__}. Create one with timm.create_model.") from None
        if any(isinstance(m, TALayerNorm) for m in vit.modules()):
            raise InvalidArgumentError("this ViT already holds TAL-LN banks (it was converted before); convert a plain "
                                       "model")
        grids = check_grids(grids)
        if interpolation not in ("bilinear", "bicubic"):
            raise InvalidArgumentError(f"interpolation={interpolation!r}: resize the image with bilinear (default) or "
                                       "bicubic")
        host = self.host
        self.patch_size = _square(host.patch_size, "patch size")
        if not host.sized:  # a NaFlexViT takes any grid: the largest sets the size
            native, self.img_size = grids[0], grids[0] * self.patch_size
        else:
            try:
                image = host.image_size
            except UnsupportedModelError as err:
                raise InvalidArgumentError(f"ReViT needs a model with a fixed image size: {err}") from None
            native, self.img_size = _square(host.grid_size, "patch grid"), _square(image, "image size")
        self.in_chans = host.in_chans
        if native != grids[0]:
            raise InvalidArgumentError(
                f"the largest grid must be the model's own patch grid: this model sees {native}x{native} patches "
                f"({self.img_size} px, patch {self.patch_size}) but grids={grids}. Use grids starting at {native} "
                f"(e.g. {tuple(round(g * native / 14) for g in DEFAULT_GRIDS)}) or rebuild the model with "
                f"img_size={grids[0] * self.patch_size}.")
        modes = module_modes(vit)  # before the model changes: the wrapper and the banks follow its mode
        self.vit = vit
        self.grids = grids
        self.tal_ln = bool(tal_ln)
        self.interpolation = interpolation
        self.antialias = antialias
        positions = norm_positions(vit) if self.tal_ln else []  # validate before touching the model

        # timm's dynamic_img_size mode (the host's follow_input_size): _pos_embed resamples the one position table
        # (bicubic, antialias; prefix entries untouched, no_embed_class respected) from the stored largest grid to
        # the current one, and rotary angles are those timm computes for that grid; at the largest grid both are
        # the model's own (a model that takes every input's grid as it is, the TimeSformer, has nothing to switch).
        host.follow_input_size()

        self._banks: tuple[TALayerNorm, ...] = ()
        if self.tal_ln:
            banks = []
            for name in positions:
                parent, _, attr = name.rpartition(".")
                owner = vit.get_submodule(parent) if parent else vit
                norm = getattr(owner, attr)
                bank = TALayerNorm(norm, len(grids))
                modes[bank] = norm.training  # it runs in the mode of the norm it replaces, as its copies do
                setattr(owner, attr, bank)
                banks.append(bank)
            self._banks = tuple(banks)  # a plain tuple (not registered twice); deepcopy keeps it consistent
        restore_modes(self, modes, default=vit.training)  # a new nn.Module starts in training mode

    # ------------------------------------------------------------------ grids
    @property
    def num_classes(self) -> int:
        vit = self.vit
        return vit.num_classes if hasattr(vit, "num_classes") else int(vit.config.num_labels)  # timm, transformers

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.vit, "pretrained_cfg", {})

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict) -> None:  # the wrapped model's (e.g. the class names a run records)
        self.vit.pretrained_cfg = cfg

    @property
    def input_size(self) -> tuple[int, ...]:
        """(C, H, W) of the images ``forward`` takes (the model's native size); (C, T, H, W) for clips."""
        return (self.in_chans, *self.host.frame_dims, self.img_size, self.img_size)

    def input_size_for(self, grid: int) -> tuple[int, ...]:
        """(C, [T,] grid*patch, grid*patch): the size the image (every frame) is resized to before the patch
        embedding."""
        side = self.grids[self.grid_index(grid)] * self.patch_size
        return (*self.input_size[:-2], side, side)

    def grid_index(self, grid: int | None) -> int:
        """Index of ``grid`` in :attr:`grids` (0 = largest); ``None`` means the largest grid."""
        if grid is None:
            return 0
        try:
            return self.grids.index(grid)
        except ValueError:
            raise InvalidArgumentError(f"grid {grid!r} is not one of this ResizableViT's grids {self.grids}; convert "
                                       "the model with that grid included") from None

    def banks(self) -> tuple[TALayerNorm, ...]:
        """The TAL-LN banks, in :func:`norm_positions` order (empty with ``tal_ln=False``)."""
        return self._banks

    def bank_parameters(self, index: int | None = None, exclude: int | None = None) -> list[nn.Parameter]:
        """Parameters of the norm copies for grid ``index`` (all grids if None), skipping grid ``exclude``."""
        return [p for bank in self._banks for k, norm in enumerate(bank.norms)
                if (index is None or k == index) and k != exclude for p in norm.parameters()]

    @contextmanager
    def at_grid(self, grid: int | None) -> Iterator[int]:
        """Select every TAL-LN bank's copy for ``grid`` inside the block; restores the previous selection
        on exit (also on error), so a selection cannot leak into a later forward. Yields the index."""
        k = self.grid_index(grid)
        previous = [bank.index for bank in self._banks]
        for bank in self._banks:
            bank.index = k
        try:
            yield k
        finally:
            for bank, idx in zip(self._banks, previous):
                bank.index = idx

    # ------------------------------------------------------------------ forward
    def resize(self, x: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """(B, C, H, W) at the native size -> (B, C, g*p, g*p), every frame of clips (B, C, T, H, W) alike;
        the identity at the largest grid."""
        if x.dim() != len(self.input_size) + 1 or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            dims = ", ".join(["B", "C", *("T" for _ in self.host.frame_dims)])
            raise InvalidArgumentError(
                f"ResizableViT takes full-size {self.host.inputs} ({dims}, {self.img_size}, {self.img_size}) and "
                f"resizes them itself; got {tuple(x.shape)}")
        side = self.input_size_for(self.grids[self.grid_index(grid)])[-1]
        if side == self.img_size:
            return x
        # every image: (B, C, [T,] H, W) -> ([B·T], C, H, W) and back (a no-op move for images)
        images = x.movedim(1, -3)
        C, shape = x.shape[1], images.shape[:-3]
        images = self._resize(images.reshape(-1, C, *x.shape[-2:]), side)
        return images.reshape(*shape, C, side, side).movedim(-3, 1)

    def _resize(self, x: torch.Tensor, side: int) -> torch.Tensor:
        return F.interpolate(x, size=(side, side), mode=self.interpolation, antialias=self.antialias,
                             align_corners=False)

    def _block_at(self, block: nn.Module, grid: int, x: torch.Tensor, args: tuple) -> torch.Tensor:
        with self.at_grid(grid):
            return self.host.run_block(block, x, *args)

    def forward_features(self, x: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """Full-size images (B, C, H, W) -> tokens after the final norm (B, P + g*g, D) at ``grid``
        (clips (B, C, T, H, W) -> (B, 1 + g*g*T, D))."""
        x = self.resize(x, grid)
        host = self.host
        with self.at_grid(grid) as k:
            if not (getattr(self.vit, "grad_checkpointing", False) and torch.is_grad_enabled() and self._banks
                    and len(self.grids) > 1):
                return host.forward_features(x)
            # Gradient checkpointing recomputes each block during backward, after this context has exited;
            # timm's checkpoint_seq would then run the wrong norm copies. Checkpoint per block ourselves,
            # with a function that selects the grid again when it is recomputed.
            def run(block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
                return checkpoint(self._block_at, block, self.grids[k], x, args, use_reentrant=False)

            return host.norm(host.blocks_forward(host.embed(x), run))

    def forward_head(self, x: torch.Tensor, grid: int | None = None, pre_logits: bool = False) -> torch.Tensor:
        """Tokens from :meth:`forward_features` at ``grid`` -> logits (B, num_classes) (fc_norm may be banked)."""
        with self.at_grid(grid):
            return self.host.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, grid: int | None = None):
        """Full-size images (B, C, H, W) or clips (B, C, T, H, W) -> logits (B, num_classes) of the model run
        at ``grid`` x ``grid`` tokens (per frame)."""
        return self.forward_head(self.forward_features(x, grid), grid)

    # ------------------------------------------------------------------ timm-style model API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        own = getattr(self.vit, "no_weight_decay", set)  # a transformers model names none (timm's optimizer
        return {f"vit.{name}" for name in own()}           # factory still spares every 1-D tensor)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if not hasattr(self.vit, "set_grad_checkpointing"):
            raise UnsupportedModelError("gradient checkpointing of a ReViT runs timm's blocks; this transformers "
                                        "model's layers run through the host without it")
        self.vit.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.vit.get_classifier() if hasattr(self.vit, "get_classifier") else self.vit.classifier

    def extra_repr(self) -> str:
        return (f"grids={self.grids}, tal_ln={self.tal_ln}, banks={len(self._banks)}, "
                f"input_size={self.input_size}")


def convert(model: nn.Module, grids: Sequence[int] = DEFAULT_GRIDS, tal_ln: bool = True,
            interpolation: str = "bilinear", antialias: bool = True) -> ResizableViT:
    """Turn a timm ``VisionTransformer`` (ViT, DeiT incl. distilled, registers, no_embed_class, avg-pool) or a
    :class:`~tokenthrift.video.TimeSformer` into a :class:`ResizableViT` that runs at every grid in ``grids``
    (docs/methods.md §3; video: every frame resized, the frame count kept, docs/methods.md §6).

    Args:
        model: a timm ``VisionTransformer`` whose patch grid is the largest grid (224 px, patch 16: 14).
            Modified in place (norms become TAL-LN banks, timm's dynamic-size mode is switched on) and
            wrapped; afterwards ``model(x)`` still equals ``revit(x)`` at the largest grid.
        grids: tokens per side of each grid, any order (stored largest first). Default (14, 10, 7); they
            scale with the model: 28 px, patch 2 gives 28 / 20 / 14 px images.
        tal_ln: bank every token-stream norm per grid (K copies, each initialised from the original, so
            (K-1)·(number of norms)·2·D extra parameters: 38,400 for DeiT-S, 113,664 for TimeSformer-B with
            K = 3). False shares them
            (the ablation).
        interpolation, antialias: how the full-size image is resized to ``grid * patch`` pixels
            (default bilinear with antialias, docs/methods.md §3).

    With one grid, or ``tal_ln=False`` at the largest grid, the logits equal the plain model's exactly.

    The result runs in the mode ``model`` was in: the wrapper takes the model's mode, every TAL-LN bank (and its
    copies) the mode of the norm it replaces, and no existing module's flag changes
    (:func:`~tokenthrift.measure.state.restore_modes`).
    """
    return ResizableViT(model, grids, tal_ln=tal_ln, interpolation=interpolation, antialias=antialias)
