"""The LLaVA family: transformers' ``LlavaForConditionalGeneration`` in the LLaVA-1.5 layout (a CLIP tower, its
``vision_feature_layer`` hidden state without the CLS token, a projector; N = (image / patch)² tokens per image).

What differs from the other families (the core, :mod:`tokenthrift.vlm.core`, does the rest): the visual tokens are
the projected tower layer LLaVA reads, each image one grid of N placeholders; the language model numbers positions
1-D by sequence index, so each image's run of placeholders is cut to its first K and the text after it moves up by
N - K positions (what every LLaVA reducer does; a 3-D M-RoPE model keeps its original positions instead); its tower
has a class token, so the reducers that work inside the tower run here: the tower's CLS attention ranks the tokens
(``attention``), ToMe merges in the tower's layers up to the one LLaVA reads (``tower-merge``), VisionZip builds its
dominant and contextual tokens from that layer (``visionzip``).

    handle = tt.vlm.reduce(model, ratio=0.25, method="divprune")
    out = model.generate(**inputs, max_new_tokens=32)      # as before, on a quarter of the visual tokens
    tt.vlm.remove(model)
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError, UnsupportedModelError
from ..hosts import TransformersHost
from ..tokens import gather_tokens
from .core import IN_TOWER, TOWER_MERGE, VISIONZIP, Family, Visual, VLMHandle, encoded_tokens
from .reducers import visionzip_keep

__all__ = ["LLAVA", "Llava"]


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


def _tower_layer(model: nn.Module, pixel_values: torch.Tensor, layer: int, k: int | None = None):
    """One pass of the tower (through its host) up to the layer whose output LLaVA takes (``vision_feature_layer``),
    and no further: (that output (M, P + N', D), the class token's attention (M, P + N') inside that layer, averaged
    over heads, the layer's keys averaged over heads (M, P + N', d), the source map (M, P + N', P + N) of which
    tokens each holds, or None). The rankings of FasterVLM's and VisionZip's kind read the row and the keys. With
    ``k``: ToMe in the layers up to it (proportional attention, bipartite merging by the keys:
    :func:`tokenthrift.tome.bipartite_merge`), r per layer (:func:`_tower_schedule`) so that the output holds the
    prefix + ``k`` tokens; then no class row."""
    from ..tome import bipartite_merge

    tower = model.model.vision_tower
    host = TransformersHost(tower)
    depth = len(host.blocks)
    index = layer % (depth + 1)  # hidden_states index: 0 = the embedding, i = layer i - 1's output
    if index == 0:
        raise InvalidArgumentError("vision_feature_layer selects the embedding: no attention ranks its tokens")
    x = host.embed(pixel_values.to(tower.dtype)).x
    M, T, _ = x.shape
    P = host.num_prefix_tokens
    schedule = [0] * depth if k is None else _tower_schedule(T, P, T - P - k, index, depth)
    size = None
    source = None if k is None else torch.eye(T, device=x.device).expand(M, T, T)
    for i, block in enumerate(list(host.blocks)[:index]):
        last = i == index - 1
        bias = None if size is None else size.log().view(M, -1)  # ToMe's proportional attention
        x, keys, *row = host.attention(block, x, bias, class_row=last and k is None)
        if schedule[i] > 0:
            size = x.new_ones(M, x.shape[1], 1) if size is None else size
            x, size, source, _ = bipartite_merge(x, keys, size, schedule[i], P, source)
        x = host.mlp(block, x)
    return x, (row[0] if row else None), keys, source


class Llava(Family):
    """``LlavaForConditionalGeneration`` (LLaVA-1.5): one grid of N tokens per image, 1-D positions, a CLS tower."""

    name = "LLaVA"
    classes = ("LlavaForConditionalGeneration",)
    inputs = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")
    in_tower = True

    def check(self, model: nn.Module, method: str) -> None:
        if method in IN_TOWER and not TransformersHost.accepts(model.model.vision_tower):
            raise UnsupportedModelError(f"the {method} reducer works inside the vision tower; this tower "
                                        f"({type(model.model.vision_tower).__name__}) is not one tokenthrift's hosts "
                                        "describe")

    def visual(self, model: nn.Module, handle: VLMHandle, pixel_values: torch.Tensor, extra: dict) -> Visual:
        config = model.config
        if extra["image_sizes"] is not None:
            raise UnsupportedModelError("tt.vlm.reduce takes the LLaVA-1.5 layout (every image one grid of N tokens); "
                                        "this call has image_sizes (LLaVA-NeXT tiles)")
        layer = extra["vision_feature_layer"]
        layer = layer if layer is not None else config.vision_feature_layer
        strategy = extra["vision_feature_select_strategy"] or config.vision_feature_select_strategy
        if not isinstance(layer, int) or strategy != "default":
            raise UnsupportedModelError("tt.vlm.reduce takes one vision_feature_layer with the CLS token dropped "
                                        "(vision_feature_select_strategy='default', LLaVA-1.5)")
        tower = TransformersHost(model.model.vision_tower)
        grid = tower.grid_size  # the placeholders the prompt holds per image: one per token of this grid
        N = grid[0] * grid[1]
        grids = [grid] * pixel_values.shape[0]
        k = handle.tokens_kept(N)
        project = model.model.multi_modal_projector
        if handle.method == TOWER_MERGE:
            hidden, _, _, source = _tower_layer(model, pixel_values, layer, k)
            P = tower.num_prefix_tokens
            source = source[:, P:, P:]  # (M, K, N): which patches each token holds
            positions = source.argmax(dim=2)  # its first patch (row-major)
            order = positions.argsort(dim=1)  # the tokens in grid order
            kept = gather_tokens(project(hidden[:, 1:]), order)  # the CLS token dropped ("default")
            sizes = source.sum(2).round().long().gather(1, order)
            return Visual(encoded_tokens(kept), list(kept), grids, positions=list(positions.gather(1, order)),
                          sizes=list(sizes))
        if handle.method == VISIONZIP and k < N:  # the class token among its dominant tokens
            hidden, row, keys, _ = _tower_layer(model, pixel_values, layer)
            tokens, positions, sizes = visionzip_keep(hidden, row, keys, k, tower.num_prefix_tokens)
            kept = project(tokens)
            return Visual(encoded_tokens(kept), list(kept), grids, positions=list(positions), sizes=list(sizes))
        if handle.method == "attention" and k < N:  # the ranking comes from inside the tower: one pass for both
            hidden, row, _, _ = _tower_layer(model, pixel_values, layer)
            features = project(hidden[:, 1:])  # the CLS token dropped ("default")
            return Visual(encoded_tokens(features), list(features), grids, scores=list(row[:, 1:]))
        encoded = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=layer,
                                                 vision_feature_select_strategy=strategy, return_dict=True)
        features = list(encoded.pooler_output)  # M times (N, D)
        if handle.method == VISIONZIP:  # keep = N: the unreduced model
            every = torch.arange(N, device=features[0].device)
            return Visual(encoded, features, grids, positions=[every] * len(features),
                          sizes=[torch.ones_like(every)] * len(features))
        return Visual(encoded, features, grids)


LLAVA = Llava()
