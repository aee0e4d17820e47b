"""LTM for ViT-like encoders, run through :mod:`tokenthrift.hosts`: timm ``VisionTransformer`` (ViT, DeiT, DINOv2,
CLIP, SigLIP's MAP head, registers, LayerScale, q/k norm) and timm ``Eva`` (EVA-02, DINOv3, PE, RoPE ViTs):
persistent merging.

Wang & Yang, "Efficient Visual Transformer by Learnable Token Merging", TPAMI 2025 (arXiv 2407.15219).
The paper released no model code; this is the project's reconstruction (docs/methods.md §4):

    Z  = X + DropPath(LS1(Attn(LN1(X))))      N patch tokens (+ P prefix tokens, never merged)
    G  = MaskModule(Z, sizes, grid)           (B, N, M), see :mod:`tokenthrift.ltm.mask`
    X' = Gᵀ Z                                 M < N merged tokens on a smaller grid
    Out = X' + DropPath(LS2(MLP(LN2(X'))))

The reduction persists: the next block starts from the M tokens, their sizes and their grid, and a
cumulative source map (original patch -> current token) is carried along so that dense outputs
(``forward_features``, ``forward_intermediates``, ``features_only``) come back at the nominal patch grid
by broadcasting every merged token to the patches it holds; pooling heads (average, MAP) see those broadcast
tokens, which weighs a merged token as the patches it holds. Token counts follow a nominal schedule: block k
keeps the grid closest to N0·r_0·…·r_k tokens (constrained to shrink), so ratios close to 1 do not stall on
small grids. On a rotary encoder a merged token's angles are computed at the mean position of the patches it
holds (:meth:`tokenthrift.hosts.Host.rope`).

The patch is reversible and keeps parameters and state_dict keys (:data:`FAMILY`, applied by
:func:`tokenthrift.ltm.convert`): every block keeps its class and gets a parameter-free ``ltm`` merger; the
model's class becomes a subclass whose forward runs the blocks through the model's host, merging between
attention and MLP.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidArgumentError, UnsupportedModelError
from ..hosts import HOSTS, Host, grid_coords, host_of, original_class
from ..tokens import join_prefix, segment_sum, split_prefix
from .family import Family
from .mask import MergeState, merge_step, tracing

__all__ = ["FAMILY", "encoder", "is_encoder"]

_HOST = "_tokenthrift_ltm_host"  # the model's host, kept on the model while LTM is applied


def _describes(module: nn.Module) -> bool:
    """A host describes ``module`` and lets a method change its tokens between blocks (LTM merges them)."""
    return any(host.reducible and host.accepts(module) for host in HOSTS)


def is_encoder(model: nn.Module) -> bool:
    """True if ``model`` is, or wraps (a ``features_only`` getter), an encoder a host describes."""
    return any(_describes(m) for m in model.modules())


def encoder(model: nn.Module) -> nn.Module:
    """The host-described encoder inside ``model`` (itself, or the one a ``features_only`` getter wraps)."""
    return next(m for m in model.modules() if _describes(m))


def _ltm_step(host: Host, block: nn.Module, x: torch.Tensor, state: MergeState, rope: torch.Tensor | None
              ) -> tuple[torch.Tensor, MergeState]:
    """One block: attention, the merge of the patch tokens, the MLP on the merged tokens."""
    x, _ = host.attention(block, x, None, rope)
    prefix, patches = split_prefix(x, state.num_prefix_tokens)
    patches, state = merge_step(block.ltm, patches, state)
    return host.mlp(block, join_prefix(prefix, patches)), state


def _mean_positions(origin: torch.Tensor, state: MergeState) -> torch.Tensor:
    """(B, M, 2) mean (row, column) of the original patches (``origin`` (B, N0, 2)) each current token holds."""
    M = state.grid[0] * state.grid[1]
    return segment_sum(origin, state.patch_map, M) / state.sizes.to(origin.dtype).unsqueeze(-1)


def _no_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    if tracing():  # torch.fx makes every argument a placeholder, the unused attn_mask included: nothing to check
        return
    if attn_mask is not None or is_causal:
        raise NotImplementedError("LTM merges tokens inside the model, so an attention mask over the input tokens no "
                                  "longer fits; run LTM models without attn_mask/is_causal")


class _LTMEncoder:
    """The forward of an encoder whose blocks merge persistently, mixed into the encoder's own class.

    ``forward_features`` returns (B, P + N0, D) like the plain model: the merged tokens broadcast back to
    the nominal patch grid. ``forward_merged`` gives the merged tokens and the :class:`MergeState`.
    """

    def forward_merged(self, x: torch.Tensor, stop_after: int | None = None, take: Sequence[int] = (),
                       norm: bool = False, inputs: dict | None = None
                       ) -> tuple[torch.Tensor, MergeState, list[torch.Tensor]]:
        """Images (B, C, H, W) -> merged tokens (B, P + M, D) before the final norm, the state, and the
        unmerged (B, P + N0, D) outputs of the blocks listed in ``take`` (final norm applied if ``norm``).
        ``inputs``: the model's other keyword inputs (none but for a NaFlexViT's padded batch, refused)."""
        host: Host = getattr(self, _HOST)
        # (torch.fx makes **inputs one placeholder: a traced model takes images only)
        embedded = host.embed_inputs(x, {} if inputs is None or tracing() else dict(inputs))
        if embedded.grid is None:
            raise UnsupportedModelError("LTM merges tokens on every image's patch grid, and this batch is padded (a "
                                        "NaFlex batch of several grids): pass images (B, C, H, W) of one size")
        x = embedded.x
        state = MergeState.start(embedded.grid, host.num_prefix_tokens)
        origin = grid_coords(embedded.grid, x.shape[0], x.device) if host.rotary else None
        coords = None  # rotary hosts: the current tokens' positions once they are no longer the grid
        taken = []
        blocks = host.blocks if stop_after is None else host.blocks[:stop_after + 1]
        checkpointed = getattr(self, "grad_checkpointing", False) and torch.is_grad_enabled()
        for i, blk in enumerate(blocks):
            rope = host.rope(embedded, coords, i)
            before = state.patch_map
            if checkpointed and not torch.jit.is_scripting():
                x, state = checkpoint(_ltm_step, host, blk, x, state, rope, use_reentrant=False)
            else:
                x, state = _ltm_step(host, blk, x, state, rope)
            if origin is not None and state.patch_map is not before:  # this block merged: positions move
                coords = _mean_positions(origin, state)
            if i in take:
                taken.append(self.unmerge_tokens(host.norm(x) if norm else x, state))
        return x, state, taken

    def unmerge_tokens(self, x: torch.Tensor, state: MergeState) -> torch.Tensor:
        """(B, P + M, D) -> (B, P + N0, D): prefix tokens as they are, patches broadcast to their sources."""
        prefix, patches = split_prefix(x, state.num_prefix_tokens)
        return join_prefix(prefix, state.unmerge(patches))

    def forward_features(self, x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False, **inputs) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        x, state, _ = self.forward_merged(x, inputs=inputs)
        return self.unmerge_tokens(getattr(self, _HOST).norm(x), state)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                **inputs) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        host: Host = getattr(self, _HOST)
        x, state, _ = self.forward_merged(x, inputs=inputs)
        x = host.norm(x)
        if host.pool_type() != "token":
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
        from timm.models._features import feature_take_indices

        _no_mask(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise InvalidArgumentError(f"output_fmt must be NCHW or NLC; got {output_fmt!r}")
        host: Host = getattr(self, _HOST)
        take_indices, max_index = feature_take_indices(len(host.blocks), indices)
        B = x.shape[0]
        x, state, intermediates = self.forward_merged(x, stop_after=max_index if stop_early else None,
                                                      take=take_indices, norm=norm)
        P = host.num_prefix_tokens
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
                out["image_features"] = self.unmerge_tokens(host.norm(x), state)
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.unmerge_tokens(host.norm(x), state), intermediates


def _check(model: nn.Module, blocks: list[nn.Module]) -> None:
    enc = encoder(model)
    if original_class(type(enc)) is not type(enc):  # a method's class
        raise UnsupportedModelError(f"LTM converts a plain timm encoder; this one is already patched "
                                    f"({type(enc).__name__}): remove that method first")
    host = host_of(enc, "LTM")
    host.check_blocks("LTM")
    host.check_positions("LTM")  # positions that can follow moved tokens (rotary ones: recomputed)
    drop = getattr(getattr(enc, "patch_drop", None), "prob", 0.0)
    if drop:
        raise InvalidArgumentError(f"LTM needs every patch on its grid, but this ViT drops {drop:.0%} of the patches "
                                   "in training (patch_drop_rate); build it with patch_drop_rate=0")


def _wrap(model: nn.Module) -> None:
    enc = encoder(model)
    host = host_of(enc, "LTM")  # built on the plain class: the host keeps its original head
    setattr(enc, _HOST, host)
    enc.__class__ = host.patched_class(type(enc), _LTMEncoder, f"LTM{type(enc).__name__}")


def _unwrap(model: nn.Module) -> None:
    enc = encoder(model)
    enc.__class__ = original_class(type(enc))
    delattr(enc, _HOST)


FAMILY = Family(name="vit", accepts=is_encoder, find=lambda model: list(host_of(encoder(model), "LTM").blocks),
                persistent="model", wrap=_wrap, unwrap=_unwrap, check=_check)
