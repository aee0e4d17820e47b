"""ToMe, token merging without training, on timm ViTs: the baseline every method here is compared with.

Bolya, Fu, Dai, Zhang, Feichtenhofer & Hoffman, "Token Merging: Your ViT but Faster", ICLR 2023. docs/methods.md §5.
Written for tokenthrift from the paper (the authors' code is non-commercial and pinned to timm 0.4.12).

Between attention and MLP of every block, ``r`` tokens are merged away by bipartite soft matching
(:func:`bipartite_merge`): the tokens are split alternately into sets A (even positions) and B (odd
positions), counted over the whole sequence, prefix tokens included; every A token is matched to its
most similar B token by the cosine similarity of the attention keys averaged over heads; the ``r`` best
matched A tokens are merged into their B partners by size-weighted average (prefix tokens never merge,
``r`` is capped at half the mergeable tokens), and the sizes are tracked. Proportional attention adds
log(size) of every key to the attention logits; on CUDA folded into one more channel of q and k
(:func:`tokens.size_biased_attention`), so the fused ``scaled_dot_product_attention`` keeps its flash
kernels, which take no float mask; on the CPU, whose flash kernel takes one, as an additive mask. Everything is batched tensor ops.

Supported: timm ``VisionTransformer`` with its pre-norm ``Block`` (ViT, DeiT, distilled DeiT with both
prefix tokens protected, register tokens, LayerScale, q/k norm, average pooling without a CLS token,
where merged tokens are pooled by size), training as well as inference. ``r=0`` is exactly the plain
model. :func:`apply` patches in place and returns a handle; :func:`remove` restores the plain model.

FROZEN: tokenthrift's ToMe as it was before the host layer (tokenthrift.hosts), kept verbatim but for its imports
as the reference that pins the ported ToMe bit for bit on timm ViTs (tests/test_hosts.py). Do not edit or use it
elsewhere; it goes when the pin has served (after every method is on the hosts).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tokenthrift.errors import InvalidArgumentError, StateError, UnsupportedModelError
from tokenthrift.measure import training_mode
from tokenthrift.tokens import segment_sum, size_biased_attention

__all__ = ["ToMeHandle", "apply", "bipartite_merge", "block_schedule", "capped_blocks", "get_handle", "largest_r",
           "merging_copy", "patch_groups", "remove"]


def block_schedule(r: int | Sequence[int] | tuple[int, float], depth: int) -> list[int]:
    """Tokens merged per block: an int for every block, one int per block (a shorter list is padded with
    0), or ``(r, inflection)`` as in the paper: linear from r·(1 - inflection) at the first block to
    r·(1 + inflection) at the last (rounded down), so the mean stays about r."""
    if isinstance(r, tuple):
        if len(r) != 2:
            raise InvalidArgumentError(f"ToMe r as a tuple is (r, inflection); got {r}")
        base, inflection = r
        low = int(base * (1.0 - inflection))
        high = 2 * base - low
        return [int(low + (high - low) * i / max(depth - 1, 1)) for i in range(depth)]
    if isinstance(r, int):
        values = [r] * depth
    else:
        values = [int(v) for v in r]
        if len(values) > depth:
            raise InvalidArgumentError(f"ToMe got {len(values)} per-block r values for {depth} blocks")
        values += [0] * (depth - len(values))
    if any(v < 0 for v in values):
        raise InvalidArgumentError(f"ToMe r must be >= 0; got {values}")
    return values


def capped_blocks(schedule: Sequence[int], num_tokens: int, num_prefix_tokens: int) -> list[int]:
    """The blocks of ``schedule`` (tokens merged per block) that cannot merge their r on a sequence of
    ``num_tokens`` tokens (prefix included): a block merges at most half of its mergeable tokens."""
    tokens, capped = num_tokens, []
    for k, r in enumerate(schedule):
        most = (tokens - num_prefix_tokens) // 2
        if r > most:
            capped.append(k)
        tokens -= min(r, most)
    return capped


def largest_r(num_tokens: int, num_prefix_tokens: int, depth: int) -> int:
    """The largest r that every one of ``depth`` blocks can merge on ``num_tokens`` tokens (prefix included)."""
    lo, hi = 0, max((num_tokens - num_prefix_tokens) // 2, 0)
    while lo < hi:  # no block capped at r: a monotone property
        mid = (lo + hi + 1) // 2
        if capped_blocks([mid] * depth, num_tokens, num_prefix_tokens):
            hi = mid - 1
        else:
            lo = mid
    return lo


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int, num_prefix_tokens: int,
                    source: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merge ``r`` tokens of x (B, N, D) by bipartite soft matching on ``metric`` (B, N, Dk).

    ``size`` (B, N, 1) tokens' sizes; ``source`` (B, N, N0) or None: which original tokens each holds.
    Returns x (B, N - r, D), size (B, N - r, 1), source (B, N - r, N0) or None, with the prefix tokens
    first and unchanged, then the unmerged A tokens in their order, then the B tokens.
    """
    B, N, D = x.shape
    P = num_prefix_tokens
    r = min(r, (N - P) // 2)
    if r <= 0:
        return x, size, source
    # A: even positions, B: odd positions, counted over the whole sequence; prefix tokens never take part.
    # At batch 1 the merge costs its number of ops, so the whole merge is one segment sum of every token into
    # its output slot (prefix, the A tokens that stay, in order, then the B tokens with their merged A tokens).
    a_start = P + (P % 2)
    b_start = P + 1 - (P % 2)
    with torch.no_grad():  # the matching is discrete
        unit = F.normalize(metric.float(), dim=-1, eps=1e-6)  # cosine of the keys, normalised once for both sets
        best, partner = (unit[:, a_start::2] @ unit[:, b_start::2].transpose(1, 2)).max(dim=-1)
        merged = torch.zeros_like(best, dtype=torch.bool).scatter_(1, best.topk(r, dim=-1).indices, 1)
        first_b = N - r - (N - b_start + 1) // 2  # output slot of the first B token
        slot = torch.empty(B, N, dtype=torch.long, device=x.device)
        slot[:, :P] = torch.arange(P, device=x.device)
        kept_rank = (~merged).cumsum(dim=-1, dtype=torch.long)  # long: ONNX has no cumulative sum of booleans
        slot[:, a_start::2] = torch.where(merged, partner + first_b, kept_rank + (P - 1))
        slot[:, b_start::2] = torch.arange(first_b, N - r, device=x.device)

    # x·size and size travel as one tensor, so the merge runs once; the source map (N0 wide) apart
    both = segment_sum(torch.cat([x * size, size.to(x.dtype)], dim=-1), slot, N - r)
    out_s = both[..., D:].detach().to(size.dtype).contiguous()  # counts: no gradient; contiguous for log and mask
    out_x = both[..., :D] / out_s  # size-weighted average
    if source is not None:
        source = segment_sum(source, slot, N - r)
    return out_x.to(x.dtype), out_s, source


def _attend(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None, kernel: str = "auto"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's ``Attention`` forward, plus proportional attention (log size of every key added to the logits:
    ``kernel="fold"`` as an extra q/k channel, which keeps the flash kernels, :func:`tokens.size_biased_attention`;
    ``"mask"`` as an additive float mask; ``"auto"``: fold on CUDA, mask elsewhere) and the keys averaged over
    heads (the matching metric)."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log().to(q.dtype).view(B, 1, 1, N)
    dropout = attn.attn_drop.p if attn.training else 0.0
    fold = kernel == "fold" or (kernel == "auto" and q.is_cuda)
    if attn.fused_attn and bias is not None and fold:
        out = size_biased_attention(q, k, v, bias.view(B, N), attn.scale, dropout)
    elif attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    if getattr(attn, "norm", None) is not None:  # scale_norm (timm >= 1.0.16)
        out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.mean(dim=1)


@dataclass
class _State:
    """Per-forward bookkeeping shared by the blocks of one patched model."""

    schedule: list[int] = field(default_factory=list)
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None


@dataclass
class ToMeHandle:
    """What :func:`apply` returns. ``r``, ``prop_attn`` and ``trace_source`` are read at every forward (set
    them to change the merging); ``last_source`` holds the (B, N, N0) source map of the latest forward with
    ``trace_source`` (which original tokens each final token holds), ``last_size`` its token sizes."""

    model: nn.Module
    r: int | Sequence[int] | tuple[int, float]
    prop_attn: bool = True
    trace_source: bool = False
    prop_kernel: str = "auto"  # how the fused kernel gets the size bias: "fold" (q/k channel), "mask" or "auto"
    state: _State = field(default_factory=_State)
    last_source: torch.Tensor | None = None
    last_size: torch.Tensor | None = None

    def schedule(self) -> list[int]:
        return block_schedule(self.r, len(self.model.blocks))


_ATTR = "_tokenthrift_tome"
PROP_KERNELS = ("auto", "fold", "mask")


def get_handle(model: nn.Module) -> ToMeHandle | None:
    return getattr(model, _ATTR, None)


def _tome_block(block_class: type) -> type:
    class ToMeBlock(block_class):
        """timm's Block with ToMe between attention and MLP (class-swapped by :func:`apply`)."""

        def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                    ) -> torch.Tensor:
            handle = self._tome_handle
            state = handle.state
            if attn_mask is not None or is_causal:
                raise UnsupportedModelError("ToMe merges tokens inside the model, so an attention mask over the input "
                                            "tokens no longer fits; run ToMe models without attn_mask")
            size = state.size if handle.prop_attn else None
            update, metric = _attend(self.attn, self.norm1(x), size, handle.prop_kernel)
            x = x + self.drop_path1(self.ls1(update))
            r = state.schedule.pop(0) if state.schedule else 0
            if r > 0:
                if state.size is None:
                    state.size = x.new_ones(x.shape[0], x.shape[1], 1)
                x, state.size, state.source = bipartite_merge(x, metric, state.size, r, self._tome_prefix,
                                                              state.source)
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    ToMeBlock.__name__ = ToMeBlock.__qualname__ = f"ToMe{block_class.__name__}"
    return ToMeBlock


def _tome_model(model_class: type) -> type:
    class ToMeVisionTransformer(model_class):
        """timm's VisionTransformer that resets ToMe's state at every forward and pools merged tokens by size."""

        def forward_features(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
            handle = self._tokenthrift_tome
            handle.state = _State(schedule=handle.schedule())
            if handle.trace_source:
                n = self.patch_embed.num_patches + self.num_prefix_tokens if not getattr(
                    self, "dynamic_img_size", False) else None
                handle.state.source = None if n is None else torch.eye(n, device=x.device).expand(x.shape[0], n, n)
            out = super().forward_features(x, **kwargs)
            handle.last_source, handle.last_size = handle.state.source, handle.state.size
            return out

        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            size = self._tokenthrift_tome.state.size
            if self.global_pool == "avg" and size is not None:  # merged tokens count by the patches they hold
                P = self.num_prefix_tokens
                x = (x[:, P:] * size[:, P:]).sum(1) / size[:, P:].sum(1)
                x = self.head_drop(self.fc_norm(x))
                return x if pre_logits else self.head(x)
            return super().forward_head(x, pre_logits=pre_logits)

    ToMeVisionTransformer.__name__ = ToMeVisionTransformer.__qualname__ = f"ToMe{model_class.__name__}"
    return ToMeVisionTransformer


def apply(model: nn.Module, r: int | Sequence[int] | tuple[int, float], prop_attn: bool = True,
          trace_source: bool = False, prop_kernel: str = "auto") -> ToMeHandle:
    """Patch a timm ``VisionTransformer`` in place for ToMe; parameters and state_dict keys unchanged.

    ``r``: tokens merged per block (int), one value per block, or ``(r, inflection)``. ``prop_attn``:
    proportional attention; ``prop_kernel``: how it reaches timm's fused attention, ``"fold"`` (log size as
    one more q/k channel, the head width padded to a multiple of 8: CUDA's flash kernels stay in use),
    ``"mask"`` (an additive float mask, which CUDA's flash kernels refuse and the CPU's take) or ``"auto"``
    (fold on CUDA, mask elsewhere: on the CPU the padded channels would only add work).
    ``trace_source``: keep the source map of every forward (visualisation).
    Returns the :class:`ToMeHandle`; :func:`remove` undoes the patch.
    """
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError("ToMe supports timm VisionTransformer models (vit_*, deit_*, incl. distilled and "
                                    f"register variants); got {type(model).__name__}")
    if get_handle(model) is not None:
        raise StateError("ToMe is already applied to this model; call tokenthrift.tome.remove(model) first")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise UnsupportedModelError(f"ToMe supports timm's pre-norm Block; block {i} is {type(blk).__name__}")
    if model.global_pool not in ("token", "avg"):
        raise UnsupportedModelError("ToMe pools merged tokens by CLS token or by size-weighted average; this model "
                                    f"pools with {model.global_pool!r}")
    if getattr(model.patch_drop, "prob", 0.0):
        raise InvalidArgumentError("ToMe merges tokens by position pairs; build the model with patch_drop_rate=0")
    if prop_kernel not in PROP_KERNELS:
        raise InvalidArgumentError(f"prop_kernel={prop_kernel!r}: choose one of {', '.join(PROP_KERNELS)}")
    handle = ToMeHandle(model, r, prop_attn, trace_source, prop_kernel=prop_kernel)
    schedule = handle.schedule()  # validates r
    if not getattr(model, "dynamic_img_size", False):  # a fixed token count: r must fit it (a larger r is not merged)
        P, depth = model.num_prefix_tokens, len(schedule)
        tokens = model.patch_embed.num_patches + P
        capped = capped_blocks(schedule, tokens, P)
        if capped:
            raise InvalidArgumentError(
                f"ToMe r={r} (--tome-r) asks block {capped[0]} to merge more tokens than it can (at most half of "
                f"those left); with {tokens - P} patch tokens over {depth} blocks the largest r is "
                f"{largest_r(tokens, P, depth)} (a larger r would be capped where the tokens run out: the r reported "
                "would not be the r run)")
    block_class = _tome_block(Block)
    for blk in model.blocks:
        blk.__class__ = block_class
        blk._tome_handle = handle
        blk._tome_prefix = model.num_prefix_tokens
    model.__class__ = _tome_model(type(model))
    setattr(model, _ATTR, handle)
    return handle


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the plain timm model again."""
    from timm.models.vision_transformer import Block

    handle = get_handle(model)
    if handle is None:
        raise StateError("ToMe is not applied to this model; nothing to remove")
    for blk in model.blocks:
        del blk._tome_handle, blk._tome_prefix
        blk.__class__ = Block
    model.__class__ = type(model).__mro__[1]
    delattr(model, _ATTR)
    return model


def merging_copy(model: nn.Module, r: int | Sequence[int] | tuple[int, float], **options) -> nn.Module:
    """A copy of ``model`` with ToMe applied at ``r`` (``options``: those of :func:`apply`); ``model`` stays
    plain."""
    import copy

    merged = copy.deepcopy(model)
    apply(merged, r, **options)
    return merged


def patch_groups(model: nn.Module, images: torch.Tensor, blocks: Sequence[int]) -> list[tuple[int, torch.Tensor, int]]:
    """Where the patches of ``images`` went in a ToMe-patched ViT: for every block index in ``blocks``, after
    that block, (block, ids, tokens) with ids (B, h, w) the token each patch then belongs to and ``tokens`` the
    number of patch tokens left. One forward in eval mode, without gradients; the model is left as it was."""
    handle = get_handle(model)
    if handle is None:
        raise StateError("ToMe is not applied to this model; call tokenthrift.tome.apply first")
    if getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError("patch groups follow a fixed patch grid; build the model without dynamic_img_size")
    bad = [k for k in blocks if not 0 <= k < len(model.blocks)]
    if bad:
        raise InvalidArgumentError(f"blocks {bad}: this model has blocks 0..{len(model.blocks) - 1}")
    P, (h, w) = model.num_prefix_tokens, model.patch_embed.grid_size
    seen: dict[int, torch.Tensor] = {}
    hooks = [model.blocks[k].register_forward_hook(lambda *_, k=k: seen.__setitem__(k, handle.state.source))
             for k in blocks]
    traced, handle.trace_source = handle.trace_source, True
    try:
        with torch.no_grad(), training_mode(model, False):
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
        handle.trace_source = traced
    # every patch sits in exactly one token: the row of its 1 in the source map
    return [(k, seen[k][:, P:, P:].argmax(dim=1).view(-1, h, w), seen[k].shape[1] - P) for k in blocks]
