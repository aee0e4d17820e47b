"""transformers models outside the host: :class:`TransformersClassifier` (a transformers image classifier with timm's
face, what the engine trains: ``--model hf:...``), :func:`load_model` (the ``hf:`` loader), the save and load helpers
a method's ``save_pretrained`` / ``from_pretrained`` use (:func:`save_as_plain`, :func:`load_saved`,
:func:`method_settings`, :data:`NOT_PLAIN`) and :func:`vit_from_timm` (a timm ViT's weights in a transformers ViT).

A patched model's ``save_pretrained`` writes its plain class (:func:`save_as_plain`): ``architectures`` names the
transformers class, so the folder loads with transformers alone, as the plain model; a method's own
``save_pretrained`` adds its settings to config.json (``tokenthrift_<method>``) and its ``from_pretrained``
reapplies them (:func:`load_saved`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import InvalidArgumentError, MissingFileError, UnsupportedModelError
from ..base import as_original_class
from .base import TimmFace, TransformersHost, transformers_families

__all__ = ["NOT_PLAIN", "TransformersClassifier", "load_model", "load_saved", "method_settings", "save_as_plain",
           "vit_from_timm"]


class TransformersClassifier(TimmFace):
    """A transformers image classifier (``hf``) with timm's face, what tokenthrift's engine trains and evaluates:
    ``forward(images)`` returns the logits tensor, ``forward_features`` / ``forward_head`` split it as timm does,
    ``num_classes``, ``pretrained_cfg`` (its input size) and ``input_size``. Its state_dict keys are the
    transformers model's under ``hf.``; every method takes it as it takes the transformers model."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        if not TransformersHost.accepts(hf) or TransformersHost(hf).is_encoder:
            raise UnsupportedModelError("tokenthrift trains a transformers image classifier (a "
                                        f"*ForImageClassification class of {transformers_families()}); got "
                                        f"{type(hf).__name__}")
        self.hf = hf
        host = TransformersHost(self)
        self.num_classes = int(hf.config.num_labels)
        self.input_size = (host.in_chans, *host.image_size)
        self.pretrained_cfg = {"input_size": self.input_size, "num_classes": self.num_classes,
                               "architecture": f"transformers {type(hf).__name__}"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return TransformersHost(self).forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return TransformersHost(self).forward_head(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.hf.gradient_checkpointing_enable() if enable else self.hf.gradient_checkpointing_disable()

    def get_classifier(self) -> nn.Module:
        return self.hf.classifier


# config.json keys of the folders whose weights are not the plain model's (LTM, ReViT), and the functions that load them
NOT_PLAIN = {"tokenthrift_ltm": "tokenthrift.ltm.from_pretrained",
             "tokenthrift_revit": "tokenthrift.revit.from_pretrained"}


def load_model(spec: str, num_classes: int | None = None, attn_implementation: str | None = None) -> nn.Module:
    """A transformers model from ``spec``, offline: ``"<class>:<config.json>"`` (random weights, e.g.
    ``ViTForImageClassification:vit-tiny.json``) or a ``save_pretrained`` folder (its weights; a classifier of
    another class count gets a fresh head; a tokenthrift LTM or ReViT folder, whose weights are not the plain
    model's, is refused, naming its loader). ``num_classes`` sets the classifier's labels."""
    import transformers

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if num_classes is not None:
        kwargs["num_labels"] = num_classes
    name, sep, path = spec.partition(":")
    if sep and not Path(spec).exists():
        cls = getattr(transformers, name, None)
        if cls is None or not hasattr(cls, "config_class"):
            raise UnsupportedModelError(f"hf:{spec}: transformers has no model class {name!r}; give "
                                        "hf:<class>:<config.json>, e.g. hf:ViTForImageClassification:config.json")
        if not Path(path).is_file():
            raise UnsupportedModelError(f"hf:{spec}: no config file {path}")
        config = cls.config_class.from_json_file(path)
        for key, value in kwargs.items():
            setattr(config, key, value)
        return cls(config)
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise UnsupportedModelError(f"hf:{spec}: not a save_pretrained folder (no config.json) and not "
                                    "<class>:<config.json>")
    config = transformers.AutoConfig.from_pretrained(folder)
    for key, loader in NOT_PLAIN.items():
        if hasattr(config, key):
            raise UnsupportedModelError(f"hf:{spec} holds a tokenthrift model ({key} in its config.json) that the "
                                        f"plain transformers class cannot stand for; load it with {loader}(folder)")
    cls = getattr(transformers, (config.architectures or [""])[0], None)
    if cls is None:
        raise UnsupportedModelError(f"hf:{spec}: its config.json names no transformers class in 'architectures'")
    return cls.from_pretrained(folder, ignore_mismatched_sizes=num_classes is not None, **kwargs)


def save_as_plain(model: nn.Module, folder: str | Path, *args, settings: dict[str, Any] | None = None,
                  **kwargs) -> None:
    """``model.save_pretrained(folder, *args, **kwargs)`` for a transformers model a method patched, written as its
    plain class writes it: config.json's ``architectures`` names the transformers class
    (``ViTForImageClassification``, not the method's ``ToMeViTForImageClassification``, which transformers does not
    know). ``settings``: entries added to config.json (a method's ``{"tokenthrift_<method>": {...}}``, JSON values,
    read back by :func:`load_saved`); the model's own config is left as it was."""
    if not hasattr(model, "save_pretrained") or not TransformersHost.accepts(model):
        raise UnsupportedModelError(f"save_pretrained writes a folder of a transformers model; got "
                                    f"{type(model).__name__} (a timm model is saved with "
                                    "torch.save(model.state_dict()) or a tokenthrift checkpoint)")
    settings = settings or {}
    for key, value in settings.items():
        setattr(model.config, key, value)
    try:
        with as_original_class(model):  # transformers names the folder's class after the model's
            model.save_pretrained(folder, *args, **kwargs)
    finally:
        for key in settings:
            delattr(model.config, key)


def load_saved(folder: str | Path, key: str, method: str, **kwargs) -> tuple[nn.Module, Any]:
    """The plain transformers model of a folder that :func:`save_as_plain` wrote with a method's settings under ``key``
    (the class config.json's ``architectures`` names, loaded with its own ``from_pretrained``; ``kwargs``: its
    arguments, e.g. ``attn_implementation``), and those settings (taken off the model's config)."""
    import transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"{folder} is not a save_pretrained folder (no config.json)")
    config = transformers.AutoConfig.from_pretrained(folder)
    settings = getattr(config, key, None)
    if settings is None:
        raise InvalidArgumentError(f"{folder} holds no tokenthrift {method} model (its config.json has no {key}); load "
                                   "a plain transformers model with its own from_pretrained")
    cls = getattr(transformers, (config.architectures or [""])[0], None)
    if cls is None:
        raise InvalidArgumentError(f"{folder}/config.json names no transformers class in 'architectures'")
    model = cls.from_pretrained(folder, **kwargs)
    if hasattr(model.config, key):
        delattr(model.config, key)
    return model, settings


def method_settings(apply: Any, handle: Any) -> dict[str, Any]:
    """The arguments of a method's ``apply`` (those after the model) that its handle holds under the same names, as
    JSON values (tuples as lists): what :func:`save_as_plain` records to reapply the method as it is."""
    import inspect

    def plain(value: Any) -> Any:
        return [plain(v) for v in value] if isinstance(value, (tuple, list)) else value

    names = list(inspect.signature(apply).parameters)[1:]
    return {name: plain(getattr(handle, name)) for name in names if hasattr(handle, name)}


def vit_from_timm(model: nn.Module, attn_implementation: str = "sdpa") -> nn.Module:
    """A transformers ``ViTForImageClassification`` holding the weights of a timm ``VisionTransformer`` (class token,
    no registers, pre-norm ``Block`` without LayerScale or q/k norm, CLS pooling): timm's fused qkv split into
    q/k/v, every other tensor copied. The two compute the same function (up to float rounding), which is what lets
    a method's result on one be checked against the other."""
    from timm.models.vision_transformer import Block, VisionTransformer
    from transformers import ViTConfig, ViTForImageClassification

    if not isinstance(model, VisionTransformer) or model.cls_token is None or model.num_prefix_tokens != 1 or (
            model.global_pool != "token") or any(type(b) is not Block or not isinstance(b.ls1, nn.Identity)
                                                 or not isinstance(b.attn.q_norm, nn.Identity) for b in model.blocks):
        raise UnsupportedModelError("vit_from_timm copies a plain timm ViT (class token, no registers, CLS pooling, "
                                    "no LayerScale or q/k norm); got another model")
    first = model.blocks[0]
    dim = model.embed_dim
    config = ViTConfig(hidden_size=dim, num_hidden_layers=len(model.blocks), num_attention_heads=first.attn.num_heads,
                       intermediate_size=first.mlp.fc1.out_features, image_size=model.patch_embed.img_size[0],
                       patch_size=model.patch_embed.patch_size[0], num_channels=model.patch_embed.proj.in_channels,
                       num_labels=model.num_classes, layer_norm_eps=model.norm.eps, hidden_act="gelu",
                       qkv_bias=first.attn.qkv.bias is not None, attn_implementation=attn_implementation,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = ViTForImageClassification(config)
    state = model.state_dict()
    out = {"vit.embeddings.cls_token": state["cls_token"], "vit.embeddings.position_embeddings": state["pos_embed"],
           "vit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "vit.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "vit.layernorm.weight": state["norm.weight"], "vit.layernorm.bias": state["norm.bias"],
           "classifier.weight": state["head.weight"], "classifier.bias": state["head.bias"]}
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(len(model.blocks)):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                out[f"vit.layers.{i}.{theirs}.{p}"] = state[f"blocks.{i}.{ours}.{p}"]
        for p in ("weight", "bias"):
            fused = state.get(f"blocks.{i}.attn.qkv.{p}")
            if fused is not None:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3)):
                    out[f"vit.layers.{i}.attention.{name}.{p}"] = part
    missing, unexpected = hf.load_state_dict(out, strict=False)
    if unexpected or any(not k.endswith("_proj.bias") for k in missing):
        raise UnsupportedModelError(f"vit_from_timm could not place every tensor: missing {missing}, unexpected "
                                    f"{unexpected}")
    return hf.eval() if not model.training else hf
