"""LTM backbones for detection and instance segmentation: a tiny Swin in torchvision's Mask R-CNN (light heads,
128 px) against its LTM version at about 0.85 of the backbone's MACs, trained from scratch on the Fashion-MNIST
collage set (COCO layout, written by tokenthrift make-collage), 2 seeds. Per run: COCO box and mask AP (AP,
AP50, AP75) from pycocotools on the evaluation split; MACs of the backbone (the Swin, and with its FPN) and of
the whole detector (on real evaluation images: the mask head runs once per detection); inference images/s of
base and LTM timed in alternating rounds on the same real images. Writes benchmarks/results/ltm_detection.{json,md}.

    python benchmarks/ltm_detection.py     # writes the collage if missing, trains (or resumes) what is missing
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import tokenthrift  # noqa: F401
from tokenthrift import measure
from tokenthrift.data.coco import CocoInstances, make_collage
from tokenthrift.ltm.calibration import calibrate_ratio
from tokenthrift.measure import OnImages, detector_macs_rows, paired_throughput, run_metadata
from tokenthrift.train import TrainConfig, load_trained

from suite import run_or_reuse, write_result

OUT = Path(__file__).parent / "results"
SWIN = dict(embed_dim=48, depths=[2, 2, 2, 2], num_heads=[2, 4, 8, 16], window_size=4)
SIZE = 128


def config(args, seed: int, name: str, **extra) -> TrainConfig:
    return TrainConfig(task="detection", model="maskrcnn", backbone="swin_tiny_patch4_window7_224",
                       model_kwargs=dict(SWIN), det_head_width=64, img_size=SIZE, data=f"coco:{args.data}",
                       epochs=args.epochs, batch_size=8, eval_batch_size=8, lr_base=args.lr_base, warmup_epochs=1,
                       min_lr=1e-5, weight_decay=0.05, seed=seed, threads=args.threads, progress=False,
                       output=args.output, name=name, **extra)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="runs/collage")
    ap.add_argument("--train-images", type=int, default=1000)
    ap.add_argument("--val-images", type=int, default=250)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr-base", type=float, default=0.002)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--target", type=float, default=0.85, help="LTM backbone MACs / base backbone MACs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default="runs/bench_ltm_detection")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (Path(args.data) / "annotations").exists():
        print(make_collage(args.data, train=args.train_images, val=args.val_images, size=SIZE, seed=0), flush=True)
    ratios, got = calibrate_ratio("swin_tiny_patch4_window7_224", args.target, sites=None,
                                  input_size=(3, SIZE, SIZE), features_only=True, strict_img_size=False, **SWIN)
    print("LTM ratios", ratios, "backbone MACs ratio", got, flush=True)
    rows = []
    for seed in args.seeds:
        for variant, extra in (("base", {}), ("LTM", dict(method="ltm", ltm_ib=False, ltm_site_ratio=tuple(ratios)))):
            name = f"{variant.lower()}-s{seed}"
            summary = run_or_reuse(config(args, seed, name, **extra), resume=True)  # an interrupted run continues
            last = summary["history"][-1]
            rows.append({"seed": seed, "variant": variant, **{k: last[k] for k in (
                "box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")},
                "train_s": summary["train_time_s"]})
            print(rows[-1], flush=True)
    # MACs and speed of one seed's pair, on real evaluation images
    val = CocoInstances(args.data, "val")
    images = [val[i][0] for i in range(8)]
    base, _ = load_trained(Path(args.output) / f"base-s{args.seeds[0]}" / "last.pth")
    merged, _ = load_trained(Path(args.output) / f"ltm-s{args.seeds[0]}" / "last.pth")
    macs = detector_macs_rows(base, merged, labels=("Mask R-CNN + tiny Swin", "LTM Mask R-CNN + tiny Swin"),
                              images=images)
    body = [measure.macs(m.backbone.body, (3, SIZE, SIZE)) for m in (base, merged)]
    for row, b in zip(macs, body):
        row["swin_GMACs"] = b / 1e9
        row["swin_ratio"] = b / body[0]
    batch = torch.stack(images)
    speeds = paired_throughput([OnImages(lambda x, m=m: m(list(x)), batch) for m in (base, merged)],
                               (3, SIZE, SIZE), len(images), repeats=7)
    for row, ips in zip(macs, speeds):
        row.update(img_s=ips, speedup=ips / speeds[0])
    mean = []
    for variant in ("base", "LTM"):
        sel = [r for r in rows if r["variant"] == variant]
        mean.append({"variant": variant, **{k: statistics.fmean(r[k] for r in sel) for k in (
            "box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")}})
    mean.append({"variant": "LTM - base", **{k: mean[1][k] - mean[0][k] for k in mean[0] if k != "variant"}})
    meta = {**run_metadata(), "dtype": "fp32", "size": SIZE,
            "swin": SWIN, "head_width": 64, "epochs": args.epochs, "train_images": args.train_images,
            "val_images": args.val_images, "seeds": args.seeds, "ltm_site_ratios": ratios, "calibrated_ratio": got,
            "speed_batch": len(images)}
    print(write_result(OUT / "ltm_detection", meta, {"rows": rows, "mean": mean, "macs": macs}, rows, mean, macs))


if __name__ == "__main__":
    main()
