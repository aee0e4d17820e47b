"""The training-engine adapters, one per method: the only code that knows both the engine
(:mod:`tokenthrift.train.protocol`) and a method library (:mod:`tokenthrift.toe`, :mod:`tokenthrift.revit`,
:mod:`tokenthrift.ltm`, ...). A new method is one library module plus one adapter module in this package: every
module here is imported and every :class:`~tokenthrift.train.protocol.Method` subclass it defines with its own
``name`` is registered in :data:`METHODS` (and its options in the configuration); methods of other packages
register through the ``tokenthrift.methods`` entry-point group (each entry point names an adapter class).
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from torch import nn

from ...errors import InvalidArgumentError
from ..config import MethodSpec, TrainConfig, register_method
from ..protocol import Method

__all__ = ["METHODS", "Method", "build_method", "inference_method", "method_class", "picture_method",
           "preview_method", "previewable"]


def _discover() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {"full": Method}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Method) and value.__module__ == module.__name__
                    and "name" in vars(value)):
                found[value.name] = value
    for entry in entry_points(group="tokenthrift.methods"):
        adapter = entry.load()
        found[adapter.name] = adapter
    for adapter in sorted(found.values(), key=lambda a: a.order):
        register_method(MethodSpec(adapter.name, adapter.Options, adapter.summary, adapter.label,
                                   adapter.previewable))
    return {a.name: a for a in sorted(found.values(), key=lambda a: a.order)}


# --method name -> adapter (full-token training is the protocol's own default behaviour)
METHODS: dict[str, type[Method]] = _discover()


def inference_method(cfg: TrainConfig, model: nn.Module, method: Method) -> Method:
    """The adapter that owns a trained model's inference side: the run's ``method``, except that a full-token
    run of a model an adapter claims (:meth:`Method.claims`: a registered merging model) is that adapter's."""
    if type(method) is Method:
        for adapter in METHODS.values():
            if adapter is not Method and adapter.claims(model):
                return adapter(cfg.with_method(adapter.name))
    return method


def previewable() -> list[str]:
    """The methods ``macs``, ``bench``, ``export`` and ``visualize`` can show on an untrained model."""
    return [name for name, cls in METHODS.items() if cls.previewable]


def preview_method(cfg: TrainConfig, model: nn.Module | None = None, requested: str | None = None,
                   default: str = "full", epochs: int | None = None) -> Method:
    """The adapter that shows an untrained ``model`` built from ``cfg``: ``requested`` (--method), else the
    config's (recipe's) method where it has a preview, else the adapter that claims the model, else ``default``.
    ``epochs``: the training length a schedule is shown over."""
    name = requested or (cfg.method if cfg.method != "full" and cfg.method in previewable() else None)
    if name is None and model is not None:
        name = next((n for n, a in METHODS.items() if a is not Method and a.claims(model)), None)
    name = name or default
    if name not in previewable():
        raise InvalidArgumentError(f"--method {name} is shown on trained checkpoints only; choose one of "
                                   f"{', '.join(previewable())}")
    return method_class(name).preview(cfg.with_method(name), epochs)


def picture_method(cfg: TrainConfig, method: Method, requested: str | None = None, default: str = "toe") -> Method:
    """The adapter that draws ``visualize``'s picture of a trained model whose inference side is ``method``:
    ``method`` itself; for a model that runs as the plain model (full tokens, ToE), the ``requested``
    method's picture on it (else its own, or for a full-token run ``default``'s)."""
    if method.plain_inference:
        name = requested or (method.name if type(method) is not Method else default)
        return method if name == method.name else method_class(name)(cfg.with_method(name))
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


def __getattr__(name: str):  # the adapters' public names (tokenthrift.train.methods.LTMMethod, ...)
    for adapter in METHODS.values():
        module = importlib.import_module(adapter.__module__)
        if name in getattr(module, "__all__", ()):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
