"""ToMe, token merging without training, on timm encoders: the baseline every method here is compared with.

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

Supported: every encoder a host of :mod:`tokenthrift.hosts` describes, training as well as inference: timm
``VisionTransformer`` with its pre-norm ``Block`` (ViT, DeiT, distilled DeiT with both prefix tokens protected,
register tokens, LayerScale, q/k norm, average pooling without a CLS token, SigLIP's attention-pool head) and timm
``Eva`` (EVA-02, DINOv3, PE, RoPE ViTs), where a merged token keeps the rotary position of the token it was merged
into (measured far better than its patches' size-weighted mean, which ToMe's matching of distant look-alike tokens
can put anywhere: benchmarks/rope_positions.py; ``positions="mean"`` chooses it), and timm ``NaFlexVit``, padded
batches included. Merged tokens are pooled by size (average weighted by size; log(size) on the attention-pool
head's keys). ``r=0`` is exactly the plain model. :func:`apply` patches in place and returns a handle; :func:`remove` restores the
plain model. The method talks to the host only (its embedding, attention and MLP steps, positions and head).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import InvalidArgumentError, StateError, UnsupportedModelError
from .hosts import Host, grid_coords, host_of, original_class
from .measure import training_mode
from .tokens import segment_sum

__all__ = ["ToMeHandle", "apply", "bipartite_merge", "block_schedule", "capped_blocks", "get_handle", "largest_r",
           "from_pretrained", "merging_copy", "patch_groups", "remove", "save_pretrained"]


def block_schedule(r: int | Sequence[int] | tuple[int, float], depth: int) -> list[int]:
    """Tokens merged per block: an int for every block, one int per block (a shorter list is padded with
    0), or ``(r, inflection)`` as in the paper: linear from r·(1 - inflection) at the first block to
    r·(1 + inflection) at the last (rounded down), so the mean stays about r; the inflection lies in [-1, 1] (a
    tuple of two ints is read this way too: ``(8, 4)`` is refused, per-block values ``[8, 4]`` are a list)."""
    if isinstance(r, tuple):
        tuple_means = ("ToMe r as a tuple is (r, inflection): r tokens per block on average, merged linearly from "
                       "r * (1 - inflection) at the first block to r * (1 + inflection) at the last, with the "
                       "inflection in [-1, 1]; per-block r values are a list (e.g. [8, 4]: 8 in block 0, 4 in block 1)")
        if len(r) != 2:
            raise InvalidArgumentError(f"{tuple_means}; got {r}")
        base, inflection = r
        if not -1 <= inflection <= 1:  # NaN fails too
            raise InvalidArgumentError(f"{tuple_means}; got inflection {inflection} in {r}")
        if not base >= 0:
            raise InvalidArgumentError(f"{tuple_means}; r must be >= 0, got {base} in {r}")
        low = int(base * (1.0 - inflection))
        high = 2 * base - low
        # the step first, then step·i, as the paper's code rounds (its parse_r): (high - low)·i / (depth - 1)
        # rounds the other way where the quotient is a whole number, e.g. (15, 1) over 12 blocks ends at 30, not 29
        step = (high - low) / max(depth - 1, 1)
        values = [int(low + step * i) for i in range(depth)]
    elif isinstance(r, int):
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


def _check_r(r, schedule: Sequence[int], num_tokens: int, num_prefix_tokens: int, where: str = "") -> None:
    """Refuse a ToMe ``r`` (its per-block ``schedule``) that some block cannot merge on ``num_tokens`` tokens (prefix
    included): a capped r would merge fewer tokens than the r reported. ``where`` says which tokens (a message's
    context)."""
    capped = capped_blocks(schedule, num_tokens, num_prefix_tokens)
    if capped:
        patches, depth = num_tokens - num_prefix_tokens, len(schedule)
        raise InvalidArgumentError(
            f"ToMe r={r} (--tome-r) asks block {capped[0]} to merge more tokens than it can (at most half of those "
            f"left); with {patches} patch tokens over {depth} blocks the largest r is "
            f"{largest_r(num_tokens, num_prefix_tokens, depth)}{where} (a larger r would be capped where the tokens "
            "run out: the r reported would not be the r run)")


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int, num_prefix_tokens: int,
                    source: torch.Tensor | None = None, coords: torch.Tensor | None = None, positions: str = "kept",
                    padded: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Merge ``r`` tokens of x (B, N, D) by bipartite soft matching on ``metric`` (B, N, Dk).

    ``size`` (B, N, 1) tokens' sizes; ``source`` (B, N, N0) or None: which original tokens each holds;
    ``coords`` (B, N, 2) or None: each token's position (patch units): a merged token's is the position of the B
    token it was merged into (``positions="kept"``) or the size-weighted mean of the pair's (``"mean"``). Returns
    x (B, N - r, D), size (B, N - r, 1), source (B, N - r, N0) or None, coords (B, N - r, 2) or None, with the
    prefix tokens first and unchanged, then the unmerged A tokens in their order, then the B tokens.
    ``padded``: tokens of size 0 are padding (a NaFlex batch, real tokens first); a real token is never merged into
    one, pads merge (at weight 0) only after every real token had its chance, and the real tokens come out first,
    in the order the image alone would give them (so an image gives the same result padded in a batch as alone, as
    long as r fits it).
    """
    B, N, D = x.shape
    P = num_prefix_tokens
    r = min(r, (N - P) // 2)
    if r <= 0:
        return x, size, source, coords
    # A: even positions, B: odd positions, counted over the whole sequence; prefix tokens never take part.
    # At batch 1 the merge costs its number of ops, so the whole merge is one segment sum of every token into
    # its output slot (prefix, the A tokens that stay, in order, then the B tokens with their merged A tokens).
    a_start = P + (P % 2)
    b_start = P + 1 - (P % 2)
    with torch.no_grad():  # the matching is discrete
        unit = F.normalize(metric.float(), dim=-1, eps=1e-6)  # cosine of the keys, normalised once for both sets
        scores = unit[:, a_start::2] @ unit[:, b_start::2].transpose(1, 2)
        if padded:
            pad = size[..., 0] == 0
            scores = scores.masked_fill(pad[:, None, b_start::2], -math.inf)
        best, partner = scores.max(dim=-1)
        if padded:
            best = best.masked_fill(pad[:, a_start::2], -math.inf)
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
    out_x = both[..., :D] / (out_s.clamp_min(1e-6) if padded else out_s)  # size-weighted average (pads: 0, not 0/0)
    if source is not None:
        source = segment_sum(source, slot, N - r)
    if coords is not None:  # positions in fp32 whatever x's dtype: a mean position must not round to a patch
        if positions == "kept":  # a merged token stays where its B token was
            weight = torch.ones(B, N, 1, device=x.device)
            weight[:, a_start::2] = (~merged).unsqueeze(-1).float()
        else:
            weight = size.float()
        coords = segment_sum(coords * weight, slot, N - r) / segment_sum(weight, slot, N - r)
    if padded:  # real tokens first, in order, as the image alone would have them (the next split pairs the same)
        order = torch.sort((out_s[..., 0] == 0).to(torch.uint8), dim=1, stable=True).indices
        out_x, out_s, source, coords = (None if t is None else t.gather(1, order.unsqueeze(-1).expand_as(t))
                                        for t in (out_x, out_s, source, coords))
    return out_x.to(x.dtype), out_s, source, coords


@dataclass
class _State:
    """What the latest forward of one patched model left for its head and for inspection."""

    size: torch.Tensor | None = None
    source: torch.Tensor | None = None
    history: list = field(default_factory=list)  # with trace_source: the source map after every block


@dataclass
class ToMeHandle:
    """What :func:`apply` returns. ``r``, ``prop_attn`` and ``trace_source`` are read at every forward (set
    them to change the merging); ``last_source`` holds the (B, N, N0) source map of the latest forward with
    ``trace_source`` (which original tokens each final token holds), ``last_size`` its token sizes. ``host``
    describes the model to ToMe (:mod:`tokenthrift.hosts`)."""

    model: nn.Module
    r: int | Sequence[int] | tuple[int, float]
    prop_attn: bool = True
    trace_source: bool = False
    prop_kernel: str = "auto"  # how the fused kernel gets the size bias: "fold" (q/k channel), "mask" or "auto"
    host: Host | None = None
    positions: str = "kept"  # a merged token's rotary position: its B token's ("kept"), or its patches' "mean"
    state: _State = field(default_factory=_State)
    last_source: torch.Tensor | None = None
    last_size: torch.Tensor | None = None

    def schedule(self) -> list[int]:
        return block_schedule(self.r, len(self.host.blocks))


_ATTR = "_tokenthrift_tome"
PROP_KERNELS = ("auto", "fold", "mask")
POSITIONS = ("mean", "kept")
PAD_BIAS = -1e4  # a pad token's attention bias: no weight after the softmax, and finite in the folded kernel


def get_handle(model: nn.Module) -> ToMeHandle | None:
    return getattr(model, _ATTR, None)


def _tome_step(host: Host, block: nn.Module, x: torch.Tensor, size: torch.Tensor | None,
               source: torch.Tensor | None, coords: torch.Tensor | None, rope: torch.Tensor | None, r: int,
               prop_attn: bool, kernel: str, num_prefix_tokens: int, positions: str, padded: bool = False):
    """One block with ToMe between its attention and its MLP: attention with log(size) added to every key's
    logits (proportional attention), ``r`` tokens merged away by the keys' similarity, the MLP on the rest.
    ``padded``: tokens of size 0 are padding, masked out of the attention whether or not it is proportional.
    A pure function of its tensors (gradient checkpointing recomputes it)."""
    bias = None
    if size is not None and (prop_attn or padded):
        bias = size.log() if prop_attn else torch.where(size > 0, 0.0, -math.inf)
        bias = (bias.clamp_min(PAD_BIAS) if padded else bias).view(x.shape[0], -1)
    x, metric = host.attention(block, x, bias, rope, kernel)
    if r > 0:
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        x, size, source, coords = bipartite_merge(x, metric, size, r, num_prefix_tokens, source, coords, positions,
                                                  padded)
    return host.mlp(block, x), size, source, coords


class _ToMeForward:
    """The forward of a model with ToMe in every block, run through its host; merged tokens pooled by size (mixed
    over the model's class by :meth:`tokenthrift.hosts.Host.patched_class`)."""

    def forward_features(self, x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False, **inputs) -> torch.Tensor:
        handle = self._tokenthrift_tome
        host = handle.host
        if attn_mask is not None or is_causal:
            raise UnsupportedModelError("ToMe merges tokens inside the model, so an attention mask over the input "
                                        "tokens no longer fits; run ToMe models without attn_mask (a NaFlexViT's "
                                        "padding is taken from patch_valid)")
        embedded = host.embed_inputs(x, inputs)
        x, P = embedded.x, host.num_prefix_tokens
        B, T, _ = x.shape
        schedule = handle.schedule()
        _check_r(handle.r, schedule, T, P, " at this input size")  # a model of any size: its grid known here
        size = coords = None
        padded = embedded.valid is not None
        if padded:  # a pad token has size 0: it holds no patch
            size = torch.cat([embedded.valid.new_ones(B, P), embedded.valid], 1).to(x.dtype).unsqueeze(-1)
        source = torch.eye(T, device=x.device).expand(B, T, T) if handle.trace_source else None
        history = []
        checkpointed = getattr(self, "grad_checkpointing", False) and torch.is_grad_enabled()
        for i, (blk, r) in enumerate(zip(host.blocks, schedule)):
            if r > 0 and coords is None and host.rotary:  # positions follow the tokens from the first merge on
                coords = torch.cat([x.new_zeros(B, P, 2, dtype=torch.float32),
                                    grid_coords(embedded.grid, B, x.device)], dim=1)
            rope = host.rope(embedded, None if coords is None else coords[:, P:], i)
            step = (host, blk, x, size, source, coords, rope, r, handle.prop_attn, handle.prop_kernel, P,
                    handle.positions, padded)
            x, size, source, coords = (checkpoint(_tome_step, *step, use_reentrant=False) if checkpointed
                                       else _tome_step(*step))
            if source is not None:
                history.append(source)
        handle.state = _State(size=size, source=source, history=history)
        handle.last_source, handle.last_size = source, size
        return host.features(host.norm(x), embedded)

    def forward_head(self, x: torch.Tensor | None = None, pre_logits: bool = False, **inputs) -> torch.Tensor:
        handle = self._tokenthrift_tome
        return handle.host.head(handle.host.head_input(x, inputs), handle.state.size, pre_logits)


def apply(model: nn.Module, r: int | Sequence[int] | tuple[int, float], prop_attn: bool = True,
          trace_source: bool = False, prop_kernel: str = "auto", positions: str = "kept") -> ToMeHandle:
    """Patch a model in place for ToMe; parameters and state_dict keys unchanged. The model is any one a host of
    :mod:`tokenthrift.hosts` describes: timm ``VisionTransformer`` (ViT, DeiT incl. distilled, registers,
    LayerScale, q/k norm, SigLIP's attention-pool head), timm ``Eva`` (EVA-02, DINOv3, PE, RoPE ViTs: a merged
    token's rotary angles are computed at its position, see ``positions``) and timm ``NaFlexVit`` (images, or a
    padded NaFlex batch whose pads are never merged into a real token, attended to or pooled).

    ``r``: tokens merged per block (int), one value per block, or ``(r, inflection)``. ``prop_attn``:
    proportional attention; ``prop_kernel``: how it reaches the model's fused attention, ``"fold"`` (log size as
    one more q/k channel, the head width padded to a multiple of 8: CUDA's flash kernels stay in use),
    ``"mask"`` (an additive float mask, which CUDA's flash kernels refuse and the CPU's take) or ``"auto"``
    (fold on CUDA, mask elsewhere: on the CPU the padded channels would only add work).
    ``trace_source``: keep the source map of every forward (visualisation). ``positions`` (rotary hosts): a
    merged token's position, ``"kept"`` (default: the position of the token it was merged into) or ``"mean"``
    (its patches' size-weighted mean, computed at fractional positions). On a RoPE ViT trained on Fashion-MNIST
    "kept" loses 0.5 points at r = 4 where "mean" loses 9 (benchmarks/rope_positions.py): the matching pairs
    distant look-alike tokens, whose mean lies where neither is.
    Returns the :class:`ToMeHandle`; :func:`remove` undoes the patch.
    """
    if get_handle(model) is not None:
        raise StateError("ToMe is already applied to this model; call tokenthrift.tome.remove(model) first")
    host = host_of(model, "ToMe")
    host.check_blocks("ToMe")
    host.check_pool("ToMe")
    if prop_attn:
        host.check_attention("ToMe")
    host.check_positions("ToMe")  # positions that can follow moved tokens (rotary ones: recomputed)
    if getattr(getattr(model, "patch_drop", None), "prob", 0.0):
        raise InvalidArgumentError("ToMe merges tokens by position pairs; build the model with patch_drop_rate=0")
    if prop_kernel not in PROP_KERNELS:
        raise InvalidArgumentError(f"prop_kernel={prop_kernel!r}: choose one of {', '.join(PROP_KERNELS)}")
    if positions not in POSITIONS:
        raise InvalidArgumentError(f"positions={positions!r}: choose one of {', '.join(POSITIONS)}")
    handle = ToMeHandle(model, r, prop_attn, trace_source, prop_kernel=prop_kernel, host=host, positions=positions)
    schedule = handle.schedule()  # validates r
    if not host.dynamic:  # a fixed token count: r must fit it now (any size: at every forward)
        _check_r(r, schedule, host.num_patches + host.num_prefix_tokens, host.num_prefix_tokens)
    model.__class__ = host.patched_class(type(model), _ToMeForward, f"ToMe{type(model).__name__}")
    setattr(model, _ATTR, handle)
    return handle


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the plain model again."""
    handle = get_handle(model)
    if handle is None:
        raise StateError("ToMe is not applied to this model; nothing to remove")
    model.__class__ = original_class(type(model))
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
    """Where the patches of ``images`` went in a ToMe-patched model: for every block index in ``blocks``, after
    that block, (block, ids, tokens) with ids (B, h, w) the token each patch then belongs to and ``tokens`` the
    number of patch tokens left. One forward in eval mode, without gradients; the model is left as it was."""
    handle = get_handle(model)
    if handle is None:
        raise StateError("ToMe is not applied to this model; call tokenthrift.tome.apply first")
    if handle.host.dynamic:
        raise UnsupportedModelError("patch groups follow a fixed patch grid; build the model without dynamic_img_size")
    depth = len(handle.host.blocks)
    bad = [k for k in blocks if not 0 <= k < depth]
    if bad:
        raise InvalidArgumentError(f"blocks {bad}: this model has blocks 0..{depth - 1}")
    P, (h, w) = handle.host.num_prefix_tokens, handle.host.grid_size
    traced, handle.trace_source = handle.trace_source, True
    try:
        with torch.no_grad(), training_mode(model, False):
            model(images)
    finally:
        handle.trace_source = traced
    seen = handle.state.history
    # every patch sits in exactly one token: the row of its 1 in the source map
    return [(k, seen[k][:, P:, P:].argmax(dim=1).view(-1, h, w), seen[k].shape[1] - P) for k in blocks]


def save_pretrained(model: nn.Module, folder: str, **kwargs) -> None:
    """Save a ToMe-patched transformers model as a transformers folder (``kwargs``: those of its ``save_pretrained``):
    the plain model's config and weights, which its own ``from_pretrained`` loads as the plain model, and ToMe's
    settings in config.json (``tokenthrift_tome``), which :func:`from_pretrained` reapplies (docs/methods.md §10)."""
    from .hosts.transformers import method_settings, save_as_plain

    handle = get_handle(model)
    if handle is None:
        raise StateError("ToMe is not applied to this model; save a plain model with its own save_pretrained")
    settings = method_settings(apply, handle)
    if isinstance(handle.r, tuple):  # (r, inflection) would read back as per-block values: save those
        settings["r"] = handle.schedule()
    save_as_plain(model, folder, settings={"tokenthrift_tome": settings}, **kwargs)


def from_pretrained(folder: str, **kwargs) -> nn.Module:
    """The ToMe model :func:`save_pretrained` wrote to ``folder``: the transformers class its config.json names,
    loaded with its own ``from_pretrained`` (``kwargs``: e.g. ``attn_implementation``), ToMe applied as saved."""
    from .hosts.transformers import load_saved

    model, settings = load_saved(folder, "tokenthrift_tome", "ToMe", **kwargs)
    apply(model, **settings)
    return model
