"""tokenthrift: make Vision Transformers cheaper by spending fewer tokens (timm-native).

Methods: :mod:`tokenthrift.toe` (Token Expansion, faster training), :mod:`tokenthrift.revit` (Resizable
ViT + Token-Length Assigner, adaptive inference), :mod:`tokenthrift.ltm` (Learnable Token Merging; importing
tokenthrift registers the ``ltm_*`` timm models). Measurement: :mod:`tokenthrift.measure`. Pretrained
models shipped in the package (``vit_fmnist_tiny_patch2_28``): :mod:`tokenthrift.pretrained`. Video: the
TimeSformer (``timesformer_*`` timm models) in :mod:`tokenthrift.video`. Training
engine: :mod:`tokenthrift.train`; entry points: :mod:`tokenthrift.apps`.
"""
from . import ltm, measure, pretrained, revit, toe, tokens, video

__version__ = "0.1.0"
__all__ = ["measure", "tokens", "toe", "revit", "ltm", "pretrained", "video", "__version__"]
