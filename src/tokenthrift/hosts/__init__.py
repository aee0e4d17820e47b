"""Hosts: one small description per encoder family that the token methods run through (:class:`Host`), so a
method is written once and a new family is one host file plus a row in :data:`HOSTS`.

    host = tokenthrift.hosts.host_of(model, "ToMe")     # the host of a model, or a clear error naming the families
"""
from torch import nn

from ..errors import UnsupportedModelError
from .base import POOLS, Embedded, Host, biased_attention, class_attention, grid_coords, original_class, patched_class
from .eva import EvaHost
from .naflex import NaFlexHost, padded_input
from .transformers import TransformersHost
from .vit import ViTHost

__all__ = ["HOSTS", "POOLS", "Embedded", "EvaHost", "Host", "NaFlexHost", "ViTHost", "biased_attention",
           "class_attention", "find_host", "grid_coords", "host_of", "original_class", "padded_input",
           "patched_class", "TransformersHost"]

HOSTS: tuple[type[Host], ...] = (ViTHost, EvaHost, NaFlexHost, TransformersHost)


def find_host(model: nn.Module) -> Host | None:
    """The host that describes ``model``, or None."""
    return next((host(model) for host in HOSTS if host.accepts(model)), None)


def host_of(model: nn.Module, method: str = "this method") -> Host:
    """The host that describes ``model``; an :class:`~tokenthrift.errors.UnsupportedModelError` naming the
    supported families for any other model."""
    host = find_host(model)
    if host is not None:
        return host
    raise UnsupportedModelError(f"{method} supports {', '.join(h.family for h in HOSTS)} models; got "
                                f"{type(model).__name__}")
