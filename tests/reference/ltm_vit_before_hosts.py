"""LTM for timm ``VisionTransformer`` (ViT, DeiT, registers, LayerScale, q/k norm): persistent merging.

Wang & Yang, "Efficient Visual Transformer by Learnable Token Merging", TPAMI 2025 (arXiv 2407.15219).
The paper released no model code; this block is the project's reconstruction (docs/methods.md §4):

    Z  = X + DropPath(LS1(Attn(LN1(X))))      N patch tokens (+ P prefix tokens, never merged)
    G  = MaskModule(Z, sizes, grid)           (B, N, M), see :mod:`tokenthrift.ltm.mask`
    X' = Gᵀ Z                                 M < N merged tokens on a smaller grid
    Out = X' + DropPath(LS2(MLP(LN2(X'))))

The reduction persists: the next block starts from the M tokens, their sizes and their grid, and a
cumulative source map (original patch -> current token) is carried along so that dense outputs
(``forward_features``, ``forward_intermediates``, ``features_only``) come back at the nominal patch grid
by broadcasting every merged token to the patches it holds. Token counts follow a nominal schedule:
block k keeps the grid closest to N0·r_0·…·r_k tokens (constrained to shrink), so ratios close to 1 do
not stall on small grids.

The patch is reversible and keeps parameters and state_dict keys (:data:`FAMILY`, applied by
:func:`tokenthrift.ltm.convert`): blocks become :class:`LTMBlock` (same modules plus a parameter-free
``ltm`` merger) and the model an :class:`LTMVisionTransformer`.

FROZEN: tokenthrift's LTM ViT blocks as they were before the host layer (tokenthrift.hosts), kept verbatim but for
their imports and the family record, as the reference that pins the ported LTM bit for bit on timm ViTs
(tests/test_ltm_hosts.py): swap a ViT's blocks to LTMBlock (each with its ``ltm`` merger) and the model to
LTMVisionTransformer by hand. Do not edit or use it elsewhere; it goes when the pin has served.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from tokenthrift.errors import InvalidArgumentError
from tokenthrift.ltm.mask import MergeState, TokenMerger, merge_step, tracing
from tokenthrift.tokens import join_prefix, split_prefix

__all__ = ["LTMBlock", "LTMVisionTransformer"]


class LTMBlock(Block):
    """timm ``Block`` with an LTM merge between attention and MLP (class-swapped by :func:`convert_vit`).

    ``forward(x)`` without a state is the plain block; ``forward(x, state)`` merges and returns
    ``(x, state)``. LayerScale, q/k norm, fused attention and drop-path are timm's own modules.
    """

    ltm: TokenMerger

    def forward(self, x: torch.Tensor, state: MergeState | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> Any:
        if state is None:
            return Block.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        prefix, patches = split_prefix(x, state.num_prefix_tokens)
        patches, state = merge_step(self.ltm, patches, state)
        x = join_prefix(prefix, patches)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, state


def _no_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    if tracing():  # torch.fx makes every argument a placeholder, the unused attn_mask included: nothing to check
        return
    if attn_mask is not None or is_causal:
        raise NotImplementedError("LTM merges tokens inside the model, so an attention mask over the input tokens no "
                                  "longer fits; run LTM models without attn_mask/is_causal")


class LTMVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose blocks merge persistently (class-swapped by :func:`convert_vit`).

    ``forward_features`` returns (B, P + N0, D) like the plain model: the merged tokens broadcast back to
    the nominal patch grid. ``forward_merged`` gives the merged tokens and the :class:`MergeState`.
    """

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        if getattr(self, "dynamic_img_size", False):
            return tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        return tuple(self.patch_embed.grid_size)

    def forward_merged(self, x: torch.Tensor, stop_after: int | None = None, take: Sequence[int] = (),
                       norm: bool = False) -> tuple[torch.Tensor, MergeState, list[torch.Tensor]]:
        """Images (B, C, H, W) -> merged tokens (B, P + M, D) before the final norm, the state, and the
        unmerged (B, P + N0, D) outputs of the blocks listed in ``take`` (final norm applied if ``norm``)."""
        state = MergeState.start(self._grid(x), self.num_prefix_tokens)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        taken = []
        blocks = self.blocks if stop_after is None else self.blocks[:stop_after + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, state = checkpoint(blk, x, state, use_reentrant=False)
            else:
                x, state = blk(x, state)
            if i in take:
                taken.append(self.unmerge_tokens(self.norm(x) if norm else x, state))
        return x, state, taken

    def unmerge_tokens(self, x: torch.Tensor, state: MergeState) -> torch.Tensor:
        """(B, P + M, D) -> (B, P + N0, D): prefix tokens as they are, patches broadcast to their sources."""
        prefix, patches = split_prefix(x, self.num_prefix_tokens)
        return join_prefix(prefix, state.unmerge(patches))

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        x, state, _ = self.forward_merged(x)
        return self.unmerge_tokens(self.norm(x), state)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        x, state, _ = self.forward_merged(x)
        x = self.norm(x)
        if not (self.attn_pool is None and self.global_pool == "token"):
            # average/max/attention pooling over the broadcast tokens = size-weighted pooling of the merged ones
            x = self.unmerge_tokens(x, state)
        return self.forward_head(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> Any:
        """timm's ``forward_intermediates`` with merging: every intermediate is unmerged to the nominal grid."""
        _no_mask(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise InvalidArgumentError(f"output_fmt must be NCHW or NLC; got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x, state, intermediates = self.forward_merged(x, stop_after=max_index if stop_early else None,
                                                      take=take_indices, norm=norm)
        P = self.num_prefix_tokens
        prefix_tokens = [y[:, :P] for y in intermediates] if P else None
        intermediates = [y[:, P:] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = state.origin
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                out["image_features"] = self.unmerge_tokens(self.norm(x), state)
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.unmerge_tokens(self.norm(x), state), intermediates
