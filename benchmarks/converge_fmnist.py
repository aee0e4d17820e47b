"""At convergence on Fashion-MNIST: the recipe and schedule of the shipped vit_fmnist_tiny_patch2_28 (recipe
fmnist_vit_tiny, 30 epochs on all 60 000 training images, EMA on, seed 0) run again with LTM (0.85 of the MACs,
IB on and off) and with ToE (stages at 0 / 10 / 20 of the 30 epochs, as the DeiT schedule is over 300).

Every run is resumable: run the same command again and it continues from runs/converge/<name>/last.pth; a
finished run (summary.json) is skipped. Several runs in parallel: one process per run, --threads 1 each.
A run longer than one working session on a fresh machine is carried in the repository: `--carry` copies each
unfinished run's last.pth to benchmarks/results/converge/<name>.last.pth (commit it, `git add -f`), and a
machine without runs/converge/<name>/last.pth resumes from that copy.

    python benchmarks/converge_fmnist.py --runs ltm_ib toe --threads 1
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tokenthrift.train import TrainConfig, Trainer, load_recipe

OUTPUT = "runs/converge"
CARRIED = Path(__file__).parent / "results" / "converge"  # checkpoints carried between machines
SHIPPED = dict(epochs=30, ema=True, seed=0)  # the shipped model's run (benchmarks/pretrain_fmnist.py)

# name -> (recipe, overrides): from scratch with exactly the shipped model's recipe and schedule
SCRATCH = {
    "ltm_ib": ("fmnist_vit_tiny_ltm", {"ltm_ib": True}),
    "ltm_noib": ("fmnist_vit_tiny_ltm", {"ltm_ib": False}),
    "toe": ("fmnist_vit_tiny_toe", {}),
}


def run_config(name: str, threads: int | None) -> TrainConfig:
    recipe, extra = SCRATCH[name]
    return TrainConfig(**{**load_recipe(recipe), **SHIPPED, **extra, "name": name, "output": OUTPUT,
                          "threads": threads, "progress": False})


def train_run(name: str, threads: int | None) -> dict:
    run_dir = Path(OUTPUT) / name
    if (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    cfg = run_config(name, threads)
    for last in (run_dir / "last.pth", CARRIED / f"{name}.last.pth"):
        if last.exists():
            cfg.resume = str(last)
            break
    return Trainer(cfg).fit()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=list(SCRATCH), choices=list(SCRATCH))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--carry", action="store_true",
                    help="copy each unfinished run's last.pth into benchmarks/results/converge and exit")
    args = ap.parse_args()
    if args.carry:
        for name in args.runs:
            last = Path(OUTPUT) / name / "last.pth"
            if last.exists() and not (Path(OUTPUT) / name / "summary.json").exists():
                shutil.copyfile(last, CARRIED / f"{name}.last.pth")
                print("carried", last, "->", CARRIED / f"{name}.last.pth")
        return
    for name in args.runs:
        summary = train_run(name, args.threads)
        print(name, {k: summary.get(k) for k in ("top1", "top1_ema", "train_time_s", "macs_ratio")}, flush=True)


if __name__ == "__main__":
    main()
