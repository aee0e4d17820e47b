"""Fashion-MNIST, tiny ViT (28 px, patch 2, 196 tokens): full-token training against ToE, same epochs,
several seeds. Writes benchmarks/results/toe_fmnist.json, .md and a plot of top-1 against wall-clock.

    python benchmarks/toe_fmnist.py --epochs 6 --train-subset 20000 --seeds 0 1
"""
import argparse
import statistics
from pathlib import Path

from tokenthrift import viz
from tokenthrift.apps.bench import compare_rows
from tokenthrift.measure import run_metadata
from tokenthrift.train import TrainConfig, load_recipe, train

from suite import write_result

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train-subset", type=int, default=20000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--output", default="runs/bench_toe_fmnist")
    args = ap.parse_args()
    recipe = load_recipe("fmnist_vit_tiny")
    third = args.epochs / 3
    common = dict(recipe, epochs=args.epochs, train_subset=args.train_subset, output=args.output, progress=False)
    runs, rows = {}, []
    for i, seed in enumerate(args.seeds):
        # alternate the order (full first, then ToE first) so slow drift of the machine hits both alike
        order = ["full", "toe"] if i % 2 == 0 else ["toe", "full"]
        results = {}
        for method in order:
            extra = dict(toe_milestones=(0, third, 2 * third)) if method == "toe" else {}
            results[method] = train(TrainConfig(**common, seed=seed, method=method, name=f"{method}-s{seed}", **extra))
            print(method, seed, results[method]["top1"], results[method]["train_time_s"], flush=True)
        runs[seed] = results
        for row in compare_rows({"full tokens": results["full"], "ToE": results["toe"]}):
            rows.append({"seed": seed, **row})
    summary = []
    for label in ("full tokens", "ToE"):
        sel = [r for r in rows if r["run"] == label]
        summary.append({"run": label, "seeds": len(sel), "top1_mean": statistics.fmean(r["top1"] for r in sel),
                        "train_s_median": statistics.median(r["train_s"] for r in sel),
                        "speedup_median": statistics.median(r["speedup"] for r in sel),
                        "MACs_ratio": statistics.fmean(r["MACs_ratio"] for r in sel),
                        "efficiency_median": statistics.median(r["efficiency"] for r in sel)})
    meta = {**run_metadata(), "dtype": "fp32", "batch_size": 128,
            "epochs": args.epochs, "train_subset": args.train_subset, "eval": "full 10k test set"}
    histories = {f"{m}-s{s}": r[m]["history"] for s, r in runs.items() for m in r}
    md = write_result(OUT / "toe_fmnist", meta, {"rows": rows, "summary": summary, "histories": histories},
                      rows, summary)
    viz.plot_accuracy_vs_time({f"{m} seed {s}": r[m]["history"] for s, r in runs.items() for m in r},
                              OUT / "toe_fmnist.png", title="Fashion-MNIST tiny ViT: full tokens vs ToE")
    print(md)


if __name__ == "__main__":
    main()
