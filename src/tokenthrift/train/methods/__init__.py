"""The training-engine adapters, one per method: the only code that knows both the engine
(:mod:`tokenthrift.train.protocol`) and a method library (:mod:`tokenthrift.toe`, :mod:`tokenthrift.revit`,
:mod:`tokenthrift.ltm`). A new method is one library module plus one adapter here and a row in
:data:`METHODS`.
"""
from __future__ import annotations

import dataclasses

from ...errors import InvalidArgumentError
from ..config import TrainConfig
from ..protocol import Method
from .ltm import LTMMethod
from .revit import ReViTMethod
from .tla import RelabeledDataset, TLAMethod
from .toe import TokenExpansion
from .tome import ToMeMethod

__all__ = ["METHODS", "LTMMethod", "Method", "ReViTMethod", "RelabeledDataset", "TLAMethod", "ToMeMethod", "TokenExpansion",
           "build_method", "inference_method", "method_class", "picture_method", "preview_method", "previewable"]

# --method name -> adapter (full-token training is the protocol's own default behaviour)
METHODS: dict[str, type[Method]] = {
    "full": Method,
    "toe": TokenExpansion,
    "revit": ReViTMethod,
    "tla": TLAMethod,
    "ltm": LTMMethod,
    "tome": ToMeMethod,
}


def inference_method(cfg: TrainConfig, model, method: Method) -> Method:
    """The adapter that owns a trained model's inference side (its evaluation rows): the run's ``method``,
    except that a full-token run of a registered ``ltm_*`` model is LTM's (it merges at inference)."""
    from ...ltm import is_ltm

    return LTMMethod(cfg) if type(method) is Method and is_ltm(model) else method


def previewable() -> list[str]:
    """The methods ``macs``, ``bench`` and ``visualize`` can show on an untrained model."""
    return [name for name, cls in METHODS.items() if cls.previewable]


def preview_method(cfg: TrainConfig, requested: str | None = None, default: str = "full",
                   epochs: int | None = None) -> Method:
    """The adapter that shows an untrained model built from ``cfg``: ``requested`` (--method), else the
    config's (recipe's) method where it has a preview, else LTM for a registered ``ltm_*`` model, else
    ``default``. ``epochs``: the training length a schedule is shown over."""
    name = requested or next((n for n in (cfg.method,) if n != "full" and n in previewable()), None)
    name = name or ("ltm" if cfg.model.startswith("ltm_") else default)
    if name not in previewable():
        raise InvalidArgumentError(f"--method {name} is shown on trained checkpoints only; choose one of "
                                   f"{', '.join(previewable())}")
    return method_class(name).preview(dataclasses.replace(cfg, method=name), epochs)


def picture_method(cfg: TrainConfig, method: Method, requested: str | None = None) -> Method:
    """The adapter that draws ``visualize``'s picture of a trained model whose inference side is ``method``:
    ``method`` itself; for a model that runs as the plain model (full tokens, ToE), the ``requested``
    method's picture on it (default ToE's: the tokens it keeps after block 0)."""
    if method.plain_inference:
        name = requested or (method.name if method.name != "full" else "toe")
        return method if name == method.name else method_class(name)(dataclasses.replace(cfg, method=name))
    if requested and requested != method.name:
        raise InvalidArgumentError(f"this is a --method {method.name} run; it is drawn as such (drop --method)")
    return method


def method_class(name: str) -> type[Method]:
    """The adapter registered as ``name``."""
    if name not in METHODS:
        raise InvalidArgumentError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def build_method(cfg: TrainConfig) -> Method:
    return method_class(cfg.method)(cfg)
