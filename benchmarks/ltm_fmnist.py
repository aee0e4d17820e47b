"""Fashion-MNIST from scratch: base against LTM (about 0.85 of the base's inference MACs), with and without
the IB loss, for a tiny ViT and a tiny Swin, several seeds: top-1 and inference MACs (training
wall-clock is not compared here: these runs share the machine with other jobs).
Writes benchmarks/results/ltm_fmnist<tag>.{json,md}.
A run whose summary.json already exists under --output is reused, so an interrupted benchmark resumes.

    OMP_NUM_THREADS=1 python benchmarks/ltm_fmnist.py --epochs 6 --train-subset 20000 --seeds 0 1
"""
import argparse
import statistics
from pathlib import Path

from tokenthrift import measure
from tokenthrift.measure import run_metadata
from tokenthrift.train import TrainConfig, load_recipe, load_trained

from suite import run_or_reuse, write_result

OUT = Path(__file__).parent / "results"
FAMILIES = {"tiny ViT": ("fmnist_vit_tiny", "fmnist_vit_tiny_ltm"),
            "tiny Swin": ("fmnist_swin_tiny", "fmnist_swin_tiny_ltm")}
VARIANTS = {"base": {}, "LTM + IB": {"ltm_ib": True}, "LTM, no IB": {"ltm_ib": False}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train-subset", type=int, default=20000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--output", default="runs/bench_ltm_fmnist")
    ap.add_argument("--tag", default="", help="suffix of the result files (ltm_fmnist<tag>.json/.md)")
    args = ap.parse_args()
    rows = []
    for family in args.families:
        base_recipe, ltm_recipe = FAMILIES[family]
        for seed in args.seeds:
            common = dict(epochs=args.epochs, train_subset=args.train_subset, output=args.output, progress=False,
                          seed=seed)
            for variant, extra in VARIANTS.items():
                recipe = base_recipe if variant == "base" else ltm_recipe
                tag = f"{base_recipe}-{variant.replace(' ', '').replace(',', '-').replace('+', '')}-s{seed}"
                result = run_or_reuse(TrainConfig(**dict(load_recipe(recipe), **common, **extra), name=tag))
                model, cfg = load_trained(Path(result["run_dir"]) / "last.pth")
                macs = measure.macs(model, (cfg.in_chans, cfg.img_size, cfg.img_size))
                rows.append({"model": family, "variant": variant, "seed": seed, "top1": result["top1"],
                             "MMACs": macs / 1e6})
                print(rows[-1], flush=True)
    summary = []
    for family in args.families:
        base_top1 = statistics.fmean(r["top1"] for r in rows if r["model"] == family and r["variant"] == "base")
        base_macs = next(r["MMACs"] for r in rows if r["model"] == family and r["variant"] == "base")
        for variant in VARIANTS:
            sel = [r for r in rows if r["model"] == family and r["variant"] == variant]
            mean = statistics.fmean(r["top1"] for r in sel)
            summary.append({"model": family, "variant": variant, "seeds": len(sel), "top1_mean": mean,
                            "top1_seeds": " / ".join(f"{r['top1']:.2f}" for r in sel),
                            "delta_vs_base": mean - base_top1,
                            "MMACs": sel[0]["MMACs"], "MACs_ratio": sel[0]["MMACs"] / base_macs})
    meta = {**run_metadata(), "dtype": "fp32", "batch_size": 128,
            "epochs": args.epochs, "train_subset": args.train_subset, "eval": "full 10k test set"}
    print(write_result(OUT / f"ltm_fmnist{args.tag}", meta, {"rows": rows, "summary": summary}, rows, summary))


if __name__ == "__main__":
    main()
