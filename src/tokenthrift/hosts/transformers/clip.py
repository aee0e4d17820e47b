"""transformers CLIP vision (``CLIPVisionModel``, ``CLIPForImageClassification``): a class embedding in the position
table (an ``nn.Embedding``), ``pre_layrnorm`` on the embedded tokens, ``CLIPEncoderLayer`` (``self_attn`` with
``out_proj``), no norm on the final tokens; the encoder's pooler is ``post_layernorm`` of the class token, the
classifier takes the patches' mean (a merged patch weighed by its size)."""
from __future__ import annotations

import torch

from .base import EmbedParts, LayerParts, TransformersHost

__all__ = ["TransformersCLIPHost"]


class TransformersCLIPHost(TransformersHost):
    family = "transformers CLIP vision"
    module = "clip.modeling_clip"
    encoder_class = "CLIPVisionModel"
    layer_class = "CLIPEncoderLayer"
    tasks = {"CLIPForImageClassification": "vision_model"}
    layers = "encoder.layers"
    parts = LayerParts(("layer_norm1", "layer_norm2"), "self_attn", "num_heads", "scale", "dropout", "out_proj")
    prefix_positions = 1
    pre_norm = "pre_layrnorm"
    final_norm = None  # last_hidden_state stays un-normed
    end_norms = ("post_layernorm",)

    def embed_parts(self) -> EmbedParts:
        emb = self.encoder.embeddings
        return EmbedParts(emb.patch_embedding, [emb.class_embedding.view(1, 1, -1)],
                          emb.position_embedding.weight.unsqueeze(0))

    def pool_type(self) -> str:
        return "token" if self.is_encoder else "avg"  # the classifier: the patches' mean

    def pooler_output(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        return self.encoder.post_layernorm(x[:, 0])

    def pool(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        return self._mean(x, size, 1)
