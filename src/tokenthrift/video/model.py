"""TimeSformer with divided space-time attention, timm-style, taking its grid and frame count from the input.

Bertasius, Wang & Torresani, "Is Space-Time Attention All You Need for Video Understanding?", ICML 2021.
docs/methods.md §6. Written for tokenthrift (neither upstream implementation is used): the official code is
non-commercial, and the transformers implementation reshapes with the grid and frame count of its config,
so it cannot run the 10×10 or 7×7 grids ReViT needs.

Input (B, C, T, H, W), as torchvision's video models and the official code. Every frame goes through one
patch embedding; the patch tokens are laid out patch-major, time-minor (token 1 + n·T + t is patch n of
frame t; token 0 is the CLS token), as in both upstreams, so their checkpoints map onto this model by name
alone (:func:`tokenthrift.video.convert_checkpoint`). One spatial position table (CLS + the default grid)
is resampled to the input's grid with timm's ``resample_abs_pos_embed`` (bicubic; both upstreams use
nearest), and one time table (the default frame count) is interpolated linearly to T when T differs.

Each :class:`DividedBlock` runs
1. temporal attention over the T tokens of every patch position (``temporal_norm1``, ``temporal_attn``,
   then the output linear ``temporal_fc``), added to the patch tokens;
2. spatial attention over the patches of every frame with a copy of the CLS token (``norm1``, ``attn``);
   the T copies of the CLS output are averaged back into the one CLS token;
3. the MLP (``norm2``, ``mlp``).
Attention is timm's ``Attention`` (``F.scaled_dot_product_attention``). 37 LayerNorms for depth 12.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Attention
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidArgumentError, UnsupportedModelError

__all__ = ["DividedBlock", "TimeSformer"]


class DividedBlock(nn.Module):
    """One divided space-time block: temporal attention, spatial attention, MLP (module docstring).

    forward(x (B, 1 + N·T, D), T) -> (B, 1 + N·T, D), patch-major time-minor patch tokens.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, attn_drop: float = 0.0, proj_drop: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.temporal_norm1 = nn.LayerNorm(dim, eps=eps)
        self.temporal_attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                       proj_drop=proj_drop)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        T = num_frames
        cls, patches = x[:, :1], x[:, 1:]
        B, NT, D = patches.shape
        N = NT // T
        # temporal: the T tokens of every patch position (consecutive in the patch-major layout)
        update = self.drop_path(self.temporal_attn(self.temporal_norm1(patches.reshape(B * N, T, D))))
        patches = patches + self.temporal_fc(update.reshape(B, NT, D))
        # spatial: the N patches of every frame with a copy of the CLS token
        frames = patches.reshape(B, N, T, D).transpose(1, 2).reshape(B * T, N, D)
        frames = torch.cat([cls.expand(B, T, D).reshape(B * T, 1, D), frames], dim=1)
        update = self.drop_path(self.attn(self.norm1(frames)))  # (B·T, 1 + N, D)
        cls = cls + update[:, :1].reshape(B, T, D).mean(1, keepdim=True)  # the frames' CLS outputs, averaged
        patches = patches + update[:, 1:].reshape(B, T, N, D).transpose(1, 2).reshape(B, NT, D)
        x = torch.cat([cls, patches], dim=1)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TimeSformer(nn.Module):
    """Divided space-time TimeSformer for video classification, with timm's model API.

    ``forward(x)``: clips (B, C, T, H, W) -> logits (B, num_classes); H and W any multiples of the patch
    size, T any frame count. ``img_size`` and ``num_frames`` set the default grid and frame count (the size
    of the position and time tables), not a limit.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 400,
                 num_frames: int = 8, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 global_pool: str = "token"):
        super().__init__()
        self.num_classes, self.num_frames, self.global_pool = num_classes, num_frames, _check_pool(global_pool)
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, flatten=False, output_fmt="NHWC",
                                      strict_img_size=False)
        self.grid_size = tuple(self.patch_embed.grid_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(DividedBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i],
                                                 attn_drop_rate, proj_drop_rate) for i in range(depth))
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.time_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for blk in list(self.blocks)[1:]:  # temporal_fc starts at zero (but in block 0): spatial first, as upstream
            nn.init.zeros_(blk.temporal_fc.weight)
            nn.init.zeros_(blk.temporal_fc.bias)

    # ------------------------------------------------------------------ timm model API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "time_embed"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay (timm's convention, as its ViT)."""
        return dict(stem=r"^cls_token|pos_embed|time_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, num_frames: int | None = None) -> None:
        """Change the default grid (the position table resampled, as timm's ``set_input_size``) and/or
        frame count (the time table interpolated); the model already runs other sizes, this sets the tables."""
        if img_size is not None:
            side = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            self.patch_embed.set_input_size(img_size=side)
            grid = tuple(self.patch_embed.grid_size)
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(self.pos_embed.data, new_size=grid,
                                                                 old_size=self.grid_size, num_prefix_tokens=1))
            self.grid_size = grid
        if num_frames is not None and num_frames != self.num_frames:
            time = F.interpolate(self.time_embed.data.transpose(1, 2), size=num_frames, mode="linear",
                                 align_corners=False).transpose(1, 2)
            self.time_embed, self.num_frames = nn.Parameter(time), num_frames

    def __prepare_scriptable__(self):
        raise UnsupportedModelError(_NO_SCRIPT.format(name="the TimeSformer"))

    # ------------------------------------------------------------------ forward
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Clips (B, C, T, H, W) -> tokens (B, 1 + N·T, D) with position and time added, and T."""
        if x.dim() != 5:
            raise InvalidArgumentError("TimeSformer takes clips (B, C, T, H, W); got a tensor of shape "
                                       f"{tuple(x.shape)}")
        B, C, T, H, W = x.shape
        tokens = self.patch_embed(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B·T, h, w, D)
        h, w, D = tokens.shape[1:]
        pos = self.pos_embed
        if (h, w) != self.grid_size:
            pos = resample_abs_pos_embed(pos, new_size=(h, w), old_size=self.grid_size, num_prefix_tokens=1)
        tokens = tokens.reshape(B, T, h * w, D) + pos[:, None, 1:]
        time = self.time_embed
        if T != time.shape[1]:
            time = F.interpolate(time.transpose(1, 2), size=T, mode="linear", align_corners=False).transpose(1, 2)
        tokens = (tokens.transpose(1, 2) + time[:, None]).reshape(B, h * w * T, D)  # patch-major, time-minor
        cls = (self.cls_token + pos[:, :1]).expand(B, -1, -1)
        return self.pos_drop(torch.cat([cls, tokens], dim=1)), T

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Clips (B, C, T, H, W) -> tokens after the final norm (B, 1 + N·T, D)."""
        x, T = self.embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, T, use_reentrant=False)
            else:
                x = blk(x, T)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's intermediate-feature API on clips: the patch tokens after the blocks in ``indices`` (the
        last n for an int), as (B, D, T, h, w) for ``output_fmt="NCHW"`` (channels first; the time axis kept)
        or (B, N·T, D) for ``"NLC"``; with the final features unless ``intermediates_only``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise InvalidArgumentError(f"output_fmt={output_fmt!r}: NCHW (B, D, T, h, w) or NLC (B, N*T, D)")
        take, last = feature_take_indices(len(self.blocks), indices)
        h, w = x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1]
        x, T = self.embed(x)
        blocks = self.blocks[:last + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = blk(x, T)
            if i in take:
                y = (self.norm(x) if norm else x)[:, 1:]
                if output_fmt == "NCHW":  # patch-major, time-minor -> (B, D, T, h, w)
                    y = y.reshape(x.shape[0], h, w, T, -1).permute(0, 4, 3, 1, 2).contiguous()
                intermediates.append(y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the norm / head), as timm's ViT does."""
        take, last = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "":  # no pooling (timm's global_pool=''): every token, for a head of one's own
            return x
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


POOLS = ("token", "avg", "")
_NO_SCRIPT = ("{name} cannot be compiled with TorchScript (torch.jit is in maintenance; its forward takes the grid "
              "and frame count from the input): use torch.compile(model) or torch.export.export(model, (x,))")


def _check_pool(global_pool: str) -> str:
    if global_pool not in POOLS:
        raise InvalidArgumentError(f"global_pool={global_pool!r}: choose token (the CLS token), avg (the patch "
                                   "tokens' mean) or '' (no pooling: forward_head returns every token)")
    return global_pool


def create_timesformer(variant: str, pretrained: bool = False, **kwargs: Any) -> TimeSformer:
    """``variant`` built the timm way (``build_model_with_cfg``: its pretrained cfg on the instance, timm's
    handling of ``pretrained``, ``features_only``, ``device`` and ``dtype``). No weights ship with tokenthrift:
    ``pretrained=True`` loads a file given with ``pretrained_cfg_overlay=dict(file=...)`` (weights in this
    model's names: :func:`tokenthrift.video.convert_checkpoint`), else timm warns and initialises randomly."""
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    out_indices = kwargs.pop("out_indices", 3)
    model = build_model_with_cfg(TimeSformer, variant, pretrained,
                                 feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)
    return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model
