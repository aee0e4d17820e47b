"""Visual-token reducers: pure tensor functions that take the visual tokens of M images, (M, N, D) on an h x w
grid (row-major), and return K of them, (M, K, D), with the grid position each stands at (M, K) (so that a
language model with 2-D or 3-D positions can keep the original ones) and the patches each holds (M, K).

Every reducer but VisionZip keeps the order of the grid (a kept token comes before every token at a later grid
position), and keep = N is the identity (the same tensor values, in the same order): the exactness a caller can test
against the unreduced model. Everything is batched over the images; DivPrune's greedy selection loops over the K
selection steps, which is the algorithm (each step depends on the previous), never over images or tokens.

    random     K tokens drawn uniformly without replacement, seeded: the baseline every method must beat
    pool       average pooling of the grid to an a x b grid with a·b = K (the plain downsampling baseline)
    divprune   max-min diversity, as the authors' code computes it: first the token whose nearest neighbour is
               farthest (cosine distance), then greedily the token farthest from those already kept (DivPrune)
    attention  the K tokens a score ranks highest, e.g. the tower's CLS attention (FasterVLM style)
    merge      bipartite soft matching (ToMe's) repeated until K tokens remain, merged by size-weighted average;
               a merged token stands at the position of the token it was merged into
    visionzip  (:func:`visionzip_keep`, on the tower's hidden states with its class token) VisionZip's dominant
               tokens (the class token and the patches it attends to most) and contextual tokens (the rest merged
               around evenly strided targets by key similarity), as the authors' code builds them
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..tokens import gather_tokens

__all__ = ["REDUCERS", "attention_keep", "divprune_keep", "merge_keep", "pool_grid", "pool_keep", "random_keep",
           "reduce_tokens", "visionzip_keep", "visionzip_split"]

REDUCERS = ("random", "pool", "divprune", "attention", "merge")


def _kept(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    index = index.sort(dim=1).values  # grid order
    return gather_tokens(x, index), index, torch.ones_like(index)


def random_keep(x: torch.Tensor, keep: int, seed: int = 0):
    """K of the N tokens of every image, uniformly at random without replacement, in grid order. The draw depends on
    ``seed`` and N only (every image of N tokens keeps the same positions), so an image keeps the same tokens in
    any batch, at any place in it."""
    noise = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(seed)).to(x.device)
    return _kept(x, noise.topk(keep).indices.expand(x.shape[0], keep))


def attention_keep(x: torch.Tensor, keep: int, scores: torch.Tensor):
    """The K tokens with the highest ``scores`` (M, N) (e.g. the class token's attention), in grid order."""
    return _kept(x, scores.topk(keep, dim=1).indices)


def divprune_keep(x: torch.Tensor, keep: int):
    """Max-min diversity (DivPrune, Alvar et al., CVPR 2025) as the authors' code (vbdi/divprune) computes it, batched
    over the images: cosine distances of the tokens in their own precision; the first kept token is the one whose
    nearest other token is farthest (the largest second-smallest distance in its column, the smallest being its own);
    then repeatedly the token whose distance to its nearest kept token is largest (the first index on a tie). Theirs
    could pick a kept token again once only duplicates of kept tokens remain; here a kept token is never a candidate."""
    M, N, _ = x.shape
    unit = x / x.norm(dim=-1, keepdim=True)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # (M, N, N)
    first = distance.topk(2, dim=1, largest=False).values[:, 1].argmax(1)  # (M,)
    chosen = torch.zeros(M, N, dtype=torch.bool, device=x.device)
    rows = torch.arange(M, device=x.device)
    chosen[rows, first] = True
    nearest = distance[rows, first]  # (M, N): each token's distance to its nearest kept token
    for _ in range(keep - 1):  # one greedy step per kept token: each depends on the ones before
        pick = nearest.masked_fill(chosen, float("-inf")).argmax(1)
        chosen[rows, pick] = True
        nearest = torch.minimum(nearest, distance[rows, pick])
    return _kept(x, chosen.nonzero()[:, 1].view(M, keep))


def pool_grid(grid: tuple[int, int], keep: int) -> tuple[int, int]:
    """The a x b grid (a·b = ``keep``, a <= h, b <= w) closest in aspect to the h x w ``grid``."""
    h, w = grid
    pairs = [(a, keep // a) for a in range(1, keep + 1) if keep % a == 0 and a <= h and keep // a <= w]
    if not pairs:
        raise InvalidArgumentError(f"pooling a {h}x{w} grid to {keep} tokens needs a x b = {keep} with a <= {h} and "
                                   f"b <= {w}; choose another keep (e.g. {max(1, round(math.sqrt(keep))) ** 2})")
    return min(pairs, key=lambda ab: abs(math.log(ab[0] / ab[1]) - math.log(h / w)))


def pool_keep(x: torch.Tensor, keep: int, grid: tuple[int, int]):
    """Average pooling of the h x w grid to :func:`pool_grid`'s a x b grid (adaptive bins, as
    ``adaptive_avg_pool2d``); each pooled token stands at the patch nearest its bin's centre and holds its bin."""
    h, w = grid
    a, b = pool_grid(grid, keep)
    M, N, D = x.shape
    image = x.transpose(1, 2).reshape(M, D, h, w)
    pooled = F.adaptive_avg_pool2d(image.float(), (a, b)).to(x.dtype).flatten(2).transpose(1, 2)
    starts_r = [(i * h) // a for i in range(a)]
    ends_r = [-((-(i + 1) * h) // a) for i in range(a)]
    starts_c = [(j * w) // b for j in range(b)]
    ends_c = [-((-(j + 1) * w) // b) for j in range(b)]
    centre = torch.tensor([((s + e - 1) // 2) * w + (c + d - 1) // 2 for s, e in zip(starts_r, ends_r)
                           for c, d in zip(starts_c, ends_c)], device=x.device)
    size = torch.tensor([(e - s) * (d - c) for s, e in zip(starts_r, ends_r) for c, d in zip(starts_c, ends_c)],
                        device=x.device)
    return pooled, centre.expand(M, keep), size.expand(M, keep)


def merge_keep(x: torch.Tensor, keep: int):
    """ToMe's bipartite soft matching (:func:`tokenthrift.tome.bipartite_merge`) on the tokens' own features,
    repeated (at most half the tokens per round) until ``keep`` remain; a merged token is the size-weighted average
    of the tokens it holds and stands at the position of the one it was merged into (its B token, ToMe's "kept"
    position). Returned in grid order of those positions."""
    from ..tome import bipartite_merge

    M, N, _ = x.shape
    size = torch.ones(M, N, 1, device=x.device, dtype=x.dtype)
    position = torch.arange(N, device=x.device, dtype=torch.float32).expand(M, N).unsqueeze(-1)  # (M, N, 1)
    while x.shape[1] > keep:
        r = min(x.shape[1] - keep, x.shape[1] // 2)
        x, size, _, position = bipartite_merge(x, x, size, r, 0, coords=position, positions="kept")
    order = position[..., 0].argsort(dim=1)  # A tokens that stayed come out before the B tokens: back to grid order
    x, size, position = (gather_tokens(t, order) for t in (x, size, position))
    return x, position[..., 0].round().long(), size[..., 0].round().long()


def visionzip_split(keep: int) -> tuple[int, int]:
    """(dominant, contextual) tokens of a VisionZip budget of ``keep``: the authors' settings (54, 10) for 64 tokens,
    (108, 20) for 128 and (162, 30) for 192, and the same 10 : 54 share of contextual tokens for any other budget
    (ours), the class token counted among the dominant ones."""
    contextual = round(keep * 10 / 64)
    return keep - contextual, contextual


def visionzip_keep(hidden: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, keep: int,
                   num_prefix_tokens: int = 1):
    """VisionZip (Yang et al., CVPR 2025) as the authors' code (dvlab-research/VisionZip) builds its tokens, batched,
    from one tower layer: ``hidden`` (M, P + N, D) its output (the class token first), ``attention`` (M, P + N) the
    class token's attention in it (over heads), ``keys`` (M, P + N, d) its keys averaged over heads. With
    (dominant, contextual) = :func:`visionzip_split` (``keep``):

    - dominant: the class token and the dominant - 1 patch tokens it attends to most, in grid order;
    - contextual: the remaining R patch tokens, L2-normalised keys; targets every ``max(1, R // contextual)``-th of
      them (the first ``contextual``); every other one joins the target of highest cosine similarity (the first on
      a tie); a contextual token is its target's hidden state plus the mean of the tokens that joined it (their
      code: the target itself is not in that mean).

    Returns (tokens (M, K, D): dominant then contextual, positions (M, K): the patch each stands at (the class token
    -1, a contextual token its target's), sizes (M, K): the tower tokens each holds). The class token and any other
    prefix token but the first are left out of the ranking, as theirs has none."""
    M, T, D = hidden.shape
    P = num_prefix_tokens
    N = T - P
    dominant, contextual = visionzip_split(keep)
    top = attention[:, P:].topk(dominant - 1, dim=1).indices  # (M, dominant - 1) patch indices
    is_dominant = torch.zeros(M, N, dtype=torch.bool, device=hidden.device).scatter_(1, top, True)
    top = is_dominant.nonzero()[:, 1].view(M, dominant - 1)  # grid order
    rest = (~is_dominant).nonzero()[:, 1].view(M, N - dominant + 1)  # (M, R), grid order
    tokens = [hidden[:, :1], gather_tokens(hidden[:, P:], top)]
    positions = [torch.full((M, 1), -1, device=hidden.device), top]
    sizes = [torch.ones(M, dominant, dtype=torch.long, device=hidden.device)]
    if contextual:
        R = rest.shape[1]
        unit = gather_tokens(keys[:, P:], rest)
        unit = unit / unit.norm(dim=-1, keepdim=True)
        targets = torch.arange(0, R, max(1, R // contextual), device=hidden.device)[:contextual]
        is_target = torch.zeros(R, dtype=torch.bool, device=hidden.device).scatter_(0, targets, True)
        others = (~is_target).nonzero()[:, 0]
        similarity = unit[:, others] @ unit[:, targets].transpose(1, 2)  # (M, R - contextual, contextual)
        assign = F.one_hot(similarity.argmax(dim=2), contextual).to(hidden.dtype)  # (M, R - c, c)
        counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)  # (M, c, 1)
        rest_hidden = gather_tokens(hidden[:, P:], rest)
        tokens.append(rest_hidden[:, targets] + assign.transpose(1, 2) @ rest_hidden[:, others] / counts)
        positions.append(rest[:, targets])
        sizes.append(1 + assign.sum(dim=1).long())
    return torch.cat(tokens, 1), torch.cat(positions, 1), torch.cat(sizes, 1)


def reduce_tokens(x: torch.Tensor, keep: int, method: str, grid: tuple[int, int] | None = None,
                  scores: torch.Tensor | None = None, seed: int = 0):
    """``method`` (one of :data:`REDUCERS`) on x (M, N, D): (kept (M, K, D), position (M, K), size (M, K)).
    ``seed``: the random reducer's draw."""
    M, N, _ = x.shape
    if not 1 <= keep <= N:
        raise InvalidArgumentError(f"keep must be between 1 and the {N} visual tokens per image; got {keep}")
    if method not in REDUCERS:
        raise InvalidArgumentError(f"unknown reducer {method!r}; choose one of {', '.join(REDUCERS)}")
    if keep == N and method != "pool":
        return x, torch.arange(N, device=x.device).expand(M, N), torch.ones(M, N, dtype=torch.long, device=x.device)
    if method == "random":
        return random_keep(x, keep, seed)
    if method == "attention":
        if scores is None:
            raise InvalidArgumentError("the attention reducer ranks tokens by a score (the tower's CLS attention); "
                                       "this model gives none")
        return attention_keep(x, keep, scores)
    if method == "divprune":
        return divprune_keep(x, keep)
    if method == "merge":
        return merge_keep(x, keep)
    if grid is None:
        raise InvalidArgumentError("pooling needs the tokens' grid")
    return pool_keep(x, keep, grid)
