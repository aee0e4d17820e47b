"""Hosts: one small description per encoder family that the token methods run through (:class:`Host`), so a
method is written once and a new family is one host file plus a row in :data:`HOSTS`, the one table that finds them.

    host = tokenthrift.hosts.host_of(model, "ToMe")     # the host of a model, or a clear error naming the families
"""
from torch import nn

from ..errors import UnsupportedModelError
from .base import (POOLS, Embedded, Host, as_original_class, biased_attention, class_attention, grid_coords,
                   original_class, patched_class)
from .eva import EvaHost
from .naflex import NaFlexHost, padded_input
from .timesformer import TimeSformerHost
from .transformers import (NOT_PLAIN, TransformersClassifier, TransformersHost, load_model, load_saved,
                           method_settings, save_as_plain, vit_from_timm)
from .transformers.clip import TransformersCLIPHost
from .transformers.deit import TransformersDeiTHost
from .transformers.dinov2 import TransformersDinov2Host, TransformersDinov2RegistersHost
from .transformers.siglip import TransformersSiglipHost
from .transformers.vit import TransformersViTHost
from .vit import ViTHost

__all__ = ["HOSTS", "NOT_PLAIN", "POOLS", "Embedded", "EvaHost", "Host", "NaFlexHost", "TimeSformerHost",
           "TransformersCLIPHost", "TransformersClassifier", "TransformersDeiTHost", "TransformersDinov2Host",
           "TransformersDinov2RegistersHost", "TransformersHost", "TransformersSiglipHost", "TransformersViTHost",
           "ViTHost", "as_original_class", "biased_attention", "class_attention", "find_host", "grid_coords",
           "host_of", "load_model", "load_saved", "method_settings", "original_class", "padded_input", "patched_class",
           "save_as_plain", "vit_from_timm"]

# one row per encoder family (a new family: its host file and a row here); the first that accepts a model describes it
HOSTS: tuple[type[Host], ...] = (
    ViTHost,  # timm VisionTransformer            hosts/vit.py
    EvaHost,  # timm Eva                          hosts/eva.py
    NaFlexHost,  # timm NaFlexVit                 hosts/naflex.py
    TransformersViTHost,  # transformers ViT      hosts/transformers/vit.py
    TransformersDeiTHost,  # transformers DeiT    hosts/transformers/deit.py
    TransformersDinov2Host,  # transformers DINOv2                         hosts/transformers/dinov2.py
    TransformersDinov2RegistersHost,  # transformers DINOv2 with registers  hosts/transformers/dinov2.py
    TransformersCLIPHost,  # transformers CLIP vision                      hosts/transformers/clip.py
    TransformersSiglipHost,  # transformers SigLIP vision                  hosts/transformers/siglip.py
    TimeSformerHost,  # tokenthrift's TimeSformer (video)                  hosts/timesformer.py
)


def find_host(model: nn.Module) -> Host | None:
    """The host that describes ``model``, or None."""
    return next((host(model) for host in HOSTS if host.accepts(model)), None)


def host_of(model: nn.Module, method: str = "this method", reduces: bool = True) -> Host:
    """The host that describes ``model``; an :class:`~tokenthrift.errors.UnsupportedModelError` naming the
    supported families for any other model. ``reduces``: the method changes the tokens between blocks (ToMe, ToE,
    EViT, LTM: the default), so a host whose blocks need the embedding's token layout is refused too
    (:meth:`Host.check_tokens`) and the error names only the families that take it; False for a method that runs
    every block whole (ReViT)."""
    host = find_host(model)
    if host is not None:
        if reduces:
            host.check_tokens(method)
        return host
    families = [h.family for h in HOSTS if h.reducible or not reduces]
    raise UnsupportedModelError(f"{method} supports {', '.join(families)} models; got {type(model).__name__}")
