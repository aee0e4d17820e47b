"""Visual-token reduction in transformers' ``Qwen2VLForConditionalGeneration``, after its ``PatchMerger`` (which
assumes whole 2 x 2 patch groups, so reduction belongs after it): each image's (h/2) x (w/2) merged tokens are cut
to K by the handle's reducer (:mod:`tokenthrift.vlm.reducers`), its placeholder tokens cut to the K that hold them,
and every kept token keeps the M-RoPE position (time, row, column) the full prompt gives it: the positions are
computed for the whole prompt (``get_rope_index``) and the kept columns selected, never renumbered (renumbering
visual tokens wrecks grounding). The text after an image keeps its position too, so generation continues from the
positions the unreduced model would use. ``input_ids``, the attention mask, ``mm_token_type_ids``, ``labels`` and
the positions are cut alike; ``generate`` returns the caller's prompt, then the new tokens.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError, UnsupportedModelError
from ..hosts import original_class
from . import sized
from .core import (ATTR, IN_TOWER, METHODS, VLMHandle, cut, generate_reduced, kept_placeholders, key_bias,
                   language_config, reduce_images, release)

__all__ = ["reduced_qwen2vl_class"]


class _ReducedQwen2VL:
    """``forward`` and ``generate`` of a Qwen2-VL whose visual tokens are reduced (mixed over its class)."""

    def _reduced_inputs(self, input_ids, pixel_values, image_grid_thw, attention_mask, mm_token_type_ids, labels):
        handle: VLMHandle = getattr(self, ATTR)
        if input_ids is None or image_grid_thw is None or mm_token_type_ids is None:
            raise InvalidArgumentError("tt.vlm.reduce rewrites the prompt of a Qwen2-VL: pass input_ids, "
                                       "image_grid_thw and mm_token_type_ids as the processor gives them")
        if bool((image_grid_thw[:, 0] != 1).any()):
            raise UnsupportedModelError("tt.vlm.reduce takes images (one temporal patch each); these have more")
        merge = self.config.vision_config.spatial_merge_size
        encoded = self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        grids = [(int(h) // merge, int(w) // merge) for h, w in image_grid_thw[:, 1:].tolist()]
        kept, positions, sizes = reduce_images(handle, list(encoded.pooler_output), grids)
        handle.last_positions, handle.last_sizes = positions, sizes
        encoded.pooler_output = tuple(kept)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        # every token's M-RoPE position in the whole prompt, and how far generation runs ahead of the sequence
        full, deltas = self.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                                 attention_mask=mask)
        is_image = input_ids == self.config.image_token_id
        keep = kept_placeholders(is_image, positions, [h * w for h, w in grids])
        left = bool((mask[:, 0] == 0).any())
        pad = self.config.text_config.pad_token_id
        new_mask = cut(mask, keep, 0, left)
        sequence = (new_mask.long().cumsum(1) - 1).masked_fill(new_mask == 0, 0)  # the text model's 1-D index
        position_ids = torch.cat([sequence[None], cut(full, keep, 0, left)])  # (4, B, L'): index, then t, h, w
        removed = (mask.sum(1) - new_mask.sum(1)).unsqueeze(1)
        self.model.rope_deltas = deltas + removed  # later steps: sequence index + delta = the full model's position
        inputs = {"input_ids": cut(input_ids, keep, 0 if pad is None else pad, left), "attention_mask": new_mask,
                  "mm_token_type_ids": cut(mm_token_type_ids, keep, 0, left), "position_ids": position_ids,
                  "mm_encoder_outputs": {"image": encoded}}
        if labels is not None:
            inputs["labels"] = cut(labels, keep, -100, left)
        if handle.sized:
            sized.set_bias(language_config(self), key_bias(is_image, keep, sizes, left))
        return inputs

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, image_grid_thw=None,
                mm_token_type_ids=None, labels=None, **kwargs):
        base = original_class(type(self))
        if pixel_values is None:  # a decoding step, or text only
            release(self, kwargs)
            return base.forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, labels=labels,
                                **kwargs)
        if kwargs.get("position_ids") is not None:
            raise InvalidArgumentError("tt.vlm.reduce computes the kept tokens' positions itself; call the model "
                                       "without position_ids")
        inputs = self._reduced_inputs(input_ids, pixel_values, image_grid_thw, attention_mask, mm_token_type_ids,
                                      labels)
        return base.forward(self, **inputs, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, image_grid_thw=None,
                 mm_token_type_ids=None, **kwargs):
        base = original_class(type(self))
        if pixel_values is None:
            return base.generate(self, input_ids=input_ids, attention_mask=attention_mask,
                                 image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, **kwargs)
        inputs = self._reduced_inputs(input_ids, pixel_values, image_grid_thw, attention_mask, mm_token_type_ids,
                                      None)
        return generate_reduced(self, input_ids, inputs, kwargs)


def reduced_qwen2vl_class(model: nn.Module, method: str) -> type | None:
    """The mixin that reduces a ``Qwen2VLForConditionalGeneration``'s visual tokens (None for another model)."""
    try:
        from transformers import Qwen2VLForConditionalGeneration
    except ImportError:
        return None
    if not isinstance(model, Qwen2VLForConditionalGeneration):
        return None
    if method in IN_TOWER:
        works = ", ".join(m for m in METHODS if m not in IN_TOWER)
        raise UnsupportedModelError(f"the {method} reducer reads the class token inside the vision tower; Qwen2-VL's "
                                    f"tower has none and its merger needs whole 2 x 2 groups: reduce after it with "
                                    f"{works}")
    return _ReducedQwen2VL
