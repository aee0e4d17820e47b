"""Token-length self-distillation (TLSD) for training a Resizable ViT.

Zhou & Zhu, "Make A Long Image Short: Adaptive Token Length for Vision Transformers", ECML-PKDD 2023
(arXiv 2307.02092). docs/methods.md §3: the same batch runs at every grid; the largest grid K learns from the
targets, every smaller grid k from the targets and from the (stop-gradient) largest-grid logits:

    L_K = CE(y, z_K)
    L_k = (1 - α)·CE(y, z_k) + α·τ²·KL(softmax(sg(z_K)/τ) ‖ softmax(z_k/τ))

Logits lists are ordered like ``ResizableViT.grids``: largest grid first (index 0).

Public API: :class:`TLSDLoss`, :func:`distillation_kl`, :func:`soft_cross_entropy`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError

__all__ = ["TLSDLoss", "distillation_kl", "soft_cross_entropy"]

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy for hard labels (B,) or soft targets (B, C) (mixup/cutmix), in fp32.

    logits (B, C) -> scalar.
    """
    logits = logits.float()
    if target.dtype.is_floating_point and target.shape == logits.shape:
        return -(target.float() * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return F.cross_entropy(logits, target)


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """τ²·KL(softmax(sg(teacher)/τ) ‖ softmax(student/τ)), averaged over the batch, in fp32.

    student, teacher (B, C) logits -> scalar. The teacher is detached here (stop-gradient), so only the
    student receives gradient.
    """
    log_p_teacher = F.log_softmax(teacher.detach().float() / tau, dim=-1)
    log_p_student = F.log_softmax(student.float() / tau, dim=-1)
    # kl_div(input=log q, target=log p, log_target=True) = Σ p (log p - log q): KL(p ‖ q), p = teacher
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * tau ** 2


class TLSDLoss(nn.Module):
    """TLSD (docs/methods.md §3): ``loss(logits, target)`` is the summed training loss; :meth:`per_grid` the
    loss of every grid.

    Args:
        alpha: weight α of the distillation term for the smaller grids (0 = plain CE everywhere).
        tau: temperature τ of the distillation softmax (the KL term is scaled by τ²).
        distill: False turns TLSD off (the ablation): every grid gets CE(y, z_k) only.
        criterion: the CE part, ``criterion(logits, target) -> scalar``; pass the training engine's
            criterion to reuse its label smoothing or soft-target CE. Default :func:`soft_cross_entropy`
            (hard or soft targets, no smoothing). :meth:`forward` can override it per call.
    """

    def __init__(self, alpha: float = 0.5, tau: float = 1.0, distill: bool = True,
                 criterion: Criterion | None = None):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise InvalidArgumentError(f"TLSD alpha={alpha} must lie in [0, 1]: it weighs distillation against CE")
        if not tau > 0:
            raise InvalidArgumentError(f"TLSD temperature tau={tau} must be positive")
        self.alpha, self.tau, self.distill = float(alpha), float(tau), bool(distill)
        self.criterion = criterion

    def grid_loss(self, logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor | None = None,
                  criterion: Criterion | None = None) -> torch.Tensor:
        """Loss of one grid: CE only when ``teacher`` is None (the largest grid) or TLSD is off; otherwise
        (1-α)·CE + α·τ²·KL against the detached ``teacher`` logits (B, C). Lets a caller back-propagate
        grid by grid."""
        ce = (criterion or self.criterion or soft_cross_entropy)(logits, target)
        if teacher is None or not self.distill:
            return ce
        return (1.0 - self.alpha) * ce + self.alpha * distillation_kl(logits, teacher, self.tau)

    def per_grid(self, logits: Sequence[torch.Tensor], target: torch.Tensor,
                 criterion: Criterion | None = None) -> list[torch.Tensor]:
        """logits: one (B, C) tensor per grid, largest grid first; target: (B,) labels or (B, C) soft
        targets. Returns the K scalar losses in the same order (their sum is :meth:`forward`)."""
        if len(logits) == 0:
            raise InvalidArgumentError("TLSDLoss needs the logits of at least one grid")
        teacher = logits[0].detach()
        return [self.grid_loss(z, target, None if k == 0 else teacher, criterion) for k, z in enumerate(logits)]

    def forward(self, logits: Sequence[torch.Tensor], target: torch.Tensor,
                criterion: Criterion | None = None) -> torch.Tensor:
        """The training loss: the sum over the grids of :meth:`per_grid` (one scalar, ready for ``backward``)."""
        return torch.stack(self.per_grid(logits, target, criterion)).sum()
