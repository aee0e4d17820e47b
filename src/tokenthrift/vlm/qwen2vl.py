"""The Qwen2-VL family: transformers' ``Qwen2VLForConditionalGeneration``, reduced after its ``PatchMerger`` (which
assumes whole 2 x 2 patch groups, so reduction belongs after it).

What differs from the other families (the core, :mod:`tokenthrift.vlm.core`, does the rest): the visual tokens are
``get_image_features``' merged tokens, each image's (h/2) x (w/2) grid read from ``image_grid_thw``; the prompt
carries ``mm_token_type_ids``, cut with the placeholders; every kept token keeps the M-RoPE position (time, row,
column) the full prompt gives it: the positions are computed for the whole prompt (``get_rope_index``) and the kept
columns selected, never renumbered (renumbering visual tokens wrecks grounding), so each image keeps the
placeholders at its kept tokens' grid positions. The text after an image keeps its position too, and
``rope_deltas`` grows by the tokens removed, so generation continues from the positions the unreduced model would
use. The tower has no class token: the in-tower reducers are refused.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .core import Family, Prompt, Visual, VLMHandle, cut

__all__ = ["QWEN2_VL", "Qwen2VL"]


class Qwen2VL(Family):
    """``Qwen2VLForConditionalGeneration``: merged tokens on each image's grid, M-RoPE positions kept."""

    name = "Qwen2-VL"
    classes = ("Qwen2VLForConditionalGeneration",)
    inputs = ("image_grid_thw", "mm_token_type_ids")
    required = ("image_grid_thw", "mm_token_type_ids")
    rows = (("mm_token_type_ids", 0),)
    no_tower = "Qwen2-VL's tower has none and its merger needs whole 2 x 2 groups"

    def visual(self, model: nn.Module, handle: VLMHandle, pixel_values: torch.Tensor, extra: dict) -> Visual:
        grid_thw = extra["image_grid_thw"]
        if bool((grid_thw[:, 0] != 1).any()):
            raise UnsupportedModelError("tt.vlm.reduce takes images (one temporal patch each); these have more")
        merge = model.config.vision_config.spatial_merge_size
        encoded = model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        grids = [(int(h) // merge, int(w) // merge) for h, w in grid_thw[:, 1:].tolist()]
        return Visual(encoded, list(encoded.pooler_output), grids)

    def slots(self, positions: list[torch.Tensor]) -> list[torch.Tensor]:
        return positions  # each kept token at its own placeholder: its (t, h, w) position

    def positions(self, model: nn.Module, prompt: Prompt) -> dict:
        # every token's M-RoPE position in the whole prompt, and how far generation runs ahead of the sequence
        full, deltas = model.model.get_rope_index(prompt.input_ids, prompt.extra["mm_token_type_ids"],
                                                  image_grid_thw=prompt.extra["image_grid_thw"],
                                                  attention_mask=prompt.mask)
        mask = prompt.new_mask
        sequence = (mask.long().cumsum(1) - 1).masked_fill(mask == 0, 0)  # the text model's 1-D index
        removed = (prompt.mask.sum(1) - mask.sum(1)).unsqueeze(1)
        model.model.rope_deltas = deltas + removed  # later steps: sequence index + delta = the full model's position
        return {"position_ids": torch.cat([sequence[None], cut(full, prompt.keep, 0, prompt.left)])}  # (4, B, L')


QWEN2_VL = Qwen2VL()
