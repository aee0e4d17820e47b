"""Host for timm's ``Eva`` (EVA-02, DINOv3, Perception Encoder, the RoPE ViTs): an optional absolute table
added before the blocks, and rotary positions applied to the patch tokens' queries and keys in every block;
``EvaBlock`` with LayerScale (``gamma_1`` / ``gamma_2``), SwiGLU or plain MLPs, q/k norm, scale norm and an
optional attention gate; registers; CLS, average or attention-pool (MAP) heads.

Rotary positions that follow the tokens. timm builds a rotary table from a coordinate grid (``_build_grid``:
integer indices with an offset and a reference-shape rescale, pixel coordinates in [-1, 1], or DINOv3's centred
normalised ones) and angles linear in those coordinates (fixed bands, DINOv3's periods, or per-block learned
frequencies for ``rope_type='mixed'``). The coordinates are affine in the patch index, so a token at any, also
fractional, patch position (a merged token at its patches' size-weighted mean) gets its angles from the same
affine map and the same frequencies: :meth:`EvaHost.rope`. At integer positions this is timm's own table (checked
when the host is built; a rotary embedding it cannot reproduce is refused for methods that move tokens).
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .base import Embedded, Host, biased_attention, class_attention, grid_coords

__all__ = ["EvaHost"]

ROPE_CHECK = 1e-4  # largest difference to timm's table at integer positions for the rotary reconstruction
ATTENTIONS = ("EvaAttention", "AttentionRope")  # the attentions of Eva blocks the host runs (by class name: the
# second is timm.layers' and not in every timm version)


class EvaHost(Host):
    family = "timm Eva (EVA-02, DINOv3, PE, RoPE ViTs)"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.rotary = model.rope is not None

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    @property
    def mixed(self) -> bool:
        return bool(getattr(self.model, "rope_mixed", False))

    def check_blocks(self, method: str) -> None:
        from timm.models.eva import EvaBlock

        for i, blk in enumerate(self.blocks):
            if type(blk) is not EvaBlock:
                raise UnsupportedModelError(f"{method} supports Eva's pre-norm EvaBlock; block {i} is "
                                            f"{type(blk).__name__} (post-norm EVA models normalise the attention "
                                            "output, not its input)")
            if type(blk.attn).__name__ not in ATTENTIONS:
                raise UnsupportedModelError(f"{method} supports Eva blocks with {' or '.join(ATTENTIONS)}; block {i} "
                                            f"has {type(blk.attn).__name__}")
        if getattr(self.model, "patch_drop", None) is not None:
            raise UnsupportedModelError(f"{method} works on the whole patch grid; build the model with "
                                        "patch_drop_rate=0")

    def check_positions(self, method: str) -> None:
        """Refuse a method that moves tokens when this model's rotary embedding cannot be placed at other
        positions (a rotary type or a timm version whose coordinates the host does not reproduce)."""
        if not self.rotary:
            return
        from ..measure import training_mode

        h, w = self.grid_size
        error = None  # why the rotary embedding cannot be placed at other positions
        try:
            with torch.no_grad(), training_mode(self.model.rope, False):  # timm's table without augmentation
                x = torch.zeros(1, self.num_prefix_tokens + h * w, self.model.embed_dim)
                table = self.model.rope.get_embed(shape=[h, w])
                rebuilt = self.rope(Embedded(x, (h, w), table), grid_coords((h, w), 1, table.device), 0)
                expected = table[0] if self.mixed else table
                diff = float((rebuilt[0] - expected).abs().max())
        except Exception as err:  # an API of another timm version: say so instead of guessing
            error = f"{type(err).__name__}: {err}"
        else:
            if diff > ROPE_CHECK:
                error = f"the rebuilt table differs from timm's by {diff:.2g}"
        if error is not None:
            raise UnsupportedModelError(
                f"{method} moves tokens, so their rotary positions must be recomputed, and this model's "
                f"{type(self.model.rope).__name__} cannot be rebuilt at other positions ({error}); "
                "supported: timm's RotaryEmbeddingCat, RotaryEmbeddingDinoV3 and RotaryEmbeddingMixed as timm "
                f"{timm.__version__} builds them (tested with timm 1.0.31)")

    # ------------------------------------------------------------------ steps
    def embed(self, images: torch.Tensor) -> Embedded:
        m = self.model
        x = m.patch_embed(images)
        # dynamic_img_size: NHWC, this input's grid; else the fixed one (no branch on a tensor: torch.fx traces this)
        grid = tuple(x.shape[1:3]) if self.dynamic else self.grid_size
        x, table = m._pos_embed(x)
        return Embedded(getattr(m, "norm_pre", nn.Identity())(x), grid, table)  # (no norm_pre before timm 1.0.16)

    def rope(self, embedded: Embedded, coords: torch.Tensor | None, block: int) -> torch.Tensor | None:
        """timm's table while the tokens are the unmerged grid (``coords`` None), else the rotary embedding at
        ``coords`` (B, N, 2): (B, 1, N, 2·d) (heads broadcast), (B, H, N, 2·d) per head for mixed RoPE."""
        if not self.rotary:
            return None
        if coords is None:
            return embedded.table[block] if self.mixed else embedded.table
        from timm.layers.pos_embed_sincos import _rope_layout

        rope = self.model.rope
        if rope.training and getattr(rope, "aug_active", False):
            raise UnsupportedModelError("this model's rotary embedding moves its coordinates at random in training "
                                        "(rope shift / jitter / rescale), which merged tokens' positions cannot "
                                        "follow: train it with token merging without that augmentation")
        c = self._coordinates(rope, embedded.grid, coords)  # (B, N, 2) in the rotary module's own units
        if self.mixed:
            f = rope.freqs[:, block].float()  # (2, H, d/2): x and y frequencies of every head
            angles = c[:, None, :, 0, None] * f[0][None, :, None, :] + c[:, None, :, 1, None] * f[1][None, :, None, :]
            emb = torch.cat([_rope_layout(angles.sin()), _rope_layout(angles.cos())], dim=-1)
            return emb.to(rope.freqs.dtype)
        if hasattr(rope, "periods"):  # DINOv3: angles 2π·coordinate / period
            sin, cos = rope._get_pos_embed_from_coords(c.reshape(-1, 2))
            emb = torch.cat([sin, cos], dim=-1).view(*c.shape[:2], -1)
        else:  # bands: angle = coordinate x band, both axes' bands side by side
            angles = (c.unsqueeze(-1) * rope.bands).flatten(-2)
            half = bool(getattr(rope, "rotate_half", False))
            emb = torch.cat([_rope_layout(angles.sin(), half), _rope_layout(angles.cos(), half)], dim=-1)
        return emb.to(embedded.table.dtype).unsqueeze(1)

    def follow_input_size(self) -> None:
        """As :meth:`Host.follow_input_size`; a rotary table cached for the model's own grid is built for every
        input's grid from then on (as timm computes it for that size: coordinates rescaled to a reference grid
        where the model has one)."""
        m, rope = self.model, self.model.rope
        pe = m.patch_embed
        before = (m.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt,
                  getattr(rope, "_use_cached_embed", None))
        super().follow_input_size()
        if rope is None:
            return
        if getattr(rope, "_use_cached_embed", False):
            rope._use_cached_embed = False  # get_embed(shape) then builds from the frequency bands
        h, w = self.grid_size
        probe = torch.zeros(1, max(h - 1, 1), max(w - 1, 1), m.embed_dim)  # a smaller grid's tokens
        with torch.no_grad():
            table = m._pos_embed(probe)[1]
        if table.shape[-2] != probe.shape[1] * probe.shape[2]:  # undo, then say why
            m.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt, cached = before
            if cached is not None:
                rope._use_cached_embed = cached
            raise UnsupportedModelError(f"this timm version's Eva ({timm.__version__}) keeps its rotary table at the "
                                        "model's own grid for other input sizes, so it cannot run other grids; timm "
                                        "1.0.31 (the tested pin) computes it for every size")

    def run_block(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        return block(x, rope=rope)

    def rope_rows(self, rope: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(N, 2·d) -> (B, 1, M, 2·d); mixed RoPE's (H, N, 2·d) -> (B, H, M, 2·d)."""
        if rope.dim() == 2:
            return rope[index].unsqueeze(1)
        return rope[:, index].permute(1, 0, 2, 3)

    @staticmethod
    def _coordinates(rope: nn.Module, grid: tuple[int, int], coords: torch.Tensor) -> torch.Tensor:
        """Patch positions (row, column) -> the rotary module's coordinates, by the affine map its own coordinate
        grid (timm's ``_build_grid`` with the module's settings) follows."""
        from timm.layers.pos_embed_sincos import _build_grid

        if hasattr(rope, "periods"):
            table = _build_grid(list(grid), grid_type="centered", grid_offset=rope.grid_offset,
                                grid_indexing=rope.grid_indexing, normalize_coords=rope.normalize_coords)
        elif hasattr(rope, "freqs"):
            table = _build_grid(list(grid), grid_indexing=rope.grid_indexing)
        else:
            table = _build_grid(list(grid), grid_type=rope.grid_type, ref_feat_shape=rope.ref_feat_shape,
                                grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing,
                                normalize_coords=rope.normalize_coords)
        table = table.to(coords.device, torch.float32)  # (h, w, 2)
        h, w = grid
        origin = table[0, 0]
        step_row = table[1, 0] - origin if h > 1 else torch.zeros_like(origin)
        step_col = table[0, 1] - origin if w > 1 else torch.zeros_like(origin)
        return origin + coords[..., :1] * step_row + coords[..., 1:] * step_col

    def attention(self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None,
                  rope: torch.Tensor | None = None, kernel: str = "auto", class_row: bool = False
                  ) -> tuple[torch.Tensor, ...]:
        from timm.layers import apply_rot_embed_cat

        attn = block.attn
        y = block.norm1(x)
        B, T, C = y.shape
        gate = attn.gate(y).sigmoid() if getattr(attn, "gate", None) is not None else None
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)  # AttentionRope: grouped-query attention
        if attn.qkv is not None:
            qkv_bias = getattr(attn, "q_bias", None)  # EvaAttention: a separate q/v bias (no k bias)
            if qkv_bias is None:
                qkv = attn.qkv(y)
            else:
                qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                if getattr(attn, "qkv_bias_separate", False):
                    qkv = attn.qkv(y) + qkv_bias
                else:
                    qkv = F.linear(y, weight=attn.qkv.weight, bias=qkv_bias)
            q, k, v = qkv.reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = attn.q_proj(y).reshape(B, T, attn.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(y).reshape(B, T, kv_heads, -1).transpose(1, 2)
            v = attn.v_proj(y).reshape(B, T, kv_heads, -1).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        keys = k.mean(dim=1)  # the matching metric: the keys' content, before the rotation by position
        if rope is not None:
            P, half = attn.num_prefix_tokens, bool(getattr(attn, "rotate_half", False))
            rotate = (lambda t: apply_rot_embed_cat(t, rope, half=half)) if half else (
                lambda t: apply_rot_embed_cat(t, rope))
            q = torch.cat([q[:, :, :P, :], rotate(q[:, :, P:, :])], dim=2).type_as(v)
            k = torch.cat([k[:, :, :P, :], rotate(k[:, :, P:, :])], dim=2).type_as(v)
        if kv_heads != attn.num_heads:
            k = k.repeat_interleave(attn.num_heads // kv_heads, dim=1)
            v = v.repeat_interleave(attn.num_heads // kv_heads, dim=1)
        row = class_attention(q, k, bias, attn.scale) if class_row else None
        out = biased_attention(q, k, v, bias, attn.scale, attn.fused_attn, attn.attn_drop, kernel)
        out = attn.norm(out.transpose(1, 2).reshape(B, T, getattr(attn, "attn_dim", C)))
        if gate is not None:
            out = out * gate
        out = attn.proj_drop(attn.proj(out))
        if block.gamma_1 is not None:
            out = block.gamma_1 * out
        x = x + block.drop_path1(out)
        return (x, keys, row) if class_row else (x, keys)

    def mlp(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = block.mlp(block.norm2(x))
        if block.gamma_2 is not None:
            out = block.gamma_2 * out
        return x + block.drop_path2(out)

    def head(self, x: torch.Tensor, size: torch.Tensor | None = None, pre_logits: bool = False) -> torch.Tensor:
        m = self.model
        if size is None or self.pool_type() == "token":
            return self._forward_head(m, x, pre_logits=pre_logits)
        pooled = self.pool_by_size(x, size, include_prefix=self.pool_type() == "map")  # Eva's head pools all tokens
        x = m.head_drop(m.fc_norm(pooled))
        return x if pre_logits else m.head(x)
