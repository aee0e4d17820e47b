"""LTM for timm MobileViT (v1: ``mobilevit_xxs/xs/s``): one mask per image, shared by the pixel groups.

Wang & Yang, "Efficient Visual Transformer by Learnable Token Merging", TPAMI 2025 (arXiv 2407.15219).
The paper released no model code; this block is the project's reconstruction (docs/methods.md §4). A
``MobileVitBlock`` unfolds its (B, C, H, W) map into P = p_h·p_w pixel groups of N patch tokens,
(B·P, N, C), runs a stack of transformer layers (timm ViT ``Block``) on every group, and folds back.
With LTM, every layer l of the stack is

    Z   = X + DropPath(Attn(LN1(X)))                          (B·P, N_l, C)
    G   = MaskModule(mean over the P groups of Z)             one (N_l -> N_{l+1}) mask per image
    X'  = Gᵀ Z                                                 the same G for every group
    Out = X' + DropPath(MLP(LN2(X')))                         (B·P, N_{l+1}, C)

so merging persists through the block's layers (layer l keeps the grid closest to N·r_0·…·r_l
tokens), and after the block's final norm every merged token is broadcast back to its patches, so
fold, the 1x1 projection and the fusion conv (which also sees the block input) run on the full map.
Parameter count unchanged. Target fallback seeds are pooled per group.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models import register_notrace_module
from timm.models.mobilevit import MobileVitBlock
from timm.models.vision_transformer import Block
from torch import nn

from ..errors import UnsupportedModelError
from .family import Family
from .mask import MergeState, merge_step

__all__ = ["FAMILY", "LTMMobileVitBlock"]


@register_notrace_module  # its merge sizes follow the input's shape: one opaque node for timm's FX tracer
class LTMMobileVitBlock(MobileVitBlock):
    """timm ``MobileVitBlock`` with a persistent LTM merge in every transformer layer (class-swapped by
    :func:`convert`). ``ltm`` holds one :class:`TokenMerger` per layer."""

    ltm: nn.ModuleList

    def _transformer(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B·P, N, C) unfolded patches -> (B·P, N, C) after the merged layers, the norm and the unmerge."""
        P = self.patch_area
        state = MergeState.start(grid)
        for layer, merger in zip(self.transformer, self.ltm):
            x = x + layer.drop_path1(layer.ls1(layer.attn(layer.norm1(x))))
            x, state = merge_step(merger, x, state, groups=P)  # one mask per image, shared by its P groups
            x = x + layer.drop_path2(layer.ls2(layer.mlp(layer.norm2(x))))
        return state.unmerge(self.norm(x), groups=P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # timm's MobileVitBlock.forward with the transformer stack replaced by _transformer
        shortcut = x
        x = self.conv_kxk(x)
        x = self.conv_1x1(x)
        patch_h, patch_w = self.patch_size
        B, C, H, W = x.shape
        new_h, new_w = math.ceil(H / patch_h) * patch_h, math.ceil(W / patch_w) * patch_w
        num_patch_h, num_patch_w = new_h // patch_h, new_w // patch_w
        num_patches = num_patch_h * num_patch_w
        interpolate = new_h != H or new_w != W
        if interpolate:
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
        x = x.reshape(B * C * num_patch_h, patch_h, num_patch_w, patch_w).transpose(1, 2)
        x = x.reshape(B, C, num_patches, self.patch_area).transpose(1, 3).reshape(B * self.patch_area, num_patches, -1)

        x = self._transformer(x, (num_patch_h, num_patch_w))

        x = x.contiguous().view(B, self.patch_area, num_patches, -1)
        x = x.transpose(1, 3).reshape(B * C * num_patch_h, num_patch_w, patch_h, patch_w)
        x = x.transpose(1, 2).reshape(B, C, num_patch_h * patch_h, num_patch_w * patch_w)
        if interpolate:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        x = self.conv_proj(x)
        if self.conv_fusion is not None:
            x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
        return x


def _check(model: nn.Module, blocks: list[nn.Module]) -> None:
    for i, blk in enumerate(blocks):
        if any(type(layer) is not Block for layer in blk.transformer):
            raise UnsupportedModelError(f"LTM supports timm's MobileVitBlock with ViT Blocks; MobileViT block {i} "
                                        "differs")


FAMILY = Family(name="mobilevit", marker=MobileVitBlock, block=MobileVitBlock, ltm_block=LTMMobileVitBlock,
                persistent="block", sites=lambda block: len(block.transformer), stacked=True, check=_check)
