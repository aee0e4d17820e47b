"""Host for transformers 5 vision encoders: ViT and DeiT (base models, classification, DeiT with its distillation
token), DINOv2 with or without registers, CLIP's and SigLIP's vision towers (SigLIP's attention-pool head), base
models and their ``*ForImageClassification`` classes.

A transformers model is found by its class (:data:`FAMILIES`), never by attribute paths alone. Its attention goes
through the implementation the user chose (``config._attn_implementation``: eager, sdpa or flex, looked up in
``ALL_ATTENTION_FUNCTIONS`` as the model's own attention does), with a method's per-key bias (log of a token's size)
as the additive float mask those implementations take; flash-attn takes no float mask, so a method that needs
the bias refuses it with the implementations that work.

A method that changes the tokens swaps the model's class for :meth:`TransformersHost.patched_class`: the method's
``forward_features`` / ``forward_head`` (timm's names, which every method implements through its host) under
:class:`TransformersForward`, the transformers ``forward`` (``pixel_values``, ``labels`` and the loss,
``interpolate_pos_encoding``, ``output_hidden_states`` with the merged lengths, ``return_dict``) rebuilt on them.
Its ``save_pretrained`` writes the plain class (:func:`save_as_plain`): ``architectures`` names the transformers class,
so the folder loads with transformers alone, as the plain model; a method's own ``save_pretrained`` adds its settings
to config.json (``tokenthrift_<method>``) and its ``from_pretrained`` reapplies them (:func:`load_saved`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, MissingFileError, UnsupportedModelError
from .base import Embedded, Host, class_attention, original_class, patched_class, size_weighted_mean

__all__ = ["FAMILIES", "TransformersClassifier", "TransformersFamily", "TransformersForward", "TransformersHost",
           "load_model", "load_saved", "method_settings", "save_as_plain", "vit_from_timm"]


@dataclass(frozen=True)
class TransformersFamily:
    """One transformers encoder family: where its classes live and how its parts are named."""

    name: str
    module: str  # the modeling module, under transformers.models
    base: str  # the encoder class (its forward loops over the layers)
    layer: str  # the class of its layers
    tasks: tuple[tuple[str, str], ...]  # (task class, attribute holding the encoder)
    layers: str  # dotted path from the encoder to its ModuleList of layers
    norms: tuple[str, str]  # the layer's norms before attention and before the MLP
    prefix_positions: int  # prefix tokens that have an entry in the position table
    final_norm: str | None  # the encoder's norm of last_hidden_state (None: CLIP keeps it un-normed)

    def classes(self) -> dict[str, type]:
        module = sys.modules.get(f"transformers.models.{self.module}")
        if module is None:  # not imported yet: then no model of this family exists
            return {}
        return {name: getattr(module, name) for name in (self.base, *(t for t, _ in self.tasks), self.layer)}


FAMILIES: tuple[TransformersFamily, ...] = (
    TransformersFamily("ViT", "vit.modeling_vit", "ViTModel", "ViTLayer", (("ViTForImageClassification", "vit"),),
                       "layers", ("layernorm_before", "layernorm_after"), 1, "layernorm"),
    TransformersFamily("DeiT", "deit.modeling_deit", "DeiTModel", "DeiTLayer",
                       (("DeiTForImageClassification", "deit"), ("DeiTForImageClassificationWithTeacher", "deit")),
                       "layers", ("layernorm_before", "layernorm_after"), 2, "layernorm"),
    TransformersFamily("DINOv2", "dinov2.modeling_dinov2", "Dinov2Model", "Dinov2Layer",
                       (("Dinov2ForImageClassification", "dinov2"),), "encoder.layer", ("norm1", "norm2"), 1,
                       "layernorm"),
    TransformersFamily("DINOv2 with registers", "dinov2_with_registers.modeling_dinov2_with_registers",
                       "Dinov2WithRegistersModel", "Dinov2WithRegistersLayer",
                       (("Dinov2WithRegistersForImageClassification", "dinov2_with_registers"),), "encoder.layer",
                       ("norm1", "norm2"), 1, "layernorm"),
    TransformersFamily("CLIP vision", "clip.modeling_clip", "CLIPVisionModel", "CLIPEncoderLayer",
                       (("CLIPForImageClassification", "vision_model"),), "encoder.layers",
                       ("layer_norm1", "layer_norm2"), 1, None),
    TransformersFamily("SigLIP vision", "siglip.modeling_siglip", "SiglipVisionModel", "SiglipEncoderLayer",
                       (("SiglipForImageClassification", "vision_model"),), "encoder.layers",
                       ("layer_norm1", "layer_norm2"), 0, "post_layernorm"),
)
FLEX_OR_MASK = ("eager", "sdpa", "flex_attention")  # the implementations that add a float mask to the logits


class TransformersClassifier(nn.Module):
    """A transformers image classifier (``hf``) with timm's face, what tokenthrift's engine trains and evaluates:
    ``forward(images)`` returns the logits tensor, ``forward_features`` / ``forward_head`` split it as timm does,
    ``num_classes``, ``pretrained_cfg`` (its input size) and ``input_size``. Its state_dict keys are the
    transformers model's under ``hf.``; every method takes it as it takes the transformers model."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        found = _family(hf)
        if found is None or found[1] is None:
            raise UnsupportedModelError("tokenthrift trains a transformers image classifier (a "
                                        f"*ForImageClassification class of {', '.join(f.name for f in FAMILIES)}); got {type(hf).__name__}")
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

    def through_host(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_head(forward_features(x))``: the forward of a method's class over this one (the transformers
        model's own forward would not run the method)."""
        return self.forward_head(self.forward_features(x))

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
    cls = type(model)
    settings = settings or {}
    for key, value in settings.items():
        setattr(model.config, key, value)
    model.__class__ = original_class(cls)  # transformers names the folder's class after the model's
    try:
        model.save_pretrained(folder, *args, **kwargs)
    finally:
        model.__class__ = cls
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


def _family(model: nn.Module) -> tuple[TransformersFamily, str | None] | None:
    """(family, attribute of the encoder or None if ``model`` is the encoder) for a transformers model."""
    if "transformers" not in sys.modules:  # a model of transformers implies it is imported: no import for timm's
        return None
    if isinstance(model, TransformersClassifier):
        return _family(model.hf)
    for family in FAMILIES:
        classes = family.classes()
        if not classes:
            continue
        if isinstance(model, classes[family.base]):
            return family, None
        for task, attr in family.tasks:
            if isinstance(model, classes[task]):
                return family, attr
    return None


_FLEX = []  # flex_attention compiled once (uncompiled it runs its slow reference path)


def _flex_biased(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                 dropout: float) -> torch.Tensor:
    """flex_attention with a per-key bias (B, T) in its score_mod; (B, T, H, d) as transformers' interfaces return.
    (transformers' own flex interface takes the bias only as a full (B, 1, T, T) float mask, which aborts the
    process on the CPU with torch 2.14; a score_mod that reads the bias row does not.)"""
    if dropout:
        raise UnsupportedModelError("flex_attention has no attention dropout; train with attention_dropout=0 or "
                                    "the sdpa implementation")
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    bias = bias.to(q.dtype)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, kv_idx]

    return _FLEX[0](q, k, v, score_mod=score_mod, scale=scale).transpose(1, 2)


class TransformersForward:
    """The transformers ``forward`` of a model whose class a method swapped, built on the method's
    ``forward_features`` and ``forward_head``: outputs as the model's own (``ImageClassifierOutput`` with the loss
    for ``labels``, or ``BaseModelOutputWithPooling``), ``return_dict=False`` as tuples, ``output_hidden_states``
    with the embedding and every layer's output at the lengths the method left (merged tokens: shorter)."""

    _tokenthrift_hidden: list | None = None  # the hidden states being recorded in this forward (host.mlp appends)

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                interpolate_pos_encoding: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, attention_mask: torch.Tensor | None = None,
                output_attentions: bool | None = None, **kwargs):
        host = TransformersHost(self)
        if attention_mask is not None or kwargs.get("bool_masked_pos") is not None:
            raise UnsupportedModelError(f"{type(self).__name__} changes the tokens inside the model, so a mask over "
                                        "the input tokens (attention_mask, bool_masked_pos) no longer fits them; run "
                                        "it without one")
        unknown = sorted(k for k, v in kwargs.items() if k != "bool_masked_pos" and v is not None)
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward() got arguments it does not take: {', '.join(unknown)}")
        if output_attentions or getattr(self.config, "output_attentions", False):
            raise UnsupportedModelError(f"{type(self).__name__} runs the attention through its host, which does not "
                                        "return attention maps; call it with output_attentions=False")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        # a selection (an index or indices, as LLaVA's get_image_features asks) records them all: indexable alike
        record = output_hidden_states if isinstance(output_hidden_states, bool) else True
        if record:
            self._tokenthrift_hidden = []
        try:
            inputs = {"interpolate_pos_encoding": True} if interpolate_pos_encoding else {}
            x = self.forward_features(pixel_values, **inputs)
            pooled = self.forward_head(x)
            hidden = tuple(self._tokenthrift_hidden) if record else None
        finally:
            if record:
                del self._tokenthrift_hidden
        return host.outputs(x, pooled, labels, hidden, getattr(self.config, "return_dict", True) if return_dict is None
                            else return_dict)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling and classifier of a method that keeps every token (its tokens broadcast back)."""
        return TransformersHost(self).head(x, None, pre_logits)

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        """transformers' ``save_pretrained``, written as the plain class writes it (:func:`save_as_plain`): the
        folder loads with transformers alone, as the plain model, whose weights these are (the method is not
        recorded; its own ``save_pretrained`` records it). A method that added modules to the model (LTM's merge
        sites) is refused: the plain class would load the folder without them and compute another function."""
        added = sorted({type(m).__module__ for m in self.modules()
                        if m is not self and type(m).__module__.startswith("tokenthrift.")})
        if added:
            library = ".".join(added[0].split(".")[:2])
            raise UnsupportedModelError(
                f"{type(self).__name__} holds modules of {library} that the plain "
                f"{original_class(type(self)).__name__} lacks, so a plain from_pretrained of what it saves would "
                f"silently compute another function; save it with {library}.save_pretrained(model, folder) and load "
                f"it with {library}.from_pretrained(folder)")
        save_as_plain(self, save_directory, *args, **kwargs)


class TransformersHost(Host):
    """A transformers 5 vision encoder (:data:`FAMILIES`), bare or under its classification head."""

    family = "transformers ViT / DeiT / DINOv2 / CLIP vision / SigLIP vision"

    def __init__(self, model: nn.Module):
        found = _family(model)
        if found is None:
            raise UnsupportedModelError(f"{type(model).__name__} is not a transformers encoder of "
                                        f"{', '.join(f.name for f in FAMILIES)}")
        self.model = model  # what a method patches: the transformers model, or its TransformersClassifier
        self.task_model = model.hf if isinstance(model, TransformersClassifier) else model
        self.info, attr = found
        self.encoder = self.task_model if attr is None else getattr(self.task_model, attr)
        self.config = self.encoder.config

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return _family(model) is not None

    # ------------------------------------------------------------------ structure
    @property
    def task(self) -> str:
        """The model's class as transformers names it (its own, before a method swapped it)."""
        return original_class(type(self.task_model)).__name__

    @property
    def num_prefix_tokens(self) -> int:
        return self.info.prefix_positions + int(getattr(self.config, "num_register_tokens", 0) or 0)

    @property
    def has_class_token(self) -> bool:
        return self.info.prefix_positions > 0

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.get_submodule(self.info.layers)

    def block_norms(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        return getattr(block, self.info.norms[0]), getattr(block, self.info.norms[1])

    @property
    def dynamic(self) -> bool:
        return bool(getattr(self.model, "_tokenthrift_follow", False))

    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.config.patch_size
        return (p, p) if isinstance(p, int) else tuple(p)

    @property
    def image_size(self) -> tuple[int, int]:
        s = self.config.image_size
        return (s, s) if isinstance(s, int) else tuple(s)

    @property
    def in_chans(self) -> int:
        return int(self.config.num_channels)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation or "eager"

    def check_attention(self, method: str) -> None:
        implementation = self.attn_implementation
        if implementation not in FLEX_OR_MASK:
            raise UnsupportedModelError(
                f"{method} adds log(token size) to the attention logits (proportional attention), which the "
                f"{implementation!r} attention cannot take (it has no float mask); use one of "
                f"{', '.join(FLEX_OR_MASK)}: model.set_attn_implementation('sdpa')")

    def pool_type(self) -> str:
        task = self.task
        if task.endswith("WithTeacher") or task in ("ViTForImageClassification", "DeiTForImageClassification"):
            return "token"
        if task == "SiglipVisionModel":
            return "map" if self.encoder.use_head else "token"
        return "avg" if "ForImageClassification" in task else "token"  # DINOv2: CLS and mean; CLIP, SigLIP: mean

    def check_blocks(self, method: str) -> None:
        layer = self.info.classes()[self.info.layer]
        for i, blk in enumerate(self.blocks):
            if type(blk) is not layer:
                raise UnsupportedModelError(f"{method} supports {self.info.name}'s {layer.__name__}; layer {i} is "
                                            f"{type(blk).__name__}")

    def token_norms(self) -> list[str]:
        """Dotted names (from the model) of the norms of the token stream: ReViT's TAL-LN banks them."""
        prefix = next(name + "." if name else "" for name, module in self.model.named_modules()
                      if module is self.encoder)
        names = [f"{prefix}{self.info.layers}.{i}.{n}" for i in range(len(self.blocks)) for n in self.info.norms]
        before = [f"{prefix}pre_layrnorm"] if hasattr(self.encoder, "pre_layrnorm") else []
        after = [f"{prefix}{n}" for n in ("layernorm", "post_layernorm") if isinstance(
            getattr(self.encoder, n, None), nn.LayerNorm)]
        return before + names + after

    # ------------------------------------------------------------------ patching
    @staticmethod
    def patched_class(base: type, mixin: type, name: str) -> type:
        """The method's ``mixin`` over the transformers class, with the transformers forward rebuilt on it (over a
        :class:`TransformersClassifier`, whose forward is timm's, the mixin alone)."""
        if issubclass(base, TransformersClassifier):  # timm's forward, on the method's features and head
            return patched_class(base, mixin, name, namespace={"forward": TransformersClassifier.through_host})
        return patched_class(base, mixin, name, (mixin, TransformersForward, base),
                             {"forward": TransformersForward.forward})

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images).x
        for block in self.blocks:
            x = self.run_block(block, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, None, pre_logits)

    # ------------------------------------------------------------------ steps
    def follow_input_size(self) -> None:
        """Embed images of any multiple of the patch size, the position table resampled as timm resamples it
        (bicubic, antialias: so a grid gives the same tokens as the same weights in timm) to each input's grid."""
        self.model._tokenthrift_follow = True

    def _embed_parts(self) -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
        """(patch projection, prefix tokens (1, 1, D) each, position table (1, prefix_positions + N, D))."""
        emb = self.encoder.embeddings
        if hasattr(emb, "patch_embeddings"):  # ViT, DeiT, DINOv2
            proj = emb.patch_embeddings.projection
            prefix = [emb.cls_token] + ([emb.distillation_token] if hasattr(emb, "distillation_token") else [])
            return proj, prefix, emb.position_embeddings
        table = emb.position_embedding.weight.unsqueeze(0)  # CLIP, SigLIP: an nn.Embedding
        prefix = [emb.class_embedding.view(1, 1, -1)] if hasattr(emb, "class_embedding") else []
        return emb.patch_embedding, prefix, table

    def embed(self, images: torch.Tensor, interpolate_pos_encoding: bool = False) -> Embedded:
        emb = self.encoder.embeddings
        proj, prefix, table = self._embed_parts()
        images = images.to(proj.weight.dtype)
        grid = tuple(s // p for s, p in zip(images.shape[-2:], self.patch_size))
        if not self.dynamic:
            if self.info.module.startswith("dinov2"):
                x = emb(images)  # DINOv2 resamples its table to every size itself
            else:
                x = emb(images, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        else:
            from timm.layers import resample_abs_pos_embed

            B, P = images.shape[0], self.info.prefix_positions
            x = proj(images).flatten(2).transpose(1, 2)
            if grid != self.grid_size:
                table = resample_abs_pos_embed(table, list(grid), list(self.grid_size), num_prefix_tokens=P)
            x = torch.cat([t.expand(B, -1, -1).to(x.dtype) for t in prefix] + [x], dim=1) + table.to(x.dtype)
            registers = getattr(emb, "register_tokens", None)
            if registers is not None:
                x = torch.cat([x[:, :1], registers.expand(B, -1, -1), x[:, 1:]], dim=1)
            x = getattr(emb, "dropout", nn.Identity())(x)
        x = getattr(self.encoder, "pre_layrnorm", nn.Identity())(x)
        self._record(x)
        return Embedded(x, grid)

    def embed_inputs(self, x: Any, inputs: dict) -> Embedded:
        extra = set(inputs) - {"interpolate_pos_encoding"}
        if extra:
            raise UnsupportedModelError(f"{type(self.model).__name__} takes pixel_values (and "
                                        f"interpolate_pos_encoding); got {', '.join(sorted(extra))}")
        return self.embed(x, inputs.get("interpolate_pos_encoding", False))

    def run_block(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(block, self.attention(block, x)[0])

    def _record(self, x: torch.Tensor) -> None:
        hidden = getattr(self.model, "_tokenthrift_hidden", None)
        if hidden is not None:
            hidden.append(x)

    def attention(self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None,
                  rope: torch.Tensor | None = None, kernel: str = "auto", class_row: bool = False
                  ) -> tuple[torch.Tensor, ...]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attn = getattr(block, "attention", None) or block.self_attn
        y = getattr(block, self.info.norms[0])(x)
        B, T, _ = y.shape
        heads = getattr(attn, "num_attention_heads", None) or attn.num_heads
        q, k, v = (proj(y).view(B, T, heads, -1).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        implementation = self.attn_implementation
        scaling = getattr(attn, "scaling", None) or attn.scale
        dropout = getattr(attn, "attention_dropout", None)
        dropout = (attn.dropout if dropout is None else dropout) if attn.training else 0.0
        row = class_attention(q, k, bias, scaling) if class_row else None
        if bias is not None:
            self.check_attention("this method")
        if bias is not None and implementation == "flex_attention":
            out = _flex_biased(q, k, v, bias, scaling, dropout)
        else:
            mask = None if bias is None else bias.to(q.dtype).view(B, 1, 1, T)
            eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward")
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
            out, _ = interface(attn, q, k, v, mask, dropout=dropout, scaling=scaling)
        project = getattr(attn, "o_proj", None) or attn.out_proj
        x = x + self._residual(block, project(out.reshape(B, T, -1)), 1)
        return (x, k.mean(dim=1), row) if class_row else (x, k.mean(dim=1))

    def mlp(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = block.mlp(getattr(block, self.info.norms[1])(x))
        x = x + self._residual(block, out, 2)
        self._record(x)
        return x

    @staticmethod
    def _residual(block: nn.Module, out: torch.Tensor, step: int) -> torch.Tensor:
        """What a layer adds to its residual stream: LayerScale and DropPath (DINOv2), dropout (ViT, DeiT)."""
        scale = getattr(block, f"layer_scale{step}", None)
        if scale is not None:
            out = scale(out)
        for name in ("drop_path", "dropout"):
            drop = getattr(block, name, None)
            if drop is not None:
                out = drop(out)
        return out

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        name = self.info.final_norm
        return x if name is None else getattr(self.encoder, name)(x)

    # ------------------------------------------------------------------ head and outputs
    @staticmethod
    def _mean(x: torch.Tensor, size: torch.Tensor | None, start: int) -> torch.Tensor:
        """The size-weighted mean of the tokens from ``start`` on."""
        return size_weighted_mean(x[:, start:], None if size is None else size[:, start:])

    def head(self, x: torch.Tensor, size: torch.Tensor | None = None, pre_logits: bool = False) -> torch.Tensor:
        """The model's pooling (a merged token counted as the patches it holds) and, unless ``pre_logits``, its
        classifier: a task model's logits, an encoder's ``pooler_output`` (None for ViT / DeiT built without
        a pooler)."""
        task, m, enc = self.task, self.task_model, self.encoder
        P = self.num_prefix_tokens
        if m is enc:  # an encoder: its pooler_output
            if self.info.name == "SigLIP vision":
                return self._map_pool(x, size) if enc.use_head else None
            if self.info.name == "CLIP vision":
                return enc.post_layernorm(x[:, 0])
            if self.info.name in ("ViT", "DeiT"):
                return None if enc.pooler is None else enc.pooler(x)
            return x[:, 0]  # DINOv2
        if task == "DeiTForImageClassificationWithTeacher":
            if pre_logits:
                return x[:, :2]
            return (m.cls_classifier(x[:, 0]) + m.distillation_classifier(x[:, 1])) / 2
        if task in ("ViTForImageClassification", "DeiTForImageClassification"):
            pooled = x[:, 0]
        elif self.info.name.startswith("DINOv2"):
            pooled = torch.cat([x[:, 0], self._mean(x, size, P)], dim=1)
        elif self.info.name == "CLIP vision":
            pooled = self._mean(x, size, 1)
        else:  # SiglipForImageClassification: the mean of every token
            pooled = self._mean(x, size, 0)
        return pooled if pre_logits else m.classifier(pooled)

    def _map_pool(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        """SigLIP's attention-pool head with log(size) added to its keys' logits."""
        head = self.encoder.head
        if size is None:
            return head(x)
        B, T, _ = x.shape
        bias = size.log().to(x.dtype).view(B, 1, T).repeat_interleave(head.attention.num_heads, dim=0)
        pooled = head.attention(head.probe.repeat(B, 1, 1), x, x, attn_mask=bias, need_weights=False)[0]
        pooled = pooled + head.mlp(head.layernorm(pooled))
        return pooled[:, 0]

    def outputs(self, x: torch.Tensor, pooled: torch.Tensor | None, labels: torch.Tensor | None,
                hidden: tuple | None, return_dict: bool):
        """The model's transformers output from the final tokens ``x`` and what :meth:`head` gave."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

        m = self.task_model
        if m is self.encoder:
            out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden)
        elif self.task == "DeiTForImageClassificationWithTeacher":
            from transformers.models.deit.modeling_deit import DeiTForImageClassificationWithTeacherOutput

            out = DeiTForImageClassificationWithTeacherOutput(
                logits=pooled, cls_logits=m.cls_classifier(x[:, 0]),
                distillation_logits=m.distillation_classifier(x[:, 1]), hidden_states=hidden)
        else:
            loss = None if labels is None else m.loss_function(labels, pooled, m.config)
            out = ImageClassifierOutput(loss=loss, logits=pooled, hidden_states=hidden)
        return out if return_dict else out.to_tuple()


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
