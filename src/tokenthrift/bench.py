"""Comparisons a user runs from ``tokenthrift macs`` / ``tokenthrift bench`` and the benchmark scripts:
each ToE stage against full tokens, MACs ratio, measured speed-up and efficiency, in one run."""
from __future__ import annotations

import copy
import statistics
from typing import Sequence

from torch import nn

from . import measure, toe


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
                   warmup: int = 2, repeats: int = 5, **toe_kwargs) -> list[dict]:
    """Measured throughput of each ToE stage against full tokens in the same run, with the MACs ratio and
    the efficiency (speed-up / (1 / MACs ratio))."""
    base_macs = measure.macs(model, input_size, train=True)
    base = measure.throughput(model, input_size, batch_size, train=train, warmup=warmup, repeats=repeats)
    patched = copy.deepcopy(model)
    handle = toe.apply(patched, **toe_kwargs)
    rows = [{"stage": "full tokens", "keep_rate": 1.0, "GMACs": base_macs / 1e9, "img_s": base,
             "speedup": 1.0, "MACs_ratio": 1.0, "efficiency": 1.0}]
    for stage, epoch in toe_stage_epochs(handle.schedule):
        handle.set_epoch(epoch)
        m = measure.macs(patched, input_size, train=True)
        ips = measure.throughput(patched, input_size, batch_size, train=train, warmup=warmup, repeats=repeats)
        rows.append({"stage": stage, "keep_rate": handle.keep_rate, "GMACs": m / 1e9, "img_s": ips,
                     "speedup": ips / base, "MACs_ratio": m / base_macs, "efficiency": ips / base * m / base_macs})
    return rows
