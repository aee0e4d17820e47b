"""The main job (``make demo``): a tiny ViT on Fashion-MNIST, full tokens against ToE (training),
ReViT + Token-Length Assigner against the full grid (inference), and the LTM model (learnable token
merging) against the full-token ViT (architecture)."""
from __future__ import annotations

from pathlib import Path

from . import report, viz
from .train import TrainConfig, load_recipe, train


def compare_rows(results: dict[str, dict]) -> list[dict]:
    """One row per run: top-1, training wall-clock, speed-up and MACs ratio against the first run, and
    the efficiency = speed-up x MACs ratio (1.0: every MAC saved became time saved)."""
    base = next(iter(results.values()))
    rows = []
    for label, r in results.items():
        speedup = base["train_time_s"] / r["train_time_s"]
        ratio = r["mean_train_macs"] / base["mean_train_macs"]
        rows.append({"run": label, "top1": r["top1"], "train_s": r["train_time_s"], "speedup": speedup,
                     "train_MACs_M": r["mean_train_macs"] / 1e6, "MACs_ratio": ratio, "efficiency": speedup * ratio})
    return rows


def adaptive_rows(common: dict, output: str, epochs: int) -> list[dict]:
    """ReViT + TLA on the same data: train the Resizable ViT, label both splits, train the assigner, and
    compare adaptive inference with the largest grid (top-1, MACs with the assigner, measured speed)."""
    from .revit.pipeline import adaptive_report, label_split

    once = dict(common, eval_every=epochs)  # evaluate at the end only: the curve is the ToE plot's job
    train(TrainConfig(**once, method="revit", name="revit"))
    out = Path(output)
    for split in ("train", "eval"):
        label_split(out / "revit" / "last.pth", split, out / f"labels_{split}.pt")
    # test_byobnet: a timm CNN that is as cheap in time as in MACs at 14 px (MobileNetV3, the library's
    # default for 224 px backbones, runs below 1 GMAC/s on such small maps)
    train(TrainConfig(**once, method="tla", name="tla", tla_labels=str(out / "labels_train.pt"),
                      tla_eval_labels=str(out / "labels_eval.pt"), tla_balanced=True, tla_model="test_byobnet"))
    report_rows = {r["rule"]: r for r in adaptive_report(out / "revit" / "last.pth", out / "tla" / "last.pth",
                                                         throughput_batch=256, repeats=5)}
    full, adaptive = report_rows["always 14x14"], report_rows["argmax"]
    return [
        {"inference": "ReViT, 14x14 grid", "top1": full["top1"], "MMACs": full["MMACs_total"], "MACs_ratio": 1.0,
         "speedup": 1.0, "efficiency": 1.0},
        {"inference": "ReViT + TLA, adaptive", "top1": adaptive["top1"], "MMACs": adaptive["MMACs_total"],
         "MACs_ratio": adaptive["MACs_ratio"], "speedup": adaptive["speedup"], "efficiency": adaptive["efficiency"],
         "grid_shares": "/".join(f"{adaptive[k]:.2f}" for k in adaptive if k.startswith("share_g"))},
    ]


def ltm_rows(common: dict, output: str, epochs: int, base_run: dict) -> list[dict]:
    """LTM on the same data: train the tiny ViT with learnable token merging (the calibrated ratios of the
    fmnist_vit_tiny_ltm recipe, IB loss on), then compare it with the full-token run ``base_run`` on
    top-1, inference MACs and measured inference speed (batch 256, same run)."""
    from . import bench
    from .train import load_trained

    recipe = load_recipe("fmnist_vit_tiny_ltm")
    ltm_keys = {k: v for k, v in recipe.items() if k.startswith("ltm_")}
    run = train(TrainConfig(**dict(common, eval_every=epochs), method="ltm", name="ltm", **ltm_keys))
    base, _ = load_trained(Path(base_run["run_dir"]) / "last.pth")
    merged, cfg = load_trained(Path(run["run_dir"]) / "last.pth")
    size = (cfg.in_chans, cfg.img_size, cfg.img_size)
    speed_rows = bench.ltm_speed_rows(base, merged, size, batch_size=256, repeats=5)
    rows = []
    for label, top1, r in (("ViT, all 196 tokens", base_run["top1"], speed_rows[0]),
                           ("LTM ViT, learned merging", run["top1"], speed_rows[1])):
        rows.append({"inference": label, "top1": top1, "MMACs": r["GMACs"] * 1e3, "MACs_ratio": r["MACs_ratio"],
                     "speedup": r["speedup"], "efficiency": r["speedup"] * r["MACs_ratio"]})
    return rows


def run_demo(epochs: int = 3, train_subset: int = 7000, output: str = "runs/demo", seed: int = 0,
             progress: bool = True, data_dir: str | None = None, adaptive: bool = True,
             eval_subset: int | None = 5000, merging: bool = True
             ) -> tuple[list[dict], list[dict], list[dict], Path]:
    """Train the Fashion-MNIST tiny ViT twice (full tokens, then ToE with the DeiT recipe's stages spread
    over ``epochs``), then (``adaptive``) the ReViT + TLA pipeline and (``merging``) the LTM model on the
    same data. Returns the training rows, the adaptive-inference rows, the LTM rows and the path of the
    accuracy-vs-time plot."""
    base = load_recipe("fmnist_vit_tiny")
    third = epochs / 3
    common = dict(base, epochs=epochs, train_subset=train_subset, eval_subset=eval_subset, output=output, seed=seed,
                  progress=progress, data_dir=data_dir, warmup_epochs=min(1, epochs - 1))
    results = {
        "full tokens": train(TrainConfig(**common, method="full", name="full")),
        "ToE": train(TrainConfig(**common, method="toe", name="toe", toe_milestones=(0, third, 2 * third))),
    }
    plot = viz.plot_accuracy_vs_time({k: v["history"] for k, v in results.items()},
                                     Path(output) / "accuracy_vs_time.png",
                                     title=f"Fashion-MNIST tiny ViT, {epochs} epochs, {train_subset} images")
    inference = adaptive_rows(common, output, epochs) if adaptive else []
    merged = ltm_rows(common, output, epochs, results["full tokens"]) if merging else []
    return compare_rows(results), inference, merged, plot


def main(**kwargs) -> None:
    rows, inference, merged, plot = run_demo(**kwargs)
    print("\nTraining: full tokens against ToE (same epochs; speed-up = training wall-clock ratio)")
    print(report.table(rows))
    if inference:
        print("\nInference: ReViT + Token-Length Assigner against the full grid (MACs include the assigner)")
        print(report.table(inference))
    if merged:
        print("\nArchitecture: LTM (learnable token merging) against the full-token ViT (inference, batch 256)")
        print(report.table(merged))
    print(f"\nplot: {plot}")
