"""LTM mask module: learnable, locality-constrained token merging as pure tensor functions.

Wang & Yang, "Efficient Visual Transformer by Learnable Token Merging", TPAMI 2025 (arXiv 2407.15219).
The paper released no model code; everything below is this project's reconstruction of its mask module
from the paper's figure and text (docs/methods.md §4). The choices the paper leaves open are marked *decision*.

One call merges N source tokens laid out on an h×w grid into M = h'·w' target tokens on a smaller grid:

1. **Targets.** The h'×w' target grid splits the source grid into cells (row i belongs to cell row
   ``i·h'//h``, columns alike). A source may merge only into the target of its own cell or of the 8
   neighbouring cells (the target's cell dilated by one cell contains it): at most ``K = 9`` allowed
   targets per source, a fixed *stencil*.
2. **Seeds.** T_m = size-weighted average of the sources in cell m (a local pool).
3. **Affinity.** E_nm = -‖ẑ_n - t̂_m‖² on L2-normalised features, for allowed pairs only.
4. **Soft mask.** W_nm = softmax over sources n of E_nm/τ_s (per target).
5. **Hard mask.** Each source picks one allowed target: straight-through Gumbel-softmax over its allowed
   targets in training (``hard=True``, temperature τ_g; *decision*: the logits are E/τ_s, the same scaled
   affinities as W), argmax without noise in evaluation.
6. **Merging matrix.** G = H ⊙ W, each column normalised with the token sizes, so every target is the
   size-weighted average of the sources assigned to it; a target that receives no source falls back to
   its seed. New sizes s' = Hᵀ s. *Decision* for the straight-through gradient: a column's normaliser
   sums its chosen sources, and a non-chosen (source, target) slot is normalised as if that source had
   joined the target, so its gradient factor stays below 1 (the exact derivative of the column
   normalisation at that slot grows like exp of the affinity gap, and overflows in training).

Cost. G is sparse (one non-zero per source in value, at most 9 allowed slots), so seeds, merge, sizes
and unmerge are O(N·D) scatters/gathers and the assignment is O(N·9). The affinities of the allowed
pairs can be computed either as O(N·9·D) (``affinity="sparse"``: gather the 9 candidate seeds of
every source, then contract) or as one O(N·M·D) BLAS product from which the 9 are picked
(``"dense"``). *Decision*, measured on one CPU core at ViT-S sizes (B=64, N=196, M=182, D=384): the
dense product takes 29 ms, the sparse path 160 ms (the 9x gathered copy is memory- and page-fault-
bound), against 700 ms for the block itself; so ``"auto"`` (the default) uses the dense product up to
1024 targets and the sparse path beyond (high resolutions, where N·M grows quadratically). Both are
batched matmuls, so the MACs counter includes them. With the straight-through gradient (training) the
merge runs as one dense (M, N) @ (N, D) product so that every allowed (source, target) slot receives
its gradient. W's normaliser cancels in G (column normalisation), so G's column m is a softmax of
E_nm/τ_s + log s_n over the sources assigned to m.

Shapes: B batch, N sources, M targets, D width, K = 9 stencil slots (row-major offsets, centre = 4).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidArgumentError, UnsupportedModelError
from ..tokens import gather_tokens, segment_sum

__all__ = [
    "AFFINITY_MODES",
    "STENCIL",
    "UNMERGE_MODES",
    "MergeMask",
    "MergeState",
    "TokenMerger",
    "compose",
    "merge",
    "merge_mask",
    "merge_step",
    "mergers",
    "seeds",
    "stencil",
    "target_grid",
    "unmerge",
    "MIN_TOKENS",
]

STENCIL = 9  # 3×3 neighbouring target cells
MIN_TOKENS = 4  # no merge leaves fewer tokens than this (docs/methods.md §8: attention over 1-3 tokens is degenerate)
AFFINITY_MODES = ("auto", "dense", "sparse")
UNMERGE_MODES = ("residual", "broadcast")
_MIN_SIZE = 1e-6  # zero-size tokens (empty targets of an earlier merge) still get a finite log-size


# ---------------------------------------------------------------------------------------------- layout
@functools.lru_cache(maxsize=4096)
def target_grid(grid: tuple[int, int], count: float) -> tuple[int, int]:
    """The target grid (h', w') with h' <= h, w' <= w whose size h'·w' is closest to ``count``, but never
    fewer than :data:`MIN_TOKENS` tokens (docs/methods.md §8: a merge must not leave attention over a handful of
    tokens; a grid that already holds no more than that is kept as it is).

    Ties go to the grid whose shrink factors h'/h and w'/w are closest to each other (keeps the aspect
    ratio), then to the larger h'. ``count >= h·w`` returns ``grid`` itself (no merging).
    """
    h, w = int(grid[0]), int(grid[1])
    if count >= h * w or h * w <= MIN_TOKENS:
        return h, w
    count = max(count, MIN_TOKENS)
    best: tuple | None = None
    for a in range(1, h + 1):  # grid arithmetic on at most h candidates, cached: not a token loop
        floor_b = -(-MIN_TOKENS // a)  # the fewest columns that keep MIN_TOKENS tokens with a rows
        for b in {math.floor(count / a), math.ceil(count / a)}:
            b = min(w, max(1, floor_b, b))
            if a * b < MIN_TOKENS:
                continue
            key = (abs(a * b - count), abs(a / h - b / w), -a)
            if best is None or key < best[0]:
                best = (key, (a, b))
    return best[1]


@functools.lru_cache(maxsize=512)
def _stencil_cpu(h: int, w: int, h2: int, w2: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = torch.arange(h) * h2 // h  # cell row of every source row
    cols = torch.arange(w) * w2 // w
    home_r = rows[:, None].expand(h, w).reshape(-1)
    home_c = cols[None, :].expand(h, w).reshape(-1)
    home = home_r * w2 + home_c
    d = torch.tensor([-1, 0, 1])
    cand_r = (home_r[:, None, None] + d[None, :, None]).expand(-1, 3, 3)
    cand_c = (home_c[:, None, None] + d[None, None, :]).expand(-1, 3, 3)
    valid = ((cand_r >= 0) & (cand_r < h2) & (cand_c >= 0) & (cand_c < w2)).reshape(h * w, STENCIL)
    # invalid slots point at a dummy target M, which every scatter drops
    cand = torch.where(valid, (cand_r * w2 + cand_c).reshape(h * w, STENCIL), h2 * w2)
    return home, cand, valid


_DEVICE_STENCILS: dict = {}


def stencil(grid: tuple[int, int], target: tuple[int, int], device: torch.device | str = "cpu"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed locality prior between an h×w source grid and an h'×w' target grid.

    Returns home (N,) the target whose cell holds each source, cand (N, 9) the allowed targets of each
    source (the 3×3 cells around its home, row-major; slots outside the target grid hold M) and valid
    (N, 9) which slots are real targets. Cached per grid pair and device.
    """
    (h, w), (h2, w2) = grid, target
    if not (1 <= h2 <= h and 1 <= w2 <= w):
        raise InvalidArgumentError(f"target grid {target} must be non-empty and no larger than the source grid {grid}")
    if tracing():
        # constants of a graph, moved where its input is (under torch.fx ``device`` is a Proxy): neither cache may
        # keep them (a traced call would fail its guards next time, non-strict torch.export leaves fake tensors)
        return tuple(t.to(device) for t in _stencil_cpu.__wrapped__(h, w, h2, w2))
    device = torch.device(device)
    key = (h, w, h2, w2, device)
    if key not in _DEVICE_STENCILS:
        if len(_DEVICE_STENCILS) > 4096:
            _DEVICE_STENCILS.clear()
        _DEVICE_STENCILS[key] = tuple(t.to(device) for t in _stencil_cpu(h, w, h2, w2))
    return _DEVICE_STENCILS[key]


# ---------------------------------------------------------------------------------------------- helpers
def _weighted_sum(x: torch.Tensor, weight: torch.Tensor | None, index: torch.Tensor, groups: int) -> torch.Tensor:
    """Σ_n weight_n · x_n per group, in fp32: x (B, N, D), weight (B, N) or None (ones) -> (B, groups, D)."""
    x = x.float()
    return segment_sum(x if weight is None else x * weight.unsqueeze(-1), index, groups)


def _seed_weights(sizes: torch.Tensor | None) -> torch.Tensor | None:
    """Pooling weights of the sources: their sizes, floored so that a cell of zero-size tokens (targets
    left empty by an earlier merge) still has a defined (plain) average. None stands for all ones."""
    return None if sizes is None else sizes.float().clamp_min(_MIN_SIZE)


def seeds(x: torch.Tensor, sizes: torch.Tensor | None, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Target seeds (docs/methods.md §4 step 2): the size-weighted average of x (B, N, D) over every target cell
    -> (B, M, D). ``sizes`` (B, N) or None for all ones."""
    home, _, _ = stencil(grid, target, x.device)
    B, N, _ = x.shape
    M = target[0] * target[1]
    home = home.expand(B, N)
    w = _seed_weights(sizes)
    den = segment_sum(w if w is not None else x.new_ones(B, N, dtype=torch.float32), home, M)
    return (_weighted_sum(x, w, home, M) / den.unsqueeze(-1)).to(x.dtype)


def unmerge(y: torch.Tensor, assign: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Broadcast every merged token back to its sources: y (B, M, D), assign (B, N) -> (B, N, D); ``dim=2``
    for channel-first tokens (B, D, M) -> (B, D, N). :func:`tokenthrift.tokens.gather_tokens`."""
    return gather_tokens(y, assign, dim)


def compose(patch_map: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Carry the source map one merge further: patch_map (B, N0) token of every original patch among
    the N current tokens, assign (B, N) -> (B, N0) token of every original patch among the M targets."""
    return assign.gather(1, patch_map)


def tracing() -> bool:
    """True while torch.compile, torch.export (strict or not) or torch.fx trace the model: no tensor value
    exists then, so code must not branch on one."""
    fx = torch.fx._symbolic_trace
    return (torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None  # non-strict export
            or getattr(fx, "is_fx_symbolic_tracing", fx.is_fx_tracing)())


def _any(mask: torch.Tensor) -> bool:
    """``mask.any()`` where reading it is free (eager on the CPU); True on accelerators, to avoid a host sync,
    and while tracing, where the branch-free path is the only one a graph can hold."""
    return True if tracing() or mask.device.type != "cpu" else bool(mask.any())


# ---------------------------------------------------------------------------------------------- the mask
@dataclass
class MergeMask:
    """One merge. Produced by :func:`merge_mask`, applied with :func:`merge`.

    assign (B, N): target of every source. chosen_weight (B, N): G at that target (differentiable).
    slot_weights (B, N, 9) or None: G in stencil layout, present with the straight-through hard mask
    (training): the non-chosen slots are 0 in value but carry gradient. sizes (B, M): new token sizes Hᵀs. count (B, M):
    sources per target. source_sizes (B, N) or None (ones): the sizes the mask was computed with.
    seed_sum (B, M, D) / seed_den (B, M): the size-weighted sums behind the seeds of the features the
    mask was computed on (the seeds themselves are only needed for empty targets).
    """

    assign: torch.Tensor
    chosen_weight: torch.Tensor
    slot_weights: torch.Tensor | None
    sizes: torch.Tensor
    count: torch.Tensor
    source_sizes: torch.Tensor | None
    seed_sum: torch.Tensor
    seed_den: torch.Tensor
    grid: tuple[int, int]
    target: tuple[int, int]

    @property
    def num_targets(self) -> int:
        return self.target[0] * self.target[1]

    @property
    def empty(self) -> torch.Tensor:
        """(B, M) targets that received no source: they fall back to their seed."""
        return self.count == 0

    @property
    def seeds(self) -> torch.Tensor:
        """(B, M, D) seeds of the features the mask was computed on (fp32)."""
        return self.seed_sum / self.seed_den.unsqueeze(-1)

    def repeat(self, groups: int) -> MergeMask:
        """The same mask for ``groups`` consecutive rows per image: batch B -> B·groups (e.g. the pixel
        groups of a MobileViT patch, which share one mask). Differentiable, like the original."""
        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(groups, dim=0)

        return MergeMask(assign=rep(self.assign), chosen_weight=rep(self.chosen_weight),
                         slot_weights=rep(self.slot_weights),
                         sizes=rep(self.sizes), count=rep(self.count), source_sizes=rep(self.source_sizes),
                         seed_sum=rep(self.seed_sum), seed_den=rep(self.seed_den), grid=self.grid, target=self.target)

    def dense(self) -> torch.Tensor:
        """G as a dense (B, N, M) matrix (tests, visualisation)."""
        B, N = self.assign.shape
        if self.slot_weights is None:
            G = self.chosen_weight.new_zeros(B, N, self.num_targets)
            return G.scatter(2, self.assign.unsqueeze(-1), self.chosen_weight.unsqueeze(-1))
        _, cand, _ = stencil(self.grid, self.target, self.assign.device)
        G = self.slot_weights.new_zeros(B, N, self.num_targets + 1)
        return G.scatter(2, cand.expand(B, N, cand.shape[1]), self.slot_weights)[..., :-1]


def _cosine(z: torch.Tensor, t: torch.Tensor, cand: torch.Tensor, valid: torch.Tensor, mode: str) -> torch.Tensor:
    """Cosine similarity of every source to its allowed targets: z (B, N, D), t (B, M, D) -> (B, N, 9).

    Neither input is normalised in memory: the dot products are divided by the norms afterwards (the
    seeds' direction does not depend on their normaliser, so unnormalised seed sums do). ``dense``
    computes all N·M products in one BLAS call and picks the 9 allowed ones (O(N·M·D)); ``sparse``
    gathers the 9 candidate targets of every source and contracts them (O(N·9·D), but a 9x copy of the
    targets). Both are batched matmuls, so the MACs counter sees them. Invalid slots come out as 0.
    """
    B, N, D = z.shape
    K = cand.shape[1]
    safe = torch.where(valid, cand, torch.zeros_like(cand))  # invalid slots read target 0, masked below
    if mode == "dense":
        dots = torch.bmm(z, t.transpose(1, 2)).gather(2, safe.expand(B, N, K))
    elif mode == "sparse":
        M = t.shape[1]
        flat = (safe.reshape(1, N * K) + torch.arange(B, device=z.device).unsqueeze(1) * M).reshape(-1)
        cands = t.reshape(B * M, D).index_select(0, flat).view(B * N, K, D)
        dots = torch.bmm(cands, z.reshape(B * N, D, 1)).view(B, N, K)
    else:
        raise InvalidArgumentError(f"unknown LTM affinity mode {mode!r}; choose one of {', '.join(AFFINITY_MODES)}")
    zn = z.norm(dim=-1).clamp_min(1e-6)
    tn = t.norm(dim=-1).clamp_min(1e-6)
    tn = tn.gather(1, safe.reshape(1, N * K).expand(B, -1)).view(B, N, K)
    return dots / (zn.unsqueeze(-1) * tn)


def merge_mask(
    z: torch.Tensor,
    sizes: torch.Tensor | None,
    grid: tuple[int, int],
    target: tuple[int, int],
    *,
    tau_s: float | torch.Tensor = 0.1,
    tau_g: float = 1.0,
    stochastic: bool = False,
    gumbel: torch.Tensor | None = None,
    affinity: str = "auto",
) -> MergeMask:
    """The LTM mask module (docs/methods.md §4 steps 1-6) for z (B, N, D) on ``grid`` merged onto ``target``.

    Args:
        z: features the affinities are computed on (the block's post-attention tokens), (B, N, D),
            row-major over ``grid``.
        sizes: (B, N) token sizes (original patches per token), or None for all ones (first merge).
        grid, target: (h, w) source grid and (h', w') target grid, h' <= h, w' <= w.
        tau_s: temperature of the soft mask W (and of the hard-mask logits).
        tau_g: Gumbel-softmax temperature (training only).
        stochastic: straight-through Gumbel-softmax (training) instead of a deterministic argmax.
        gumbel: optional (B, N, 9) Gumbel noise, in :func:`stencil` slot order, used instead of sampling.
        affinity: ``dense``, ``sparse`` or ``auto`` (dense up to 1024 targets: on CPUs the BLAS product
            beats the memory-bound 9-candidate gather by about 5x at ViT sizes).

    Returns:
        The :class:`MergeMask`; apply it with :func:`merge`.
    """
    B, N, _ = z.shape
    if not tracing() and grid[0] * grid[1] != N:
        raise InvalidArgumentError(f"LTM: {N} tokens do not fill the {grid[0]}x{grid[1]} grid they are said to lie on")
    home, cand, valid = stencil(grid, target, z.device)
    M = target[0] * target[1]
    K = cand.shape[1]
    if affinity == "auto":
        affinity = "dense" if M <= 1024 else "sparse"

    w = _seed_weights(sizes)
    home_b = home.expand(B, N)
    seed_sum = _weighted_sum(z, w, home_b, M)
    seed_den = segment_sum(w if w is not None else z.new_ones(B, N, dtype=torch.float32), home_b, M)
    # E = -||ẑ - t̂||² = 2·cos - 2 for unit vectors; invalid slots can never be chosen (masked after the
    # division, so that a learnable τ_s never meets an infinite value)
    energy = 2.0 * _cosine(z.float(), seed_sum, cand, valid, affinity) - 2.0
    logits = (energy / tau_s).masked_fill(~valid, float("-inf"))

    if stochastic:
        if gumbel is None:  # Gumbel(0, 1) = -log(Exp(1)); an exponential draw of exactly 0 would give +inf
            tiny = torch.finfo(torch.float32).tiny  # drawn in fp32 (a dtype known while tracing)
            gumbel = -torch.empty_like(logits, dtype=torch.float32).exponential_().clamp_min_(tiny).log()
        soft = ((logits + gumbel) / tau_g).softmax(dim=-1)
        slot = soft.argmax(dim=-1, keepdim=True)
        hard = torch.zeros_like(soft).scatter_(-1, slot, 1.0) - soft.detach() + soft  # straight-through
    else:
        slot = logits.argmax(dim=-1, keepdim=True)
        hard = None
    assign = cand.expand(B, N, K).gather(-1, slot).squeeze(-1)  # (B, N) in [0, M)

    with torch.no_grad():
        count = segment_sum(z.new_ones(B, N, dtype=torch.float32), assign, M)
        new_sizes = count if sizes is None else segment_sum(sizes.float(), assign, M)

    # column normalisation with sizes: G[n, m] ∝ H[n, m] · s_n · exp(E_nm/τ_s) (W's normaliser cancels)
    score = logits if w is None else logits + w.log().unsqueeze(-1)  # (B, N, K), -inf on invalid slots
    chosen = score.gather(-1, slot).squeeze(-1)
    with torch.no_grad():  # per-target stabiliser: the largest chosen score (0 for empty targets)
        peak = chosen.new_full((B, M), float("-inf")).scatter_reduce_(1, assign, chosen, "amax")
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    if hard is None:  # deterministic: only the chosen slot matters, O(N)
        e = (chosen - peak.gather(1, assign)).exp()
        chosen_weight = e / segment_sum(e, assign, M).gather(1, assign)
        slot_weights = None
    else:  # every allowed slot: non-chosen ones are 0 in value but carry the straight-through gradient
        safe = torch.where(valid, cand, torch.zeros_like(cand)).reshape(1, N * K).expand(B, -1)
        # clamp: a non-chosen slot may out-score the chosen sources of its target by far; its value is 0
        e = (score - peak.gather(1, safe).view(B, N, K)).clamp(max=30.0).exp()  # 0 on invalid slots
        num = hard * e
        chosen = torch.zeros_like(e).scatter_(-1, slot, 1.0)
        # the column sums run over the chosen slots only; a non-chosen slot is normalised as if its source
        # joined that target (den + e): its straight-through factor e / (den + e) stays below 1, where the
        # plain derivative e / den can reach e^30 and once overflowed the backward pass
        den = num.new_zeros(B, M).scatter_add(1, safe, (num * chosen).reshape(B, N * K))
        nonempty = count > 0
        den = torch.where(nonempty, den, torch.ones_like(den))
        # slots pointing at empty targets get no gradient: those targets take their seed instead
        keep = nonempty.gather(1, safe).view(B, N, K) & valid
        norm = den.gather(1, safe).view(B, N, K) + (1.0 - chosen) * e
        slot_weights = torch.where(keep, num / norm, torch.zeros_like(num))
        chosen_weight = slot_weights.gather(-1, slot).squeeze(-1)
    return MergeMask(assign=assign, chosen_weight=chosen_weight, slot_weights=slot_weights, sizes=new_sizes,
                     count=count, source_sizes=sizes, seed_sum=seed_sum, seed_den=seed_den, grid=tuple(grid),
                     target=tuple(target))


def merge(x: torch.Tensor, mask: MergeMask, own_seeds: bool = False) -> torch.Tensor:
    """X' = Gᵀ x with the seed fallback (docs/methods.md §4 step 6): x (B, N, D) -> (B, M, D).

    ``x`` is either the features the mask was computed on (``own_seeds=True`` reuses their seeds) or
    any other features of the same tokens (e.g. every pixel group of a MobileViT patch side by side),
    whose fallback seeds are then pooled from ``x``. Sums run in fp32; the result has x's dtype.
    """
    B, N, _ = x.shape
    M = mask.num_targets
    if mask.slot_weights is not None and torch.is_grad_enabled():
        # straight-through: one dense (M, N) @ (N, D) product per image, so that autograd reaches every
        # allowed slot of G, chosen or not
        _, cand, _ = stencil(mask.grid, mask.target, x.device)
        G = mask.slot_weights.new_zeros(B, N, M + 1).scatter(2, cand.expand(B, N, cand.shape[1]), mask.slot_weights)
        out = torch.bmm(G[..., :M].transpose(1, 2).to(x.dtype), x).float()
    else:  # hard mask fixed: one weighted scatter, O(N·D)
        out = _weighted_sum(x, mask.chosen_weight, mask.assign, M)
    empty = mask.empty
    if _any(empty):
        fallback = mask.seeds if own_seeds else seeds(x, mask.source_sizes, mask.grid, mask.target).float()
        out = torch.where(empty.unsqueeze(-1), fallback, out)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------- module
def check_ratio(ratio: float) -> None:
    """The one check of an LTM keep ratio (:class:`TokenMerger` and :func:`~tokenthrift.ltm.convert` call it)."""
    if not 0.0 < ratio <= 1.0:
        raise InvalidArgumentError(f"LTM ratio {ratio} must lie in (0, 1]: it is the share of tokens a merge keeps")


class TokenMerger(nn.Module):
    """Thin holder of one merge site's knobs; parameter-free unless ``learn_tau``.

    Attributes (plain, read at run time): ``ratio`` the share of tokens kept at this site, ``tau_s``,
    ``tau_g``, ``affinity``, ``unmerge`` (how a block that merges and unmerges within itself, Swin and
    EfficientViT, broadcasts back: ``residual`` adds the unmerged update to every token's own residual,
    ``broadcast`` replaces every token by its merged token plus update) and ``record`` (keep the latest
    :class:`MergeMask` in ``last`` for visualisation). With ``learn_tau=True`` the soft-mask temperature
    becomes one learnable scalar ``log_tau`` (the only parameter LTM may add, docs/methods.md §4).
    """

    def __prepare_scriptable__(self):  # torch.jit.script calls it on every submodule first
        raise UnsupportedModelError("LTM models cannot be compiled with TorchScript (torch.jit is in maintenance; the "
                                    "merge builds its token groups at run time): use torch.compile(model) or "
                                    "torch.export.export(model, (x,))")

    def __init__(self, ratio: float = 1.0, tau_s: float = 0.1, tau_g: float = 1.0, learn_tau: bool = False,
                 affinity: str = "auto", unmerge: str = "residual"):
        super().__init__()
        check_ratio(ratio)
        if tau_s <= 0 or tau_g <= 0:
            raise InvalidArgumentError(f"LTM temperatures must be positive; got tau_s={tau_s}, tau_g={tau_g}")
        if unmerge not in UNMERGE_MODES:
            raise InvalidArgumentError(f"unknown LTM unmerge mode {unmerge!r}; choose one of "
                                       f"{', '.join(UNMERGE_MODES)}")
        if affinity not in AFFINITY_MODES:
            raise InvalidArgumentError(f"unknown LTM affinity mode {affinity!r}; choose one of "
                                       f"{', '.join(AFFINITY_MODES)}")
        self.ratio = float(ratio)
        self.tau_g = float(tau_g)
        self.affinity = affinity
        self.unmerge = unmerge
        self.record = False
        self.last: MergeMask | None = None
        self.map_size: tuple[int, int] | None = None  # (H, W) of the map the last recorded merge ran on (Swin)
        if learn_tau:
            self.log_tau = nn.Parameter(torch.tensor(math.log(tau_s)))
        else:
            self.log_tau = None
            self._tau_s = float(tau_s)

    @property
    def tau_s(self) -> float | torch.Tensor:
        return self.log_tau.exp() if self.log_tau is not None else self._tau_s

    @tau_s.setter
    def tau_s(self, value: float) -> None:
        if self.log_tau is not None:
            with torch.no_grad():
                self.log_tau.fill_(math.log(value))
        else:
            self._tau_s = float(value)

    def forward(self, z: torch.Tensor, sizes: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]
                ) -> MergeMask:
        """z (B, N, D), sizes (B, N) on ``grid`` -> the :class:`MergeMask` onto ``target``."""
        mask = merge_mask(z, sizes, grid, target, tau_s=self.tau_s, tau_g=self.tau_g,
                          stochastic=self.training, affinity=self.affinity)
        if self.record:
            self.last = MergeMask(**{k: (v.detach() if torch.is_tensor(v) else v) for k, v in vars(mask).items()})
        return mask

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, tau_s={float(self.tau_s):.3g}, tau_g={self.tau_g:.3g}, affinity={self.affinity}"


def mergers(model: nn.Module) -> list[TokenMerger]:
    """Every merge site's :class:`TokenMerger` of ``model``, in forward order."""
    return [m for m in model.modules() if isinstance(m, TokenMerger)]


# ---------------------------------------------------------------------------------------------- persistent merging
@dataclass(frozen=True)
class MergeState:
    """What one merge site hands to the next when merges persist (ViT blocks, MobileViT layers).

    grid: (h, w) of the current patch tokens. origin: the original patch grid. nominal: the schedule's
    (fractional) token count so far. sizes: (B, N) original patches per token, None while no merge has
    happened (all ones). patch_map: (B, N0) current token of every original patch, None for the identity.
    num_prefix_tokens: leading tokens (CLS, registers) that never merge.
    """

    grid: tuple[int, int]
    origin: tuple[int, int]
    nominal: float
    sizes: torch.Tensor | None = None
    patch_map: torch.Tensor | None = None
    num_prefix_tokens: int = 0

    @classmethod
    def start(cls, grid: Sequence[int], num_prefix_tokens: int = 0) -> MergeState:
        grid = (int(grid[0]), int(grid[1]))
        return cls(grid=grid, origin=grid, nominal=float(grid[0] * grid[1]), num_prefix_tokens=num_prefix_tokens)

    def unmerge(self, patches: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Current patch tokens (B·groups, N, D) -> one token per original patch (B·groups, N0, D)."""
        if self.patch_map is None:
            return patches
        return unmerge(patches, self.patch_map if groups == 1 else self.patch_map.repeat_interleave(groups, dim=0))


def merge_step(merger: TokenMerger, patches: torch.Tensor, state: MergeState, groups: int = 1
               ) -> tuple[torch.Tensor, MergeState]:
    """One persistent merge of patch tokens (B·groups, N, D) on ``state.grid`` -> (B·groups, M, D) and the
    new state.

    The target grid is the one closest to the nominal count ``state.nominal · merger.ratio`` (so ratios
    close to 1 do not stall on small grids); when that is the current grid nothing is merged (ratio 1.0 is
    exactly the plain model). ``groups > 1``: every image contributes ``groups`` consecutive rows (the
    pixel groups of a MobileViT patch) that share one mask, computed on their mean; their fallback seeds
    are pooled per row.
    """
    nominal = state.nominal * merger.ratio
    target = target_grid(state.grid, nominal)
    if target == state.grid:
        return patches, dataclasses.replace(state, nominal=nominal)
    if groups == 1:
        mask = merger(patches, state.sizes, state.grid, target)
        merged = merge(patches, mask, own_seeds=True)
    else:
        mask = merger(patches.view(-1, groups, *patches.shape[1:]).mean(1), state.sizes, state.grid, target)
        merged = merge(patches, mask.repeat(groups))
    patch_map = mask.assign if state.patch_map is None else compose(state.patch_map, mask.assign)
    return merged, dataclasses.replace(state, grid=target, nominal=nominal, sizes=mask.sizes, patch_map=patch_map)
