"""transformers DeiT (``DeiTModel``, ``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``): ViT's
layout with a distillation token after the class token (both in the position table). The classifier takes the class
token; the distilled classifier averages the class token's head and the distillation token's, and returns both in
its own output type."""
from __future__ import annotations

import torch

from .base import EmbedParts, LayerParts, TransformersHost

__all__ = ["TransformersDeiTHost"]

TEACHER = "DeiTForImageClassificationWithTeacher"


class TransformersDeiTHost(TransformersHost):
    family = "transformers DeiT"
    module = "deit.modeling_deit"
    encoder_class = "DeiTModel"
    layer_class = "DeiTLayer"
    tasks = {"DeiTForImageClassification": "deit", TEACHER: "deit"}
    layers = "layers"
    parts = LayerParts(("layernorm_before", "layernorm_after"))
    prefix_positions = 2
    final_norm = "layernorm"
    end_norms = ("layernorm",)

    @property
    def distilled(self) -> bool:
        """The model is the distilled classifier (a head on the class token and one on the distillation token)."""
        return self.task == TEACHER

    def embed_parts(self) -> EmbedParts:
        emb = self.encoder.embeddings
        return EmbedParts(emb.patch_embeddings.projection, [emb.cls_token, emb.distillation_token],
                          emb.position_embeddings, dropout=emb.dropout)

    def pooler_output(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor | None:
        pooler = self.encoder.pooler
        return None if pooler is None else pooler(x)

    def pool(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        return x[:, 0]

    def head(self, x: torch.Tensor, size: torch.Tensor | None = None, pre_logits: bool = False) -> torch.Tensor:
        if not self.distilled:
            return super().head(x, size, pre_logits)
        m = self.task_model
        if pre_logits:
            return x[:, :2]
        return (m.cls_classifier(x[:, 0]) + m.distillation_classifier(x[:, 1])) / 2

    def outputs(self, x: torch.Tensor, pooled: torch.Tensor | None, labels: torch.Tensor | None,
                hidden: tuple | None, return_dict: bool):
        if not self.distilled:
            return super().outputs(x, pooled, labels, hidden, return_dict)
        from transformers.models.deit.modeling_deit import DeiTForImageClassificationWithTeacherOutput

        m = self.task_model
        out = DeiTForImageClassificationWithTeacherOutput(
            logits=pooled, cls_logits=m.cls_classifier(x[:, 0]),
            distillation_logits=m.distillation_classifier(x[:, 1]), hidden_states=hidden)
        return out if return_dict else out.to_tuple()
