"""Train the shipped pretrained model and export it: the Fashion-MNIST tiny ViT (recipe fmnist_vit_tiny) with
full tokens, 30 epochs on all 60 000 training images, EMA on; then the weights with the better final top-1
(model or EMA) go to src/tokenthrift/weights/vit_fmnist_tiny_patch2_28.safetensors, with the training log
(.jsonl) and a summary (.json) beside them, loadable as timm.create_model("vit_fmnist_tiny_patch2_28",
pretrained=True).

About 3 hours on 2 idle CPU cores (6 min an epoch; the shipped run took 4.6 h sharing the machine).
Interrupted? Run the same command again: it resumes from runs/fmnist_vit_tiny_pretrain/last.pth.

    python benchmarks/pretrain_fmnist.py [--epochs 30] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenthrift.pretrained import FMNIST_VIT, weights_path
from tokenthrift.train import TrainConfig, Trainer, load_recipe
from tokenthrift.train.checkpoint import export_weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default="runs")
    ap.add_argument("--export-only", action="store_true", help="export the finished run without training")
    args = ap.parse_args()
    run_dir = Path(args.output) / "fmnist_vit_tiny_pretrain"
    if not args.export_only:
        last = run_dir / "last.pth"
        resume = str(last) if last.exists() else None
        cfg = TrainConfig(**{**load_recipe("fmnist_vit_tiny"), "epochs": args.epochs, "ema": True,
                             "name": run_dir.name, "output": args.output, "threads": args.threads,
                             "progress": False, "resume": resume})
        Trainer(cfg).fit()
    print(json.dumps(export_weights(run_dir / "last.pth", weights_path(), FMNIST_VIT,
                                    "python benchmarks/pretrain_fmnist.py"), indent=1))


if __name__ == "__main__":
    main()
