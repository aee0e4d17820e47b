"""TimeSformer models registered with timm on ``import tokenthrift``: ``timesformer_base_patch16_224``
(ViT-B/16, 8 frames: 195.8 GMACs per view), ``timesformer_small_patch16_224`` (width 384, 6 heads) and
``timesformer_tiny_patch16_224`` (width 192, 3 heads) for CPU work. timm keywords pass through
(``num_classes``, ``img_size``, ``patch_size``, ``in_chans``, ``embed_dim``, ``depth``, ``num_heads``,
``num_frames``, ``drop_path_rate``, ...). No weights ship with them: ``pretrained=True`` loads a local file
(``pretrained_cfg_overlay=dict(file=...)``, in this model's names: see :func:`convert_checkpoint`), else timm
warns and initialises randomly.
"""
from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model

from .model import TimeSformer, create_timesformer

__all__ = ["timesformer_base_patch16_224", "timesformer_small_patch16_224", "timesformer_tiny_patch16_224"]

_KINETICS = {"num_classes": 400, "input_size": (3, 224, 224), "mean": (0.45, 0.45, 0.45), "std": (0.225, 0.225, 0.225),
             "crop_pct": 0.875, "interpolation": "bilinear", "first_conv": "patch_embed.proj", "classifier": "head"}
default_cfgs = generate_default_cfgs({f"timesformer_{size}_patch16_224": dict(_KINETICS)
                                      for size in ("base", "small", "tiny")})


def _create(variant: str, pretrained: bool, defaults: dict, kwargs: dict[str, Any]) -> TimeSformer:
    return create_timesformer(variant, pretrained=pretrained, **{**defaults, **kwargs})


@register_model
def timesformer_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> TimeSformer:
    """TimeSformer-B (divided space-time), 8 frames of 224 px, patch 16."""
    return _create("timesformer_base_patch16_224", pretrained,
                   dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, num_frames=8), kwargs)


@register_model
def timesformer_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> TimeSformer:
    """TimeSformer-S: the base layout at width 384, 6 heads."""
    return _create("timesformer_small_patch16_224", pretrained,
                   dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, num_frames=8), kwargs)


@register_model
def timesformer_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> TimeSformer:
    """TimeSformer-Ti: the base layout at width 192, 3 heads."""
    return _create("timesformer_tiny_patch16_224", pretrained,
                   dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, num_frames=8), kwargs)
