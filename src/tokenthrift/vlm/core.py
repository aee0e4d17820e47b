"""The one core of visual-token reduction in a vision-language model, for every family (docs/methods.md §11).

A family (one file each, one row of :data:`tokenthrift.vlm.families.FAMILIES`) is a :class:`Family` record of what
differs: the transformers classes it takes, how it gets each image's visual tokens and their grid
(:meth:`Family.visual`), which per-token rows its forward takes besides ``input_ids``, the attention mask and
``labels``, how its language model numbers positions, and whether its vision tower has a class token (the
in-tower reducers). This module does the rest, the same for every family:

- selection: the handle's reducer run per grid (:func:`reduce_images`), unless the family reduced in its tower;
- prompt rewriting: each image's placeholders cut to the ones its kept tokens fill (:func:`kept_placeholders`),
  every per-token row (ids, attention mask, labels, the family's rows) cut alike and padded again on the batch's
  side (:func:`cut`);
- positions: the family's (:meth:`Family.positions`) handed to the model with the rewritten prompt;
- proportional attention: the reduced prompt's key bias (:func:`key_bias`, :mod:`tokenthrift.vlm.sized`);
- the forward / generate skeleton (:class:`ReducedVLM`, mixed over the model's class): without images the
  model's own call, with images the reduced prompt; ``generate`` returns the sequences the unreduced call would
  (:func:`generate_reduced`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, UnsupportedModelError
from ..hosts import original_class, patched_class
from . import sized
from .reducers import REDUCERS, reduce_tokens

__all__ = ["ATTR", "IN_TOWER", "METHODS", "SIZED", "TOWER_MERGE", "VISIONZIP", "Family", "Prompt", "ReducedVLM",
           "VLMHandle", "Visual", "check_reducer", "cut", "encoded_tokens", "generate_reduced", "get_handle",
           "key_bias", "kept_placeholders", "language_config", "reduce_images", "reduced_class", "reduced_inputs",
           "release"]

ATTR = "_tokenthrift_vlm"
TOWER_MERGE = "tower-merge"  # ToMe inside the vision tower (through tokenthrift.hosts), not on its output
VISIONZIP = "visionzip"  # VisionZip's dominant and contextual tokens from a tower layer with a class token
METHODS = (*REDUCERS, TOWER_MERGE, VISIONZIP)
IN_TOWER = ("attention", TOWER_MERGE, VISIONZIP)  # reducers that read a class token inside the tower
SIZED = ("pool", "merge", TOWER_MERGE)  # reducers whose tokens hold several patches each (VisionZip's authors weigh
# its contextual tokens as one each)
CALL = ("input_ids", "pixel_values", "attention_mask", "labels")  # what every family's reduced call reads


# ---------------------------------------------------------------------------------------------- the family record
@dataclass
class Visual:
    """One call's visual tokens as a family gives them to the core: ``encoded`` the model's own encoder output (what
    its forward takes as ``mm_encoder_outputs["image"]``), ``tokens`` each image's (N_i, D) tokens on its ``grids``
    (h_i, w_i) (row-major, N_i = h_i · w_i), ``scores`` (N_i,) per image for the attention reducer. A family that
    reduced inside its tower gives the kept (K_i, D) ``tokens`` with their ``positions`` and ``sizes`` (K_i,), and
    the core selects nothing. ``counts``: the placeholders each image holds in the prompt (default N_i)."""

    encoded: Any
    tokens: list[torch.Tensor]
    grids: list[tuple[int, int]]
    scores: list[torch.Tensor] | None = None
    positions: list[torch.Tensor] | None = None
    sizes: list[torch.Tensor] | None = None
    counts: list[int] | None = None


@dataclass
class Prompt:
    """The prompt being rewritten, as :meth:`Family.positions` sees it: the caller's ``input_ids`` and attention
    ``mask`` (B, L), ``keep`` (B, L) the tokens that stay, ``new_mask`` (B, L') the rewritten mask, ``left``
    whether the batch is padded on the left, ``extra`` the family's :attr:`Family.inputs` of this call."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    keep: torch.Tensor
    new_mask: torch.Tensor
    left: bool
    extra: dict[str, Any]


class Family:
    """What one vision-language model family declares; :func:`reduced_inputs` does everything else. A family is a
    subclass in its own file (:mod:`.llava`, :mod:`.qwen2vl`) and an instance of it in
    :data:`tokenthrift.vlm.families.FAMILIES`."""

    name: str = ""  # as users know it, in messages
    classes: tuple[str, ...] = ()  # the transformers classes it takes, by their names in ``transformers``
    # the forward arguments a call with images reads besides input_ids, pixel_values, attention_mask and labels
    # (consumed: the reduced call passes what they become), in the order ``_reduced_inputs`` takes them
    inputs: tuple[str, ...] = ()
    required: tuple[str, ...] = ()  # those of them a call with images must give
    rows: tuple[tuple[str, int], ...] = ()  # those of them that are per-token rows, cut with the placeholders, and
    # their pad value (e.g. Qwen's mm_token_type_ids, Gemma's token_type_ids)
    in_tower: bool = False  # a vision tower with a class token that tokenthrift's hosts run: the IN_TOWER reducers
    no_tower: str = "its vision tower has no class token"  # why they cannot run, where in_tower is False

    def model_classes(self) -> tuple[type, ...]:
        """The transformers classes of :attr:`classes` this transformers has."""
        import transformers

        found = (getattr(transformers, name, None) for name in self.classes)
        return tuple(cls for cls in found if isinstance(cls, type))

    def takes(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_classes())

    @property
    def reducers(self) -> tuple[str, ...]:
        """The reducers of :data:`METHODS` this family runs."""
        return METHODS if self.in_tower else tuple(m for m in METHODS if m not in IN_TOWER)

    def check(self, model: nn.Module, method: str) -> None:
        """Refuse, at :func:`tokenthrift.vlm.reduce`, what this model cannot run (beyond :attr:`reducers`)."""

    def visual(self, model: nn.Module, handle: VLMHandle, pixel_values: torch.Tensor, extra: dict) -> Visual:
        """The visual tokens of the images of one call (``extra``: the call's :attr:`inputs`)."""
        raise NotImplementedError

    def placeholder(self, model: nn.Module) -> int:
        """The token id of an image placeholder in ``input_ids``."""
        return model.config.image_token_id

    def slots(self, positions: list[torch.Tensor]) -> list[torch.Tensor]:
        """Which of each image's placeholders its kept tokens fill (indices into its run). Default: the first K_i,
        for a language model that numbers positions by sequence index: every placeholder is the same token, so only
        the run's length matters (and a token kept from outside the grid, VisionZip's class token, has a slot)."""
        return [torch.arange(len(p), device=p.device) for p in positions]

    def positions(self, model: nn.Module, prompt: Prompt) -> dict[str, Any]:
        """What the model takes with the rewritten prompt to place its tokens (e.g. ``position_ids``). Default:
        nothing; the language model numbers the reduced sequence from its attention mask."""
        return {}

    def outputs(self, encoded: Any, kept: list[torch.Tensor], positions: list[torch.Tensor]) -> Any:
        """``encoded`` carrying the kept tokens (K_i, D) of each image as the model's forward reads them. Default:
        its ``pooler_output`` replaced; a family with more per visual token (Qwen3-VL's DeepStack features) cuts
        those too."""
        encoded.pooler_output = tuple(kept) if isinstance(encoded.pooler_output, tuple) else list(kept)
        return encoded


def encoded_tokens(tokens: torch.Tensor | list[torch.Tensor]):
    """Visual tokens (M, K, D) as a ``get_image_features`` output carries them, for a family that computed them
    itself."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=list(tokens))


def check_reducer(family: Family, model: nn.Module, method: str) -> None:
    """Refuse a reducer ``family`` cannot run on ``model``, naming the ones that work."""
    works = ", ".join(family.reducers)
    if method in IN_TOWER and method not in family.reducers:
        raise UnsupportedModelError(f"the {method} reducer reads the class token inside the vision tower; "
                                    f"{family.no_tower}: reduce after it with {works}")
    if method not in family.reducers:
        raise UnsupportedModelError(f"{family.name} does not take the {method} reducer; choose one of {works}")
    family.check(model, method)


# ---------------------------------------------------------------------------------------------- the handle
@dataclass
class VLMHandle:
    """What :func:`reduce` returns. ``keep`` / ``ratio``, ``method`` and ``seed`` are read at every call;
    ``last_positions`` holds the grid positions (M, K) of the visual tokens the latest call kept (a list of (K,)
    tensors when the images had different grids), ``last_sizes`` the patches each holds. ``family``: the
    :class:`Family` record the model was found by."""

    model: nn.Module
    method: str = "divprune"
    keep: int | None = None
    ratio: float | None = None
    seed: int = 0
    prop_attn: bool = True
    last_positions: torch.Tensor | list | None = None
    last_sizes: torch.Tensor | list | None = None
    family: Family | None = None

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


def language_config(model: nn.Module):
    """The config of a VLM's language model (what its attention layers read)."""
    return model.model.language_model.config


# ---------------------------------------------------------------------------------------------- selection
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


# ---------------------------------------------------------------------------------------------- prompt rewriting
def kept_placeholders(is_image: torch.Tensor, positions: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """(B, L) True for every token that stays: the text, and of each image's ``counts[i]`` placeholders (the
    images in reading order, row by row) those at the indices ``positions[i]`` into its run."""
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


def _stacked(rows: list[torch.Tensor], grids: list[tuple[int, int]]) -> torch.Tensor | list[torch.Tensor]:
    """(M, K) when every image has the same grid, else the list of (K_i,) rows."""
    return torch.stack(rows) if len(set(map(tuple, grids))) == 1 else rows


def reduced_inputs(model: nn.Module, extra: dict, input_ids: torch.Tensor | None = None,
                   pixel_values: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> dict[str, Any]:
    """The keyword arguments of the model's own forward (or generate) on the reduced prompt: the family's visual
    tokens reduced (:func:`reduce_images`, or in its tower), ``input_ids``, the attention mask, ``labels`` and the
    family's per-token rows cut to the kept placeholders and padded again on the batch's side, the family's
    positions, the kept tokens as ``mm_encoder_outputs``; the key bias set for proportional attention. ``extra``:
    the call's :attr:`Family.inputs`."""
    handle = get_handle(model)
    family = handle.family
    if input_ids is None:
        raise InvalidArgumentError("tt.vlm.reduce rewrites the image placeholders in input_ids; pass input_ids, "
                                   "not inputs_embeds")
    missing = [name for name in family.required if extra.get(name) is None]
    if missing:
        raise InvalidArgumentError(f"tt.vlm.reduce rewrites the prompt of a {family.name}: pass input_ids, "
                                   f"{' and '.join(missing)} as the processor gives them")
    visual = family.visual(model, handle, pixel_values, extra)
    if visual.positions is None:
        kept, positions, sizes = reduce_images(handle, visual.tokens, visual.grids, visual.scores)
    else:  # reduced inside the tower
        kept, positions, sizes = visual.tokens, visual.positions, visual.sizes
    handle.last_positions, handle.last_sizes = _stacked(positions, visual.grids), _stacked(sizes, visual.grids)
    encoded = family.outputs(visual.encoded, kept, positions)
    is_image = input_ids == family.placeholder(model)
    counts = visual.counts if visual.counts is not None else [h * w for h, w in visual.grids]
    keep = kept_placeholders(is_image, family.slots(positions), counts)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    left = bool((mask[:, 0] == 0).any())  # padded on the left (generation) or the right
    pad = language_config(model).pad_token_id
    new_mask = cut(mask, keep, 0, left)
    inputs = {"input_ids": cut(input_ids, keep, 0 if pad is None else pad, left), "attention_mask": new_mask,
              "mm_encoder_outputs": {"image": encoded}}
    for name, value in family.rows:
        if extra.get(name) is not None:
            inputs[name] = cut(extra[name], keep, value, left)
    if labels is not None:
        inputs["labels"] = cut(labels, keep, -100, left)
    inputs.update(family.positions(model, Prompt(input_ids, mask, keep, new_mask, left, extra)))
    if handle.sized:
        sized.set_bias(language_config(model), key_bias(is_image, keep, sizes, left))
    return inputs


# ---------------------------------------------------------------------------------------------- forward and generate
def release(model: nn.Module, kwargs: dict) -> None:
    """Forget the last reduced prompt's key bias when a call starts a new prompt without images (no cache, no
    visual features): a stale bias must not reach an unrelated prompt."""
    handle = get_handle(model)
    fresh = all(kwargs.get(k) is None for k in ("cache", "past_key_values", "mm_encoder_outputs"))
    if handle is not None and handle.sized and fresh:
        sized.set_bias(language_config(model), None)


def generate_reduced(model: nn.Module, input_ids: torch.Tensor, inputs: dict, kwargs: dict):
    """The model's own ``generate`` on the reduced prompt ``inputs`` (``kwargs``: the caller's other arguments),
    returning the sequences the unreduced call would: the caller's ``input_ids``, then the new tokens; the prompt's
    key bias is dropped afterwards."""
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


_SIGNATURES: dict[type, inspect.Signature] = {}


def _keywords(base: type, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name, positional ones bound as the model's own ``forward`` takes them."""
    if not args:
        return kwargs
    if base not in _SIGNATURES:
        _SIGNATURES[base] = inspect.signature(base.forward)
    signature = _SIGNATURES[base]
    bound = signature.bind(None, *args, **kwargs).arguments
    named = {}
    for name, value in list(bound.items())[1:]:  # not self
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{base.__name__}.forward() takes its arguments by name past {name}")
        named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return named


def _split(call: dict, family: Family, names: tuple[str, ...] = CALL) -> tuple[dict, dict, dict]:
    """(the core's arguments ``names``, the family's :attr:`Family.inputs`, the rest) of a call."""
    rest = dict(call)
    core = {name: rest.pop(name, None) for name in names}
    extra = {name: rest.pop(name, None) for name in family.inputs}
    return core, extra, rest


class ReducedVLM:
    """``forward`` and ``generate`` of a vision-language model whose visual tokens are reduced (mixed over its
    class): a call without images is the model's own; one with images runs on :func:`reduced_inputs`."""

    def _reduced_inputs(self, input_ids, pixel_values, attention_mask=None, labels=None, *extra, **named):
        """:func:`reduced_inputs` with the family's :attr:`Family.inputs` by position (after ``labels``) or name."""
        family = get_handle(self).family
        return reduced_inputs(self, {**dict(zip(family.inputs, extra)), **named}, input_ids, pixel_values,
                              attention_mask, labels)

    def forward(self, *args, **kwargs):
        base = original_class(type(self))
        call = _keywords(base, args, kwargs)
        if call.get("pixel_values") is None:  # a decoding step, or text only
            release(self, call)
            return base.forward(self, **call)
        if call.get("position_ids") is not None:
            raise InvalidArgumentError("tt.vlm.reduce computes the kept tokens' positions itself; call the model "
                                       "without position_ids")
        core, extra, rest = _split(call, get_handle(self).family)
        return base.forward(self, **reduced_inputs(self, extra, **core), **rest)

    @torch.no_grad()
    def generate(self, input_ids=None, **kwargs):
        base = original_class(type(self))
        if kwargs.get("pixel_values") is None:
            return base.generate(self, input_ids=input_ids, **kwargs)
        core, extra, rest = _split({"input_ids": input_ids, **kwargs}, get_handle(self).family, CALL[:3])
        return generate_reduced(self, input_ids, reduced_inputs(self, extra, **core), rest)


def reduced_class(base: type) -> type:
    """The class a reduced model of class ``base`` is swapped for: :class:`ReducedVLM` over ``base``, its ``forward``
    showing ``base.forward``'s signature (``generate`` checks the model's arguments against it)."""
    def forward(self, *args, **kwargs):
        return ReducedVLM.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(base.forward)
    forward.__doc__ = base.forward.__doc__
    return patched_class(base, ReducedVLM, f"Reduced{base.__name__}", namespace={"forward": forward})
