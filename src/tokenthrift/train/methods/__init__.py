"""The training-engine adapters, one per method: the only code that knows both the engine
(:mod:`tokenthrift.train.protocol`) and a method library (:mod:`tokenthrift.toe`, :mod:`tokenthrift.revit`,
:mod:`tokenthrift.ltm`). A new method is one library module plus one adapter here and a row in
:data:`METHODS`.
"""
from __future__ import annotations

from ...errors import InvalidArgumentError
from ..config import TrainConfig
from ..protocol import Method
from .ltm import LTMMethod
from .revit import ReViTMethod
from .tla import RelabeledDataset, TLAMethod
from .toe import TokenExpansion

__all__ = ["METHODS", "LTMMethod", "Method", "ReViTMethod", "RelabeledDataset", "TLAMethod", "TokenExpansion",
           "build_method", "inference_method", "method_class"]

# --method name -> adapter (full-token training is the protocol's own default behaviour)
METHODS: dict[str, type[Method]] = {
    "full": Method,
    "toe": TokenExpansion,
    "revit": ReViTMethod,
    "tla": TLAMethod,
    "ltm": LTMMethod,
}


def inference_method(cfg: TrainConfig, model, method: Method) -> Method:
    """The adapter that owns a trained model's inference side (its evaluation rows): the run's ``method``,
    except that a full-token run of a registered ``ltm_*`` model is LTM's (it merges at inference)."""
    from ...ltm import is_ltm

    return LTMMethod(cfg) if type(method) is Method and is_ltm(model) else method


def method_class(name: str) -> type[Method]:
    """The adapter registered as ``name``."""
    if name not in METHODS:
        raise InvalidArgumentError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def build_method(cfg: TrainConfig) -> Method:
    return method_class(cfg.method)(cfg)
