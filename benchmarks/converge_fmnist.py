"""At convergence on Fashion-MNIST: the recipe and schedule of the shipped vit_fmnist_tiny_patch2_28 (recipe
fmnist_vit_tiny, 30 epochs on all 60 000 training images, EMA on, seed 0) run again with LTM (0.85 of the MACs,
IB on and off) and with ToE (stages at 0 / 10 / 20 of the 30 epochs, as the DeiT schedule is over 300); and the
shipped model fine-tuned on equal terms three ways (ft_full: all tokens, the control; ft_ltm: LTM with the same
ratios; ft_tome: ToMe r=9, the uniform r closest to LTM's MACs, merging while it trains), FINETUNE_EPOCHS on all
60 000 images at a tenth of the pretraining peak rate, seeds 0 and 1.

Every run is resumable: run the same command again and it continues from runs/converge/<name>/last.pth; a
finished run (summary.json) is skipped. Several runs in parallel: one process per run, --threads 1 each.
A run longer than one working session on a fresh machine is carried in the repository: `--carry` copies each
unfinished run's last.pth to benchmarks/results/converge/<name>.last.pth (commit it, `git add -f`), and a
machine without runs/converge/<name>/last.pth resumes from that copy; a finished run's summary and log are
carried the same way (<name>.summary.json, <name>.jsonl), so --report works on any machine.

    python benchmarks/converge_fmnist.py --runs ltm_ib toe --threads 1
    python benchmarks/converge_fmnist.py --runs ltm_ib --ship   # the finished LTM model into the package
    python benchmarks/converge_fmnist.py --report               # benchmarks/results/converge_fmnist.{json,md}
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tokenthrift.ltm.registry import FMNIST_LTM
from tokenthrift.pretrained import FMNIST_VIT, weights_path
from tokenthrift.train import TrainConfig, Trainer, load_recipe
from tokenthrift.train.checkpoint import export_weights

OUTPUT = "runs/converge"
CARRIED = Path(__file__).parent / "results" / "converge"  # checkpoints carried between machines
SHIPPED = dict(epochs=30, ema=True, seed=0)  # the shipped model's run (benchmarks/pretrain_fmnist.py)

# name -> (recipe, overrides): from scratch with exactly the shipped model's recipe and schedule
SCRATCH = {
    "ltm_ib": ("fmnist_vit_tiny_ltm", {"ltm_ib": True}),
    "ltm_noib": ("fmnist_vit_tiny_ltm", {"ltm_ib": False}),
    "toe": ("fmnist_vit_tiny_toe", {}),
}
FINETUNE_EPOCHS = 3
FINETUNE = dict(model=FMNIST_VIT, pretrained=True, epochs=FINETUNE_EPOCHS, ema=True, lr_base=0.002, warmup_epochs=0,
                min_lr=1e-5)  # the demo's fine-tuning rate (a tenth of the pretraining peak), on all 60 000 images
TOME_R = 9  # 0.842 of the MACs: the uniform r closest to LTM's 0.851 (apps.compare.tome_r_for)
_LTM = {k: v for k, v in load_recipe("fmnist_vit_tiny_ltm").items() if k.startswith("ltm_")}
FINETUNES = {f"ft_{kind}_s{seed}": (extra, seed) for seed in (0, 1) for kind, extra in (
    ("full", {"method": "full"}), ("ltm", {"method": "ltm", **_LTM}), ("tome", {"method": "tome", "tome_r": TOME_R}))}
RUNS = [*SCRATCH, *FINETUNES]


def run_config(name: str, threads: int | None) -> TrainConfig:
    common = {"name": name, "output": OUTPUT, "threads": threads, "progress": False}
    if name in SCRATCH:
        recipe, extra = SCRATCH[name]
        return TrainConfig(**{**load_recipe(recipe), **SHIPPED, **extra, **common})
    extra, seed = FINETUNES[name]
    base = {k: v for k, v in load_recipe("fmnist_vit_tiny").items()  # the model's own architecture, not the recipe's
            if k not in ("model", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")}
    return TrainConfig(**{**base, **FINETUNE, **extra, "seed": seed, **common})


def train_run(name: str, threads: int | None) -> dict:
    run_dir = Path(OUTPUT) / name
    for done in (run_dir / "summary.json", CARRIED / f"{name}.summary.json"):
        if done.exists():
            return json.loads(done.read_text())
    cfg = run_config(name, threads)
    for last in (run_dir / "last.pth", CARRIED / f"{name}.last.pth"):
        if last.exists():
            cfg.resume = str(last)
            break
    return Trainer(cfg).fit()


def carry(name: str) -> None:
    """Copy a run's state into the repository: an unfinished run's last.pth, a finished run's summary and log."""
    run_dir = Path(OUTPUT) / name
    if (run_dir / "summary.json").exists():
        shutil.copyfile(run_dir / "summary.json", CARRIED / f"{name}.summary.json")
        shutil.copyfile(run_dir / "metrics.jsonl", CARRIED / f"{name}.jsonl")
        (CARRIED / f"{name}.last.pth").unlink(missing_ok=True)
        print("carried", name, "(finished): summary and log")
    elif (run_dir / "last.pth").exists():
        shutil.copyfile(run_dir / "last.pth", CARRIED / f"{name}.last.pth")
        shutil.copyfile(run_dir / "metrics.jsonl", CARRIED / f"{name}.partial.jsonl")
        print("carried", name, "(unfinished): last.pth and its log so far")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--carry", action="store_true",
                    help="copy each unfinished run's last.pth (a finished one's summary and log) into "
                         "benchmarks/results/converge and exit")
    ap.add_argument("--ship", action="store_true", help="export the finished ltm_ib run as the package's "
                    f"{FMNIST_LTM} weights (safetensors, training log, summary) and exit")
    args = ap.parse_args()
    if args.carry:
        for name in args.runs:
            carry(name)
        return
    if args.ship:
        run_dir = Path(OUTPUT) / "ltm_ib"
        if not (run_dir / "summary.json").exists():
            raise SystemExit(f"ltm_ib has not finished ({run_dir / 'summary.json'} is missing): train it first")
        summary = export_weights(run_dir / "last.pth", weights_path(FMNIST_LTM), FMNIST_LTM,
                                 "python benchmarks/converge_fmnist.py --runs ltm_ib")
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
        return
    for name in args.runs:
        summary = train_run(name, args.threads)
        print(name, {k: summary.get(k) for k in ("top1", "top1_ema", "train_time_s", "macs_ratio")}, flush=True)


if __name__ == "__main__":
    main()
