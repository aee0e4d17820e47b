"""Pure tensor helpers shared by every method.

Shapes follow the project notation: B batch, P prefix tokens (CLS, distillation, registers),
N patch tokens, M kept or merged tokens, D width. Nothing here holds state or parameters.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import InvalidArgumentError

DISTANCES = ("cosine", "euclidean", "manhattan")


def split_prefix(x: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P+N, D) -> prefix (B, P, D), patches (B, N, D)."""
    return x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]


def join_prefix(prefix: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_prefix`: prefix tokens go back in front."""
    if isinstance(prefix.shape[1], int) and prefix.shape[1] == 0:  # no copy (a tracer's symbolic shape: cat)
        return patches
    return torch.cat([prefix, patches], dim=1)


def flat_index(index: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, N) indices into per-image groups -> (B·N,) indices into the flattened (B·groups) axis."""
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * groups
    return (index + offsets).reshape(-1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """out[b, m] = x[b, index[b, m]]: x (B, N, D), index (B, M) -> (B, M, D). The same op broadcasts merged
    tokens back to their sources (LTM's unmerge: index = the merged token of every source). ``dim=2``
    reads channel-first tokens: x (B, D, N) -> (B, D, M)."""
    if dim == 2:
        return x.gather(2, index.unsqueeze(1).expand(-1, x.shape[1], -1))
    B, N, D = x.shape
    return x.reshape(B * N, D).index_select(0, flat_index(index, N)).view(B, index.shape[1], D)


def segment_sum(values: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum per group: values (B, N, D) or (B, N), index (B, N) in [0, groups) -> (B, groups, D) or
    (B, groups). Differentiable with respect to ``values``; sums in the values' dtype."""
    if torch.onnx.is_in_onnx_export():
        # the legacy exporter writes index_add_ with repeated indices as a ScatterElements without reduction
        # (wrong sums); scatter_add it writes with reduction="add". Eager, index_add_ adds whole rows: 3x faster
        if values.dim() == 2:
            return values.new_zeros(index.shape[0], groups).scatter_add_(1, index, values)
        return values.new_zeros(index.shape[0], groups, values.shape[2]).scatter_add_(
            1, index.unsqueeze(-1).expand(-1, -1, values.shape[2]), values)
    B, N = index.shape
    flat = values.reshape(B * N, -1)
    out = flat.new_zeros(B * groups, flat.shape[1]).index_add_(0, flat_index(index, groups), flat)
    return out.view(values.shape[:1] + (groups,) + values.shape[2:])  # shape arithmetic torch.fx can record


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
    xf = x.float()
    sums = segment_sum(xf, assign, num_groups)
    counts = segment_sum(xf.new_ones(assign.shape), assign, num_groups)
    return (sums / counts.clamp(min=1).unsqueeze(-1)).to(x.dtype)


def index_positions(index: torch.Tensor, n: int) -> torch.Tensor:
    """index (B, M) of distinct positions in [0, n) -> (B, n) map: slot of each position in
    ``index``, -1 where a position is absent."""
    slots = torch.arange(index.shape[1], device=index.device).expand_as(index)
    return index.new_full((index.shape[0], n), -1).scatter(1, index, slots)


def size_biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_size: torch.Tensor, scale: float,
                          dropout_p: float = 0.0, multiple: int = 8) -> torch.Tensor:
    """softmax(scale · q kᵀ + log_size) v through the fused ``scaled_dot_product_attention`` kernels.

    The per-key bias ``log_size`` (B, N) travels as one more channel of q and k instead of as an additive
    float mask, which the flash kernels do not take: q gets a channel of ones, k a channel of
    ``log_size / scale``, so the kernel's scale · q'·k' is the biased logit exactly. q, k and v are
    zero-padded to a head width divisible by ``multiple`` (the kernels' preferred alignment) and the output
    is cut back. q, k, v: (B, H, N, D)."""
    B, H, N, D = q.shape
    width = -(-(D + 1) // multiple) * multiple
    bias = (log_size.to(q.dtype) / scale).view(B, 1, N, 1).expand(B, H, N, 1)
    q = torch.cat([q, q.new_ones(B, H, N, 1), q.new_zeros(B, H, N, width - D - 1)], dim=-1)
    k = torch.cat([k, bias, k.new_zeros(B, H, N, width - D - 1)], dim=-1)
    v = F.pad(v, (0, width - D))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)[..., :D]


def picture_sites(sites: Sequence) -> list:
    """The first, middle and last of ``sites`` (all of them if three or fewer): the merges a picture shows."""
    sites = list(sites)
    return [sites[0], sites[len(sites) // 2], sites[-1]] if len(sites) > 3 else sites
