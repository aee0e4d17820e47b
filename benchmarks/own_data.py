"""Your own data: fine-tune the shipped vit_fmnist_tiny_patch2_28 on a small ImageFolder that is not
Fashion-MNIST, with tokenthrift's defaults, as a user would: full tokens, LTM, and ReViT + TLA.

The folder is written from scikit-learn's bundled handwritten digits (1 797 images of 8x8 px, 16 grey
levels; offline), upscaled to 28 px (bilinear) as white-on-black PNGs, split 80/20 per class with a fixed
seed: runs/own_data/digits/{train,val}/<digit>/<i>.png. Digits change meaning in a mirror, so the runs pass
``--hflip 0`` (the documented switch); one row keeps the default flip to show its cost, and one reproduces
the issue's setting (ImageNet statistics, the from-scratch rate and warm-up) to show what the defaults fix.

    pip install scikit-learn
    python benchmarks/own_data.py --epochs 10 --seeds 0 1 --output runs/own_data_e10
    python benchmarks/own_data.py --epochs 5 --seeds 0 1 --rows full ltm-macs   # --ltm-macs 0.85 against full

Every run is one ``tokenthrift train`` command (printed); a finished run (summary.json) is reused.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from PIL import Image

from tokenthrift.apps.labels import adaptive_report, label_split
from tokenthrift.train import TrainConfig, load_recipe

from suite import run_or_reuse

OUT = Path("runs/own_data")
FOLDER = Path("runs/own_data/digits")  # shared by every --output
MODEL = "vit_fmnist_tiny_patch2_28"
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def write_digits(root: Path, seed: int = 0) -> Path:
    """scikit-learn's digits as an ImageFolder of 28 px grey PNGs (80 % train, 20 % val per class)."""
    if (root / "val").is_dir():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        index = rng.permutation(np.flatnonzero(digits.target == label))
        cut = int(round(0.8 * len(index)))
        for split, part in (("train", index[:cut]), ("val", index[cut:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
                Image.fromarray(pixels).resize((28, 28), Image.BILINEAR).save(folder / f"{i}.png")
    return root


# (run key, row name, train flags beyond the common ones: tokenthrift train --model ... --pretrained --data ...)
ROWS = [
    ("issue", "full tokens, the issue's setting (ImageNet statistics, lr 5e-4 per 512, warm-up 1 epoch)",
     dict(method="full", hflip=0.0, lr_base=5e-4, warmup_epochs=1, **IMAGENET)),
    ("full-flip", "full tokens, defaults (flip on)", dict(method="full")),
    ("full", "full tokens, defaults, --hflip 0", dict(method="full", hflip=0.0)),
    ("ltm", "LTM (ratios of fmnist_vit_tiny_ltm), defaults, --hflip 0",
     dict(method="ltm", hflip=0.0, **{k: v for k, v in load_recipe("fmnist_vit_tiny_ltm").items()
                                      if k.startswith("ltm_")})),
    ("ltm-macs", "LTM --ltm-macs 0.85, defaults, --hflip 0", dict(method="ltm", hflip=0.0, ltm_macs=0.85)),
    ("revit", "ReViT (grids 14/10/7), defaults, --hflip 0", dict(method="revit", hflip=0.0)),
]


def flags(values: dict) -> str:
    out = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else f"--no-{k.replace('_', '-')}")
        elif isinstance(v, (tuple, list)):
            out.append(f"{flag} {' '.join(str(x) for x in v)}")
        else:
            out.append(f"{flag} {v}")
    return " ".join(out)


def run(name: str, extra: dict, epochs: int, seed: int) -> dict:
    common = dict(model=MODEL, pretrained=True, data=f"imagefolder:{FOLDER}", epochs=epochs,
                  seed=seed, output=str(OUT), name=name, progress=False, overwrite=True, threads=1)
    cfg = {**common, **extra}
    print("tokenthrift train " + flags({k: v for k, v in cfg.items() if k not in ("progress", "overwrite")}),
          flush=True)
    return run_or_reuse(TrainConfig(**cfg))


def tla_rows(revit_name: str, epochs: int, seed: int) -> list[dict]:
    """Label the ReViT's training and validation images, train the assigner (test_byobnet, class-balanced,
    as the demo) and report the fixed grids and the adaptive rule."""
    ckpt = OUT / revit_name / "last.pth"
    for split in ("train", "eval"):
        label_split(ckpt, split, OUT / f"{revit_name}-labels-{split}.pt")
    tla_name = f"{revit_name}-tla"
    run_or_reuse(TrainConfig(model=MODEL, data=f"imagefolder:{FOLDER}", epochs=max(2, epochs // 2),
                             seed=seed, output=str(OUT), name=tla_name, progress=False, overwrite=True, threads=1,
                             method="tla",
                             tla_model="test_byobnet", tla_balanced=True, lr_base=0.008, hflip=0.0,
                             tla_labels=str(OUT / f"{revit_name}-labels-train.pt"),
                             tla_eval_labels=str(OUT / f"{revit_name}-labels-eval.pt")))
    return adaptive_report(ckpt, OUT / tla_name / "last.pth", throughput_batch=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--output", default="runs/own_data", help="run folders (a finished run there is reused)")
    ap.add_argument("--rows", nargs="+", choices=[key for key, _, _ in ROWS],
                    help="run these rows only (results: own_data_e<E>_<rows>.json)")
    args = ap.parse_args()
    global OUT
    OUT = Path(args.output)
    write_digits(FOLDER)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for key, row, extra in ROWS:
            if args.rows and key not in args.rows:
                continue
            summary = run(f"{key}-s{seed}", extra, args.epochs, seed)
            if extra["method"] == "revit":
                for r in tla_rows(f"{key}-s{seed}", args.epochs, seed):
                    results.setdefault(f"ReViT + TLA: {r['rule']}", []).append(
                        {"top1": r["top1"], "macs_ratio": r["MACs_ratio"]})
                continue
            ratio = summary["inference_macs"] / summary["baseline_macs"]
            results.setdefault(row, []).append({"top1": summary["top1"], "macs_ratio": ratio})
    table = {row: {"top1_mean": statistics.fmean(e["top1"] for e in entries),
                   "top1_per_seed": [round(e["top1"], 2) for e in entries],
                   "macs_ratio": statistics.fmean(e["macs_ratio"] for e in entries)}
             for row, entries in results.items()}
    out = Path(f"benchmarks/results/own_data_e{args.epochs}{'_' + '_'.join(args.rows) if args.rows else ''}.json")
    out.write_text(json.dumps({"epochs": args.epochs, "seeds": args.seeds, "rows": table}, indent=1))
    print("\n| row | top-1 % (mean; per seed) | MACs ratio |\n|---|---|---|")
    for row, t in table.items():
        print(f"| {row} | {t['top1_mean']:.2f} ({', '.join(map(str, t['top1_per_seed']))}) | {t['macs_ratio']:.3f} |")


if __name__ == "__main__":
    main()
