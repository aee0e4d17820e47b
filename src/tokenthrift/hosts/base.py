"""What a token method needs to know about a ViT-like encoder, and nothing more: :class:`Host`.

A host wraps one model of its family (timm ``VisionTransformer``, timm ``Eva``, ...) and describes it to the
methods: its prefix tokens and patch grid; the embedding that turns images into tokens; each block as an
attention step and an MLP step around the residual stream, the attention taking an additive per-key bias
(proportional attention: log of a token's size) in whatever kernel the model uses and returning the keys
averaged over heads (ToMe's matching metric); positions for any set of tokens (nothing to do for an absolute
table added before the blocks; rotary angles recomputed at any, also fractional, position); the final norm; and
pooling that counts a merged token as the patches it holds (CLS, size-weighted average, attention-pool head with
log(size) on its keys). A method loops over the blocks with these steps and changes the tokens between them;
it never names a family's classes, only the capabilities a host declares (:class:`Host`: ``rotary``, ``sized`` /
``dynamic``, ``has_class_token``, ``padded``, ``reducible`` and the ``check_*`` refusals). A new encoder family is one
host file and one row in the table :data:`tokenthrift.hosts.HOSTS`.

Shapes: B batch, P prefix tokens, N patch tokens, T = P + N tokens, D width. Token coordinates are (row,
column) in patch units of the patch grid of the forward (row-major order); a merged token's coordinate is the
size-weighted mean of its patches'.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError, UnsupportedModelError
from ..tokens import size_biased_attention

__all__ = ["Embedded", "Host", "POOLS", "as_original_class", "attention_pool", "biased_attention", "class_attention",
           "grid_coords", "original_class", "patched_class", "size_weighted_mean"]

POOLS = ("token", "avg", "map")  # the pooling a size can weigh: CLS token, average, attention-pool head


@dataclass
class Embedded:
    """What :meth:`Host.embed` gives a method: the tokens (B, P + N, D) before the first block, the patch grid
    (h, w) of this forward (None for a padded batch of several grids), the host's positional state for that grid
    (a rotary table, or None), and for a padded batch the patches' validity (B, N) (None: every token is real)."""

    x: torch.Tensor
    grid: tuple[int, int] | None
    table: Any = None
    valid: torch.Tensor | None = None
    frames: int | None = None  # a clip's frame count (a video host's tokens hold every frame's patches)


_PATCHED: dict[tuple, type] = {}  # (mixin, bases) -> the patched class: one per pair, so that types compare equal


def patched_class(base: type, mixin: type, name: str, bases: tuple | None = None, namespace: dict | None = None
                  ) -> type:
    """A method's class for a model of class ``base``: ``mixin`` (the method's forward) over ``base`` (or over
    ``bases``, with ``namespace``'s attributes, for a host whose model needs more), named ``name``; its
    :func:`original_class` is ``base``."""
    bases = (mixin, base) if bases is None else bases
    key = (mixin, bases)
    if key not in _PATCHED:
        body = {"__module__": mixin.__module__, "__qualname__": name, "__tokenthrift_base__": base, **(namespace or {})}
        _PATCHED[key] = type(name, bases, body)
    return _PATCHED[key]


def original_class(cls: type) -> type:
    """The model class a method's :func:`patched_class` was built on (``cls`` itself if it is no such class)."""
    return getattr(cls, "__tokenthrift_base__", cls)


@contextmanager
def as_original_class(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as its :func:`original_class` inside the block (a library that names what it writes after the
    model's class, transformers' ``save_pretrained``, writes the plain class); its class is restored on exit."""
    cls = type(model)
    model.__class__ = original_class(cls)
    try:
        yield model
    finally:
        model.__class__ = cls


def grid_coords(grid: tuple[int, int], batch: int, device: torch.device | str) -> torch.Tensor:
    """(B, h·w, 2) float coordinates (row, column) of the patches of a ``grid`` in row-major order."""
    h, w = grid
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    return torch.stack([rows, cols], dim=-1).expand(batch, h * w, 2)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
                     fused: bool, drop: nn.Module, kernel: str = "auto") -> torch.Tensor:
    """softmax(scale · q kᵀ + bias) v for q, k, v (B, H, T, d) and a per-key bias (B, T) or None, in the
    kernel the model uses: the fused ``scaled_dot_product_attention`` at its default scale (the bias as an
    additive float mask, or, with ``kernel="fold"`` (``"auto"`` on CUDA), folded into one more q/k channel so
    that the flash kernels stay in use: :func:`tokenthrift.tokens.size_biased_attention`) or the explicit
    product. ``drop``: the attention's dropout module (its rate applies in training). Returns (B, H, T, d)."""
    B, _, T, _ = q.shape
    dropout = drop.p if drop.training else 0.0
    if fused and bias is not None and (kernel == "fold" or (kernel == "auto" and q.is_cuda)):
        return size_biased_attention(q, k, v, bias, scale, dropout)
    mask = None if bias is None else bias.to(q.dtype).view(B, 1, 1, T)
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    logits = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask
    return drop(logits.softmax(dim=-1)) @ v


def class_attention(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The attention the first token (the class token) pays to every token, averaged over heads: (B, T) from q, k
    (B, H, T, d) and a per-key bias (B, T) or None. One query row written out, so that the other rows stay in
    the model's fused kernel (which returns no weights)."""
    logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)  # (B, H, 1, T)
    if bias is not None:
        logits = logits + bias.float()[:, None, None, :]
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """The mean of tokens x (B, T, D) with each counted as the ``size`` (B, T, 1) patches it holds (None: one each)."""
    return x.mean(dim=1) if size is None else (x * size).sum(1) / size.sum(1)


def attention_pool(pool: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """timm's ``AttentionPoolLatent`` (a MAP head: learned latent queries attend over the tokens) on x (B, T, D) with
    a per-key ``bias`` (B, T) added to its attention logits, written out from its modules (older timm's forward
    takes no mask)."""
    B, T, C = x.shape
    if getattr(pool, "pos_embed", None) is not None:
        raise UnsupportedModelError("an attention-pool head with its own position table has a fixed token count; "
                                    "merged tokens cannot be pooled by it")
    q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
    k, v = pool.kv(x).reshape(B, T, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = getattr(pool, "q_norm", nn.Identity())(q), getattr(pool, "k_norm", nn.Identity())(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).view(B, 1, 1, T))
    out = pool.proj_drop(pool.proj(out.transpose(1, 2).reshape(B, pool.latent_len, -1)))
    if getattr(pool, "mlp", None) is not None:
        out = out + pool.mlp(pool.norm(out))
    if pool.pool == "token":
        return out[:, 0]
    return out.mean(1) if pool.pool == "avg" else out


class Host:
    """The interface between a token method and one encoder family. Subclasses implement the family's steps;
    :meth:`accepts` says which models they take. ``model`` is the wrapped model (its class may have been
    swapped by a method; the host reads the original parts).

    What a method may require is declared here, with the default most families have; a family's host overrides what
    differs, and a method asks for these, never for a family:

    - ``rotary``: positions travel with the tokens (rotary angles recomputed at any position, :meth:`rope`), not in
      the features; :meth:`check_positions` refuses a method that moves tokens where they cannot follow.
    - ``has_class_token``: the first prefix token summarises the others (EViT ranks tokens by its attention).
    - ``sized`` / ``dynamic``: the model is built for one image size (a fixed grid) / its grid follows the input's
      size now (:meth:`follow_input_size` switches to it).
    - ``padded``: the model takes a padded batch of several grids (``Embedded.valid``: a NaFlexViT's).
    - ``reducible``: a method may drop, merge or select tokens between the blocks; :meth:`check_tokens` refuses it
      where the blocks need the embedding's token layout (the TimeSformer's frames).
    - :meth:`check_blocks` (the blocks are the kind the host's steps run), :meth:`check_pool` (the pooling can weigh a
      merged token by its size), :meth:`check_attention` (the attention takes a per-key bias).
    """

    family: ClassVar[str] = ""  # the family in words (errors list the table's families)
    rotary: ClassVar[bool] = False  # positions travel with the tokens (rotary angles), not in the features
    sized: ClassVar[bool] = True  # the model is built for one image size (a NaFlexViT is not: any grid is its own)
    padded: ClassVar[bool] = False  # takes a padded batch of several grids (Embedded.valid)
    reducible: ClassVar[bool] = True  # its blocks take any tokens, so a method may change them between blocks
    inputs: ClassVar[str] = "images"  # what the model takes, in words: images (B, C, H, W), or clips

    def __init__(self, model: nn.Module):
        self.model = model
        # the family's own head, kept before a method swaps the model's class for one that overrides it
        self._forward_head = type(model).forward_head

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """Whether this host describes ``model`` (a model of its family, possibly under a method's class)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ structure
    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def has_class_token(self) -> bool:
        """The first prefix token is a class token (the tokens' summary that attends to every token)."""
        return getattr(self.model, "cls_token", None) is not None

    @property
    def blocks(self) -> nn.Module:
        return self.model.blocks

    def block_norms(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The block's norm before its attention and before its MLP (what they see: the tokens each step runs)."""
        return block.norm1, block.norm2

    @property
    def dynamic(self) -> bool:
        """The patch grid follows the input size (timm's ``dynamic_img_size``)."""
        return bool(getattr(self.model, "dynamic_img_size", False))

    @property
    def grid_size(self) -> tuple[int, int]:
        """The nominal patch grid (the one of the model's image size)."""
        return tuple(int(s) for s in self.model.patch_embed.grid_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.model.patch_embed.patch_size)

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def image_size(self) -> tuple[int, int]:
        """The model's image size (H, W)."""
        pe = self.model.patch_embed
        if getattr(pe, "img_size", None) is None:
            raise UnsupportedModelError(f"{type(self.model).__name__} has no fixed image size (its patch embedding "
                                        f"{type(pe).__name__} takes any)")
        return tuple(int(s) for s in pe.img_size)

    @property
    def in_chans(self) -> int:
        return int(self.model.patch_embed.proj.in_channels)

    @property
    def frame_dims(self) -> tuple[int, ...]:
        """The input's sizes between its channels and its image (H, W): () for images (B, C, H, W); (T,) for clips
        (B, C, T, H, W), T the model's default frame count."""
        return ()

    def token_norms(self) -> list[str]:
        """Dotted names (from the model) of the norms of the token stream (ReViT's TAL-LN banks them), all of width
        D, where they are not ``nn.Identity``: ``norm_pre``, every block's ``norm1`` / ``norm2``, ``norm`` and
        ``fc_norm`` (DeiT has 25). Norms inside the attention or the MLP (q/k norm, scale norms) and an
        attention-pool head are not among them."""
        m = self.model
        for blk in self.blocks:
            if not all(isinstance(getattr(blk, n, None), nn.Module) for n in ("norm1", "norm2")):
                raise InvalidArgumentError(
                    f"TAL-LN needs blocks with norm1/norm2 (timm Block, ResPostBlock); {type(blk).__name__} has none. "
                    "Convert with tal_ln=False to share the norms.")
        blocks = [f"blocks.{i}.{n}" for i, blk in enumerate(self.blocks) for n in ("norm1", "norm2")
                  if not isinstance(getattr(blk, n), nn.Identity)]
        present = [n for n in ("norm_pre", "norm", "fc_norm") if isinstance(getattr(m, n, None), nn.Module)
                   and not isinstance(getattr(m, n), nn.Identity)]
        return [n for n in present if n == "norm_pre"] + blocks + [n for n in present if n != "norm_pre"]

    @staticmethod
    def patched_class(base: type, mixin: type, name: str) -> type:
        """The class a method swaps a model of class ``base`` to: its ``mixin`` (``forward_features`` /
        ``forward_head`` through the host, timm's names) over ``base`` (:func:`patched_class`)."""
        return patched_class(base, mixin, name)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The model's own tokens after the final norm (a timm model's ``forward_features``)."""
        return self.model.forward_features(images)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The model's own head on the tokens of :meth:`forward_features`."""
        return self.model.forward_head(x, pre_logits=pre_logits)

    def pool_type(self) -> str:
        """How the model pools its tokens for the head: one of :data:`POOLS`, or another timm name."""
        return "map" if getattr(self.model, "attn_pool", None) is not None else self.model.global_pool

    def check_blocks(self, method: str) -> None:
        """Refuse a model whose blocks are not the kind this host's :meth:`attention` and :meth:`mlp` steps run (a
        method that steps through the blocks calls it at ``apply``)."""
        raise NotImplementedError(f"{type(self).__name__} does not say which blocks its steps run (Host.check_blocks)")

    def check_positions(self, method: str) -> None:
        """Refuse a method that moves tokens where the model's positions cannot follow them. Nothing to check for
        positions added before the blocks (an absolute table); a rotary host says whether its angles can be
        recomputed at other positions."""
        if self.rotary:
            raise NotImplementedError(f"{type(self).__name__} has rotary positions and does not say whether they can "
                                      "move (Host.check_positions)")

    def check_tokens(self, method: str) -> None:
        """Refuse a method that changes the tokens between blocks (drops, merges or selects them) where the blocks
        need the token layout the embedding made (``reducible`` False)."""
        if not self.reducible:
            raise UnsupportedModelError(
                f"{method} changes the tokens between blocks, and the blocks of a {self.family} model need every "
                f"token of the layout its embedding makes; got {type(self.model).__name__}. Shorten its inputs with "
                "ReViT (tokenthrift.revit.convert), which changes the grid instead")

    def check_attention(self, method: str) -> None:
        """Refuse a model whose attention cannot take a per-key bias (proportional attention); every timm kernel
        takes one."""

    def check_pool(self, method: str) -> None:
        pool = self.pool_type()
        if pool not in POOLS:
            raise UnsupportedModelError(f"{method} pools merged tokens by CLS token, size-weighted average or an "
                                        f"attention-pool head weighted by size; this model pools with {pool!r}: "
                                        "build it with global_pool='avg' or 'token'")

    # ------------------------------------------------------------------ steps
    def embed(self, images: torch.Tensor) -> Embedded:
        """Images -> the tokens entering the first block (patch embedding, positions, prefix tokens, pre-norm)."""
        raise NotImplementedError

    def embed_inputs(self, x: Any, inputs: dict) -> Embedded:
        """:meth:`embed` of what the model's ``forward_features`` was given: ``x`` and keyword ``inputs`` (none
        but for a host whose model takes more, a NaFlexViT's padded batch)."""
        if inputs:
            raise UnsupportedModelError(f"{type(self.model).__name__} takes images; got {', '.join(inputs)}")
        return self.embed(x)

    def features(self, x: torch.Tensor, embedded: Embedded) -> Any:
        """What ``forward_features`` returns for the normed tokens ``x`` (the tokens themselves, or the structure
        the model's own ``forward`` hands to its head)."""
        return x

    def head_input(self, x: Any, inputs: dict) -> torch.Tensor:
        """The tokens among what the model's ``forward`` hands to ``forward_head``."""
        return x

    def rope(self, embedded: Embedded, coords: torch.Tensor | None, block: int) -> torch.Tensor | None:
        """The rotary embedding block ``block`` applies to patch tokens at ``coords`` (B, N, 2) (None: the
        unmerged grid of ``embedded``); None for a host without rotary positions."""
        return None

    def follow_input_size(self) -> None:
        """Switch the model to timm's ``dynamic_img_size`` mode, exactly what timm.create_model(...,
        dynamic_img_size=True) builds: the patch embedding accepts any multiple of the patch size and emits NHWC, and
        the positions (the absolute table resampled, bicubic; rotary angles) follow the input's grid. A ReViT runs
        every grid this way."""
        from timm.layers import Format

        m = self.model
        if m.dynamic_img_size:
            return
        pe = m.patch_embed
        m.dynamic_img_size = True
        pe.strict_img_size, pe.flatten, pe.output_fmt = False, False, Format.NHWC

    def block_args(self, embedded: Embedded, block: int) -> tuple:
        """What block ``block`` takes after the tokens when they are the unmerged tokens of ``embedded``, as
        :meth:`run_block` passes it on: its rotary table (None for a host without rotary positions)."""
        return (self.rope(embedded, None, block),)

    def run_block(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """The whole block, as the model runs it (``rope``: the block's rotary table, for a rotary host; what
        :meth:`block_args` gives)."""
        return block(x)

    def blocks_forward(self, embedded: Embedded, run=None) -> torch.Tensor:
        """Every block, whole, on the tokens of ``embedded``: the tokens after the last block, before the final norm
        (the shared block loop of a forward that keeps every token). ``run(block, x, *args)`` runs one block (default
        :meth:`run_block`; e.g. checkpointed), ``args`` being :meth:`block_args`."""
        run = self.run_block if run is None else run
        x = embedded.x
        for i, block in enumerate(self.blocks):
            x = run(block, x, *self.block_args(embedded, i))
        return x

    def rope_rows(self, rope: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The rows of a block's rotary table ``rope`` at patch indices ``index`` (B, M): the positions of a
        subset of the patch tokens (ToE's kept tokens), batched as the block's attention takes them."""
        raise NotImplementedError(f"{type(self).__name__} has no rotary positions")

    def attention(self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None,
                  rope: torch.Tensor | None = None, kernel: str = "auto", class_row: bool = False
                  ) -> tuple[torch.Tensor, ...]:
        """The attention half of ``block`` on x (B, T, D), residual included, with the per-key ``bias`` (B, T)
        added to the attention logits; returns (x after the step, the keys averaged over heads (B, T, d)), and
        with ``class_row`` a third tensor: the first token's attention over all tokens, averaged over heads (B,
        T), computed apart (:func:`class_attention`) so that the step keeps the model's kernel."""
        raise NotImplementedError

    def mlp(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The MLP half of ``block``, residual included."""
        raise NotImplementedError

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm after the last block."""
        return self.model.norm(x)

    def head(self, x: torch.Tensor, size: torch.Tensor | None = None, pre_logits: bool = False) -> torch.Tensor:
        """Pooling, the head's norm and the classifier on x (B, T, D) whose tokens hold ``size`` (B, T, 1)
        patches each (None: one each, the model's own head)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared pieces
    def pool_by_size(self, x: torch.Tensor, size: torch.Tensor, include_prefix: bool = False) -> torch.Tensor:
        """The pooled features of :data:`POOLS` with merged tokens weighted by their sizes: a CLS token as it is,
        the average weighted by size, an attention-pool head with log(size) added to its keys."""
        P = 0 if include_prefix else self.num_prefix_tokens
        pool = self.pool_type()
        if pool == "map":
            return attention_pool(self.model.attn_pool, x[:, P:], size[:, P:].log().view(x.shape[0], -1))
        if pool == "avg":
            return size_weighted_mean(x[:, P:], size[:, P:])
        return x[:, 0]
