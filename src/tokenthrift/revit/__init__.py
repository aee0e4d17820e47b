"""ReViT + TLA: adaptive token length at inference (docs/methods.md §3).

Zhou & Zhu, "Make A Long Image Short: Adaptive Token Length for Vision Transformers", ECML-PKDD 2023
(arXiv 2307.02092). A Resizable ViT runs one set of weights at several token grids (TAL-LN, TLSD); a
small Token-Length Assigner picks the grid per image; :class:`AdaptiveViT` runs each image at its grid.
Modules: :mod:`.model` (ResizableViT, TAL-LN), :mod:`.distill` (TLSD), :mod:`.labels` (token-length labels and
their file), :mod:`.assigner` (the TLA and its MACs budget), :mod:`.adaptive` (grid selection, AdaptiveViT), :mod:`.cascade` (the confidence cascade over the grids,
its calibration to a MACs budget, CascadeViT).

Grid index convention: ``k`` indexes ``revit.grids`` (largest first), so 0 = largest grid.

The training-engine adapters live in :mod:`tokenthrift.train.methods` (``revit`` and ``tla``), the
labelling and adaptive-evaluation pipeline in :mod:`tokenthrift.apps.labels`: this library knows nothing
of training.
"""
from .adaptive import AdaptiveViT, select_grids
from .assigner import (
                       DEFAULT_ASSIGNER,
                       MAX_MACS_FRACTION,
                       TokenLengthAssigner,
                       assigner_macs_fraction,
                       check_assigner_budget,
)
from .cascade import (
                       CONFIDENCES,
                       Calibration,
                       CascadeViT,
                       GridOutcomes,
                       calibrate_cascade,
                       calibrate_thresholds,
                       cascade_exits,
                       confidence,
                       default_budgets,
                       executed_macs,
                       grid_outcomes,
)
from .distill import TLSDLoss, distillation_kl, soft_cross_entropy
from .labels import (
                       UNSOLVED,
                       TokenLengthLabels,
                       assign_labels,
                       balanced_class_weights,
                       label_histogram,
                       load_labels,
                       save_labels,
                       smallest_correct_grid,
)
from .transformers_io import from_pretrained, save_pretrained
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
    "DEFAULT_ASSIGNER", "MAX_MACS_FRACTION", "UNSOLVED", "smallest_correct_grid", "assign_labels", "label_histogram",
    "balanced_class_weights", "TokenLengthLabels", "save_labels", "load_labels", "TokenLengthAssigner",
    "assigner_macs_fraction", "check_assigner_budget", "select_grids", "AdaptiveViT",
    "CONFIDENCES", "Calibration", "CascadeViT", "GridOutcomes", "calibrate_cascade", "calibrate_thresholds", "cascade_exits",
    "confidence", "default_budgets", "executed_macs", "grid_outcomes", "from_pretrained", "save_pretrained",
]
