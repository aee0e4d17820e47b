"""ReViT + TLA: adaptive token length at inference (docs/methods.md §3).

Zhou & Zhu, "Make A Long Image Short: Adaptive Token Length for Vision Transformers", ECML-PKDD 2023
(arXiv 2307.02092). A Resizable ViT runs one set of weights at several token grids (TAL-LN, TLSD); a
small Token-Length Assigner picks the grid per image; :class:`AdaptiveViT` runs each image at its grid.

Grid index convention: ``k`` indexes ``revit.grids`` (largest first), so 0 = largest grid.

The training-engine adapters live in :mod:`tokenthrift.train.methods` (``revit`` and ``tla``), the
labelling and adaptive-evaluation pipeline in :mod:`tokenthrift.apps.labels`: this library knows nothing
of training.
"""
from .assigner import (
                       DEFAULT_ASSIGNER,
                       MAX_MACS_FRACTION,
                       AdaptiveViT,
                       TokenLengthAssigner,
                       TokenLengthLabels,
                       assign_labels,
                       assigner_macs_fraction,
                       balanced_class_weights,
                       check_assigner_budget,
                       label_histogram,
                       load_labels,
                       save_labels,
                       select_grids,
                       smallest_correct_grid,
)
from .distill import TLSDLoss, distillation_kl, soft_cross_entropy
from .model import (
                       DEFAULT_GRIDS,
                       ResizableViT,
                       TALayerNorm,
                       check_grids,
                       convert,
                       norm_positions,
)

__all__ = [
    "DEFAULT_GRIDS", "TALayerNorm", "ResizableViT", "convert", "check_grids", "norm_positions",
    "TLSDLoss", "distillation_kl", "soft_cross_entropy",
    "DEFAULT_ASSIGNER", "MAX_MACS_FRACTION", "smallest_correct_grid", "assign_labels", "label_histogram",
    "balanced_class_weights", "TokenLengthLabels", "save_labels", "load_labels", "TokenLengthAssigner",
    "assigner_macs_fraction", "check_assigner_budget", "select_grids", "AdaptiveViT",
]
