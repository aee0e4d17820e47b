"""What every vision-language model's reduction shares: the handle, the reducer run per grid (:func:`reduce_images`),
the prompt rewriting (:func:`kept_placeholders`, :func:`cut`: each image's placeholder tokens cut to the ones its
kept visual tokens fill, every per-token row (ids, attention mask, labels, token types, positions) cut alike and
padded again on the batch's side), and generation on the reduced prompt (:func:`generate_reduced`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..hosts import original_class
from .reducers import REDUCERS, reduce_tokens

__all__ = ["ATTR", "IN_TOWER", "METHODS", "SIZED", "TOWER_MERGE", "VISIONZIP", "VLMHandle", "cut", "generate_reduced",
           "get_handle", "key_bias", "kept_placeholders", "language_config", "reduce_images", "release"]

ATTR = "_tokenthrift_vlm"
TOWER_MERGE = "tower-merge"  # ToMe inside the vision tower (through tokenthrift.hosts), not on its output
VISIONZIP = "visionzip"  # VisionZip's dominant and contextual tokens from a tower layer with a class token
METHODS = (*REDUCERS, TOWER_MERGE, VISIONZIP)
IN_TOWER = ("attention", TOWER_MERGE, VISIONZIP)  # reducers that read a class token inside the tower
SIZED = ("pool", "merge", TOWER_MERGE)  # reducers whose tokens hold several patches each (VisionZip's authors weigh
# its contextual tokens as one each)


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
    prop_attn: bool = True
    last_positions: torch.Tensor | list | None = None
    last_sizes: torch.Tensor | list | None = None

    @property
    def sized(self) -> bool:
        """Whether the kept tokens hold several patches each (merging, pooling) and the language model weighs them
        by that (proportional attention)."""
        return self.prop_attn and self.method in SIZED

    def tokens_kept(self, n: int) -> int:
        """K of N visual tokens of an image: ``keep``, or ``round(ratio · N)`` (at least 1) as DivPrune's authors
        round it. A ``keep`` above N is refused: the image has fewer tokens than asked for."""
        if self.keep is None:
            return max(1, round(n * self.ratio))
        if self.keep > n:
            raise InvalidArgumentError(f"keep={self.keep} visual tokens, but an image here has only {n}: ask for at "
                                       f"most {n}, or give ratio= (a share of each image's tokens)")
        return self.keep


def get_handle(model: nn.Module) -> VLMHandle | None:
    return getattr(model, ATTR, None)


def reduce_images(handle: VLMHandle, features: list[torch.Tensor], grids: list[tuple[int, int]],
                  scores: list[torch.Tensor] | None = None) -> tuple[list, list, list]:
    """The handle's reducer on every image's tokens (N_i, D) on its grid: (kept (K_i, D), positions (K_i,), sizes
    (K_i,)) per image. Images of one grid go through the reducer as one batch (a loop over the distinct grids only)."""
    out: list = [None] * len(features)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, grid in enumerate(grids):
        groups.setdefault(tuple(grid), []).append(i)
    for grid, members in groups.items():
        x = torch.stack([features[i] for i in members])
        score = None if scores is None else torch.stack([scores[i] for i in members])
        k = handle.tokens_kept(x.shape[1])
        kept, positions, sizes = reduce_tokens(x, k, handle.method, grid, score, handle.seed)
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


def key_bias(is_image: torch.Tensor, keep: torch.Tensor, sizes: list[torch.Tensor], left: bool) -> torch.Tensor | None:
    """The reduced prompt's (B, L') per-key bias for proportional attention: log of the patches each kept visual
    token holds at its placeholder, 0 for every other token; None when every token holds one patch."""
    if all(bool((s == 1).all()) for s in sizes):  # nothing to weigh: the model's own attention, untouched
        return None
    full = torch.zeros(is_image.shape, device=is_image.device)
    full[is_image & keep] = torch.cat([s.to(full) for s in sizes]).log()  # row-major: images and tokens in order
    return cut(full, keep, 0.0, left)


def language_config(model: nn.Module):
    """The config of a VLM's language model (what its attention layers read)."""
    return model.model.language_model.config


def release(model: nn.Module, kwargs: dict) -> None:
    """Forget the last reduced prompt's key bias when a call starts a new prompt without images (no cache, no
    visual features): a stale bias must not reach an unrelated prompt."""
    from . import sized

    handle = get_handle(model)
    fresh = all(kwargs.get(k) is None for k in ("cache", "past_key_values", "mm_encoder_outputs"))
    if handle is not None and handle.sized and fresh:
        sized.set_bias(language_config(model), None)


def generate_reduced(model: nn.Module, input_ids: torch.Tensor, inputs: dict, kwargs: dict):
    """The model's own ``generate`` on the reduced prompt ``inputs`` (``kwargs``: the caller's other arguments),
    returning the sequences the unreduced call would: the caller's ``input_ids``, then the new tokens; the prompt's
    key bias is dropped afterwards."""
    from . import sized

    try:
        out = original_class(type(model)).generate(model, **inputs, **kwargs)
    finally:
        sized.set_bias(language_config(model), None)
    sequences = out if torch.is_tensor(out) else out.sequences
    full = torch.cat([input_ids, sequences[:, inputs["input_ids"].shape[1]:]], dim=1)
    if torch.is_tensor(out):
        return full
    out.sequences = full
    return out
