"""Token Expansion (ToE): train a ViT on fewer tokens, grow them stage by stage.

Huang et al., "A General and Efficient Training for Transformer via Token Expansion", CVPR 2024
(arXiv 2404.00672). Block 0 sees every token; right after it a parameter-free operator keeps a
well-spread subset of the patch tokens and merges the rest into it; the remaining blocks, the final
norm and the head see only P + M tokens. Evaluation always runs with all tokens.

Public API: :func:`token_expansion` (the pure operator), :class:`ToESchedule` (epoch -> stage ->
keep rates), :func:`apply` / :func:`remove` (patch any model a host of :mod:`tokenthrift.hosts` describes,
reversibly: timm ViTs and the Eva family, whose kept tokens keep their rotary positions).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from . import measure
from .errors import InvalidArgumentError, StateError, UnsupportedModelError
from .hosts import Host, host_of
from .tokens import (
    DISTANCES,
    affinity,
    gather_tokens,
    index_positions,
    join_prefix,
    scatter_mean,
    split_prefix,
)

__all__ = ["token_expansion", "expansion_sizes", "expansion_groups", "merge_groups", "block0_output", "ToESchedule",
           "ToEHandle", "apply", "remove", "get_handle"]


def _check_rates(r0: float, keep_rates: Sequence[float], k: int, distance: str) -> None:
    if not 0.0 < r0 <= 1.0:
        raise InvalidArgumentError(f"ToE r0={r0} must lie in (0, 1]: it is the share of patch tokens kept as seeds")
    prev = r0
    for r in keep_rates:
        if not prev <= r <= 1.0:
            raise InvalidArgumentError(
                f"ToE keep rates {tuple(keep_rates)} must be non-decreasing, at least r0={r0} and at most 1.0 (they "
                "are cumulative: e.g. r0=0.25, keep_rates=(0.5, 0.75, 1.0))")
        prev = r
    if int(k) != k or k < 1:
        raise InvalidArgumentError(f"ToE repeat count k={k} must be a positive integer")
    if distance not in DISTANCES:
        raise InvalidArgumentError(f"unknown ToE distance {distance!r}; choose one of {', '.join(DISTANCES)}")


def expansion_sizes(num_patches: int, r0: float, keep_rates: Sequence[float], k: int = 2,
                    last_stage: bool = False) -> tuple[int, list[int]]:
    """Number of seeds and the sizes of every expansion chunk, in order (docs/methods.md §2 steps 2-3).

    Stage j adds ``int(N * (r_j - r_{j-1}))`` tokens (r_0 = r0) in k chunks: k-1 chunks of
    ``count // k`` and a last one with the rest. ``last_stage``: ``keep_rates`` are the whole schedule (its
    last stage reached, at a keep rate below 1); that stage then adds ``int(N * r_s) - int(N * (r0 + sum of
    the earlier steps))``, as the authors' code does (Osilly/TokenExpansion, ``token_expansion``).
    """
    n0 = int(num_patches * r0)
    steps = [cur - prev for prev, cur in zip((r0, *keep_rates), keep_rates)]
    chunks: list[int] = []
    for j, step in enumerate(steps):
        count = int(num_patches * step)
        if last_stage and j == len(steps) - 1:
            count = max(int(num_patches * keep_rates[-1]) - int(num_patches * (r0 + sum(steps[:-1]))), 0)
        chunks += [count // k] * (k - 1) + [count - (count // k) * (k - 1)]
    return n0, chunks


@torch.no_grad()
def _select(patches: torch.Tensor, r0: float, keep_rates: Sequence[float], k: int, distance: str,
            last_stage: bool = False) -> torch.Tensor:
    """Indices (B, M) of the kept patch tokens, ascending. Discrete, so no gradient."""
    B, N, _ = patches.shape
    n0, chunks = expansion_sizes(N, r0, keep_rates, k, last_stage)
    if n0 < 1:
        raise InvalidArgumentError(f"ToE r0={r0} keeps no seed among {N} patch tokens; raise r0 to at least "
                                   f"{1 / N:.4f}")
    if n0 + sum(chunks) > N:
        raise InvalidArgumentError(f"ToE keep rates {tuple(keep_rates)} ask for more than the {N} patch tokens there "
                                   "are")
    feats = patches.detach().float()
    step = int(1 // r0)
    kept = torch.arange(0, N, step, device=patches.device)[:n0].expand(B, n0)
    selected = torch.zeros(B, N, dtype=torch.bool, device=patches.device).scatter_(1, kept, True)
    # closeness of every token to its nearest selected token, updated chunk by chunk (max is associative)
    closest = affinity(feats, gather_tokens(feats, kept), distance).amax(-1)
    for size in chunks:  # a handful of chunks (k per stage): never a loop over tokens or images
        if size == 0:
            continue
        farthest = closest.masked_fill(selected, float("inf")).topk(size, dim=1, largest=False).indices
        selected.scatter_(1, farthest, True)
        kept = torch.cat([kept, farthest], dim=1)
        closest = torch.maximum(closest, affinity(feats, gather_tokens(feats, farthest), distance).amax(-1))
    return kept.sort(dim=1).values


@torch.no_grad()
def merge_groups(patches: torch.Tensor, kept: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """(B, N) slot in ``kept`` of the token each patch merges into: itself if kept, else the nearest kept."""
    slot = index_positions(kept, patches.shape[1])
    nearest = affinity(patches, gather_tokens(patches, kept), distance).argmax(-1)
    return torch.where(slot >= 0, slot, nearest)


def _merge(patches: torch.Tensor, kept: torch.Tensor, distance: str) -> torch.Tensor:
    """Each kept token becomes the plain mean of itself and the unkept tokens nearest to it."""
    if kept.shape[1] == patches.shape[1]:
        return gather_tokens(patches, kept)
    return scatter_mean(patches, merge_groups(patches, kept, distance), kept.shape[1])


def expansion_groups(x: torch.Tensor, keep_rates: Sequence[float], r0: float, k: int = 2,
                     num_prefix_tokens: int = 1, distance: str = "cosine", last_stage: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`token_expansion` would do to ``x``, as indices: kept (B, M) and groups (B, N)."""
    _check_rates(r0, keep_rates, k, distance)
    _, patches = split_prefix(x, num_prefix_tokens)
    kept = _select(patches, r0, keep_rates, k, distance, last_stage)
    return kept, merge_groups(patches, kept, distance)


class _Stop(Exception):
    """Raised by :func:`block0_output`'s hook: nothing after block 0 needs to run."""


@torch.no_grad()
def block0_output(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The output of block 0 of a timm ``VisionTransformer`` on ``images``, (B, P+N, D): exactly what the
    ToE operator sees in training (the model's own forward, stopped after block 0; eval mode)."""
    captured: list[torch.Tensor] = []

    def stop(module: nn.Module, args, output: torch.Tensor) -> None:
        captured.append(output)
        raise _Stop

    host = host_of(model, "ToE")
    hook = host.blocks[0].register_forward_hook(stop)
    try:
        with measure.training_mode(model, False):
            host.forward_features(images)
    except _Stop:
        pass
    finally:
        hook.remove()
    return captured[0]


def token_expansion(
    x: torch.Tensor,
    keep_rates: Sequence[float],
    r0: float,
    k: int = 2,
    num_prefix_tokens: int = 1,
    distance: str = "cosine",
    last_stage: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ToE operator: keep a widely spread set of patch tokens and merge the rest into it.

    Args:
        x: block-0 output, (B, P+N, D).
        keep_rates: cumulative keep rates of the stages reached so far, e.g. ``[0.5]`` in stage 1 of the
            DeiT recipe and ``[0.5, 0.75]`` in stage 2; empty keeps only the ``r0`` seeds.
        r0: initial keep rate; seeds are the patches ``0, step, 2*step, ...`` with ``step = int(1 // r0)``.
        k: chunks per stage ("repeat count"): farthest tokens are added chunk by chunk.
        num_prefix_tokens: P leading tokens (CLS, distillation, registers) kept untouched in front.
        distance: ``cosine`` (default), ``euclidean`` or ``manhattan``.
        last_stage: ``keep_rates`` are the schedule's last stage (below 1): its count is the authors' top-up
            (:func:`expansion_sizes`); the training hook sets it.

    Returns:
        tokens (B, P+M, D): prefix tokens, then the kept tokens in ascending patch order, each the mean
        of itself and the unkept tokens nearest to it (differentiable: every token gets gradient);
        patch_index (B, M): index of each kept token among the N patch tokens.

    Implements docs/methods.md §2 steps 1-5 (spatial initialization, widest feature-distribution expansion,
    feature-distribution merging).
    """
    _check_rates(r0, keep_rates, k, distance)
    if x.dim() != 3:
        raise InvalidArgumentError(f"token_expansion expects tokens of shape (B, P+N, D); got {tuple(x.shape)}")
    return _expand(x, keep_rates, r0, k, num_prefix_tokens, distance, last_stage)


def _expand(x: torch.Tensor, keep_rates: Sequence[float], r0: float, k: int, num_prefix_tokens: int,
            distance: str, last_stage: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_expansion` on arguments already validated (the training hook's, checked once by its
    :class:`ToESchedule`)."""
    prefix, patches = split_prefix(x, num_prefix_tokens)
    kept = _select(patches, r0, keep_rates, k, distance, last_stage)
    return join_prefix(prefix, _merge(patches, kept, distance)), kept


@dataclass
class ToESchedule:
    """Epoch -> stage -> cumulative keep rates. Stage ``s = bisect_right(milestones, epoch)``; in stage s
    the operator uses ``keep_rates[:s]`` (stage 0, before the first milestone, keeps the r0 seeds only).

    ``epoch`` may be fractional (``epoch + step / steps_per_epoch``) for a step-based schedule.
    Defaults are the DeiT-Tiny/Small recipe of the paper (300 epochs).
    """

    r0: float = 0.25
    keep_rates: tuple[float, ...] = (0.5, 0.75, 1.0)
    milestones: tuple[float, ...] = (0, 100, 200)
    k: int = 2
    distance: str = "cosine"
    epoch: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.keep_rates = tuple(float(r) for r in self.keep_rates)
        self.milestones = tuple(self.milestones)
        self.k = int(self.k)
        _check_rates(self.r0, self.keep_rates, self.k, self.distance)
        if len(self.keep_rates) != len(self.milestones):
            raise InvalidArgumentError(
                f"ToE needs one milestone per stage: got keep_rates={self.keep_rates} and milestones={self.milestones}")
        if list(self.milestones) != sorted(self.milestones):
            raise InvalidArgumentError(f"ToE milestones {self.milestones} must be non-decreasing epochs")

    def set_epoch(self, epoch: float) -> None:
        self.epoch = epoch

    def stage(self, epoch: float | None = None) -> int:
        at = self.epoch if epoch is None else epoch
        return sum(1 for m in self.milestones if m <= at)  # bisect_right on the sorted milestones, traceable

    def rates(self, epoch: float | None = None) -> tuple[float, ...]:
        """Cumulative keep rates reached at ``epoch`` (the operator's ``keep_rates`` argument)."""
        return self.keep_rates[: self.stage(epoch)]

    def keep_rate(self, epoch: float | None = None) -> float:
        rates = self.rates(epoch)
        return rates[-1] if rates else self.r0

    def is_full(self, epoch: float | None = None) -> bool:
        """True once the schedule keeps every token: the operator is then skipped entirely."""
        return self.keep_rate(epoch) >= 1.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in ToESchedule(**state).state_dict().items():
            setattr(self, key, value)


class ToEHandle:
    """What :func:`apply` returns: the schedule plus the hook that runs the operator after block 0.

    The operator runs only when the model is in training mode and the schedule is not at full tokens,
    so ``model.eval()`` and EMA copies (always in eval mode) compute exactly the unpatched model.
    ``last_patch_index`` holds the (B, M) kept indices of the latest reduced forward (for dense heads
    and visualisation).
    """

    def __init__(self, model: nn.Module, schedule: ToESchedule, host: Host):
        self.schedule = schedule
        self.host = host
        self.num_prefix_tokens = host.num_prefix_tokens
        self.last_patch_index: torch.Tensor | None = None
        self._reduced = False  # whether the current forward's block 0 reduced the tokens
        self._hooks = [host.blocks[0].register_forward_hook(self._after_block0, with_kwargs=True)]
        if host.rotary:  # every later block rotates the kept tokens by their own positions
            self._hooks += [blk.register_forward_pre_hook(self._kept_positions, with_kwargs=True)
                            for blk in list(host.blocks)[1:]]

    def _after_block0(self, block: nn.Module, args, kwargs, output: torch.Tensor):
        self._reduced = block.training and not self.schedule.is_full()
        if not self._reduced:
            return None
        if kwargs.get("attn_mask") is not None:
            raise UnsupportedModelError("ToE selects tokens on every image's patch grid, and this batch is padded (an "
                                        "attention mask: a NaFlex batch of several grids); train on images (B, C, H, "
                                        "W) of one size")
        s = self.schedule
        rates = s.rates()
        tokens, self.last_patch_index = _expand(output, rates, s.r0, s.k, self.num_prefix_tokens, s.distance,
                                                last_stage=len(rates) == len(s.keep_rates))
        return tokens

    def _kept_positions(self, block: nn.Module, args, kwargs):
        """A rotary host's later blocks get the rows of their rotary table at the kept tokens' positions."""
        if not self._reduced or kwargs.get("rope") is None:
            return None
        return args, {**kwargs, "rope": self.host.rope_rows(kwargs["rope"], self.last_patch_index)}

    def set_epoch(self, epoch: float) -> None:
        self.schedule.set_epoch(epoch)

    @property
    def stage(self) -> int:
        return self.schedule.stage()

    @property
    def keep_rate(self) -> float:
        return self.schedule.keep_rate()

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)

    def _detach(self) -> None:
        for hook in self._hooks:
            hook.remove()


_ATTR = "_tokenthrift_toe"


def get_handle(model: nn.Module) -> ToEHandle | None:
    """The ToE handle attached to ``model``, or None."""
    return getattr(model, _ATTR, None)


def apply(
    model: nn.Module,
    r0: float = 0.25,
    keep_rates: Sequence[float] = (0.5, 0.75, 1.0),
    milestones: Sequence[float] = (0, 100, 200),
    k: int = 2,
    distance: str = "cosine",
) -> ToEHandle:
    """Patch a model for ToE: any model a host of :mod:`tokenthrift.hosts` describes (timm ``VisionTransformer``:
    ViT, DeiT incl. distilled, registers, LayerScale; timm ``Eva``: EVA-02, DINOv3, PE, RoPE ViTs, where every kept
    token keeps its own rotary position).

    Parameters and state_dict keys are unchanged; :func:`remove` undoes the patch. Returns the handle;
    call ``handle.set_epoch(epoch)`` each epoch (the tokenthrift trainer does).
    """
    host = host_of(model, "ToE")
    if len(host.blocks) < 2:
        raise InvalidArgumentError("ToE reduces tokens after block 0, so the model needs at least 2 blocks; this one "
                                   f"has {len(host.blocks)}")
    if get_handle(model) is not None:
        raise StateError("ToE is already applied to this model; call tokenthrift.toe.remove(model) first")
    drop = getattr(getattr(model, "patch_drop", None), "prob", 0.0)
    if drop:
        raise InvalidArgumentError("ToE selects and merges tokens on the full patch grid after block 0, but this model "
                                   f"drops {drop:.0%} of the patches in training (PatchDropout, patch_drop_rate); "
                                   "build it with patch_drop_rate=0 to use ToE")
    schedule = ToESchedule(r0=r0, keep_rates=tuple(keep_rates), milestones=tuple(milestones), k=k, distance=distance)
    handle = ToEHandle(model, schedule, host)
    setattr(model, _ATTR, handle)
    return handle


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model is the plain timm model again. Returns the model."""
    handle = get_handle(model)
    if handle is None:
        raise StateError("ToE is not applied to this model; nothing to remove")
    handle._detach()
    delattr(model, _ATTR)
    return model
