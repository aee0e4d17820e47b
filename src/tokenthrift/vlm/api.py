"""``tt.vlm.reduce`` / ``tt.vlm.remove``: the model's family is found in :data:`.families.FAMILIES`, and the model's
class is swapped for one with the core's reduced ``forward`` and ``generate`` (:class:`.core.ReducedVLM`)."""
from __future__ import annotations

from torch import nn

from ..errors import InvalidArgumentError, StateError
from ..hosts import original_class
from . import sized
from .core import ATTR, METHODS, VLMHandle, check_reducer, get_handle, language_config, reduced_class
from .families import family_of

__all__ = ["reduce", "remove"]


def reduce(model: nn.Module, keep: int | None = None, ratio: float | None = None, method: str = "divprune",
           seed: int = 0, prop_attn: bool = True) -> VLMHandle:
    """Reduce the visual tokens of a transformers vision-language model in place to ``keep`` per image (or ``ratio``
    of them), chosen by ``method``: one of :data:`tokenthrift.vlm.REDUCERS` on the tokens the connector gives the
    language model, or one that works inside a vision tower with a class token (LLaVA): ``"tower-merge"``, ToMe in
    the tower so that the layer LLaVA reads holds K patch tokens, and ``"visionzip"``, VisionZip's dominant and
    contextual tokens from that layer. ``seed`` for the random reducer (every image of a grid keeps the same
    positions, at every call and in any batch). ``prop_attn``: a merged or pooled token (one that holds several
    patches) gets log(size) on its key in the language model's attention (eager or sdpa), so that it weighs as the
    tokens it replaced (:mod:`tokenthrift.vlm.sized`). Supported: the classes of :data:`.families.FAMILIES`,
    ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout) and ``Qwen2VLForConditionalGeneration`` (after its merger,
    each kept token at its original M-RoPE position). Returns the :class:`VLMHandle`; :func:`remove` undoes it."""
    if get_handle(model) is not None:
        raise StateError("the visual tokens of this model are reduced already; call tokenthrift.vlm.remove(model) "
                         "first")
    if (keep is None) == (ratio is None):
        raise InvalidArgumentError("give keep (visual tokens per image) or ratio (a share of them), one of the two")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not float(keep).is_integer() or keep < 1:
            raise InvalidArgumentError(f"keep is a whole number of visual tokens per image, at least 1; got {keep!r} "
                                       "(for a share of each image's tokens give ratio=)")
        keep = int(keep)
    if ratio is not None and not 0 < ratio <= 1:
        raise InvalidArgumentError(f"ratio must lie in (0, 1]; got {ratio}")
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown reducer {method!r}; choose one of {', '.join(METHODS)}")
    family = family_of(model)
    check_reducer(family, model, method)
    handle = VLMHandle(model, method, keep, ratio, seed, bool(prop_attn), family=family)
    if handle.sized:
        sized.enable(language_config(model))
    model.__class__ = reduced_class(type(model))
    setattr(model, ATTR, handle)
    return handle


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`reduce`: the plain model again."""
    handle = get_handle(model)
    if handle is None:
        raise StateError("the visual tokens of this model are not reduced; nothing to remove")
    if handle.sized:
        sized.disable(language_config(model))
    model.__class__ = original_class(type(model))
    delattr(model, ATTR)
    return model
