"""Honest measurement: MACs of the forward that actually runs, analytic ViT MACs, throughput.

Rules (docs/methods.md §1): "FLOPs" in this field are MACs; count with ``FlopCounterMode`` (total / 2) on the real
forward, including every attention kernel it does not know and the method's own overhead; report
throughput as the median images/s after warm-up and always as a ratio against a baseline measured in the
same run.
"""
from __future__ import annotations

import copy
import platform
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import InvalidArgumentError

__all__ = ["macs", "vit_macs", "throughput", "throughput_samples", "device_of", "training_mode", "run_metadata",
           "UncountedOpError"]

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


@contextmanager
def training_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Every submodule in train (or eval) mode inside the block; each one's own flag restored afterwards
    (the one helper for this: measurement, evaluation, ToE's and LTM's pictures use it)."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def device_of(model: nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def macs(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    train: bool = False,
    batch_size: int = 1,
    example: torch.Tensor | None = None,
    **forward_kwargs,
) -> float:
    """MACs per image (per clip for a video model) of ``model(x, **forward_kwargs)`` for x of shape
    (batch_size, *input_size), random (``example``: these inputs instead).

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
    if example is not None:  # real inputs: what a data-dependent model (a detector's heads) does on them
        x, batch_size = example.to(device), example.shape[0]
    else:
        x = torch.randn(batch_size, *input_size, device=device, generator=torch.Generator(device).manual_seed(0))
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=dict(_EXTRA_FLOPS))
    recorder = _OpRecorder()
    # fork_rng: counting must not move the caller's random stream (dropout runs in training mode)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            training_mode(model, train), torch.set_grad_enabled(train), counter, recorder:
        model(x, **forward_kwargs)
    missed = sorted(str(op) for op in recorder.seen - set(counter.flop_registry)
                    if any(h in str(op) for h in _HEAVY))
    if missed:
        raise UncountedOpError(
            f"these ops ran but have no MACs formula, so the count would be too low: {missed}. Add a formula to "
            "tokenthrift.measure._EXTRA_FLOPS.")
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def throughput_samples(
    model: nn.Module,
    input_size: Sequence[int],
    batch_size: int = 64,
    train: bool = False,
    warmup: int = 3,
    repeats: int = 10,
    dtype: torch.dtype | None = None,
    num_classes: int | None = None,
) -> list[float]:
    """Images/s of each timed repeat (model alone, synthetic input, after ``warmup`` calls).

    ``train=False``: a no-grad forward in eval mode. ``train=True``: forward + backward + AdamW step
    in training mode, on a deep copy so the caller's weights do not move. ``dtype`` runs under autocast.
    """
    device = device_of(model)
    x = torch.randn(batch_size, *input_size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    if not train:
        def step() -> None:
            with torch.no_grad(), autocast:
                model(x)
        with training_mode(model, False):
            seconds = _timed(step, device, warmup, repeats)
    else:
        net = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
        classes = num_classes or getattr(model, "num_classes", 10) or 10
        y = torch.randint(0, classes, (batch_size,), device=device)

        def step() -> None:
            with autocast:
                out = net(x)
                outs = out if isinstance(out, (tuple, list)) else (out,)
                loss = sum(nn.functional.cross_entropy(o.float(), y) for o in outs) / len(outs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        seconds = _timed(step, device, warmup, repeats)
    return [batch_size / s for s in seconds]


def throughput(model: nn.Module, input_size: Sequence[int], batch_size: int = 64, train: bool = False,
               **kwargs) -> float:
    """Median images/s of :func:`throughput_samples` (inference, or a full training step)."""
    return statistics.median(throughput_samples(model, input_size, batch_size, train, **kwargs))


def run_metadata(**extra) -> dict:
    """What a benchmark's result file records about where it ran: date, CPU, torch threads and the library
    versions, then ``extra`` (device, dtype, sizes, ...)."""
    import timm

    from ._version import __version__

    return {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "tokenthrift": __version__, "python": platform.python_version(), **extra}
