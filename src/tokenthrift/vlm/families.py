"""The table of vision-language model families :func:`tokenthrift.vlm.reduce` takes, and the only place a model's
family is looked up. A new family is one file in this package (a :class:`tokenthrift.vlm.core.Family` record, e.g.
:mod:`.qwen2vl`) and one row here; the core (:mod:`.core`) does the rest (docs/architecture.md, "Add a VLM
family")."""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .core import Family
from .llava import LLAVA
from .qwen2vl import QWEN2_VL

__all__ = ["FAMILIES", "family_of"]

FAMILIES: tuple[Family, ...] = (
    LLAVA,
    QWEN2_VL,
)


def family_of(model: nn.Module) -> Family:
    """The row of :data:`FAMILIES` that takes ``model`` (the first whose classes it is an instance of)."""
    for family in FAMILIES:
        if family.takes(model):
            return family
    classes = [name for family in FAMILIES for name in family.classes]
    listed = " and ".join(c for c in (", ".join(classes[:-1]), *classes[-1:]) if c) or "no class"
    raise UnsupportedModelError(f"tt.vlm.reduce supports transformers' {listed}; got {type(model).__name__}")
