"""Video models: a divided space-time TimeSformer that takes its grid and frame count from the input
(:mod:`.model`), registered with timm (:mod:`.registry`), and checkpoint conversion from the official code
and from transformers (:mod:`.checkpoint`). docs/methods.md §6. ReViT + TLA run on it through
:func:`tokenthrift.revit.convert`.
"""
from . import registry  # registers the timesformer_* names with timm
from .checkpoint import convert_checkpoint
from .model import DividedBlock, TimeSformer

__all__ = ["DividedBlock", "TimeSformer", "convert_checkpoint", "registry"]
