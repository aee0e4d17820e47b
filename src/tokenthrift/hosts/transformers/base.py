"""What every transformers 5 vision encoder host shares (:class:`TransformersHost`), written once; each family's file
(:mod:`.vit`, :mod:`.deit`, :mod:`.dinov2`, :mod:`.clip`, :mod:`.siglip`) says what differs, and the table
:data:`tokenthrift.hosts.HOSTS` finds them by class.

A family's host is a record: the modeling module and classes it takes (the encoder, its ``*ForImageClassification``
classes with the attribute holding the encoder, its layer), where the layers and their norms are
(:class:`LayerParts`: also how its attention names its parts), the prefix tokens in the position table, the final
norm, and the methods where families differ in kind: the embedding's parts (:meth:`TransformersHost.embed_parts`),
the embedding the model runs itself at its own grid (:meth:`TransformersHost.own_embedding`), the pooling of a task
class and the encoder's ``pooler_output`` (:meth:`TransformersHost.pool`, :meth:`TransformersHost.pooler_output`,
:meth:`TransformersHost.pool_type`) and the outputs (:meth:`TransformersHost.outputs`).

Shared here: the attention through the implementation the user chose (``config._attn_implementation``: eager, sdpa
or flex, looked up in ``ALL_ATTENTION_FUNCTIONS`` as the model's own attention does), with a method's per-key bias
(log of a token's size) as the additive float mask those implementations take (flash-attn takes no float mask, so
a method that needs the bias refuses it with the implementations that work); the embedding at any grid with the
table resampled as timm resamples it; the MLP step with the hidden states recorded; and the patched class.

A method that changes the tokens swaps the model's class for :meth:`TransformersHost.patched_class`: the method's
``forward_features`` / ``forward_head`` (timm's names, which every method implements through its host) under
:class:`TransformersForward`, the transformers ``forward`` (``pixel_values``, ``labels`` and the loss,
``interpolate_pos_encoding``, ``output_hidden_states`` with the merged lengths, ``return_dict``) rebuilt on them.
Its ``save_pretrained`` writes the plain class: ``architectures`` names the transformers class, so the folder loads
with transformers alone, as the plain model (:mod:`.models` holds the save and load helpers).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ..base import Embedded, Host, as_original_class, class_attention, original_class, patched_class, size_weighted_mean

__all__ = ["EmbedParts", "FLEX_OR_MASK", "LayerParts", "TimmFace", "TransformersForward", "TransformersHost",
           "transformers_families"]

FLEX_OR_MASK = ("eager", "sdpa", "flex_attention")  # the implementations that add a float mask to the logits


@dataclass(frozen=True)
class LayerParts:
    """How a family's layer names its parts: its norms before the attention and before the MLP, and the attention
    module with its head count, scaling, dropout rate and output projection."""

    norms: tuple[str, str]
    attention: str = "attention"
    heads: str = "num_attention_heads"
    scaling: str = "scaling"
    dropout: str = "attention_dropout"
    output: str = "o_proj"


@dataclass
class EmbedParts:
    """A family's embedding taken apart: the patch projection (a Conv2d), the prefix tokens that have an entry in the
    position table ((1, 1, D) each, in order), the table (1, prefix + N, D), tokens without a position inserted after
    the first prefix token (DINOv2's registers, (1, R, D)) and the dropout after it."""

    projection: nn.Module
    prefix: list[torch.Tensor]
    table: torch.Tensor
    registers: torch.Tensor | None = None
    dropout: nn.Module | None = None


class TimmFace(nn.Module):
    """A transformers model (``hf``) behind timm's face (:class:`~tokenthrift.hosts.transformers.TransformersClassifier`
    is one): its host describes the model inside, and a method's class over it keeps timm's forward
    (:meth:`through_host`)."""

    hf: nn.Module

    def through_host(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_head(forward_features(x))``: the forward of a method's class over this one (the transformers
        model's own forward would not run the method)."""
        return self.forward_head(self.forward_features(x))


def _rows() -> list[type[TransformersHost]]:
    """The transformers families of the one table, :data:`tokenthrift.hosts.HOSTS`."""
    from .. import HOSTS  # the table lists this module's subclasses: read when a model is looked up

    return [row for row in HOSTS if issubclass(row, TransformersHost)]


def transformers_families() -> str:
    """The transformers families of the table, in words (for errors)."""
    return ", ".join(row.family for row in _rows())


def _row_of(model: nn.Module) -> type[TransformersHost]:
    row = next((row for row in _rows() if row.accepts(model)), None)
    if row is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers encoder of "
                                    f"{transformers_families()}")
    return row


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
        """transformers' ``save_pretrained``, written as the plain class writes it
        (:func:`tokenthrift.hosts.transformers.save_as_plain`): the folder loads with transformers alone, as the plain
        model, whose weights these are (the method is not recorded; its own ``save_pretrained`` records it). A method
        that added modules to the model (LTM's merge sites) is refused: the plain class would load the folder without
        them and compute another function."""
        added = sorted({type(m).__module__ for m in self.modules()
                        if m is not self and type(m).__module__.startswith("tokenthrift.")})
        if added:
            library = ".".join(added[0].split(".")[:2])
            raise UnsupportedModelError(
                f"{type(self).__name__} holds modules of {library} that the plain "
                f"{original_class(type(self)).__name__} lacks, so a plain from_pretrained of what it saves would "
                f"silently compute another function; save it with {library}.save_pretrained(model, folder) and load "
                f"it with {library}.from_pretrained(folder)")
        with as_original_class(self):  # transformers names the folder's class after the model's
            self.save_pretrained(save_directory, *args, **kwargs)


class TransformersHost(Host):
    """A transformers 5 vision encoder, bare or under its classification head: what every family shares. A family's
    host (a row of :data:`tokenthrift.hosts.HOSTS`) subclasses it with its record (class attributes) and the methods
    where it differs. ``TransformersHost(model)`` gives the host of the model's family."""

    family = ""
    module: ClassVar[str] = ""  # the modeling module, under transformers.models
    encoder_class: ClassVar[str] = ""  # the encoder class (its forward loops over the layers)
    layer_class: ClassVar[str] = ""  # the class of its layers
    tasks: ClassVar[dict[str, str]] = {}  # task class -> attribute holding the encoder
    layers: ClassVar[str] = ""  # dotted path from the encoder to its ModuleList of layers
    parts: ClassVar[LayerParts] = LayerParts(("", ""))  # how a layer names its norms and attention
    prefix_positions: ClassVar[int] = 1  # prefix tokens that have an entry in the position table
    pre_norm: ClassVar[str | None] = None  # the encoder's norm of the embedded tokens, if any
    final_norm: ClassVar[str | None] = None  # the encoder's norm of last_hidden_state (None: kept un-normed)
    end_norms: ClassVar[tuple[str, ...]] = ()  # the encoder's norms after the layers (ReViT's TAL-LN banks them)

    def __new__(cls, model: nn.Module | None = None):
        if cls is TransformersHost and model is not None:  # the shared class on a model: its family's row
            cls = _row_of(model)
        return super().__new__(cls)

    def __init__(self, model: nn.Module):
        attr = type(self)._encoder_attribute(model)
        if attr is None:
            raise UnsupportedModelError(f"{type(model).__name__} is not a {self.family} model")
        self.model = model  # what a method patches: the transformers model, or its TransformersClassifier
        self.task_model = model.hf if isinstance(model, TimmFace) else model
        self.encoder = self.task_model.get_submodule(attr)
        self.config = self.encoder.config

    @classmethod
    def classes(cls) -> dict[str, type]:
        """The family's classes by name ({} while its modeling module is not imported: then no model of it exists)."""
        module = sys.modules.get(f"transformers.models.{cls.module}")
        if module is None:
            return {}
        return {name: getattr(module, name) for name in (cls.encoder_class, *cls.tasks, cls.layer_class)}

    @classmethod
    def _encoder_attribute(cls, model: nn.Module) -> str | None:
        """The attribute holding the encoder in ``model`` ("" if ``model`` is the encoder), None if it is no model of
        this family."""
        if "transformers" not in sys.modules:  # a model of transformers implies it is imported: no import for timm's
            return None
        if isinstance(model, TimmFace):
            model = model.hf
        classes = cls.classes()
        if not classes:
            return None
        if isinstance(model, classes[cls.encoder_class]):
            return ""
        return next((attr for task, attr in cls.tasks.items() if isinstance(model, classes[task])), None)

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        if cls is TransformersHost:  # the shared class: any transformers family of the table
            return any(row.accepts(model) for row in _rows())
        return cls._encoder_attribute(model) is not None

    # ------------------------------------------------------------------ structure
    @property
    def task(self) -> str:
        """The model's class as transformers names it (its own, before a method swapped it)."""
        return original_class(type(self.task_model)).__name__

    @property
    def is_encoder(self) -> bool:
        """The model is the bare encoder (its head: ``pooler_output``), not a task class."""
        return self.task_model is self.encoder

    @property
    def num_prefix_tokens(self) -> int:
        return self.prefix_positions + int(getattr(self.config, "num_register_tokens", 0) or 0)

    @property
    def has_class_token(self) -> bool:
        return self.prefix_positions > 0

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.get_submodule(self.layers)

    def block_norms(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        return getattr(block, self.parts.norms[0]), getattr(block, self.parts.norms[1])

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
        """CLS pooling unless the family says otherwise (its classifier's pooling, SigLIP's MAP head)."""
        return "token"

    def check_blocks(self, method: str) -> None:
        layer = self.classes()[self.layer_class]
        for i, blk in enumerate(self.blocks):
            if type(blk) is not layer:
                raise UnsupportedModelError(f"{method} supports {self.family}'s {layer.__name__}; layer {i} is "
                                            f"{type(blk).__name__}")

    def token_norms(self) -> list[str]:
        """Dotted names (from the model) of the norms of the token stream: ReViT's TAL-LN banks them."""
        prefix = next(name + "." if name else "" for name, module in self.model.named_modules()
                      if module is self.encoder)
        names = [f"{prefix}{self.layers}.{i}.{n}" for i in range(len(self.blocks)) for n in self.parts.norms]
        before = [f"{prefix}{self.pre_norm}"] if self.pre_norm is not None else []
        after = [f"{prefix}{n}" for n in self.end_norms if isinstance(getattr(self.encoder, n, None), nn.LayerNorm)]
        return before + names + after

    # ------------------------------------------------------------------ patching
    @staticmethod
    def patched_class(base: type, mixin: type, name: str) -> type:
        """The method's ``mixin`` over the transformers class, with the transformers forward rebuilt on it (over a
        :class:`TimmFace`, whose forward is timm's, the mixin alone)."""
        if issubclass(base, TimmFace):  # timm's forward, on the method's features and head
            return patched_class(base, mixin, name, namespace={"forward": TimmFace.through_host})
        return patched_class(base, mixin, name, (mixin, TransformersForward, base),
                             {"forward": TransformersForward.forward})

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks_forward(self.embed(images)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, None, pre_logits)

    # ------------------------------------------------------------------ steps
    def follow_input_size(self) -> None:
        """Embed images of any multiple of the patch size, the position table resampled as timm resamples it
        (bicubic, antialias: so a grid gives the same tokens as the same weights in timm) to each input's grid."""
        self.model._tokenthrift_follow = True

    def embed_parts(self) -> EmbedParts:
        """The family's embedding taken apart (what :meth:`embed` runs at any grid)."""
        raise NotImplementedError

    def own_embedding(self, images: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        """The model's own embedding module on ``images`` (its table at its own grid, or resampled the transformers
        way on the user's request)."""
        return self.encoder.embeddings(images, interpolate_pos_encoding=bool(interpolate_pos_encoding))

    def embed(self, images: torch.Tensor, interpolate_pos_encoding: bool = False) -> Embedded:
        parts = self.embed_parts()
        images = images.to(parts.projection.weight.dtype)
        grid = tuple(s // p for s, p in zip(images.shape[-2:], self.patch_size))
        if not self.dynamic:
            x = self.own_embedding(images, interpolate_pos_encoding)
        else:
            from timm.layers import resample_abs_pos_embed

            B, P, table = images.shape[0], self.prefix_positions, parts.table
            x = parts.projection(images).flatten(2).transpose(1, 2)
            if grid != self.grid_size:
                table = resample_abs_pos_embed(table, list(grid), list(self.grid_size), num_prefix_tokens=P)
            x = torch.cat([t.expand(B, -1, -1).to(x.dtype) for t in parts.prefix] + [x], dim=1) + table.to(x.dtype)
            if parts.registers is not None:
                x = torch.cat([x[:, :1], parts.registers.expand(B, -1, -1), x[:, 1:]], dim=1)
            if parts.dropout is not None:
                x = parts.dropout(x)
        if self.pre_norm is not None:
            x = getattr(self.encoder, self.pre_norm)(x)
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

        parts = self.parts
        attn = getattr(block, parts.attention)
        y = getattr(block, parts.norms[0])(x)
        B, T, _ = y.shape
        heads = getattr(attn, parts.heads)
        q, k, v = (proj(y).view(B, T, heads, -1).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        implementation = self.attn_implementation
        scaling = getattr(attn, parts.scaling)
        dropout = getattr(attn, parts.dropout) if attn.training else 0.0
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
        project = getattr(attn, parts.output)
        x = x + self._residual(block, project(out.reshape(B, T, -1)), 1)
        return (x, k.mean(dim=1), row) if class_row else (x, k.mean(dim=1))

    def mlp(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = block.mlp(getattr(block, self.parts.norms[1])(x))
        x = x + self._residual(block, out, 2)
        self._record(x)
        return x

    @staticmethod
    def _residual(block: nn.Module, out: torch.Tensor, step: int) -> torch.Tensor:
        """What a layer adds to its residual stream: its LayerScale (``layer_scale1`` / ``2``), DropPath
        (``drop_path``) and dropout (``dropout``), those it has."""
        scale = getattr(block, f"layer_scale{step}", None)
        if scale is not None:
            out = scale(out)
        for name in ("drop_path", "dropout"):
            drop = getattr(block, name, None)
            if drop is not None:
                out = drop(out)
        return out

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        name = self.final_norm
        return x if name is None else getattr(self.encoder, name)(x)

    # ------------------------------------------------------------------ head and outputs
    @staticmethod
    def _mean(x: torch.Tensor, size: torch.Tensor | None, start: int) -> torch.Tensor:
        """The size-weighted mean of the tokens from ``start`` on."""
        return size_weighted_mean(x[:, start:], None if size is None else size[:, start:])

    def pooler_output(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor | None:
        """The encoder's ``pooler_output`` from its final tokens x (B, T, D) holding ``size`` (B, T, 1) patches each."""
        raise NotImplementedError

    def pool(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        """What the task class's classifier takes from the final tokens, a merged token weighed by its size."""
        raise NotImplementedError

    def head(self, x: torch.Tensor, size: torch.Tensor | None = None, pre_logits: bool = False) -> torch.Tensor:
        """The model's pooling (a merged token counted as the patches it holds) and, unless ``pre_logits``, its
        classifier: a task model's logits, an encoder's ``pooler_output``."""
        if self.is_encoder:
            return self.pooler_output(x, size)
        pooled = self.pool(x, size)
        return pooled if pre_logits else self.task_model.classifier(pooled)

    def outputs(self, x: torch.Tensor, pooled: torch.Tensor | None, labels: torch.Tensor | None,
                hidden: tuple | None, return_dict: bool):
        """The model's transformers output from the final tokens ``x`` and what :meth:`head` gave."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

        m = self.task_model
        if self.is_encoder:
            out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden)
        else:
            loss = None if labels is None else m.loss_function(labels, pooled, m.config)
            out = ImageClassifierOutput(loss=loss, logits=pooled, hidden_states=hidden)
        return out if return_dict else out.to_tuple()
