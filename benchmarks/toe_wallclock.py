"""ToE's training wall-clock ratio for the 30-epoch convergence run, measured on an idle machine: the engine's own
training epoch (real Fashion-MNIST batches through the data loader, forward, backward, AdamW, EMA, scheduler) of
the full-token recipe and of the ToE recipe at each of its stages, timed in alternation (each round times all
of them, starting one later than the round before), median over rounds. The 30-epoch ratio weights each stage
by its number of epochs.

Pause every training process first (kill -STOP PID): the point is a number that no other job shares.

    python benchmarks/toe_wallclock.py --threads 2 --images 5120 --rounds 4
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from tokenthrift import measure
from tokenthrift.train import TrainConfig, Trainer, load_recipe

from suite import write_result

OUT = Path(__file__).parent / "results"
SCHEDULE = dict(epochs=30, ema=True, seed=0, progress=False)  # benchmarks/converge_fmnist.py's shipped schedule


def trainer(recipe: str, images: int, threads: int, output: str) -> Trainer:
    cfg = TrainConfig(**{**load_recipe(recipe), **SCHEDULE, "train_subset": images, "threads": threads,
                         "output": output, "name": recipe})
    return Trainer(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=5120, help="training images per timed epoch (batch 128)")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        full, toe = trainer("fmnist_vit_tiny", args.images, args.threads, tmp), \
            trainer("fmnist_vit_tiny_toe", args.images, args.threads, tmp)
        # the epoch at which each stage starts (the recipe spreads them over the 30), and how many it lasts
        starts = [int(m) for m in toe.method.handle.schedule.milestones]
        lengths = [b - a for a, b in zip(starts, [*starts[1:], toe.cfg.epochs])]
        for t in (full, toe):  # one untimed epoch each: allocator, data loader and kernels warm
            t.method.on_epoch_start(0)
            t.train_one_epoch(0)
        # one round times the full model and ToE at every stage, each round starting one configuration later:
        # drift of the machine's speed falls on all of them alike
        configs = [("full", full, 0), *((f"stage {k}", toe, e) for k, e in enumerate(starts, 1))]
        times = {name: [] for name, _, _ in configs}
        for r in range(args.rounds):
            for name, t, epoch in configs[r % len(configs):] + configs[:r % len(configs)]:
                t.method.on_epoch_start(epoch)
                times[name].append(t.train_one_epoch(epoch)["train_time_s"])
        full_s = statistics.median(times["full"])
        rows = []
        for stage, (start, length) in enumerate(zip(starts, lengths), 1):
            toe.method.on_epoch_start(start)
            toe_s = statistics.median(times[f"stage {stage}"])
            rows.append({"stage": stage, "epochs": f"{start + 1}-{start + length}",
                         "keep_rate": toe.method.handle.keep_rate,
                         "train_MACs_ratio": toe.method.train_macs(toe.model, toe.input_size)
                         / full.method.train_macs(full.model, full.input_size),
                         "full_s": full_s, "toe_s": toe_s, "speedup": full_s / toe_s, "length": length})
    full_total = sum(r["full_s"] * r["length"] for r in rows)
    toe_total = sum(r["toe_s"] * r["length"] for r in rows)
    macs_ratio = sum(r["train_MACs_ratio"] * r["length"] for r in rows) / sum(r["length"] for r in rows)
    total = {"stage": f"{toe.cfg.epochs} epochs", "epochs": f"1-{toe.cfg.epochs}", "train_MACs_ratio": macs_ratio,
             "full_s": full_total, "toe_s": toe_total, "speedup": full_total / toe_total,
             "efficiency": full_total / toe_total * macs_ratio}
    meta = measure.run_metadata(threads=args.threads, images_per_epoch=args.images, rounds=args.rounds,
                                batch_size=full.cfg.batch_size)
    print(write_result(OUT / "toe_wallclock", meta, {"rows": rows, "total": total, "epoch_seconds": times},
                       [*rows, total]))


if __name__ == "__main__":
    main()
