"""Visual-token reduction in transformers' ``LlavaForConditionalGeneration`` (the LLaVA-1.5 layout: a CLIP tower, its
``vision_feature_layer`` hidden state without the CLS token, a projector; N = (image / patch)² tokens per image).

:func:`reduce` swaps the model's class for one whose ``forward`` and ``generate`` reduce the projected visual
tokens of every image to K (:mod:`tokenthrift.vlm.reducers`) and rewrite the prompt to match: each image's run of
N placeholder tokens in ``input_ids`` becomes K (and the attention mask and ``labels`` with it), rows that lose
different numbers of tokens are padded again on the side the batch was padded on, and the reduced features reach
the language model as ``mm_encoder_outputs``. ``generate`` returns the sequences the unreduced call would
(the caller's prompt, then the new tokens), so code that slices off the prompt keeps working; its KV cache holds
the reduced prompt. LLaVA's language model numbers positions 1-D by sequence index, so the text after an image
moves up by N - K positions (what every LLaVA reducer does; a 3-D M-RoPE model keeps its original positions
instead). :func:`remove` restores the model.

    handle = tt.vlm.reduce(model, ratio=0.25, method="divprune")
    out = model.generate(**inputs, max_new_tokens=32)      # as before, on a quarter of the visual tokens
    tt.vlm.remove(model)
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError, UnsupportedModelError
from ..hosts import TransformersHost, original_class
from ..tokens import gather_tokens
from . import sized
from .core import (ATTR, IN_TOWER, TOWER_MERGE, VISIONZIP, VLMHandle, cut, generate_reduced, kept_placeholders,
                   key_bias, language_config, reduce_images, release)
from .reducers import visionzip_keep

__all__ = ["reduced_llava_class"]


def _feature_layer(model: nn.Module, pixel_values: torch.Tensor, layer: int):
    """One pass of the tower (through its host) up to the layer whose output LLaVA takes (``vision_feature_layer``):
    (that output (M, P + N, D), the class token's attention (M, P + N) inside that layer, averaged over heads, the
    layer's keys averaged over heads (M, P + N, d)). The rankings of FasterVLM's and VisionZip's kind read it."""
    tower = model.model.vision_tower
    host = TransformersHost(tower)
    depth = len(host.blocks)
    index = layer % (depth + 1)  # hidden_states index: 0 = the embedding, i = layer i - 1's output
    if index == 0:
        raise InvalidArgumentError("vision_feature_layer selects the embedding: no attention ranks its tokens")
    x = host.embed(pixel_values.to(tower.dtype)).x
    for block in list(host.blocks)[:index - 1]:
        x = host.run_block(block, x)
    last = host.blocks[index - 1]
    x, keys, row = host.attention(last, x, class_row=True)
    return host.mlp(last, x), row, keys


def _encoded(features: torch.Tensor):
    """The projected tokens (M, K, D) as ``get_image_features`` returns them."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=list(features.unbind(0)))


def _tower_schedule(tokens: int, prefix: int, merge: int, layers: int, depth: int) -> list[int]:
    """ToMe's r for each of ``depth`` layers so that the first ``layers`` merge ``merge`` tokens in all, as evenly
    as the cap (half the mergeable tokens per layer) allows, the later ones none."""
    def reachable(mergeable: int, steps: int) -> int:  # the most ``steps`` layers can merge of ``mergeable``
        return mergeable - -(-mergeable // 2 ** steps) if steps > 0 else 0

    schedule = []
    for i in range(depth):
        left = layers - i
        r = 0
        if left > 0:  # evenly, but never so little that the later layers cannot merge the rest
            cap = min(merge, (tokens - prefix) // 2)
            r = min(cap, -(-merge // left))
            while r < cap and merge - r > reachable(tokens - r - prefix, left - 1):
                r += 1
        schedule.append(r)
        merge, tokens = merge - r, tokens - r
    if merge:
        raise InvalidArgumentError(f"merging in the tower's first {layers} layers cannot reach so few tokens (at most "
                                   "half the tokens per layer); keep more tokens or reduce after the tower")
    return schedule


def _merged_in_tower(model: nn.Module, pixel_values: torch.Tensor, layer: int, strategy: str, k: int):
    """ToMe inside the vision tower (through its host), r per layer chosen so that the hidden state LLaVA reads
    holds CLS + ``k`` tokens: (the encoder output with the projected tokens, kept (M, K, D), positions (M, K) (the
    patch each token was kept at: the first it holds), sizes (M, K)), the tokens in grid order."""
    from .. import tome

    tower = model.model.vision_tower
    host = TransformersHost(tower)
    depth, (h, w) = len(host.blocks), host.grid_size
    index = layer % (depth + 1)
    N, P = h * w, host.num_prefix_tokens
    schedule = _tower_schedule(N + P, P, N - k, index, depth)
    handle = tome.apply(tower, schedule, trace_source=True)
    try:
        encoded = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=layer,
                                                 vision_feature_select_strategy=strategy, return_dict=True)
        source = handle.state.history[index - 1][:, P:, P:]  # (M, K, N): which patches each token holds
    finally:
        tome.remove(tower)
    features = torch.stack(list(encoded.pooler_output))
    positions = source.argmax(dim=2)  # its first patch (row-major)
    order = positions.argsort(dim=1)
    kept = gather_tokens(features, order)
    sizes = source.sum(2).round().long().gather(1, order)
    return encoded, kept, positions.gather(1, order), sizes


class _ReducedLlava:
    """``forward`` and ``generate`` of a LLaVA whose visual tokens are reduced (mixed over its class)."""

    def _reduced_inputs(self, input_ids, pixel_values, attention_mask, labels, vision_feature_layer,
                        vision_feature_select_strategy, image_sizes):
        handle: VLMHandle = getattr(self, ATTR)
        config = self.config
        if image_sizes is not None:
            raise UnsupportedModelError("tt.vlm.reduce takes the LLaVA-1.5 layout (every image one grid of N tokens); "
                                        "this call has image_sizes (LLaVA-NeXT tiles)")
        if input_ids is None:
            raise InvalidArgumentError("tt.vlm.reduce rewrites the image placeholders in input_ids; pass input_ids, "
                                       "not inputs_embeds")
        layer = vision_feature_layer if vision_feature_layer is not None else config.vision_feature_layer
        strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        if not isinstance(layer, int) or strategy != "default":
            raise UnsupportedModelError("tt.vlm.reduce takes one vision_feature_layer with the CLS token dropped "
                                        "(vision_feature_select_strategy='default', LLaVA-1.5)")
        tower = TransformersHost(self.model.vision_tower)
        N = tower.grid_size[0] * tower.grid_size[1]  # the tokens per image the prompt holds placeholders for
        side, k = tower.grid_size[0], handle.tokens_kept(N)
        project = self.model.multi_modal_projector
        if handle.method == TOWER_MERGE:
            encoded, kept, positions, sizes = _merged_in_tower(self, pixel_values, layer, strategy, k)
        elif handle.method == VISIONZIP:  # the class token among its dominant tokens; keep = N: the unreduced model
            if k < N:
                hidden, row, keys = _feature_layer(self, pixel_values, layer)
                tokens, positions, sizes = visionzip_keep(hidden, row, keys, k, tower.num_prefix_tokens)
                kept = project(tokens)
                encoded = _encoded(kept)
            else:
                encoded = self.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=layer,
                                                        vision_feature_select_strategy=strategy, return_dict=True)
                kept = torch.stack(list(encoded.pooler_output))
                positions = torch.arange(N, device=kept.device).expand(kept.shape[0], N)
                sizes = torch.ones_like(positions)
        else:
            scores = None
            if handle.method == "attention" and k < N:  # the ranking comes from inside the tower: one pass for both
                hidden, row, _ = _feature_layer(self, pixel_values, layer)
                encoded, scores = _encoded(project(hidden[:, 1:])), row[:, 1:]  # the CLS token dropped ("default")
            else:
                encoded = self.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=layer,
                                                        vision_feature_select_strategy=strategy, return_dict=True)
            features = list(encoded.pooler_output)  # M times (N, D)
            kept, positions, sizes = (torch.stack(t) for t in reduce_images(
                handle, features, [(side, side)] * len(features), None if scores is None else list(scores)))
        handle.last_positions, handle.last_sizes = positions, sizes
        encoded.pooler_output = list(kept.unbind(0))
        is_image = input_ids == config.image_token_id
        # LLaVA numbers positions by sequence index, so only each run's length matters: its first K placeholders
        first = torch.arange(kept.shape[1], device=kept.device)
        keep = kept_placeholders(is_image, [first] * kept.shape[0], [N] * kept.shape[0])
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        left = bool((mask[:, 0] == 0).any())  # padded on the left (generation) or the right
        pad = config.text_config.pad_token_id if config.text_config.pad_token_id is not None else 0
        inputs = {"input_ids": cut(input_ids, keep, pad, left), "attention_mask": cut(mask, keep, 0, left),
                  "mm_encoder_outputs": {"image": encoded}}
        if labels is not None:
            inputs["labels"] = cut(labels, keep, -100, left)
        if handle.sized:
            sized.set_bias(language_config(self), key_bias(is_image, keep, list(sizes), left))
        return inputs

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, labels=None, vision_feature_layer=None,
                vision_feature_select_strategy=None, image_sizes=None, **kwargs):
        base = original_class(type(self))
        if pixel_values is None:  # a decoding step, or text only
            release(self, kwargs)
            return base.forward(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        inputs = self._reduced_inputs(input_ids, pixel_values, attention_mask, labels, vision_feature_layer,
                                      vision_feature_select_strategy, image_sizes)
        return base.forward(self, **inputs, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, vision_feature_layer=None,
                 vision_feature_select_strategy=None, image_sizes=None, **kwargs):
        if pixel_values is None:
            return original_class(type(self)).generate(self, input_ids=input_ids, attention_mask=attention_mask,
                                                       **kwargs)
        inputs = self._reduced_inputs(input_ids, pixel_values, attention_mask, None, vision_feature_layer,
                                      vision_feature_select_strategy, image_sizes)
        return generate_reduced(self, input_ids, inputs, kwargs)


def reduced_llava_class(model: nn.Module, method: str) -> type | None:
    """The mixin that reduces a ``LlavaForConditionalGeneration``'s visual tokens (None for another model)."""
    from transformers import LlavaForConditionalGeneration

    if not isinstance(model, LlavaForConditionalGeneration):
        return None
    if method in IN_TOWER and not TransformersHost.accepts(model.model.vision_tower):
        raise UnsupportedModelError(f"the {method} reducer works inside the vision tower; this tower "
                                    f"({type(model.model.vision_tower).__name__}) is not one tokenthrift's hosts "
                                    "describe")
    return _ReducedLlava
