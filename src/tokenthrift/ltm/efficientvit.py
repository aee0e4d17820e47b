"""LTM for timm EfficientViT-MIT (``efficientvit_b*``): MBConv on the merged grid after the LiteMLA residual.

Wang & Yang, "Efficient Visual Transformer by Learnable Token Merging", TPAMI 2025 (arXiv 2407.15219).
The paper released no model code; this block is the project's reconstruction (SPEC §4). An
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

from collections.abc import Sequence
from typing import Any

import torch
from timm.models.efficientvit_mit import EfficientVitBlock
from torch import nn

from ..errors import UnsupportedModelError
from .mask import TokenMerger, merge, swap_in, swap_out, target_grid

__all__ = ["LTMEfficientVitBlock", "chains", "convert", "num_sites", "remove"]


def _unmerge_nchw(y: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """y (B, C, M) channel-first merged tokens, assign (B, N) -> (B, C, N) (an expanded index: no copy)."""
    return y.gather(2, assign.unsqueeze(1).expand(-1, y.shape[1], -1))


class LTMEfficientVitBlock(EfficientVitBlock):
    """timm ``EfficientVitBlock`` whose MBConv runs on merged tokens (class-swapped by :func:`convert`)."""

    ltm: TokenMerger
    ltm_unmerge: str

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
        if self.ltm_unmerge == "residual":
            out = z.flatten(2) + _unmerge_nchw(update.flatten(2), mask.assign)
        else:
            out = _unmerge_nchw((merged + update).flatten(2), mask.assign)
        return out.view(B, C, H, W)


def _blocks(model: nn.Module) -> list[EfficientVitBlock]:
    return [m for m in model.modules() if isinstance(m, EfficientVitBlock)]


def num_sites(model: nn.Module) -> int:
    """One merge per EfficientViT attention block."""
    return len(_blocks(model))


def convert(model: nn.Module, ratios: Sequence[float], unmerge: str = "residual", **merger_kwargs: Any) -> nn.Module:
    """Patch every ``EfficientVitBlock`` of ``model`` in place; one ratio per block. Returns the model."""
    blocks = _blocks(model)
    for i, blk in enumerate(blocks):
        if not isinstance(getattr(blk.local_module, "shortcut", None), nn.Identity):
            raise UnsupportedModelError(f"LTM expects the MBConv of EfficientViT block {i} to have an identity "
                                        f"shortcut")
    swap_in(blocks, list(ratios), LTMEfficientVitBlock, "EfficientViT", merger_kwargs, ltm_unmerge=unmerge)
    return model


def remove(model: nn.Module) -> nn.Module:
    swap_out(_blocks(model), LTMEfficientVitBlock, "ltm_unmerge")
    return model


def chains(model: nn.Module) -> dict[str, Any]:
    """EfficientViT merges do not persist: no chains."""
    return {}
