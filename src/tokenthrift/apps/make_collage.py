"""``tokenthrift make-collage``: the offline instance-segmentation set (Fashion-MNIST garments on canvases) in the
COCO layout, for ``train --task detection --data coco:PATH`` (:func:`tokenthrift.data.coco.make_collage`)."""
from __future__ import annotations

import argparse

HELP = "write the offline instance-segmentation set (Fashion-MNIST garments on canvases) in the COCO layout"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write (annotations/, train2017/, val2017/)")
    p.add_argument("--train", type=int, default=2000, help="training canvases (default: 2000)")
    p.add_argument("--val", type=int, default=500, help="evaluation canvases (default: 500)")
    p.add_argument("--size", type=int, default=128, help="canvas side in pixels (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--max-objects", type=int, default=6, help="garments per canvas, at most (default: 6)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: Debian's package location)")


def run(args: argparse.Namespace) -> None:
    from ..data.coco import make_collage

    summary = make_collage(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed,
                           max_objects=args.max_objects, data_dir=args.data_dir)
    for split, counts in summary.items():
        print(f"{split}: {counts['images']} images, {counts['instances']} instances")
    print(f"COCO layout in {args.out}: train with --task detection --data coco:{args.out}")
