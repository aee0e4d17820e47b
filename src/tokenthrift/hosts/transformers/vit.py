"""transformers ViT (``ViTModel``, ``ViTForImageClassification``): a class token with an entry in the position table,
pre-norm ``ViTLayer`` with dropout on its residuals, ``layernorm`` on the final tokens; the classifier and the
encoder's pooler take the class token."""
from __future__ import annotations

import torch

from .base import EmbedParts, LayerParts, TransformersHost

__all__ = ["TransformersViTHost"]


class TransformersViTHost(TransformersHost):
    family = "transformers ViT"
    module = "vit.modeling_vit"
    encoder_class = "ViTModel"
    layer_class = "ViTLayer"
    tasks = {"ViTForImageClassification": "vit"}
    layers = "layers"
    parts = LayerParts(("layernorm_before", "layernorm_after"))
    prefix_positions = 1
    final_norm = "layernorm"
    end_norms = ("layernorm",)

    def embed_parts(self) -> EmbedParts:
        emb = self.encoder.embeddings
        return EmbedParts(emb.patch_embeddings.projection, [emb.cls_token], emb.position_embeddings,
                          dropout=emb.dropout)

    def pooler_output(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor | None:
        pooler = self.encoder.pooler
        return None if pooler is None else pooler(x)  # (None for a ViTModel built without its pooler)

    def pool(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        return x[:, 0]
