"""LTM's information-bottleneck (IB) loss and a batched torch k-means.

Wang & Yang, "Efficient Visual Transformer by Learnable Token Merging", TPAMI 2025 (arXiv 2407.15219).
The paper trains LTM models with cross-entropy plus a variational upper bound of an IB objective over
clusters of the pooled features. This module is the project's reconstruction of that term (docs/methods.md §4):

- **Clusters.** k-means with K = min(K_out, num_samples // 10) clusters (K_out = 1000 by default) on the
  L2-normalised pooled features of the training set, refreshed every epoch (or every E epochs) without
  gradients.
- **Soft assignment.** φ(f)_a = softmax_a(-β‖f̂ - c_a‖²), β = 10 by default.
- **Class-conditional cluster distribution.** Q[a, y] = mean of φ(f)_a over the training samples of
  class y, with the same centroids, fixed during the epoch.
- **Loss.** IB = mean_i -Σ_a φ(f_i)_a · log(Q[a, y_i] + ε). With soft targets (mixup/cutmix),
  log Q[a, y_i] becomes Σ_c y_ic · log(Q[a, c] + ε). The bound's other term, the entropy of the
  input-cluster assignment, has no gradient and is not trained.

Under ``torch.distributed`` the features of every rank are gathered before fitting, the centroids and
Q are computed on rank 0 and broadcast, so all ranks use the same ones. Without it everything runs in
the one process. k-means is deterministic given its seed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError, StateError

__all__ = ["IBLoss", "kmeans", "nearest_centroid", "soft_assign"]

_CHUNK = 65536  # rows per distance block: bounds memory at chunk x K floats


def _sq_dist(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances x (n, D) to c (K, D) by one matmul: (n, K)."""
    return (x.pow(2).sum(-1, keepdim=True) - 2.0 * x @ c.T + c_sq).clamp_min(0.0)


@torch.no_grad()
def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor,
                     chunk: int = _CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Index (N,) of the nearest centroid of every row of x (N, D) and the squared distance (N,)."""
    c_sq = centroids.pow(2).sum(-1)
    index, dist_ = [], []
    for block in x.split(chunk):  # memory bound, not a loop over samples
        d = _sq_dist(block, centroids, c_sq)
        v, i = d.min(-1)
        index.append(i)
        dist_.append(v)
    return torch.cat(index), torch.cat(dist_)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0, tol: float = 1e-6,
           chunk: int = _CHUNK) -> torch.Tensor:
    """Lloyd's k-means on x (N, D) -> centroids (k, D), in fp32, deterministic given ``seed``.

    Initial centroids are k distinct rows drawn by a seeded permutation; every iteration assigns each
    row to its nearest centroid (matmul distances, in chunks of rows) and moves each centroid to the mean
    of its rows. A cluster left empty is re-seeded with the row farthest from its centroid (then the next
    farthest, ...), so exactly k clusters come out. Stops early once no centroid moves more than ``tol``.
    """
    x = x.float()
    N = x.shape[0]
    if not 1 <= k <= N:
        raise InvalidArgumentError(f"k-means needs 1 <= k <= number of samples; got k={k} for {N} samples")
    generator = torch.Generator().manual_seed(seed)
    start = torch.randperm(N, generator=generator)[:k].to(x.device)
    centroids = x[start].clone()
    for _ in range(iters):
        assign, dist_ = nearest_centroid(x, centroids, chunk)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        new = sums / counts.clamp_min(1).unsqueeze(-1).to(x.dtype)
        empty = counts == 0
        if empty.any():
            far = dist_.topk(int(empty.sum())).indices  # the worst-served rows seed the empty clusters
            new[empty] = x[far]
        shift = (new - centroids).norm(dim=-1).max()
        centroids = new
        if shift <= tol:
            break
    return centroids


def soft_assign(features: torch.Tensor, centroids: torch.Tensor, beta: float) -> torch.Tensor:
    """φ(f) = softmax_a(-β‖f̂ - c_a‖²): features (B, D) (normalised here), centroids (K, D) -> (B, K)."""
    f = F.normalize(features.float(), dim=-1, eps=1e-6)
    return (-beta * _sq_dist(f, centroids, centroids.pow(2).sum(-1))).softmax(dim=-1)


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(default: torch.device) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if default.type != "cpu" else default


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate the (n_r, ...) tensors of every rank (n_r may differ) on every rank, in rank order."""
    device = _comm_device(t.device)
    local = t.to(device)
    n = torch.tensor([local.shape[0]], device=device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    padded = local.new_zeros(max(counts), *local.shape[1:])
    padded[: local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    device = _comm_device(t.device)
    buf = t.to(device).contiguous()
    dist.broadcast(buf, src=0)
    return buf.to(t.device)


class IBLoss(nn.Module):
    """The IB term of LTM training (docs/methods.md §4). Call :meth:`fit` once per refresh, then use it as a loss.

    Args:
        num_classes: C, the number of classes (columns of Q).
        num_clusters: K_out; the fit uses K = min(K_out, num_samples // 10) (at least 1).
        beta: sharpness of the soft assignment φ.
        eps: added inside the log of Q.
        iters, seed: k-means iterations and seed.

    ``loss = ib(features, targets)`` with pooled features (B, D) and integer targets (B,) or soft
    targets (B, C). Before the first :meth:`fit` the loss raises (there are no clusters yet).
    """

    def __init__(self, num_classes: int, num_clusters: int = 1000, beta: float = 10.0, eps: float = 1e-6,
                 iters: int = 25, seed: int = 0):
        super().__init__()
        if num_classes < 1 or num_clusters < 1:
            raise InvalidArgumentError(f"IBLoss needs positive num_classes and num_clusters; got {num_classes}, "
                                       f"{num_clusters}")
        if beta <= 0 or eps <= 0:
            raise InvalidArgumentError(f"IBLoss needs beta > 0 and eps > 0; got beta={beta}, eps={eps}")
        self.num_classes, self.num_clusters = int(num_classes), int(num_clusters)
        self.beta, self.eps, self.iters, self.seed = float(beta), float(eps), int(iters), int(seed)
        self.centroids: torch.Tensor | None = None  # (K, D)
        self.q: torch.Tensor | None = None  # (K, C), columns sum to 1

    @property
    def fitted(self) -> bool:
        return self.centroids is not None

    def _targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Integer (N,) or soft (N, C) targets -> class weights (N, C) in fp32."""
        if targets.dim() == 1:
            if targets.numel() and (targets.min() < 0 or targets.max() >= self.num_classes):
                raise InvalidArgumentError(f"IBLoss targets must lie in [0, {self.num_classes}); got "
                                           f"[{int(targets.min())}, {int(targets.max())}]")
            return F.one_hot(targets.long(), self.num_classes).float()
        if targets.shape[-1] != self.num_classes:
            raise InvalidArgumentError(f"soft targets have {targets.shape[-1]} classes, IBLoss has {self.num_classes}")
        return targets.float()

    @torch.no_grad()
    def fit(self, features: torch.Tensor, targets: torch.Tensor, seed: int | None = None) -> None:
        """Refresh the clusters and Q from pooled training features (N, D) and their targets.

        ``targets``: integer (N,) or soft (N, C). Under DDP every rank passes its own share; they are
        gathered, rank 0 fits, and the result is broadcast.
        """
        if features.shape[0] != targets.shape[0]:
            raise InvalidArgumentError(f"{features.shape[0]} features but {targets.shape[0]} targets")
        if _dist_on():
            features, targets = _all_gather_rows(features), _all_gather_rows(targets)
        n = features.shape[0]
        if n == 0:
            raise InvalidArgumentError("IBLoss.fit got no features: collect pooled features of the training set first")
        f = F.normalize(features.float(), dim=-1, eps=1e-6)
        k = max(1, min(self.num_clusters, n // 10))
        centroids = kmeans(f, k, self.iters, self.seed if seed is None else seed)
        # Q[a, c] = mean φ_a over the samples of class c (soft targets weight the samples)
        y = self._targets(targets.to(f.device))
        num = torch.zeros(k, self.num_classes, device=f.device)
        for fb, yb in zip(f.split(_CHUNK), y.split(_CHUNK)):  # chunks bound the (n, K) memory
            num += soft_assign(fb, centroids, self.beta).T @ yb
        mass = y.sum(0)
        q = torch.where(mass > 0, num / mass.clamp_min(1e-12), torch.full_like(num, 1.0 / k))  # unseen class: uniform
        if _dist_on():
            centroids, q = _broadcast(centroids), _broadcast(q)
        self.centroids, self.q = centroids, q

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """IB = mean_i -Σ_a φ(f_i)_a · log(Q[a, y_i] + ε) for features (B, D) and targets (B,) or (B, C)."""
        if not self.fitted:
            raise StateError("IBLoss has no clusters yet: call fit(features, targets) first")
        centroids, q = self.centroids.to(features.device), self.q.to(features.device)
        phi = soft_assign(features, centroids, self.beta)  # (B, K)
        log_q = (q + self.eps).log()  # (K, C)
        if targets.dim() == 1:
            per_cluster = log_q[:, targets.long()].T  # (B, K)
        else:
            per_cluster = self._targets(targets) @ log_q.T
        return -(phi * per_cluster).sum(-1).mean()

    def state_dict(self, *args, **kwargs) -> dict:  # clusters have a data-dependent shape: plain tensors
        return {"centroids": self.centroids, "q": self.q}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.centroids, self.q = state["centroids"], state["q"]
