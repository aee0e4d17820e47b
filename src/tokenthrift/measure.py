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

__all__ = ["macs", "vit_macs", "throughput", "throughput_samples", "device_of", "model_input_shape", "training_mode",
           "run_metadata", "merge_agreement", "FixedForward", "UncountedOpError"]

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


def model_input_shape(model: nn.Module) -> tuple[int, int, int | None]:
    """(channels, side, frames) ``model`` takes: its patch embedding's when it has one, else its cfg's input
    size; frames None for an image model."""
    from timm.data import resolve_model_data_config

    c, h, _ = resolve_model_data_config(model)["input_size"]
    pe = getattr(model, "patch_embed", None)
    if getattr(pe, "img_size", None):
        h = pe.img_size[0]
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        c = proj.in_channels
    return int(c), int(h), getattr(model, "num_frames", None)


@contextmanager
def _frozen(model: nn.Module, frozen: bool = True) -> Iterator[None]:
    """The parameters without ``requires_grad`` inside the block (restored afterwards). An eval count needs it:
    without gradients a view of a parameter (an attention-pool head's latent query, ``latent.expand(B, ...)``)
    still says it requires grad but has no graph, and the module tracker of torch's FLOP counter fails on it."""
    flags = [(p, p.requires_grad) for p in model.parameters()] if frozen else []
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


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
            training_mode(model, train), torch.set_grad_enabled(train), _frozen(model, not train), counter, recorder:
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
    compile: bool = False,
) -> list[float]:
    """Images/s of each timed repeat (model alone, synthetic input, after ``warmup`` calls).

    ``train=False``: a no-grad forward in eval mode. ``train=True``: forward + backward + AdamW step
    in training mode, on a deep copy so the caller's weights do not move. ``dtype`` runs under autocast.
    ``compile``: run ``torch.compile(model)`` (compiled during the warm-up; give ``warmup`` >= 2).
    """
    device = device_of(model)
    run = torch.compile(model) if compile and not train else model
    x = torch.randn(batch_size, *input_size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    if not train:
        def step() -> None:
            with torch.no_grad(), autocast:
                run(x)
        with training_mode(model, False):
            seconds = _timed(step, device, warmup, repeats)
    else:
        net = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
        forward = torch.compile(net) if compile else net
        classes = num_classes or getattr(model, "num_classes", 10) or 10
        y = torch.randint(0, classes, (batch_size,), device=device)

        def step() -> None:
            with autocast:
                out = forward(x)
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


def paired_throughput(models: Sequence[nn.Module], input_size: Sequence[int], batch_size: int, train: bool = False,
                      warmup: int = 2, repeats: int = 5, dtype: torch.dtype | None = None,
                      compile: bool = False, round_warmup: int = 1) -> list[float]:
    """Median images/s of each model, timed in alternating rounds (A, B, C, then B, C, A, ...: each round starts
    one model later) so that slow drift of the machine (clock, a neighbour's load) hits every model alike and no
    model always follows the same one. ``dtype``: run under autocast. ``compile``: every model through
    ``torch.compile`` (inference only; compiled in the first round's warm-up). ``round_warmup``: untimed calls
    of each model before its timed one in every later round. Both because the first call after another model
    runs with that model's state in the caches: at batch 1 that costs a model that follows a different one and
    flatters one that follows a model like it (measured: the same ToMe merge, timed right after another ToMe
    model and right after the plain model in a fixed order, differed by 3.5 points of overhead share)."""
    if compile and train:
        raise InvalidArgumentError("paired_throughput compiles inference only; time a compiled training step with "
                                   "throughput_samples(..., train=True, compile=True)")
    models = [torch.compile(m) if compile else m for m in models]
    samples: list[list[float]] = [[] for _ in models]
    for r in range(repeats):
        for k in range(len(models)):
            i = (k + r) % len(models)
            samples[i] += throughput_samples(models[i], input_size, batch_size, train=train,
                                             warmup=warmup if r == 0 else round_warmup, repeats=1, dtype=dtype)
    return [statistics.median(s) for s in samples]


class FixedForward(nn.Module):
    """``model(x, **forward_kwargs)`` as a one-input module (e.g. a ReViT at one grid): what the timers and the
    exporters take."""

    def __init__(self, model: nn.Module, **forward_kwargs):
        super().__init__()
        self.model, self.forward_kwargs = model, forward_kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, **self.forward_kwargs)


class OnImages(nn.Module):
    """Runs ``fn`` on fixed real images whatever input it is given: the speed of an adaptive path depends on
    which grids the images get, so it is timed on real evaluation images, not noise (with
    :func:`paired_throughput`)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor):
        super().__init__()
        self.fn, self.images = fn, images
        self.anchor = nn.Parameter(torch.zeros((), device=images.device), requires_grad=False)  # for device_of

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.images)


def detector_macs_rows(*models: nn.Module, input_size: Sequence[int] | None = None, label: str = "",
                       images: Sequence[torch.Tensor] | None = None) -> list[dict]:
    """MACs of detectors (a plain one, then its LTM version if given): backbone with FPN, and the whole
    detector in eval mode, averaged over ``images`` (real images: the mask head runs once per detection, so
    the whole detector's count depends on what it finds; default one random image of ``input_size``)."""
    if input_size is None and images is None:
        raise TypeError("give input_size or images")
    rows = []
    for k, model in enumerate(models):
        size = tuple(images[0].shape) if images is not None else tuple(input_size)
        backbone = macs(model.backbone, size)
        if images is None:
            whole = macs(model, size)
        else:
            whole = statistics.fmean(macs(model, size, example=i[None]) for i in images)
        rows.append({"model": f"{'LTM ' if k else ''}{label}".strip(), "backbone_GMACs": backbone / 1e9,
                     "detector_GMACs": whole / 1e9})
    for r in rows:
        r["backbone_ratio"] = r["backbone_GMACs"] / rows[0]["backbone_GMACs"]
        r["detector_ratio"] = r["detector_GMACs"] / rows[0]["detector_GMACs"]
    return rows


def block_token_counts(vit: nn.Module, x: torch.Tensor) -> list[tuple[int, int]]:
    """(tokens into attention, tokens into the MLP) of every block of a timm-style ViT (``blocks``, each with
    ``norm1`` before attention and ``norm2`` before the MLP) in one eval forward on ``x``: the shapes a
    token-reducing method runs."""
    counts = [[0, 0] for _ in vit.blocks]
    handles = [norm.register_forward_pre_hook(lambda m, args, i=i, j=j: counts[i].__setitem__(j, args[0].shape[-2]))
               for i, blk in enumerate(vit.blocks) for j, norm in enumerate((blk.norm1, blk.norm2))]
    try:
        with torch.no_grad(), training_mode(vit, False):
            vit(x)
    finally:
        for h in handles:
            h.remove()
    return [(a, m) for a, m in counts]


class TokenCutOracle(nn.Module):
    """The limit a token-reducing method (ToMe, LTM) can reach: the plain model run at the method's per-block
    token counts (:func:`block_token_counts`) with the surplus tokens simply cut (no matching, no merging), so
    the same shapes and MACs minus the method's own work. ``1 - time(oracle) / time(method)`` is the method's
    overhead share. Its outputs mean nothing: it exists to be timed.

    ``host``: the model's host (:mod:`tokenthrift.hosts`, passed in by the caller: this module imports none),
    whose steps run the blocks, the rotary table cut with the tokens."""

    def __init__(self, vit: nn.Module, counts: Sequence[tuple[int, int]], host):
        super().__init__()
        if len(counts) != len(vit.blocks):
            raise InvalidArgumentError(f"{len(counts)} token counts for {len(vit.blocks)} blocks")
        self.vit, self.counts, self.host = vit, [tuple(c) for c in counts], host

    @classmethod
    def of(cls, plain: nn.Module, merged: nn.Module, input_size: Sequence[int], host) -> TokenCutOracle:
        """The oracle of ``merged`` (a merging version of ``plain``), in eval mode."""
        x = torch.randn(1, *input_size, device=device_of(plain))
        return cls(plain, block_token_counts(merged, x), host).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        host = self.host
        embedded = host.embed(x)
        x, P = embedded.x, host.num_prefix_tokens
        for i, (blk, (n_attn, n_mlp)) in enumerate(zip(host.blocks, self.counts)):
            x = x[:, :n_attn]
            rope = host.rope(embedded, None, i)
            rope = None if rope is None else rope[..., : n_attn - P, :]
            x = host.mlp(blk, host.attention(blk, x, None, rope)[0][:, :n_mlp])
        return host.head(host.norm(x))


def merging_speed_rows(base: nn.Module, merged: nn.Module, input_size: Sequence[int], batch_size: int,
                       warmup: int = 2, repeats: int = 5, dtype: torch.dtype | None = None, compile: bool = False,
                       label: str = "merged", oracle=None) -> list[dict]:
    """Inference throughput of a token-merging model (ToMe, LTM) against its plain model, timed in alternating
    rounds, eager or compiled alike, with MACs ratio, efficiency (speed-up x MACs ratio) and ``saving_share``
    (time saved / MACs saved; 1.0: every MAC saved became time saved). ``oracle``: the base's host
    (:mod:`tokenthrift.hosts`) to also time the same-shape oracle (:class:`TokenCutOracle`) through, and the merged
    model's
    ``overhead_share`` = 1 - oracle time / merged time, the share of its time spent on merging (matching, gathers,
    unmerging)."""
    models, names = [base, merged], ["plain", label]
    if oracle:
        models.append(TokenCutOracle.of(base, merged, input_size, oracle))
        names.append("oracle (tokens cut)")
    counted = [macs(m, input_size) for m in models]
    ips = paired_throughput(models, input_size, batch_size, warmup=warmup, repeats=repeats, dtype=dtype,
                            compile=compile)
    rows = [{"model": name, "mode": "compiled" if compile else "eager", "batch": batch_size, "GMACs": m / 1e9,
             "img_s": speed, "speedup": speed / ips[0], "MACs_ratio": m / counted[0],
             "efficiency": speed / ips[0] * m / counted[0]} for name, m, speed in zip(names, counted, ips)]
    saved = 1 - rows[1]["MACs_ratio"]
    rows[1]["saving_share"] = (1 - ips[0] / ips[1]) / saved if saved > 0 else "-"
    if oracle:
        rows[1]["overhead_share"] = 1 - ips[1] / ips[2]
    return rows


def run_metadata(**extra) -> dict:
    """What a benchmark's result file records about where it ran: date, CPU, torch threads and the library
    versions, then ``extra`` (device, dtype, sizes, ...)."""
    import timm

    from ._version import __version__

    return {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "tokenthrift": __version__, "python": platform.python_version(), **extra}



def merge_agreement(ids: torch.Tensor) -> float:
    """How alike a merging method merges different images: the mean adjusted Rand index over every pair of
    images in ``ids`` (B, N), the merged token each of the N patches of image b joined (compared as partitions:
    the label values are arbitrary). 1: the same partition for every image, a fixed positional merge; about 0:
    no more alike than random partitions of the same group sizes. Content-aware merging lies low."""
    B, N = ids.shape
    if B < 2 or N < 2:
        raise InvalidArgumentError(f"merge agreement compares the partitions of at least 2 images of at least 2 "
                                   f"patches; got {B} images of {N} patches")
    ids = torch.unique(ids.long().cpu(), return_inverse=True)[1]  # labels 0..K-1
    K = int(ids.max()) + 1

    def pair_count(n: torch.Tensor) -> torch.Tensor:  # C(n, 2)
        return n * (n - 1) / 2

    image = torch.arange(B).unsqueeze(1)
    own = pair_count(torch.bincount((ids + image * K).flatten(), minlength=B * K).view(B, K).double()).sum(1)
    total = pair_count(torch.tensor(float(N), dtype=torch.float64))
    scores = []
    for i in range(B - 1):  # a measurement, not a hot path: image i against every later image at once
        later = B - 1 - i
        cells = ids[i] * K + ids[i + 1:] + image[:later] * (K * K)  # the contingency cell of every patch
        cell, count = torch.unique(cells.flatten(), return_counts=True)
        index = torch.zeros(later, dtype=torch.float64).index_add_(0, cell // (K * K), pair_count(count.double()))
        a, b = own[i], own[i + 1:]
        expected, top = a * b / total, (a + b) / 2
        same = top == expected  # both partitions trivial alike (e.g. all singletons): identical, 1
        scores.append(torch.where(same, 1.0, (index - expected) / torch.where(same, 1.0, top - expected)))
    return float(torch.cat(scores).mean())
