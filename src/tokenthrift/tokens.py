"""Pure tensor helpers shared by every method.

Shapes follow the project notation: B batch, P prefix tokens (CLS, distillation, registers),
N patch tokens, M kept or merged tokens, D width. Nothing here holds state or parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InvalidArgumentError

DISTANCES = ("cosine", "euclidean", "manhattan")


def split_prefix(x: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P+N, D) -> prefix (B, P, D), patches (B, N, D)."""
    return x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]


def join_prefix(prefix: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_prefix`: prefix tokens go back in front."""
    return torch.cat([prefix, patches], dim=1) if prefix.shape[1] else patches


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), index (B, M) -> (B, M, D) with out[b, m] = x[b, index[b, m]]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def affinity(a: torch.Tensor, b: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Pairwise closeness between token sets, larger = closer, computed in fp32.

    a (B, N, D), b (B, M, D) -> (B, N, M). ``cosine`` gives the cosine similarity; the true
    distances (``euclidean``, ``manhattan``) are returned negated so that argmax picks the nearest
    and argmin the farthest for every choice of ``distance``.
    """
    a, b = a.float(), b.float()
    if distance == "cosine":
        return F.normalize(a, dim=-1, eps=1e-6) @ F.normalize(b, dim=-1, eps=1e-6).transpose(1, 2)
    if distance == "euclidean":
        return -torch.cdist(a, b, p=2.0)
    if distance == "manhattan":
        return -torch.cdist(a, b, p=1.0)
    raise InvalidArgumentError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")


def scatter_mean(x: torch.Tensor, assign: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Plain mean of tokens per group, differentiable with respect to ``x``.

    x (B, N, D), assign (B, N) integer group ids in [0, num_groups) -> (B, num_groups, D).
    Groups that receive no token come out as zeros. Sums run in fp32 (bf16 sums lose digits).
    """
    B, N, D = x.shape
    xf = x.float()
    sums = xf.new_zeros(B, num_groups, D).scatter_add(1, assign.unsqueeze(-1).expand(-1, -1, D), xf)
    counts = xf.new_zeros(B, num_groups).scatter_add(1, assign, xf.new_ones(B, N))
    return (sums / counts.clamp(min=1).unsqueeze(-1)).to(x.dtype)


def index_positions(index: torch.Tensor, n: int) -> torch.Tensor:
    """index (B, M) of distinct positions in [0, n) -> (B, n) map: slot of each position in
    ``index``, -1 where a position is absent."""
    slots = torch.arange(index.shape[1], device=index.device).expand_as(index)
    return index.new_full((index.shape[0], n), -1).scatter(1, index, slots)
