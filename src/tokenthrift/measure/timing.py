"""Timing: images/s of a model after warm-up (:func:`throughput_samples`, :func:`throughput`: inference or a
full training step), several models timed in alternating rounds so that drift and cache state hit each alike
(:func:`paired_throughput`: the way to compare speeds), the wrappers the timers take (:class:`FixedForward`: a
model with fixed keyword arguments; :class:`OnImages`: a path timed on fixed real images), and
:func:`run_metadata`, what a benchmark's result file records about where it ran."""
from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .state import device_of, training_mode

__all__ = ["FixedForward", "OnImages", "paired_throughput", "run_metadata", "throughput", "throughput_samples"]


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


def run_metadata(**extra) -> dict:
    """What a benchmark's result file records about where it ran: date, CPU, torch threads and the library
    versions, then ``extra`` (device, dtype, sizes, ...)."""
    import timm

    from .._version import __version__

    return {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "tokenthrift": __version__, "python": platform.python_version(), **extra}
