"""LTM for timm ``SwinTransformer``: merge inside every window after (S)W-MSA, unmerge before the next block.

Wang & Yang, "Efficient Visual Transformer by Learnable Token Merging", TPAMI 2025 (arXiv 2407.15219).
The paper released no model code; this block is the project's reconstruction (docs/methods.md §4). Window
partitions and shifts need the full grid, so merging cannot persist across Swin blocks:

    Z   = X + DropPath(WindowAttn(LN1(X)))         full (B, H, W, C) map, timm's (S)W-MSA unchanged
    X'  = Gᵀ Z_w                                   every window's N = ws² tokens -> M on an h'×w' grid
    Y   = MLP(LN2(X'))                             the MLP runs on M tokens per window
    Out = Z_w + unmerge(DropPath(Y))               back to N tokens per window, then to the map

*Decisions.* (1) Merging uses the regular, unshifted window partition in every block, also after
shifted-window attention: a shifted window at the border joins far-apart image regions, which must not
be averaged together. (2) ``unmerge="residual"`` (default) broadcasts only the MLP update, so every
token keeps its own residual stream; ``unmerge="broadcast"`` replaces each token by its merged token
plus update (the literal "broadcast the merged token back", which erases within-cell detail at every
block). (3) Drop-path is sampled per image, as in timm, not per window. Padding tokens of windows that
overhang a non-divisible map get size 0, so they do not pull seeds or merged tokens.

Dense outputs (``forward_features``, ``forward_intermediates``, ``features_only``) are untouched: every
block returns the full map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_notrace_module
from timm.models.swin_transformer import (
    SwinTransformerBlock,
    window_partition,
    window_reverse,
)
from torch import nn

from .family import Family
from .mask import TokenMerger, merge, target_grid, unmerge

__all__ = ["FAMILY", "LTMSwinTransformerBlock"]


@register_notrace_module  # its merge sizes follow the input's shape: one opaque node for timm's FX tracer
class LTMSwinTransformerBlock(SwinTransformerBlock):
    """timm ``SwinTransformerBlock`` whose MLP runs on merged window tokens (class-swapped by :func:`convert`)."""

    ltm: TokenMerger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        wh, ww = self.window_size
        target = target_grid((wh, ww), self.ltm.ratio * wh * ww)
        if target == (wh, ww):
            return SwinTransformerBlock.forward(self, x)
        z = x + self.drop_path1(self._attn(self.norm1(x)))
        pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
        sizes = None
        if pad_h or pad_w:
            z = F.pad(z, (0, 0, 0, pad_w, 0, pad_h))
            real = F.pad(z.new_ones(1, H, W, 1), (0, 0, 0, pad_w, 0, pad_h))
            sizes = window_partition(real, (wh, ww)).view(-1, wh * ww).repeat(B, 1)  # 0 on padding
        Hp, Wp = H + pad_h, W + pad_w
        windows = window_partition(z, (wh, ww)).view(-1, wh * ww, C)  # (B·nW, N, C)
        mask = self.ltm(windows, sizes, (wh, ww), target)
        if self.ltm.record:  # the map this merge ran on, for merge maps (dynamic input sizes included)
            self.ltm.map_size = (H, W)
        merged = merge(windows, mask, own_seeds=True)  # (B·nW, M, C)
        M = merged.shape[1]
        update = self.mlp(self.norm2(merged))
        update = self.drop_path2(update.view(B, -1, C)).view(-1, M, C)  # drop-path per image, not per window
        # unmerge straight into the map layout: window_reverse moves the (small) integer index of every
        # token's merged row within its image, not the (B, H, W, C) activations
        windows_per_image = mask.assign.shape[0] // B
        rows = mask.assign + (torch.arange(mask.assign.shape[0], device=x.device) % windows_per_image).unsqueeze(1) * M
        rows = window_reverse(rows.view(-1, wh, ww, 1), (wh, ww), Hp, Wp).view(B, Hp * Wp)
        residual = self.ltm.unmerge == "residual"
        source = (update if residual else merged + update).view(B, windows_per_image * M, C)
        out = unmerge(source, rows).view(B, Hp, Wp, C)
        if residual:
            out = z + out
        return out[:, :H, :W, :] if (pad_h or pad_w) else out


def _layout(model: nn.Module, site: str, window: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, columns) of windows and the (H, W) map of the block that owns merge site ``site`` (the size it
    last ran at; the size it was built for if it never recorded one)."""
    merger = model.get_submodule(site)
    H, W = getattr(merger, "map_size", None) or model.get_submodule(site.rsplit(".", 1)[0]).input_resolution
    return (-(-H // window[0]), -(-W // window[1])), (H, W)


FAMILY = Family(name="swin", marker=SwinTransformerBlock, block=SwinTransformerBlock,
                ltm_block=LTMSwinTransformerBlock, layout=_layout)
