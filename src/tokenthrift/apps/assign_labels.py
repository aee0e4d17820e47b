"""``tokenthrift assign-labels``: the token-length label of each image of a split (the smallest grid a ReViT
checkpoint gets right), the training targets of ``train --method tla`` (:func:`.labels.label_split`)."""
from __future__ import annotations

import argparse

from .common import device, runtime_flags

HELP = "ReViT: token-length label of each image (smallest correct grid)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint of a --method revit run")
    p.add_argument("--split", choices=["train", "holdout", "eval"], default="train",
                   help="label the images the run trained on, the ones it held out (--train-holdout) or its "
                        "evaluation images")
    p.add_argument("--out", required=True, help="label file to write (read by train --method tla)")
    p.add_argument("--margin", type=float, default=0.0, help="also require this true-class probability")
    p.add_argument("--unsolved", choices=["smallest", "largest"], default="smallest",
                   help="label of images no grid gets right: the smallest grid (default: no pick helps them, the "
                        "smallest wastes the fewest MACs) or the largest (the rule before 2026-12)")
    p.add_argument("--ema", action="store_true", help="label with the EMA weights")
    p.add_argument("--data-dir", help="dataset folder (default: the run's)")
    runtime_flags(p)


def run(args: argparse.Namespace) -> None:
    from ..train.checkpoint import check_writable
    from .labels import label_split

    check_writable(args.out, "--out", directory=False)
    labels, info = label_split(args.checkpoint, args.split, args.out, margin=args.margin, batch_size=args.batch_size,
                               data_dir=args.data_dir, ema=args.ema, device=device(args.device),
                               workers=args.workers, unsolved=args.unsolved)
    total = max(len(labels), 1)
    print("grid  images  share")
    for g, count in zip(info["grids"], info["histogram"]):
        print(f"{g:>4}  {count:>6}  {count / total:.3f}")
    print(f"{len(labels)} labels ({args.split} split) -> {args.out}")
