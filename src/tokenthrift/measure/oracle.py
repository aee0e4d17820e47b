"""Same-shape oracle and merge agreement of a token-reducing method: the tokens each block of a ViT runs
(:func:`block_token_counts`), the plain model run at those counts with the surplus tokens cut
(:class:`TokenCutOracle`: what the method's time would be without its own work), and how alike a merging method
merges different images (:func:`merge_agreement`)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .state import device_of, training_mode

__all__ = ["TokenCutOracle", "block_token_counts", "merge_agreement"]


def block_token_counts(vit: nn.Module, x: torch.Tensor, norms: Sequence[tuple[nn.Module, nn.Module]] | None = None
                       ) -> list[tuple[int, int]]:
    """(tokens into attention, tokens into the MLP) of every block of a ViT in one eval forward on ``x``: the shapes
    a token-reducing method runs. ``norms``: every block's (norm before attention, norm before the MLP); default a
    timm-style ViT's (``blocks``, each with ``norm1`` and ``norm2``)."""
    norms = [(blk.norm1, blk.norm2) for blk in vit.blocks] if norms is None else norms
    counts = [[0, 0] for _ in norms]
    handles = [norm.register_forward_pre_hook(lambda m, args, i=i, j=j: counts[i].__setitem__(j, args[0].shape[-2]))
               for i, pair in enumerate(norms) for j, norm in enumerate(pair)]
    try:
        with torch.no_grad(), training_mode(vit, False):
            vit(x)
    finally:
        for h in handles:
            h.remove()
    return [(a, m) for a, m in counts]


class TokenCutOracle(nn.Module):
    """The limit a token-reducing method (ToMe, LTM) can reach: the plain model run at the method's per-block
    token counts (:func:`block_token_counts`) with the surplus tokens simply cut (no matching, no merging), so
    the same shapes and MACs minus the method's own work. ``1 - time(oracle) / time(method)`` is the method's
    overhead share. Its outputs mean nothing: it exists to be timed.

    ``host``: the model's host (:mod:`tokenthrift.hosts`, passed in by the caller: this module imports none),
    whose steps run the blocks, the rotary table cut with the tokens."""

    def __init__(self, vit: nn.Module, counts: Sequence[tuple[int, int]], host):
        super().__init__()
        if len(counts) != len(host.blocks):
            raise InvalidArgumentError(f"{len(counts)} token counts for {len(host.blocks)} blocks")
        self.vit, self.counts, self.host = vit, [tuple(c) for c in counts], host

    @classmethod
    def of(cls, plain: nn.Module, merged: nn.Module, input_size: Sequence[int], host) -> TokenCutOracle:
        """The oracle of ``merged`` (a merging version of ``plain``), in eval mode."""
        x = torch.randn(1, *input_size, device=device_of(plain))
        norms = [host.block_norms(blk) for blk in type(host)(merged).blocks]  # the merged model's own blocks
        return cls(plain, block_token_counts(merged, x, norms), host).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        host = self.host
        embedded = host.embed(x)
        x, P = embedded.x, host.num_prefix_tokens
        for i, (blk, (n_attn, n_mlp)) in enumerate(zip(host.blocks, self.counts)):
            x = x[:, :n_attn]
            rope = host.rope(embedded, None, i)
            rope = None if rope is None else rope[..., : n_attn - P, :]
            x = host.mlp(blk, host.attention(blk, x, None, rope)[0][:, :n_mlp])
        return host.head(host.norm(x))


def merge_agreement(ids: torch.Tensor) -> float:
    """How alike a merging method merges different images: the mean adjusted Rand index over every pair of
    images in ``ids`` (B, N), the merged token each of the N patches of image b joined (compared as partitions:
    the label values are arbitrary). 1: the same partition for every image, a fixed positional merge; about 0:
    no more alike than random partitions of the same group sizes. Content-aware merging lies low."""
    B, N = ids.shape
    if B < 2 or N < 2:
        raise InvalidArgumentError(f"merge agreement compares the partitions of at least 2 images of at least 2 "
                                   f"patches; got {B} images of {N} patches")
    ids = torch.unique(ids.long().cpu(), return_inverse=True)[1]  # labels 0..K-1
    K = int(ids.max()) + 1

    def pair_count(n: torch.Tensor) -> torch.Tensor:  # C(n, 2)
        return n * (n - 1) / 2

    image = torch.arange(B).unsqueeze(1)
    own = pair_count(torch.bincount((ids + image * K).flatten(), minlength=B * K).view(B, K).double()).sum(1)
    total = pair_count(torch.tensor(float(N), dtype=torch.float64))
    scores = []
    for i in range(B - 1):  # a measurement, not a hot path: image i against every later image at once
        later = B - 1 - i
        cells = ids[i] * K + ids[i + 1:] + image[:later] * (K * K)  # the contingency cell of every patch
        cell, count = torch.unique(cells.flatten(), return_counts=True)
        index = torch.zeros(later, dtype=torch.float64).index_add_(0, cell // (K * K), pair_count(count.double()))
        a, b = own[i], own[i + 1:]
        expected, top = a * b / total, (a + b) / 2
        same = top == expected  # both partitions trivial alike (e.g. all singletons): identical, 1
        scores.append(torch.where(same, 1.0, (index - expected) / torch.where(same, 1.0, top - expected)))
    return float(torch.cat(scores).mean())
