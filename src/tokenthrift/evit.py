"""EViT-style attentive-token pruning on timm encoders: keep the tokens the class token attends to, fuse the rest.

Liang, Ge, Tong, Song, Wang & Xie, "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022. docs/methods.md §9. Written for tokenthrift from the paper.

In each pruning block (by default those at 1/4, 1/2 and 3/4 of the depth: blocks 3, 6 and 9 of 12), between
attention and MLP: the class token's attention to every patch token, averaged over heads, ranks the patch tokens;
the ``ceil(keep_rate · N)`` most attended stay (in their order), and the others are fused into one token appended
after the kept ones: their sum weighted by that attention, as the authors' code computes it (``fusion="mean"``,
ours: divided by the attention they hold; ``fuse=False`` drops them instead). The token
fused in one pruning block is a patch token to the next: ranked, kept or fused again. The class row is computed
apart from the attention (:func:`tokenthrift.hosts.class_attention`), so the block keeps the model's fused
attention kernel. Prefix tokens (class token, registers) are never pruned. A token's size (the patches it holds)
is tracked for pooling: an average-pooled model weighs the fused token by its patches. Works off the shelf (no
weight changes) and fine-tuned (the ranking is discrete, the fusion weights carry gradients to the attention).

Supported: every encoder a host of :mod:`tokenthrift.hosts` describes that has a class token: timm
``VisionTransformer`` (ViT, DeiT, registers, LayerScale, ...), ``Eva`` (EVA-02, DINOv3, PE, RoPE ViTs: a kept
token keeps its rotary position, the fused token sits at its patches' attention-weighted mean) and
``NaFlexVit`` on images. :func:`apply` patches in place and returns a handle; :func:`remove` restores the plain
model; ``keep_rate=1`` is exactly the plain model. Everything is batched tensor ops.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import InvalidArgumentError, StateError, UnsupportedModelError
from .hosts import Host, grid_coords, host_of, original_class
from .measure import training_mode

__all__ = ["FUSIONS", "EViTHandle", "apply", "attentive_prune", "default_locations", "get_handle", "kept_patches",
           "from_pretrained", "pruning_copy", "remove", "save_pretrained", "token_counts"]

_ATTR = "_tokenthrift_evit"


def default_locations(depth: int) -> tuple[int, ...]:
    """The pruning blocks of a ``depth``-block encoder: those at 1/4, 1/2 and 3/4 of the depth (3, 6, 9 of 12, as
    the paper prunes DeiT)."""
    return tuple(sorted({depth // 4, depth // 2, (3 * depth) // 4} - {0} or {depth // 2}))


FUSIONS = ("sum", "mean")  # the authors' attention-weighted sum; ours: that sum divided by the attention it holds


def kept_count(tokens: int, keep_rate: float) -> int:
    """Patch tokens a pruning block keeps of ``tokens``: ``ceil(keep_rate · tokens)`` in floating point, as the
    authors' code computes it (0.7 · 10 rounds up to 8), at least 1."""
    return max(1, math.ceil(keep_rate * tokens))


def token_counts(num_patches: int, depth: int, keep_rate: float, locations: Sequence[int], fuse: bool = True
                 ) -> list[tuple[int, int]]:
    """Patch tokens (attention, MLP) of every block: the analytic count of what :func:`apply` runs (a pruning
    block's attention sees the tokens before, its MLP those after)."""
    counts, n = [], num_patches
    for i in range(depth):
        before = n
        if i in locations and kept_count(n, keep_rate) < n:
            n = kept_count(n, keep_rate) + int(fuse)
        counts.append((before, n))
    return counts


def attentive_prune(x: torch.Tensor, attention: torch.Tensor, keep: int, num_prefix_tokens: int,
                    size: torch.Tensor, coords: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                    fuse: bool = True, fusion: str = "sum"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Keep the ``keep`` patch tokens of x (B, T, D) that the class token attends to most (``attention`` (B, T):
    its attention over all tokens), in their order, after the prefix tokens; with ``fuse`` append one token made of
    the others: with ``fusion="sum"`` their sum weighted by their attention (the authors' code), with ``"mean"``
    that sum divided by the attention they hold (ours). ``size`` (B, T, 1): patches each token holds (the fused
    token holds the sum); ``coords`` (B, T - P, 2) or None: patch-token positions (the fused token's: the
    attention-weighted mean); ``ids`` (B, T - P) or None: the original patch each patch token is (-1: a fused
    token), for pictures. Returns x, size, coords, ids with ``keep`` (+ 1 fused) patch tokens."""
    P = num_prefix_tokens
    B, T, D = x.shape
    if keep >= T - P:
        return x, size, coords, ids
    score = attention[:, P:]
    kept = score.topk(keep, dim=1).indices.sort(dim=1).values  # (B, keep): the most attended, in their order

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, kept.unsqueeze(-1).expand(-1, -1, t.shape[-1])) if t.dim() == 3 else t.gather(1, kept)

    patches, patch_size = x[:, P:], size[:, P:]
    out_x, out_s = [x[:, :P], take(patches)], [size[:, :P], take(patch_size)]
    out_c = None if coords is None else [take(coords)]
    out_i = None if ids is None else [take(ids)]
    if fuse:
        pruned = torch.ones_like(score, dtype=torch.bool).scatter(1, kept, False)
        weight = (score * pruned).unsqueeze(-1)  # the class token's attention to each pruned token, 0 for kept ones
        total = weight.sum(1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        fused = (patches * weight.to(x.dtype)).sum(1, keepdim=True)
        out_x.append(fused if fusion == "sum" else (fused / total.to(x.dtype)).to(x.dtype))
        out_s.append((patch_size * pruned.unsqueeze(-1)).sum(1, keepdim=True))
        if out_c is not None:
            out_c.append((coords * weight).sum(1, keepdim=True) / total)
        if out_i is not None:
            out_i.append(ids.new_full((B, 1), -1))
    cat = lambda parts: None if parts is None else torch.cat(parts, dim=1)  # noqa: E731
    return cat(out_x), cat(out_s), cat(out_c), cat(out_i)


@dataclass
class EViTHandle:
    """What :func:`apply` returns. ``keep_rate``, ``locations`` and ``fuse`` are read at every forward (set them to
    change the pruning); with ``trace`` the latest forward's kept patches after every pruning block are in
    ``last_ids`` (a list of (B, n) original patch indices, -1 for a fused token). ``host`` describes the model."""

    model: nn.Module
    keep_rate: float
    locations: tuple[int, ...]
    fuse: bool = True
    fusion: str = "sum"
    host: Host | None = None
    trace: bool = False
    last_size: torch.Tensor | None = None
    last_ids: list = field(default_factory=list)

    def counts(self, num_patches: int | None = None) -> list[tuple[int, int]]:
        """Patch tokens (attention, MLP) of every block at the model's patch count (or ``num_patches``)."""
        n = self.host.num_patches if num_patches is None else num_patches
        return token_counts(n, len(self.host.blocks), self.keep_rate, self.locations, self.fuse)


def get_handle(model: nn.Module) -> EViTHandle | None:
    return getattr(model, _ATTR, None)


def _evit_step(host: Host, block: nn.Module, x: torch.Tensor, size: torch.Tensor, coords: torch.Tensor | None,
               ids: torch.Tensor | None, rope: torch.Tensor | None, keep_rate: float | None, fuse: bool,
               fusion: str, num_prefix_tokens: int):
    """One block, pruned between its attention and its MLP when ``keep_rate`` is given. A pure function of its
    tensors (gradient checkpointing recomputes it)."""
    if keep_rate is None:
        return host.run_block(block, x, rope), size, coords, ids
    x, _, attention = host.attention(block, x, None, rope, class_row=True)
    keep = kept_count(x.shape[1] - num_prefix_tokens, keep_rate)
    x, size, coords, ids = attentive_prune(x, attention, keep, num_prefix_tokens, size, coords, ids, fuse, fusion)
    return host.mlp(block, x), size, coords, ids


class _EViTForward:
    """The forward of a model with attentive-token pruning in its pruning blocks, run through its host (mixed
    over the model's class by :meth:`tokenthrift.hosts.Host.patched_class`)."""

    def forward_features(self, x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False, **inputs) -> torch.Tensor:
        handle = get_handle(self)
        host = handle.host
        if attn_mask is not None or is_causal:
            raise UnsupportedModelError("EViT prunes tokens inside the model, so an attention mask over the input "
                                        "tokens no longer fits; run it without attn_mask")
        embedded = host.embed_inputs(x, inputs)
        if embedded.valid is not None:
            raise UnsupportedModelError("EViT takes images, not a padded NaFlex batch: pass the images (B, C, H, "
                                        "W), of any size")
        x, P = embedded.x, host.num_prefix_tokens
        B, T, _ = x.shape
        size = x.new_ones(B, T, 1)
        coords = grid_coords(embedded.grid, B, x.device) if host.rotary else None
        ids = torch.arange(T - P, device=x.device).expand(B, T - P) if handle.trace else None
        traced, moved = [], False  # moved: positions differ from the grid's once a block has pruned
        checkpointed = getattr(self, "grad_checkpointing", False) and torch.is_grad_enabled()
        for i, blk in enumerate(host.blocks):
            rope = host.rope(embedded, coords if moved else None, i)
            rate = handle.keep_rate if i in handle.locations else None
            moved = moved or rate is not None
            step = (host, blk, x, size, coords, ids, rope, rate, handle.fuse, handle.fusion, P)
            x, size, coords, ids = (checkpoint(_evit_step, *step, use_reentrant=False) if checkpointed
                                    else _evit_step(*step))
            if ids is not None and rate is not None:
                traced.append(ids)
        handle.last_size, handle.last_ids = size, traced
        return host.features(host.norm(x), embedded)

    def forward_head(self, x: torch.Tensor | None = None, pre_logits: bool = False, **inputs) -> torch.Tensor:
        handle = get_handle(self)
        return handle.host.head(handle.host.head_input(x, inputs), handle.last_size, pre_logits)


def apply(model: nn.Module, keep_rate: float = 0.7, locations: Sequence[int] | None = None,
          fuse: bool = True, fusion: str = "sum") -> EViTHandle:
    """Patch a model in place for attentive-token pruning; parameters and state_dict keys unchanged. The model is
    any one a host of :mod:`tokenthrift.hosts` describes with a class token (timm ``VisionTransformer``, ``Eva``,
    ``NaFlexVit`` on images).

    ``keep_rate``: share of the patch tokens each pruning block keeps, in (0, 1] (the paper's 0.7 keeps 0.34 of
    the tokens after three blocks); ``locations``: the pruning blocks (default :func:`default_locations`);
    ``fuse``: fuse the pruned tokens into one (the paper's EViT) or drop them; ``fusion``: ``"sum"``, their
    attention-weighted sum (the authors' code), or ``"mean"``, that sum divided by the attention they hold (ours, a
    token of the same scale as the others). Returns the :class:`EViTHandle`; :func:`remove` undoes the patch."""
    if get_handle(model) is not None:
        raise StateError("EViT is already applied to this model; call tokenthrift.evit.remove(model) first")
    if original_class(type(model)) is not type(model):  # ToMe, LTM: the forward is theirs (ToE's hook is not)
        raise StateError(f"another tokenthrift method ({type(model).__name__}) is applied to this model; remove it "
                         "first (EViT runs the host's plain blocks)")
    host = host_of(model, "EViT")
    host.check_blocks("EViT")
    host.check_pool("EViT")
    host.check_positions("EViT")  # positions that can follow moved tokens (rotary ones: recomputed)
    if not host.has_class_token:
        raise UnsupportedModelError("EViT ranks tokens by the class token's attention; this model has no class token "
                                    "(build it with class_token=True, or use ToMe, which needs none)")
    if not 0.0 < keep_rate <= 1.0:
        raise InvalidArgumentError(f"EViT keep_rate={keep_rate}: the share of patch tokens each pruning block keeps, "
                                   "in (0, 1] (the paper uses 0.5-0.9)")
    depth = len(host.blocks)
    locations = default_locations(depth) if locations is None else tuple(sorted({int(i) for i in locations}))
    bad = [i for i in locations if not 0 <= i < depth]
    if bad or not locations:
        raise InvalidArgumentError(f"EViT locations {list(locations)}: pruning blocks are indices 0..{depth - 1} "
                                   f"(default {list(default_locations(depth))})")
    if fusion not in FUSIONS:
        raise InvalidArgumentError(f"EViT fusion={fusion!r}: one of {', '.join(FUSIONS)} (sum: the authors' "
                                   "attention-weighted sum; mean: divided by the attention the pruned tokens hold)")
    if getattr(getattr(model, "patch_drop", None), "prob", 0.0):
        raise InvalidArgumentError("EViT prunes by attention; build the model with patch_drop_rate=0")
    handle = EViTHandle(model, float(keep_rate), locations, bool(fuse), fusion, host=host)
    model.__class__ = host.patched_class(type(model), _EViTForward, f"EViT{type(model).__name__}")
    setattr(model, _ATTR, handle)
    return handle


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the plain model again."""
    if get_handle(model) is None:
        raise StateError("EViT is not applied to this model; nothing to remove")
    model.__class__ = original_class(type(model))
    delattr(model, _ATTR)
    return model


def pruning_copy(model: nn.Module, keep_rate: float = 0.7, **options) -> nn.Module:
    """A copy of ``model`` with EViT applied (``options``: those of :func:`apply`); ``model`` stays plain."""
    import copy

    pruned = copy.deepcopy(model)
    apply(pruned, keep_rate, **options)
    return pruned


def kept_patches(model: nn.Module, images: torch.Tensor) -> list[tuple[int, torch.Tensor, int]]:
    """Which patches of ``images`` an EViT-patched model keeps: for every pruning block, (block, kept (B, h, w)
    bool, patch tokens after it, the fused one included). One forward in eval mode without gradients."""
    handle = get_handle(model)
    if handle is None:
        raise StateError("EViT is not applied to this model; call tokenthrift.evit.apply first")
    if handle.host.dynamic:
        raise UnsupportedModelError("kept patches follow a fixed patch grid; build the model without dynamic_img_size")
    h, w = handle.host.grid_size
    handle.trace = True
    try:
        with torch.no_grad(), training_mode(model, False):
            model(images)
    finally:
        handle.trace = False
    out = []
    for block, ids in zip(sorted(handle.locations), handle.last_ids):
        kept = torch.zeros(ids.shape[0], h * w + 1, dtype=torch.bool, device=ids.device)
        kept.scatter_(1, ids % (h * w + 1), True)  # -1 (fused) lands in the spare last column
        out.append((block, kept[:, :h * w].view(-1, h, w), ids.shape[1]))
    return out


def save_pretrained(model: nn.Module, folder: str, **kwargs) -> None:
    """Save an EViT-patched transformers model as a transformers folder (``kwargs``: those of its
    ``save_pretrained``): the plain model's config and weights, which its own ``from_pretrained`` loads as the plain
    model, and EViT's settings in config.json (``tokenthrift_evit``), which :func:`from_pretrained` reapplies
    (docs/methods.md §10)."""
    from .hosts.transformers import method_settings, save_as_plain

    handle = get_handle(model)
    if handle is None:
        raise StateError("EViT is not applied to this model; save a plain model with its own save_pretrained")
    save_as_plain(model, folder, settings={"tokenthrift_evit": method_settings(apply, handle)}, **kwargs)


def from_pretrained(folder: str, **kwargs) -> nn.Module:
    """The EViT model :func:`save_pretrained` wrote to ``folder``: the transformers class its config.json names,
    loaded with its own ``from_pretrained`` (``kwargs``: e.g. ``attn_implementation``), EViT applied as saved."""
    from .hosts.transformers import load_saved

    model, settings = load_saved(folder, "tokenthrift_evit", "EViT", **kwargs)
    apply(model, **settings)
    return model
