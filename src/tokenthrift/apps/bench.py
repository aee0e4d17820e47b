"""``tokenthrift bench``: measured speed of a method against its baseline in the same run (a model built from a
recipe and flags, or a trained checkpoint as its method runs it; the rows: :func:`.variants.bench_rows`), and the
training race a user runs from ``tokenthrift demo`` and the benchmark scripts: training runs against the first,
wall-clock speed-up, MACs ratio and efficiency, with a flag on timing the MACs cannot explain."""
from __future__ import annotations

import argparse

from .common import default_preview, device, model_flags, resolve_model


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


HELP = "measured speed of a method against its baseline, same run"


def add_arguments(p: argparse.ArgumentParser) -> None:
    model_flags(p, "bench", "take the model and method settings from a recipe")
    p.add_argument("--checkpoint", help="time a trained tokenthrift checkpoint as its method runs it (every variant "
                                        "against the model without the method) instead of a model built from the "
                                        "flags")
    p.add_argument("--batch-size", dest="batch_sizes", type=int, nargs="+", default=[64],
                   help="images per timed step; several: one set of rows each (e.g. 1 32; default: 64)")
    p.add_argument("--compile", action="store_true",
                   help="also time every model through torch.compile (each against its plain model compiled)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default: 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default: 5)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"],
                   help="run under autocast with this dtype (default: off, fp32)")


def run(args: argparse.Namespace) -> None:
    """Every variant against its baseline (a training method's stages as training steps), at each batch size,
    eager and with ``--compile`` compiled too."""
    import torch

    from ..train.engine import amp_dtype
    from . import report
    from .variants import bench_rows

    shown = resolve_model(args, doing="timed", default=default_preview("bench"))
    if args.threads:
        torch.set_num_threads(args.threads)
    run_on = torch.device(device(args.device))
    dtype = amp_dtype(args.amp, run_on)
    model, size, rows = shown.model.to(run_on), shown.size, []
    variants = shown.method.training_variants(model, size) or shown.variants()
    for compiled in (False, True) if args.compile else (False,):
        for batch in args.batch_sizes:
            rows += bench_rows(variants, size, batch, warmup=max(args.warmup, 2 if compiled else 0),
                               repeats=args.repeats, dtype=dtype, compile=compiled)
    step = "training step (fwd+bwd+AdamW)" if any(v.train for v in variants) else "inference (no grad)"
    precision = "fp32" if dtype is None else f"autocast {str(dtype).removeprefix('torch.')}"
    threads = f", {torch.get_num_threads()} threads" if run_on.type == "cpu" else ""
    print(f"{shown.cfg.model} {'x'.join(map(str, size))}, batch {' and '.join(map(str, args.batch_sizes))}, {step}, "
          f"{run_on}, {precision}{threads}, median of {args.repeats}")
    print(report.table(rows))
