"""Adaptive inference: a grid per image from the assigner's probabilities (:func:`select_grids`), and
:class:`AdaptiveViT`, which groups a batch by grid, runs each group once and scatters the logits back into
input order.

Zhou & Zhu, "Make A Long Image Short: Adaptive Token Length for Vision Transformers", ECML-PKDD 2023
(arXiv 2307.02092), docs/methods.md §3. Grid index 0 = the largest grid.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import measure
from ..errors import InvalidArgumentError, UnsupportedModelError
from .labels import label_histogram

__all__ = ["select_grids", "AdaptiveViT"]


def select_grids(probs: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
    """Assigner probabilities (B, K) (column 0 = largest grid) -> (B,) grid index per image.

    ``gamma=None``: argmax. Otherwise the smallest grid whose cumulative probability, summed from the
    smallest grid upward, reaches ``gamma`` (0 < gamma <= 1; small gamma favours short token lengths,
    gamma near 1 long ones); where rounding keeps the total below gamma, the largest grid.
    """
    if probs.dim() != 2:
        raise InvalidArgumentError(f"probs must be (B, K); got shape {tuple(probs.shape)}")
    if gamma is None:
        return probs.argmax(dim=1)
    if not 0.0 < gamma <= 1.0:
        raise InvalidArgumentError(f"gamma={gamma} must lie in (0, 1]")
    K = probs.shape[1]
    reached = probs.float().flip(1).cumsum(1) >= gamma  # column j = grid index K-1-j
    first = reached.int().argmax(dim=1)  # argmax returns the first maximal column
    return torch.where(reached.any(dim=1), K - 1 - first, 0)


class AdaptiveViT(nn.Module):
    """Adaptive token length at inference (docs/methods.md §3): the TLA picks a grid per image, the batch is grouped
    by grid, each group runs once, and the logits are scattered back into input order.

    forward(x (B, C, H, W), grid_index=None) -> logits (B, num_classes), row i for image i. Pass
    ``grid_index`` (B,) to bypass the assigner (e.g. oracle labels). ``last_grid_index`` holds the (B,)
    grid indices of the latest call (0 = largest grid).

    Args:
        revit: the :class:`~tokenthrift.revit.ResizableViT`.
        assigner: a :class:`TokenLengthAssigner` with K = len(revit.grids) outputs (None: only for subclasses
            that pick grids otherwise, as :class:`~tokenthrift.revit.cascade.CascadeViT`).
        gamma: None for argmax, or the cumulative-probability threshold of :func:`select_grids`.
    """

    def __init__(self, revit: nn.Module, assigner: nn.Module, gamma: float | None = None):
        super().__init__()
        K = len(revit.grids)
        if assigner is not None and getattr(assigner, "num_classes", K) != K:
            raise InvalidArgumentError(f"the assigner predicts {assigner.num_classes} grids but the ResizableViT has "
                                       f"{K} ({tuple(revit.grids)}); train the assigner on labels for these grids")
        if gamma is not None and not 0.0 < gamma <= 1.0:
            raise InvalidArgumentError(f"gamma={gamma} must lie in (0, 1]")
        self.revit, self.assigner, self.gamma = revit, assigner, gamma
        self.last_grid_index: torch.Tensor | None = None
        self._grid_macs: list[float] | None = None
        self._assigner_macs: float | None = None

    @property
    def grids(self) -> tuple[int, ...]:
        return tuple(self.revit.grids)

    @property
    def num_classes(self) -> int:
        return self.revit.num_classes

    @property
    def last_grids(self) -> torch.Tensor | None:
        """(B,) grid size (tokens per side) each image of the latest call ran at."""
        if self.last_grid_index is None:
            return None
        return torch.tensor(self.grids, device=self.last_grid_index.device)[self.last_grid_index]

    def choose(self, x: torch.Tensor) -> torch.Tensor:
        """Full-size images (B, C, H, W) -> (B,) grid index chosen by the assigner."""
        if self.assigner is None:
            raise InvalidArgumentError("no assigner: pass grid_index, or build the model with an assigner")
        return select_grids(self.assigner(x).float().softmax(-1), self.gamma)

    def forward(self, x: torch.Tensor, grid_index: torch.Tensor | None = None) -> torch.Tensor:
        index = self.choose(x) if grid_index is None else grid_index.to(x.device).long()
        if index.shape != (x.shape[0],):
            raise InvalidArgumentError(f"grid_index must be (B,) = ({x.shape[0]},); got {tuple(index.shape)}")
        out = None
        for k, grid in enumerate(self.grids):  # one forward per grid, never per image
            members = (index == k).nonzero().squeeze(1)
            if members.numel() == 0:
                continue
            logits = self._run(x.index_select(0, members), grid)
            if out is None:
                out = logits.new_empty((x.shape[0], *logits.shape[1:]))
            out.index_copy_(0, members, logits)
        self.last_grid_index = index.detach()
        if out is None:  # empty batch
            out = x.new_empty((0, self.num_classes))
        return out

    def _run(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        logits = self.revit(x, grid=grid)
        if not isinstance(logits, torch.Tensor):
            raise UnsupportedModelError(f"{type(self).__name__} is for inference: the model returned several heads (a "
                                        "distilled DeiT in distilled-training mode); call .eval() first")
        return logits

    # ------------------------------------------------------------------ cost
    def grid_macs(self) -> list[float]:
        """MACs per image of the backbone at each grid (largest first), measured once with
        :func:`tokenthrift.measure.macs` and cached."""
        if self._grid_macs is None:
            self._grid_macs = [measure.macs(self.revit, self.revit.input_size, grid=g) for g in self.grids]
        return list(self._grid_macs)

    def assigner_macs(self) -> float:
        """MACs per image of the assigner (measured once, cached; 0 without one)."""
        if self.assigner is None:
            return 0.0
        if self._assigner_macs is None:
            self._assigner_macs = measure.macs(self.assigner, self.revit.input_size)
        return self._assigner_macs

    def grid_shares(self, grid_index: torch.Tensor | None = None) -> torch.Tensor:
        """(K,) share of images sent to each grid, from ``grid_index`` (default: the last call)."""
        index = self.last_grid_index if grid_index is None else grid_index
        if index is None or index.numel() == 0:
            raise InvalidArgumentError("no grid choices yet: run the model on a batch or pass grid_index")
        counts = label_histogram(index, len(self.grids)).double()
        return counts / counts.sum()

    def expected_macs(self, grid_shares: Sequence[float] | torch.Tensor | None = None,
                      include_assigner: bool = True) -> float:
        """Expected MACs per image = MACs(TLA) + Σ_k p_k · MACs(grid k) (docs/methods.md §3).

        ``grid_shares``: p_k per grid index (or counts: they are normalised); default the shares of the
        last call. ``include_assigner=False`` gives the backbone-only figure.
        """
        shares = self.grid_shares() if grid_shares is None else torch.as_tensor(grid_shares, dtype=torch.float64)
        if shares.shape != (len(self.grids),) or (shares < 0).any() or not shares.sum() > 0:
            raise InvalidArgumentError(f"grid_shares must be {len(self.grids)} non-negative numbers (one per grid, "
                                       f"largest first); got {shares.tolist()}")
        shares = shares / shares.sum()
        backbone = float(sum(p * m for p, m in zip(shares.tolist(), self.grid_macs())))
        return backbone + (self.assigner_macs() if include_assigner else 0.0)
