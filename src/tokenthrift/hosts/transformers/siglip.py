"""transformers SigLIP vision (``SiglipVisionModel``, ``SiglipForImageClassification``): no prefix token, a position
table of the patches alone (an ``nn.Embedding``), ``SiglipEncoderLayer`` (``self_attn`` with ``out_proj``),
``post_layernorm`` on the final tokens. The encoder's pooler is its attention-pool (MAP) head (``vision_use_head``;
without it the encoder has no pooler), which pools merged tokens with log(size) added to its keys' logits; the
classifier takes the mean of every token (a merged token weighed by its size)."""
from __future__ import annotations

import torch

from .base import EmbedParts, LayerParts, TransformersHost

__all__ = ["TransformersSiglipHost"]


class TransformersSiglipHost(TransformersHost):
    family = "transformers SigLIP vision"
    module = "siglip.modeling_siglip"
    encoder_class = "SiglipVisionModel"
    layer_class = "SiglipEncoderLayer"
    tasks = {"SiglipForImageClassification": "vision_model"}
    layers = "encoder.layers"
    parts = LayerParts(("layer_norm1", "layer_norm2"), "self_attn", "num_heads", "scale", "dropout", "out_proj")
    prefix_positions = 0
    final_norm = "post_layernorm"
    end_norms = ("post_layernorm",)

    def embed_parts(self) -> EmbedParts:
        emb = self.encoder.embeddings
        return EmbedParts(emb.patch_embedding, [], emb.position_embedding.weight.unsqueeze(0))

    def pool_type(self) -> str:
        if self.is_encoder:
            return "map" if self.encoder.use_head else "token"
        return "avg"  # the classifier: the mean of every token

    def pooler_output(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor | None:
        return self._map_pool(x, size) if self.encoder.use_head else None

    def pool(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        return self._mean(x, size, 0)

    def _map_pool(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        """The attention-pool head with log(size) added to its keys' logits."""
        head = self.encoder.head
        if size is None:
            return head(x)
        B, T, _ = x.shape
        bias = size.log().to(x.dtype).view(B, 1, T).repeat_interleave(head.attention.num_heads, dim=0)
        pooled = head.attention(head.probe.repeat(B, 1, 1), x, x, attn_mask=bias, need_weights=False)[0]
        pooled = pooled + head.mlp(head.layernorm(pooled))
        return pooled[:, 0]
