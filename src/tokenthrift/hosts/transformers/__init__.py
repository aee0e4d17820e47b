"""Hosts for transformers 5 vision encoders, one file per family, each a row of the table
:data:`tokenthrift.hosts.HOSTS`: ViT (:mod:`.vit`), DeiT with its distillation token (:mod:`.deit`), DINOv2 with or
without registers (:mod:`.dinov2`), CLIP's vision tower (:mod:`.clip`) and SigLIP's with its attention-pool head
(:mod:`.siglip`); base models and their ``*ForImageClassification`` classes. What they share (the attention through
``ALL_ATTENTION_FUNCTIONS``, the embedding at any grid, :class:`TransformersForward`, the outputs) is
:mod:`.base`; the models outside the host (:class:`TransformersClassifier`, the ``hf:`` loader :func:`load_model`,
the save and load helpers, :func:`vit_from_timm`) are :mod:`.models`. The families' hosts are imported by the table
(``tokenthrift.hosts``).
"""
from .base import FLEX_OR_MASK, EmbedParts, LayerParts, TimmFace, TransformersForward, TransformersHost
from .models import (NOT_PLAIN, TransformersClassifier, load_model, load_saved, method_settings, save_as_plain,
                     vit_from_timm)

__all__ = ["FLEX_OR_MASK", "NOT_PLAIN", "EmbedParts", "LayerParts", "TimmFace", "TransformersClassifier",
           "TransformersForward", "TransformersHost", "load_model", "load_saved", "method_settings", "save_as_plain",
           "vit_from_timm"]
