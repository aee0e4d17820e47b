"""Comparisons a user runs from ``tokenthrift macs`` / ``tokenthrift bench`` and the benchmark scripts:
each ToE stage against full tokens, MACs ratio, measured speed-up and efficiency, in one run."""
from __future__ import annotations

import copy
import statistics
from typing import Sequence

import torch
from torch import nn

from .. import measure, toe


def toe_stage_epochs(schedule: toe.ToESchedule) -> list[tuple[int, float]]:
    """(stage, first epoch of that stage) for every reduced stage; the full-token stage is the baseline."""
    return [(s, m) for s, m in enumerate(schedule.milestones, start=1) if not schedule.is_full(m)]


def default_epochs(schedule: toe.ToESchedule) -> int:
    """Training length implied by a schedule whose last stage lasts as long as the one before it
    (300 for the DeiT recipe 0/100/200)."""
    ms = schedule.milestones
    return int(ms[-1] + max(ms[-1] - ms[-2], 1)) if len(ms) > 1 else int(ms[0]) + 1


def toe_macs_rows(model: nn.Module, input_size: Sequence[int], epochs: int | None = None,
                  **toe_kwargs) -> list[dict]:
    """Training-forward MACs of each ToE stage against the full-token model (operator overhead included),
    and the mean over ``epochs`` epochs of the schedule."""
    base = measure.macs(model, input_size, train=True)
    patched = copy.deepcopy(model)
    handle = toe.apply(patched, **toe_kwargs)
    epochs = epochs or default_epochs(handle.schedule)
    by_stage: dict[int, float] = {}
    for epoch in range(epochs):
        handle.set_epoch(epoch)
        if handle.stage not in by_stage:
            by_stage[handle.stage] = measure.macs(patched, input_size, train=True)
    rows = [{"stage": "full tokens", "keep_rate": 1.0, "GMACs": base / 1e9, "MACs_ratio": 1.0}]
    for stage, epoch in toe_stage_epochs(handle.schedule):
        handle.set_epoch(epoch)
        m = by_stage.get(stage) or measure.macs(patched, input_size, train=True)
        rows.append({"stage": stage, "keep_rate": handle.keep_rate, "GMACs": m / 1e9, "MACs_ratio": m / base})
    mean = statistics.fmean(by_stage[handle.schedule.stage(e)] for e in range(epochs))
    rows.append({"stage": f"mean over {epochs} epochs", "keep_rate": "-", "GMACs": mean / 1e9,
                 "MACs_ratio": mean / base})
    return rows


def toe_speed_rows(model: nn.Module, input_size: Sequence[int], batch_size: int, train: bool = True,
                   warmup: int = 2, repeats: int = 5, dtype: torch.dtype | None = None, **toe_kwargs) -> list[dict]:
    """Measured throughput of each ToE stage against full tokens in the same run (``dtype``: autocast), with
    the MACs ratio and the efficiency (speed-up / (1 / MACs ratio))."""
    base_macs = measure.macs(model, input_size, train=True)
    base = measure.throughput(model, input_size, batch_size, train=train, warmup=warmup, repeats=repeats,
                              dtype=dtype)
    patched = copy.deepcopy(model)
    handle = toe.apply(patched, **toe_kwargs)
    rows = [{"stage": "full tokens", "keep_rate": 1.0, "GMACs": base_macs / 1e9, "img_s": base,
             "speedup": 1.0, "MACs_ratio": 1.0, "efficiency": 1.0}]
    for stage, epoch in toe_stage_epochs(handle.schedule):
        handle.set_epoch(epoch)
        m = measure.macs(patched, input_size, train=True)
        ips = measure.throughput(patched, input_size, batch_size, train=train, warmup=warmup, repeats=repeats,
                                 dtype=dtype)
        rows.append({"stage": stage, "keep_rate": handle.keep_rate, "GMACs": m / 1e9, "img_s": ips,
                     "speedup": ips / base, "MACs_ratio": m / base_macs, "efficiency": ips / base * m / base_macs})
    return rows


def paired_throughput(models: Sequence[nn.Module], input_size: Sequence[int], batch_size: int, train: bool = False,
                      warmup: int = 2, repeats: int = 5, dtype: torch.dtype | None = None) -> list[float]:
    """Median images/s of each model, timed in alternating rounds (A, B, A, B, ...) so that slow drift of
    the machine (clock, a neighbour's load) hits every model alike. ``dtype``: run under autocast."""
    samples: list[list[float]] = [[] for _ in models]
    for r in range(repeats):
        for model, out in zip(models, samples):
            out += measure.throughput_samples(model, input_size, batch_size, train=train,
                                              warmup=warmup if r == 0 else 0, repeats=1, dtype=dtype)
    return [statistics.median(s) for s in samples]


def ltm_macs_rows(base: nn.Module, merged: nn.Module, input_size: Sequence[int], label: str = "") -> list[dict]:
    """Inference MACs and parameters of an LTM model against its base (the mask module's matmuls
    included)."""
    base_macs, ltm_macs = measure.macs(base, input_size), measure.macs(merged, input_size)
    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    return [{"model": label or "base", "GMACs": base_macs / 1e9, "params_M": params(base), "MACs_ratio": 1.0},
            {"model": f"LTM {label}".strip(), "GMACs": ltm_macs / 1e9, "params_M": params(merged),
             "MACs_ratio": ltm_macs / base_macs}]


def ltm_speed_rows(base: nn.Module, merged: nn.Module, input_size: Sequence[int], batch_size: int,
                   warmup: int = 2, repeats: int = 5, label: str = "", dtype: torch.dtype | None = None) -> list[dict]:
    """Inference throughput of an LTM model against its base in the same run, with the MACs saving, the
    measured time saving and their quotient ``saving_share`` (1.0: every MAC saved became time saved)."""
    base_row, ltm_row = ltm_macs_rows(base, merged, input_size, label)
    base_ips, ltm_ips = paired_throughput([base, merged], input_size, batch_size, warmup=warmup, repeats=repeats,
                                          dtype=dtype)
    macs_saving = 1 - ltm_row["MACs_ratio"]
    time_saving = 1 - base_ips / ltm_ips  # share of the time per image saved
    base_row.update(img_s=base_ips, speedup=1.0, MACs_saving=0.0, time_saving=0.0, saving_share="-")
    ltm_row.update(img_s=ltm_ips, speedup=ltm_ips / base_ips, MACs_saving=macs_saving, time_saving=time_saving,
                   saving_share=time_saving / macs_saving if macs_saving > 0 else "-")
    return [base_row, ltm_row]


def ltm_pair(model: nn.Module, cfg) -> tuple[nn.Module, nn.Module]:
    """(base, LTM) in eval mode for a model built from ``cfg`` (its ``model`` name, ``ltm_ratio``,
    ``ltm_tau_s``): the model converted with the ratio (or the calibrated ratios of its registered base;
    an ``ltm_*`` model as it is), and the plain model under it."""
    from .. import ltm
    from ..train.methods.ltm import prepare, ratio_of

    name = cfg.backbone if cfg.task == "detection" else cfg.model  # what LTM converts: a detector's backbone
    merged = prepare(model, name, ratio_of(cfg.ltm_ratio), tau_s=cfg.ltm_tau_s).eval()
    return ltm.plain_copy(merged).eval(), merged


def compare_rows(results: dict[str, dict]) -> list[dict]:
    """Training runs (engine summaries) against the first: top-1, training wall-clock, speed-up and MACs
    ratio against the first run, and the efficiency = speed-up x MACs ratio (1.0: every MAC saved became
    time saved)."""
    base = next(iter(results.values()))
    rows = []
    for label, r in results.items():
        speedup = base["train_time_s"] / r["train_time_s"]
        ratio = r["mean_train_macs"] / base["mean_train_macs"]
        rows.append({"run": label, "top1": r["top1"], "train_s": r["train_time_s"], "speedup": speedup,
                     "train_MACs_M": r["mean_train_macs"] / 1e6, "MACs_ratio": ratio, "efficiency": speedup * ratio,
                     "timing": timing_note(speedup * ratio)})
    return rows


EFFICIENCY_BOUND = 1.15  # speed-up x MACs ratio above this: the runs were timed under different loads


def timing_note(efficiency: float) -> str:
    """'ok', or a warning when a speed-up exceeds what the MACs saved allow (efficiency well above 1): the
    compared runs did not see the same machine load, so the timing says nothing about the method."""
    return "ok" if efficiency <= EFFICIENCY_BOUND else f"disturbed (efficiency {efficiency:.2f} > {EFFICIENCY_BOUND})"


class OnImages(nn.Module):
    """Runs ``fn`` on fixed real images whatever input it is given: the speed of an adaptive path depends on
    which grids the images get, so it is timed on real evaluation images, not noise (with
    :func:`paired_throughput`)."""

    def __init__(self, fn, images: torch.Tensor):
        super().__init__()
        self.fn, self.images = fn, images
        self.anchor = nn.Parameter(torch.zeros((), device=images.device), requires_grad=False)  # measure's device

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
        backbone = measure.macs(model.backbone, size)
        if images is None:
            whole = measure.macs(model, size)
        else:
            whole = statistics.fmean(measure.macs(model, size, example=i[None]) for i in images)
        rows.append({"model": f"{'LTM ' if k else ''}{label}".strip(), "backbone_GMACs": backbone / 1e9,
                     "detector_GMACs": whole / 1e9})
    for r in rows:
        r["backbone_ratio"] = r["backbone_GMACs"] / rows[0]["backbone_GMACs"]
        r["detector_ratio"] = r["detector_GMACs"] / rows[0]["detector_GMACs"]
    return rows
