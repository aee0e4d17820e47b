"""MACs counting: :func:`macs`, the MACs per image of the forward that actually runs (torch's ``FlopCounterMode`` / 2,
plus formulas for the attention and distance kernels it misses, ``_EXTRA_FLOPS``, and an error rather than a low
count when a compute-heavy op without a formula runs), and :func:`vit_macs`, the analytic count of a timm ViT to
check it against. Detectors are counted with :func:`macs` too (a list of images as ``example``)."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import InvalidArgumentError
from .state import device_of, frozen, training_mode

__all__ = ["UncountedOpError", "macs", "vit_macs"]

aten = torch.ops.aten


def _sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _cdist(x1_shape, x2_shape, *args, out_shape=None, **kwargs) -> int:
    *batch, n, d = x1_shape
    m = x2_shape[-2]
    b = 1
    for s in batch:
        b *= s
    return 2 * b * n * m * d  # one multiply-accumulate per coordinate pair, like a matmul


# Kernels FlopCounterMode misses (torch 2.14 / timm 1.0 on the CPU): without them DeiT-S reads 4.24, not 4.60.
_EXTRA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
    aten._scaled_dot_product_fused_attention_overrideable: _sdpa_forward,
    aten._scaled_dot_product_fused_attention_overrideable_backward: _sdpa_backward,
    aten._cdist_forward: _cdist,
}
# Name fragments of ops that do real multiply-accumulate work; each one that runs must be counted.
_HEAVY = ("attention", "cdist", "conv", "mm")


class UncountedOpError(RuntimeError):
    """A compute-heavy op ran that the MACs counter has no formula for."""


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def macs(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    train: bool = False,
    batch_size: int = 1,
    example: torch.Tensor | Sequence[torch.Tensor] | None = None,
    **forward_kwargs,
) -> float:
    """MACs per image (per clip for a video model) of ``model(x, **forward_kwargs)`` for x of shape
    (batch_size, *input_size), random (``example``: these inputs instead: a batch tensor, or a list of
    (C, H, W) images as torchvision's detectors take them).

    Counts what actually runs (FlopCounterMode / 2) plus the attention and distance kernels the counter
    misses. ``train=True`` counts the forward of a training step: training mode, where training-only
    reductions such as ToE are active, with gradients enabled, so that ops which only run while autograd
    records (the dense straight-through product of LTM's hard mask) are counted too. Raises
    :class:`UncountedOpError` if a compute-heavy op ran without a formula.
    """
    if len(input_size) not in (3, 4):
        raise InvalidArgumentError("input_size must be (channels, height, width), or (channels, frames, height, "
                                   f"width) for a video model; got {tuple(input_size)}")
    device = device_of(model)
    if train:  # a training-mode forward may update state (BatchNorm statistics): count on a copy
        model = copy.deepcopy(model)
        batch_size = max(batch_size, 2)  # BatchNorm refuses one sample per channel in training mode
    if isinstance(example, (list, tuple)):  # torchvision's detectors take a list of (C, H, W) images
        x, batch_size = [e.to(device) for e in example], len(example)
    elif example is not None:  # real inputs: what a data-dependent model (a detector's heads) does on them
        x, batch_size = example.to(device), example.shape[0]
    else:
        x = torch.randn(batch_size, *input_size, device=device, generator=torch.Generator(device).manual_seed(0))
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=dict(_EXTRA_FLOPS))
    recorder = _OpRecorder()
    # fork_rng: counting must not move the caller's random stream (dropout runs in training mode)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            training_mode(model, train), torch.set_grad_enabled(train), frozen(model, not train), counter, recorder:
        model(x, **forward_kwargs)
    missed = sorted(str(op) for op in recorder.seen - set(counter.flop_registry)
                    if any(h in str(op) for h in _HEAVY))
    if missed:
        raise UncountedOpError(
            f"these ops ran but have no MACs formula, so the count would be too low: {missed}. Add a formula to "
            "tokenthrift.measure.counting._EXTRA_FLOPS.")
    return counter.get_total_flops() / 2 / batch_size


def vit_macs(model: nn.Module, tokens_per_block: Sequence[int] | None = None) -> float:
    """Analytic MACs per image of a timm ``VisionTransformer``: patch embedding, blocks, head.

    A block on N tokens (prefix included) of width D with MLP hidden H costs (4D + 2H)·N·D + 2·N²·D
    MACs (12·N·D² + 2·N²·D for H = 4D). ``tokens_per_block`` overrides the token count of each block
    (default: P + N everywhere) so reduced-token schedules can be checked against the counter.
    """
    D = model.embed_dim
    pe = model.patch_embed
    num_patches = pe.num_patches
    in_chans = pe.proj.in_channels
    ph, pw = pe.patch_size
    full = num_patches + model.num_prefix_tokens
    tokens = list(tokens_per_block) if tokens_per_block is not None else [full] * len(model.blocks)
    if len(tokens) != len(model.blocks):
        raise InvalidArgumentError(f"tokens_per_block has {len(tokens)} entries for {len(model.blocks)} blocks")
    total = num_patches * D * in_chans * ph * pw
    for n, blk in zip(tokens, model.blocks):
        hidden = blk.mlp.fc1.out_features
        total += (4 * D + 2 * hidden) * n * D + 2 * n * n * D
    heads = [h for h in (getattr(model, "head", None), getattr(model, "head_dist", None)) if isinstance(h, nn.Linear)]
    total += sum(h.in_features * h.out_features for h in heads)
    return float(total)
