"""transformers DINOv2 (``Dinov2Model``, ``Dinov2ForImageClassification``) and DINOv2 with registers
(``Dinov2WithRegisters*``): a class token in the position table, registers (``num_register_tokens``) after it
without a position, LayerScale and DropPath on the residuals of ``Dinov2Layer``, ``layernorm`` on the final tokens.
At its own grid the model's embedding runs as it is, resampling its table to any input size itself; the classifier
takes the class token beside the patches' mean (a merged patch weighed by its size), the encoder's pooler the class
token."""
from __future__ import annotations

import torch

from .base import EmbedParts, LayerParts, TransformersHost

__all__ = ["TransformersDinov2Host", "TransformersDinov2RegistersHost"]


class TransformersDinov2Host(TransformersHost):
    family = "transformers DINOv2"
    module = "dinov2.modeling_dinov2"
    encoder_class = "Dinov2Model"
    layer_class = "Dinov2Layer"
    tasks = {"Dinov2ForImageClassification": "dinov2"}
    layers = "encoder.layer"
    parts = LayerParts(("norm1", "norm2"))
    prefix_positions = 1
    final_norm = "layernorm"
    end_norms = ("layernorm",)

    def embed_parts(self) -> EmbedParts:
        emb = self.encoder.embeddings
        return EmbedParts(emb.patch_embeddings.projection, [emb.cls_token], emb.position_embeddings,
                          getattr(emb, "register_tokens", None), emb.dropout)

    def own_embedding(self, images: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        return self.encoder.embeddings(images)  # DINOv2 resamples its table to every size itself

    def pool_type(self) -> str:
        return "token" if self.is_encoder else "avg"  # the classifier: the class token and the patches' mean

    def pooler_output(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        return x[:, 0]

    def pool(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([x[:, 0], self._mean(x, size, self.num_prefix_tokens)], dim=1)


class TransformersDinov2RegistersHost(TransformersDinov2Host):
    family = "transformers DINOv2 with registers"
    module = "dinov2_with_registers.modeling_dinov2_with_registers"
    encoder_class = "Dinov2WithRegistersModel"
    layer_class = "Dinov2WithRegistersLayer"
    tasks = {"Dinov2WithRegistersForImageClassification": "dinov2_with_registers"}
