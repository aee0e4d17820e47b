"""Does position bookkeeping matter? ToMe on a RoPE ViT with merged tokens at their patches' size-weighted mean
position against the naive rule, the merged token keeps the position of the token it was merged into (which this
benchmark found far better: ToMe's default since).

The model: a RoPE ViT (timm ``Eva``, ``vit_small_patch16_rope_224``: rotary positions only, no absolute table) at
the shipped ViT's shape (28 px, patch 2: the 14x14 grid; width 48, depth 6, 3 heads), trained from scratch on
Fashion-MNIST with the shipped model's recipe (``fmnist_vit_tiny``: all 60 000 training images, EMA) on a shorter
schedule (``--epochs``, default 10 against the shipped 30; resumable: run the command again). Then ToMe at several
r, both position rules, top-1 of the model's own weights on all 10 000 test images, MACs against the plain model.

    python benchmarks/rope_positions.py --threads 2     # -> benchmarks/results/rope_positions.{json,md}
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import tokenthrift as tt
from tokenthrift.apps.report import table
from tokenthrift.data import build_dataset
from tokenthrift.train import TrainConfig, Trainer, evaluate, load_recipe, load_trained, run_preprocess

from suite import write_result

MODEL = "vit_small_patch16_rope_224"  # timm Eva: RoPE ('cat', x-y indexing), a CLS token, no absolute table
OUT = Path("benchmarks/results/rope_positions")
R_VALUES = (4, 8, 12, 16, 20, 24)


def train(epochs: int, threads: int, output: str) -> Path:
    run_dir = Path(output) / "rope_vit_fmnist"
    last = run_dir / "last.pth"
    cfg = TrainConfig(**{**load_recipe("fmnist_vit_tiny"), "model": MODEL, "epochs": epochs, "ema": True,
                         "name": run_dir.name, "output": output, "threads": threads, "progress": False,
                         "resume": str(last) if last.exists() else None})
    done = last.exists() and torch.load(last, weights_only=False)["epoch"] >= epochs
    if not done:
        Trainer(cfg).fit()
    return last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default="runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = train(args.epochs, args.threads, args.output)
    model, cfg = load_trained(checkpoint)
    ds, _ = build_dataset("fashion-mnist", False, 28, 1, preprocess=run_preprocess(cfg))
    loader = DataLoader(ds, 500)
    size = (1, 28, 28)
    base_macs = tt.measure.macs(model, size)
    rows = [{"r": 0, "positions": "-", "top1": evaluate(model, loader, torch.device("cpu")), "MACs_ratio": 1.0}]
    for r in R_VALUES:
        for rule in ("mean", "kept"):
            merged = copy.deepcopy(model)
            tt.tome.apply(merged, r, positions=rule)
            rows.append({"r": r, "positions": rule, "top1": evaluate(merged, loader, torch.device("cpu")),
                         "MACs_ratio": tt.measure.macs(merged, size) / base_macs})
            print(table(rows[-1:]), flush=True)
    history = torch.load(checkpoint, weights_only=False)["history"]
    meta = tt.measure.run_metadata(device="cpu", dtype="fp32", model=MODEL, epochs=args.epochs,
                                   trained_top1=history[-1]["top1"], test_images=len(ds),
                                   command="python benchmarks/rope_positions.py --threads 2")
    write_result(OUT, meta, {"rows": rows}, rows)
    print(table(rows, markdown=True))


if __name__ == "__main__":
    main()
