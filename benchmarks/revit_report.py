"""Tables and a plot from the run folders of benchmarks/revit_fmnist.sh: per-grid top-1 of the ReViT
against the single-grid model (trained at 28 px, also evaluated at 20 and 14 px) and the ablations,
assigner accuracy, adaptive top-1 / MACs over a gamma sweep, and the adaptive path's measured
throughput at batch 256. Writes benchmarks/results/revit_fmnist.{md,json,png}.

    python benchmarks/revit_report.py --runs runs/bench_revit_fmnist
"""
import argparse
import json
from pathlib import Path

import matplotlib
import torch

from tokenthrift import revit
from tokenthrift.apps.labels import adaptive_report, split_loader
from tokenthrift.measure import run_metadata
from tokenthrift.train import evaluate, load_trained, model_input_size

from suite import write_result

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = Path(__file__).parent / "results"
GAMMAS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def per_grid(run: Path) -> dict:
    last = json.loads((run / "summary.json").read_text())["history"][-1]
    return {k: v for k, v in last.items() if k.startswith("top1_g")}


def single_grid_rows(run: Path, grids) -> dict:
    """The plain model, converted without TAL-LN (same weights) and simply evaluated at smaller grids."""
    model, cfg = load_trained(run / "last.pth")
    size = model_input_size(model, cfg)
    resizable = revit.convert(model, grids, tal_ln=False).eval()
    loader = split_loader(cfg, "eval", size, 500, None)
    return {f"top1_g{g}": evaluate(resizable, loader, torch.device("cpu"), grid=g) for g in grids}


def plot(rows: list[dict]) -> None:
    """Top-1 against mean MACs: the gamma sweep (sorted by MACs), argmax, the fixed grids, the oracle."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    sweep = sorted((r for r in rows if r["rule"].startswith("gamma")), key=lambda r: r["MMACs_total"])
    ax.plot([r["MMACs_total"] for r in sweep], [r["top1"] for r in sweep], "o-", label="ReViT + TLA, gamma sweep")
    for r in rows:
        if r["rule"] == "argmax" or r["rule"].startswith("always") or r["rule"] == "oracle labels":
            ax.plot(r["MMACs_total"], r["top1"], "*" if r["rule"] == "argmax" else "s", markersize=9,
                    label="ReViT + TLA, argmax" if r["rule"] == "argmax" else r["rule"])
    ax.set_xlabel("mean MMACs per image (assigner included)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Fashion-MNIST tiny ViT: adaptive token length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "revit_fmnist.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs/bench_revit_fmnist")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from revit_fmnist.json")
    args = ap.parse_args()
    if args.plot_only:
        return plot(json.loads((OUT / "revit_fmnist.json").read_text())["adaptive"])
    runs = Path(args.runs)
    grids = (14, 10, 7)
    table = [{"model": "ReViT (TAL-LN + TLSD)", **per_grid(runs / "revit")},
             {"model": "single grid (28 px), resized input", **single_grid_rows(runs / "single_grid", grids)}]
    for name, label in (("revit_no_talln", "ReViT, TAL-LN off"), ("revit_no_tlsd", "ReViT, TLSD off")):
        if (runs / name / "summary.json").exists():
            table.append({"model": label, **per_grid(runs / name)})
    tla = json.loads((runs / "tla" / "summary.json").read_text())
    labels = revit.load_labels(runs / "labels_train.pt")
    eval_labels = revit.load_labels(runs / "labels_eval.pt")
    rows = adaptive_report(runs / "revit" / "last.pth", runs / "tla" / "last.pth", (None, *GAMMAS),
                           oracle_labels=runs / "labels_eval.pt", throughput_batch=256, repeats=args.repeats)
    assigners = []  # the same labels and backbone with each assigner trained on them (argmax rule)
    for run in sorted(p for p in runs.glob("tla*") if (p / "last.pth").exists()):
        argmax = next(r for r in rows if r["rule"] == "argmax") if run.name == "tla" else next(
            r for r in adaptive_report(runs / "revit" / "last.pth", run / "last.pth", (None,), throughput_batch=256,
                                       repeats=args.repeats) if r["rule"] == "argmax")
        last_epoch = json.loads((run / "summary.json").read_text())["history"][-1]
        assigners.append({"assigner": load_trained(run / "last.pth")[1].options.model or revit.DEFAULT_ASSIGNER,
                          "run": run.name,
                          "assigner_top1": last_epoch["top1"],
                          "MACs_fraction": last_epoch.get("tla_macs_fraction", "-"),
                          **{k: argmax[k] for k in ("top1", "MACs_ratio", "img_s", "img_s_full", "speedup",
                                                    "efficiency")}})
    meta = {**run_metadata(), "dtype": "fp32",
            "throughput_batch": 256, "eval": "Fashion-MNIST test set (10k)"}
    extra = {"assigner_top1": tla["top1"], "label_hist_train": labels.histogram.tolist(),
             "label_hist_eval": eval_labels.histogram.tolist(), "grids": list(grids)}
    md = write_result(OUT / "revit_fmnist", meta,
                      {"per_grid": table, "adaptive": rows, "assigners": assigners, **extra},
                      table, json.dumps(extra), rows, assigners)
    plot(rows)
    print(md)


if __name__ == "__main__":
    main()
