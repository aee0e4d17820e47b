"""ReViT + TLA on video: a small TimeSformer (divided space-time, 4 frames of 28 px, patch 2: 14×14 / 10×10
/ 7×7 tokens per frame, width 48, depth 4) on Moving Fashion-MNIST, 2 seeds. Per seed: the ReViT
(every grid each step, TAL-LN, TLSD), token-length labels of its training and test clips, the assigner
(test_byobnet at half resolution on the middle frame and, with --tla-motion, the default, the clip's mean
absolute frame difference as a second channel), and the adaptive evaluation (each fixed grid, argmax, a gamma
sweep, the confidence cascade over the grids, one decision per clip, calibrated on held-out training clips;
MACs per clip with the assigner; clips/s of the adaptive path against the full grid, timed
in alternating rounds on real test clips), and at each grid whether the model uses frame order: the share of
clips whose motion pair it gets right (the frames' content tells the pair) and, among those, the share with
the right direction (only the order of the frames tells it; 50 % is an order-blind model).
Writes benchmarks/results/revit_video_motion.{json,md} (revit_video.{json,md} with --no-tla-motion), keeping
the rows of seeds it did not run (one seed per machine: --seeds 1 adds seed 1 to seed 0's file).

    python benchmarks/revit_video.py                  # trains what is missing (resumable), then reports
    python benchmarks/revit_video.py --report-only    # re-time and re-tabulate finished runs
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tokenthrift.apps import report
from tokenthrift.apps.labels import adaptive_report, label_split, split_loader
from tokenthrift.measure import run_metadata
from tokenthrift.train import TrainConfig, load_trained, model_input_size

from suite import run_or_reuse, write_result

OUT = Path(__file__).parent / "results"
MODEL = dict(model="timesformer_tiny_patch16_224", img_size=28, patch_size=2, num_frames=4, in_chans=1, embed_dim=48,
             depth=4, num_heads=3, data="moving-fashion-mnist", batch_size=64, lr_base=0.008, weight_decay=0.05,
             warmup_epochs=1, min_lr=1e-5, label_smoothing=0.1, progress=False)
GAMMAS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)


def run_seed(seed: int, args) -> Path:
    out = Path(args.output) / f"s{seed}"
    common = dict(MODEL, epochs=args.epochs, train_subset=args.train_subset, eval_subset=args.eval_subset,
                  seed=seed, output=str(out), threads=args.threads)
    # an interrupted run continues from its last.pth, so a restarted benchmark continues where it stopped
    run_or_reuse(TrainConfig(**common, method="revit", name="revit"), resume=True)
    for split in ("train", "eval"):
        if not (out / f"labels_{split}.pt").exists():
            label_split(out / "revit" / "last.pth", split, out / f"labels_{split}.pt")
    run_or_reuse(TrainConfig(**{**common, "epochs": args.tla_epochs}, method="tla", name="tla",
                             tla_model="test_byobnet", tla_labels=str(out / "labels_train.pt"),
                             tla_eval_labels=str(out / "labels_eval.pt"), tla_balanced=True,
                             tla_motion=args.tla_motion), resume=True)
    return out


@torch.no_grad()
def order_rows(revit_checkpoint: Path, seed: int) -> list[dict]:
    """Per grid: top-1, pair top-1 (classes 2k and 2k+1 are one motion forwards and backwards) and the
    direction top-1 among the clips whose pair is right."""
    revit, cfg = load_trained(revit_checkpoint)
    pred, target = [], []
    for clips, labels in split_loader(cfg, "eval", model_input_size(revit, cfg), 250, None):
        pred.append(torch.stack([revit(clips, grid=g).argmax(-1) for g in revit.grids], 1))
        target.append(labels)
    pred, target = torch.cat(pred), torch.cat(target)[:, None]
    pair = pred // 2 == target // 2
    exact = pred == target
    return [{"seed": seed, "grid": f"{g}x{g}", "top1": 100.0 * exact[:, k].double().mean().item(),
             "pair_top1": 100.0 * pair[:, k].double().mean().item(),
             "direction_top1_given_pair": 100.0 * exact[:, k][pair[:, k]].double().mean().item()}
            for k, g in enumerate(revit.grids)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--tla-epochs", type=int, default=4)
    ap.add_argument("--train-subset", type=int, default=5000)
    ap.add_argument("--eval-subset", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tla-motion", action=argparse.BooleanOptionalAction, default=True,
                    help="the assigner sees the middle frame and the frame differences (default; --no-tla-motion: "
                         "the middle frame only, as before 2026-12-02)")
    ap.add_argument("--output", default="runs/bench_revit_video")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stem = "revit_video_motion" if args.tla_motion else "revit_video"  # the middle-frame runs keep their files
    rows, order, seeds = [], [], list(args.seeds)
    if (OUT / f"{stem}.json").exists():  # a run of other seeds (another machine's): keep their rows
        kept = json.loads((OUT / f"{stem}.json").read_text())
        rows = [r for r in kept["rows"] if r["seed"] not in args.seeds]
        order = [r for r in kept["order"] if r["seed"] not in args.seeds]
        seeds = sorted({*seeds, *(r["seed"] for r in rows)})
    for seed in args.seeds:
        out = Path(args.output) / f"s{seed}" if args.report_only else run_seed(seed, args)
        tla = json.loads((out / "tla" / "summary.json").read_text())
        for r in adaptive_report(out / "revit" / "last.pth", out / "tla" / "last.pth", gammas=(None, *GAMMAS),
                                 oracle_labels=out / "labels_eval.pt", throughput_batch=64, repeats=7):
            rows.append({"seed": seed, **r, "assigner_top1": tla["top1"]})
        order += order_rows(out / "revit" / "last.pth", seed)
        print(report.table([r for r in rows if r["seed"] == seed]), flush=True)
    mean = []
    for rule in dict.fromkeys(r["rule"] for r in rows):
        sel = [r for r in rows if r["rule"] == rule and "top1" in r]  # a cascade that fits no budget has no top-1
        if not sel:
            continue
        full = [r for r in rows if r["rule"] == "always 14x14" and r["seed"] in {q["seed"] for q in sel}]
        m = {"rule": rule, "top1_mean": statistics.fmean(r["top1"] for r in sel),
             "delta_vs_14x14": statistics.fmean(a["top1"] - b["top1"] for a, b in zip(sel, full)),
             "MACs_ratio_mean": statistics.fmean(r["MACs_ratio"] for r in sel),
             "MMACs_per_clip": statistics.fmean(r["MMACs_total"] for r in sel)}
        if all("speedup" in r for r in sel):
            m.update(speedup_median=statistics.median(r["speedup"] for r in sel),
                     efficiency_median=statistics.median(r["efficiency"] for r in sel))
        mean.append(m)
    meta = {**run_metadata(), "dtype": "fp32", "model": MODEL,
            "epochs": args.epochs, "tla_epochs": args.tla_epochs, "train_clips": args.train_subset,
            "test_clips": args.eval_subset, "seeds": seeds, "throughput_batch": 64, "tla_motion": args.tla_motion}
    print(write_result(OUT / stem, meta, {"rows": rows, "mean": mean, "order": order}, rows, mean, order))


if __name__ == "__main__":
    main()
