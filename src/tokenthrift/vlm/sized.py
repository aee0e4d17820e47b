"""Proportional attention in a VLM's language model: a visual token that holds s patches (a merged or pooled one)
gets log(s) added to its key's attention logits, as ToMe does inside an encoder, so that it weighs in the
language model's attention as the s tokens it replaced would.

The language model keeps its attention implementation (eager or sdpa): it is wrapped by one registered under
:data:`NAME` (transformers' ``AttentionInterface``, with sdpa's mask builder registered beside it) that adds the
prompt's per-key bias, (B, L) log sizes set for each reduced prompt, to the mask (keys past the prompt, the
generated tokens, get 0). Implementations without a float mask (flash-attn) cannot take it: refused.
"""
from __future__ import annotations

import sys

import torch

from ..errors import UnsupportedModelError

__all__ = ["NAME", "disable", "enable", "set_bias"]

NAME = "tokenthrift_sized"
INNER = ("eager", "sdpa")
_BIAS: dict[int, torch.Tensor] = {}  # id(language model config) -> the current prompt's (B, L) key bias


def _sized_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own attention (eager or sdpa) with the prompt's per-key bias added to its mask."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = module.config
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(config._tokenthrift_inner, eager)
    bias = _BIAS.get(id(config))
    if bias is not None:
        q_len, k_len = query.shape[-2], key.shape[-2]
        bias = bias[:, :k_len] if bias.shape[1] >= k_len else torch.nn.functional.pad(bias, (0, k_len - bias.shape[1]))
        if attention_mask is None:  # sdpa's builder left the causal mask to is_causal: write it out
            rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
            attention_mask = (torch.arange(k_len, device=query.device)[None] <= rows)[None, None]
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
        attention_mask = attention_mask[..., :k_len] + bias[:, None, None, :].to(query.dtype)
    return inner(module, query, key, value, attention_mask, **kwargs)


def enable(config) -> None:
    """Route the language model (``config``: its config) through the sized attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    inner = config._attn_implementation or "eager"
    if inner not in INNER:
        raise UnsupportedModelError(f"proportional attention adds log(size) to the language model's attention "
                                    f"logits, which its {inner!r} attention cannot take; use eager or sdpa, or "
                                    "reduce with prop_attn=False")
    AttentionInterface.register(NAME, _sized_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    config._tokenthrift_inner = inner
    config._attn_implementation = NAME


def disable(config) -> None:
    """The language model's own attention again."""
    config._attn_implementation = config._tokenthrift_inner
    del config._tokenthrift_inner
    _BIAS.pop(id(config), None)


def set_bias(config, bias: torch.Tensor | None) -> None:
    """The (B, L) key bias of the prompt the next calls run (None: no bias)."""
    if bias is None:
        _BIAS.pop(id(config), None)
    else:
        _BIAS[id(config)] = bias
