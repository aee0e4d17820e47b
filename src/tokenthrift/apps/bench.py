"""The training race a user runs from ``tokenthrift demo`` and the benchmark scripts: training runs against
the first, wall-clock speed-up, MACs ratio and efficiency, with a flag on timing the MACs cannot explain.
(The ``macs`` and ``bench`` rows of a method are built from its variants: :mod:`tokenthrift.apps.variants`.)"""
from __future__ import annotations


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
