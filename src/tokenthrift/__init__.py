"""tokenthrift: make Vision Transformers cheaper by spending fewer tokens (timm-native).

Methods: :mod:`tokenthrift.toe` (Token Expansion, faster training), :mod:`tokenthrift.revit` (Resizable
ViT + Token-Length Assigner, adaptive inference), :mod:`tokenthrift.ltm` (Learnable Token Merging; importing
tokenthrift registers the ``ltm_*`` timm models), and the training-free baseline :mod:`tokenthrift.tome`.
Measurement: :mod:`tokenthrift.measure`. Models: the pretrained Fashion-MNIST ViT shipped in the package
(:mod:`tokenthrift.pretrained`), the TimeSformer (:mod:`tokenthrift.video`), detectors around timm backbones
(:mod:`tokenthrift.detection`). Datasets and transforms: :mod:`tokenthrift.data`. Training engine: :mod:`tokenthrift.train`; entry points: :mod:`tokenthrift.apps`.
"""
import importlib
import importlib.util

from . import ltm, measure, pretrained, revit, toe, tokens, tome, video
from ._version import __version__

_LAZY = ("data", "detection")  # imported on first use: ``import tokenthrift`` stays light (no torchvision datasets)


def __getattr__(name: str):
    """``tt.data``, ``tt.detection`` and any other submodule (a method library added later, ``tt.<method>``),
    imported on first use."""
    if name in _LAZY or (not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["data", "detection", "measure", "tokens", "toe", "revit", "ltm", "tome", "pretrained", "video",
           "__version__"]
