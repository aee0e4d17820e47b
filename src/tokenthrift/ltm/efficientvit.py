"""LTM for timm EfficientViT-MIT (``efficientvit_b*``): MBConv on the merged grid after the LiteMLA residual.

Wang & Yang, "Efficient Visual Transformer by Learnable Token Merging", TPAMI 2025 (arXiv 2407.15219).
The paper released no model code; this block is the project's reconstruction (docs/methods.md §4). An
``EfficientVitBlock`` is a LiteMLA context module and an MBConv local module, both residual, on a
(B, C, H, W) map:

    Z   = X + LiteMLA(X)                     full H×W map, timm's module unchanged
    X'  = Gᵀ Z                               H·W tokens -> M = h'·w' tokens, kept as a (B, C, h', w') map
    Y   = MBConv(X')                         1x1 expand, 3x3 depthwise, 1x1 project on the merged grid
    Out = Z + unmerge(Y)                     back to (B, C, H, W)

The merged tokens keep a 2-D layout (the mask's targets form a grid), so the MBConv's depthwise
convolution still sees spatial neighbours. *Decision:* the block unmerges its output, so every block,
stage and dense output (``forward_features``, ``forward_intermediates``, ``features_only``) keeps the
nominal stride and the next block's linear attention sees the full map; as for Swin, ``unmerge=
"residual"`` (default) broadcasts the MBConv update only, ``"broadcast"`` replaces every token by its
merged token plus update.
"""
from __future__ import annotations

import torch
from timm.models import register_notrace_module
from timm.models.efficientvit_mit import EfficientVitBlock
from torch import nn

from ..errors import UnsupportedModelError
from .family import Family
from .mask import TokenMerger, merge, target_grid, unmerge

__all__ = ["FAMILY", "LTMEfficientVitBlock"]


@register_notrace_module  # its merge sizes follow the input's shape: one opaque node for timm's FX tracer
class LTMEfficientVitBlock(EfficientVitBlock):
    """timm ``EfficientVitBlock`` whose MBConv runs on merged tokens (class-swapped by :func:`convert`)."""

    ltm: TokenMerger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        target = target_grid((H, W), self.ltm.ratio * H * W)
        if target == (H, W):
            return EfficientVitBlock.forward(self, x)
        z = self.context_module(x)
        tokens = z.flatten(2).transpose(1, 2).contiguous()  # (B, N, C): one copy beats strided reductions
        mask = self.ltm(tokens, None, (H, W), target)
        merged = merge(tokens, mask, own_seeds=True).transpose(1, 2).reshape(B, C, *target)
        local = self.local_module
        update = local.main(local.pre_norm(merged))
        if self.ltm.unmerge == "residual":  # channel-first unmerge: an expanded index, no transposed copy
            out = z.flatten(2) + unmerge(update.flatten(2), mask.assign, dim=2)
        else:
            out = unmerge((merged + update).flatten(2), mask.assign, dim=2)
        return out.view(B, C, H, W)


def _check(model: nn.Module, blocks: list[nn.Module]) -> None:
    for i, blk in enumerate(blocks):
        if not isinstance(getattr(blk.local_module, "shortcut", None), nn.Identity):
            raise UnsupportedModelError(f"LTM expects the MBConv of EfficientViT block {i} to have an identity "
                                        "shortcut")


FAMILY = Family(name="efficientvit", marker=EfficientVitBlock, block=EfficientVitBlock,
                ltm_block=LTMEfficientVitBlock, check=_check)
