"""What every vision-language model's reduction shares: the handle, :func:`reduce` / :func:`remove` (dispatching
on the model's class to its file: :mod:`.llava`, :mod:`.qwen2vl`), and the prompt rewriting (:func:`kept_placeholders`,
:func:`cut`): each image's placeholder tokens cut to the ones its kept visual tokens fill, every per-token row
(ids, attention mask, labels, token types, positions) cut alike and padded again on the batch's side."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InvalidArgumentError, StateError, UnsupportedModelError
from ..hosts import original_class, patched_class
from .reducers import REDUCERS, reduce_tokens

__all__ = ["METHODS", "TOWER_MERGE", "VLMHandle", "cut", "get_handle", "kept_placeholders", "reduce", "reduce_images",
           "remove"]

ATTR = "_tokenthrift_vlm"
TOWER_MERGE = "tower-merge"  # ToMe inside the vision tower (through tokenthrift.hosts), not on its output
METHODS = (*REDUCERS, TOWER_MERGE)


@dataclass
class VLMHandle:
    """What :func:`reduce` returns. ``keep`` / ``ratio``, ``method`` and ``seed`` are read at every call;
    ``last_positions`` holds the grid positions (M, K) of the visual tokens the latest call kept (a list of (K,)
    tensors when the images had different grids), ``last_sizes`` the patches each holds."""

    model: nn.Module
    method: str = "divprune"
    keep: int | None = None
    ratio: float | None = None
    seed: int = 0
    last_positions: torch.Tensor | list | None = None
    last_sizes: torch.Tensor | list | None = None
    _generator: torch.Generator = field(default_factory=torch.Generator)

    def tokens_kept(self, n: int) -> int:
        """K of N visual tokens of an image."""
        if self.keep is not None:
            return min(int(self.keep), n)
        return max(1, round(n * self.ratio))


def get_handle(model: nn.Module) -> VLMHandle | None:
    return getattr(model, ATTR, None)


def reduce_images(handle: VLMHandle, features: list[torch.Tensor], grids: list[tuple[int, int]],
                  scores: list[torch.Tensor] | None = None) -> tuple[list, list, list]:
    """The handle's reducer on every image's tokens (N_i, D) on its grid: (kept (K_i, D), positions (K_i,), sizes
    (K_i,)) per image. Images of one grid go through the reducer as one batch (a loop over the distinct grids only)."""
    handle._generator.manual_seed(handle.seed)
    out: list = [None] * len(features)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, grid in enumerate(grids):
        groups.setdefault(tuple(grid), []).append(i)
    for grid, members in groups.items():
        x = torch.stack([features[i] for i in members])
        score = None if scores is None else torch.stack([scores[i] for i in members])
        k = handle.tokens_kept(x.shape[1])
        kept, positions, sizes = reduce_tokens(x, k, handle.method, grid, score, handle._generator)
        for j, i in enumerate(members):
            out[i] = (kept[j], positions[j], sizes[j])
    kept, positions, sizes = (list(t) for t in zip(*out))
    return kept, positions, sizes


def kept_placeholders(is_image: torch.Tensor, positions: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """(B, L) True for every token that stays: the text, and of each image's ``counts[i]`` placeholders (the
    images in reading order, row by row) those at the grid ``positions[i]`` its kept tokens stand at."""
    total = int(is_image.sum())
    if total != sum(counts):
        raise InvalidArgumentError(f"input_ids hold {total} image placeholders for {len(counts)} images of "
                                   f"{', '.join(map(str, counts))} tokens; the processor writes one per visual token")
    starts = torch.tensor([0, *counts], device=is_image.device).cumsum(0)  # each image's first placeholder
    keep = torch.zeros(total, dtype=torch.bool, device=is_image.device)
    keep[torch.cat([p.to(is_image.device) + s for p, s in zip(positions, starts[:-1])])] = True
    out = torch.ones_like(is_image)
    out[is_image] = keep  # placeholders in row-major order: the images in reading order
    return out


def cut(rows: torch.Tensor, keep: torch.Tensor, pad_value, left: bool) -> torch.Tensor:
    """``rows`` (..., B, L) without the tokens ``keep`` (B, L) drops, padded again with ``pad_value`` on the left
    (``left``) or the right to the longest row: (..., B, L')."""
    length = keep.sum(1)
    width = int(length.max())
    offset = (width - length).unsqueeze(1) if left else torch.zeros_like(length).unsqueeze(1)
    target = torch.where(keep, keep.long().cumsum(1) - 1 + offset, width)  # dropped ones to a spill column
    target = target.expand_as(rows)
    out = torch.full((*rows.shape[:-1], width + 1), pad_value, dtype=rows.dtype, device=rows.device)
    out.scatter_(-1, target, rows)
    return out[..., :width]


def reduce(model: nn.Module, keep: int | None = None, ratio: float | None = None, method: str = "divprune",
           seed: int = 0) -> VLMHandle:
    """Reduce the visual tokens of a transformers vision-language model in place to ``keep`` per image (or ``ratio``
    of them), chosen by ``method``: one of :data:`tokenthrift.vlm.REDUCERS` on the tokens the connector gives the
    language model, or ``"tower-merge"`` (LLaVA), ToMe inside the CLIP tower so that the layer LLaVA reads holds K
    patch tokens. ``seed`` for the random reducer (the same tokens at every call). Supported:
    ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout) and ``Qwen2VLForConditionalGeneration`` (after its
    merger, each kept token at its original M-RoPE position). Returns the :class:`VLMHandle`; :func:`remove` undoes
    it."""
    from .llava import reduced_llava_class
    from .qwen2vl import reduced_qwen2vl_class

    if get_handle(model) is not None:
        raise StateError("the visual tokens of this model are reduced already; call tokenthrift.vlm.remove(model) "
                         "first")
    if (keep is None) == (ratio is None):
        raise InvalidArgumentError("give keep (visual tokens per image) or ratio (a share of them), one of the two")
    if keep is not None and keep < 1:
        raise InvalidArgumentError(f"keep must be at least 1; got {keep}")
    if ratio is not None and not 0 < ratio <= 1:
        raise InvalidArgumentError(f"ratio must lie in (0, 1]; got {ratio}")
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown reducer {method!r}; choose one of {', '.join(METHODS)}")
    mixin = reduced_llava_class(model, method) or reduced_qwen2vl_class(model, method)
    if mixin is None:
        raise UnsupportedModelError("tt.vlm.reduce supports transformers' LlavaForConditionalGeneration and "
                                    f"Qwen2VLForConditionalGeneration; got {type(model).__name__}")
    handle = VLMHandle(model, method, keep, ratio, seed)
    base = type(model)
    model.__class__ = patched_class(base, mixin, f"Reduced{base.__name__}")
    setattr(model, ATTR, handle)
    return handle


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`reduce`: the plain model again."""
    if get_handle(model) is None:
        raise StateError("the visual tokens of this model are not reduced; nothing to remove")
    model.__class__ = original_class(type(model))
    delattr(model, ATTR)
    return model
