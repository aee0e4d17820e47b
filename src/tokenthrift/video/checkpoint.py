"""Checkpoints of the official TimeSformer and of transformers' ``TimesformerForVideoClassification``, mapped
onto :class:`tokenthrift.video.TimeSformer` by name (the token layout and every shape are the same).

Official names are this model's own (``blocks.i.temporal_attn.qkv``, ``temporal_fc``, ``norm1``, ...), under
an optional ``model.`` or ``module.`` prefix. transformers names (``timesformer.encoder.layer.i...``) are
renamed: ``layernorm_before`` -> ``norm1``, ``temporal_layernorm`` -> ``temporal_norm1``,
``layernorm_after`` -> ``norm2``, ``attention.attention.qkv`` / ``attention.output.dense`` -> ``attn.qkv`` /
``attn.proj`` (the same for ``temporal_attention``), ``temporal_dense`` -> ``temporal_fc``,
``intermediate.dense`` / ``output.dense`` -> ``mlp.fc1`` / ``mlp.fc2``, ``layernorm`` -> ``norm``,
``classifier`` -> ``head``.
"""
from __future__ import annotations

import re

import torch

from ..errors import InvalidArgumentError

__all__ = ["convert_checkpoint"]

_HF_TOP = {
    "timesformer.embeddings.cls_token": "cls_token",
    "timesformer.embeddings.position_embeddings": "pos_embed",
    "timesformer.embeddings.time_embeddings": "time_embed",
    "timesformer.embeddings.patch_embeddings.projection.": "patch_embed.proj.",
    "timesformer.layernorm.": "norm.",
    "classifier.": "head.",
}
_HF_BLOCK = {
    "temporal_attention.attention.qkv.": "temporal_attn.qkv.",
    "temporal_attention.output.dense.": "temporal_attn.proj.",
    "temporal_dense.": "temporal_fc.",
    "temporal_layernorm.": "temporal_norm1.",
    "attention.attention.qkv.": "attn.qkv.",
    "attention.output.dense.": "attn.proj.",
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
}
_OFFICIAL = re.compile(r"^(cls_token|pos_embed|time_embed|patch_embed\.|blocks\.\d+\.|norm\.|head\.)")


def _from_hf(key: str) -> str | None:
    for old, new in _HF_TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    match = re.match(r"^timesformer\.encoder\.layer\.(\d+)\.(.*)$", key)
    if match:
        index, rest = match.groups()
        for old, new in _HF_BLOCK.items():
            if rest.startswith(old):
                return f"blocks.{index}.{new}{rest[len(old):]}"
    return None


def convert_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the official TimeSformer (``model_state`` of its checkpoints) or of transformers'
    ``TimesformerForVideoClassification`` -> the state dict of :class:`TimeSformer` (load it with
    ``model.load_state_dict``). Raises with the unknown keys if a key maps to nothing."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        key = re.sub(r"^(module\.|model\.)+", "", key)
        if key.startswith(("timesformer.", "classifier.")):
            new = _from_hf(key)
        else:
            new = key if _OFFICIAL.match(key) else None
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise InvalidArgumentError("these keys are neither official TimeSformer nor transformers Timesformer keys: "
                                   f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return out
