"""Host for timm's ``VisionTransformer`` (ViT, DeiT incl. distilled, DeiT-III, DINOv2 with or without
registers, CLIP, SigLIP with its attention-pool head, FlexiViT, ...): absolute positions added before the blocks,
timm's pre-norm ``Block`` with LayerScale, q/k norm, an optional attention gate and scale norm.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import Embedded, Host, biased_attention, class_attention

__all__ = ["ViTHost"]


class ViTHost(Host):
    family = "timm VisionTransformer"

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def check_blocks(self, method: str) -> None:
        from timm.models.vision_transformer import Block

        for i, blk in enumerate(self.blocks):
            if type(blk) is not Block:
                raise UnsupportedModelError(f"{method} supports timm's pre-norm Block; block {i} is "
                                            f"{type(blk).__name__}")

    def embed(self, images: torch.Tensor) -> Embedded:
        m = self.model
        x = m.patch_embed(images)
        # dynamic_img_size: NHWC, this input's grid; else the fixed one (no branch on a tensor: torch.fx traces this)
        grid = tuple(x.shape[1:3]) if self.dynamic else self.grid_size  # NHWC if dynamic
        x = m.norm_pre(m.patch_drop(m._pos_embed(x)))
        return Embedded(x, grid)

    def attention(self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None,
                  rope: torch.Tensor | None = None, kernel: str = "auto", class_row: bool = False
                  ) -> tuple[torch.Tensor, ...]:
        attn = block.attn
        y = block.norm1(x)
        B, T, _ = y.shape
        gate = attn.gate(y).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(y).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        row = class_attention(q, k, bias, attn.scale) if class_row else None
        out = biased_attention(q, k, v, bias, attn.scale, attn.fused_attn, attn.attn_drop, kernel)
        out = out.transpose(1, 2).reshape(B, T, attn.num_heads * attn.head_dim)
        if getattr(attn, "norm", None) is not None:  # scale_norm (timm >= 1.0.16)
            out = attn.norm(out)
        if gate is not None:
            out = out * gate
        out = attn.proj_drop(attn.proj(out))
        x = x + block.drop_path1(block.ls1(out))
        return (x, k.mean(dim=1), row) if class_row else (x, k.mean(dim=1))

    def mlp(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def head(self, x: torch.Tensor, size: torch.Tensor | None = None, pre_logits: bool = False) -> torch.Tensor:
        m = self.model
        if size is None or self.pool_type() == "token":
            return self._forward_head(m, x, pre_logits=pre_logits)
        x = m.head_drop(m.fc_norm(self.pool_by_size(x, size, getattr(m, "pool_include_prefix", False))))
        return x if pre_logits else m.head(x)
