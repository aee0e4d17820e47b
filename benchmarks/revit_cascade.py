"""Adaptive inference against every fixed grid: the confidence cascade (max probability and margin, with and
without the assigner's start), TLA argmax and the fixed grids on the same curve, thresholds calibrated on
training images each ReViT never trained on. Two ReViT benchmark runs (benchmarks/revit_fmnist.sh's recipe:
fmnist_vit_tiny, 6 epochs on 10 000 training images; seeds 0 and 1) on all 10 000 test images, and the
demo's checkpoint (runs/demo, `make demo`) on its 5 000. Trains what is missing (resumable: a finished run is
kept), then writes benchmarks/results/revit_cascade.{md,json} and one Pareto plot per checkpoint.

    python benchmarks/revit_cascade.py [--seeds 0 1] [--demo runs/demo] [--budgets 0.411 0.6] [--threads 2]
    python benchmarks/revit_cascade.py --seeds --budgets 0.411 0.5 0.6   # the demo's checkpoint only
"""
import argparse
import json
from pathlib import Path

import torch

from tokenthrift.apps import report
from tokenthrift.apps.labels import adaptive_report, label_split
from tokenthrift.measure import run_metadata
from tokenthrift.train import TrainConfig, load_recipe

from suite import run_or_reuse, write_result

OUT = Path(__file__).parent / "results"
RUNS = Path("runs/bench_revit_cascade")
COLUMNS = ("rule", "top1", "MACs_ratio", "MMACs_total", "share_g14", "share_g10", "share_g7", "thresholds",
           "calibration_top1", "calibration_MACs_ratio", "img_s", "speedup", "note")


def benchmark_run(seed: int, threads: int) -> Path:
    """The ReViT benchmark's recipe at ``seed``, its token-length labels and its assigner (skipped when done)."""
    out = RUNS / f"seed{seed}"
    common = dict(load_recipe("fmnist_vit_tiny"), epochs=6, train_subset=10000, seed=seed, output=str(out),
                  progress=False, threads=threads, eval_subset=None)
    run_or_reuse(TrainConfig(**common, method="revit", name="revit", overwrite=True))
    for split in ("train", "eval"):
        if not (out / f"labels_{split}.pt").exists():
            label_split(out / "revit" / "last.pth", split, out / f"labels_{split}.pt")
    run_or_reuse(TrainConfig(**common, method="tla", name="tla", tla_labels=str(out / "labels_train.pt"),
                             tla_eval_labels=str(out / "labels_eval.pt"), tla_balanced=True,
                             tla_model="test_byobnet", overwrite=True))
    return out


def evaluate(name: str, folder: Path, labels: Path | None, budgets: list[float] | None) -> list[dict]:
    rows = adaptive_report(folder / "revit" / "last.pth", folder / "tla" / "last.pth", oracle_labels=labels,
                           plot=OUT / f"revit_cascade_{name}.png", repeats=5, budgets=budgets)
    fixed = {r["rule"]: r for r in rows if r.get("family") == "fixed grid"}
    grids = sorted(int(k.split()[1].split("x")[0]) for k in fixed)
    middle = fixed[f"always {grids[1]}x{grids[1]}"]
    for r in rows:  # the targets: above the middle grid at its MACs (+0.02), the largest grid's top-1 cheaper
        if "top1" in r:
            r["vs_middle_grid"] = r["top1"] - middle["top1"] if r["MACs_ratio"] <= middle["MACs_ratio"] + 0.02 else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="benchmark seeds (none: the demo only)")
    ap.add_argument("--demo", default="runs/demo", help="the demo's run folder (skipped if it holds no revit run)")
    ap.add_argument("--budgets", type=float, nargs="+", default=None,
                    help="MACs budgets of the cascades (default: the middle grid's MACs and 0.6)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    saved = OUT / "revit_cascade.json"  # a run of some checkpoints keeps the others' rows
    results = json.loads(saved.read_text())["results"] if saved.exists() else {}
    meta = run_metadata(device="cpu", dtype="fp32", batch=256, threads=args.threads)

    def write(name: str, rows: list[dict]) -> None:  # after every checkpoint: a long run keeps what it has
        results[name] = rows
        write_result(OUT / "revit_cascade", meta, {"results": results},
                     *(part for key, table in results.items() for part in
                       (f"## {key}", report.table(table, [*COLUMNS, "vs_middle_grid"], markdown=True))))
        print(f"\n{name}\n{report.table(rows, [*COLUMNS, 'vs_middle_grid'])}", flush=True)

    if (Path(args.demo) / "revit" / "last.pth").exists():
        labels = Path(args.demo) / "labels_eval.pt"
        write("demo", evaluate("demo", Path(args.demo), labels if labels.exists() else None, args.budgets))
    for seed in args.seeds:
        folder = benchmark_run(seed, args.threads)
        write(f"benchmark_seed{seed}", evaluate(f"seed{seed}", folder, folder / "labels_eval.pt", args.budgets))


if __name__ == "__main__":
    main()
