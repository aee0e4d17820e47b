"""The main job (``make demo``): a tiny ViT on Fashion-MNIST, full tokens against ToE, same epochs."""
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


def run_demo(epochs: int = 3, train_subset: int = 10000, output: str = "runs/demo", seed: int = 0,
             progress: bool = True, data_dir: str | None = None) -> tuple[list[dict], Path]:
    """Train the Fashion-MNIST tiny ViT twice (full tokens, then ToE with the DeiT recipe's stages spread
    over ``epochs``); return the comparison rows and the path of the accuracy-vs-time plot."""
    base = load_recipe("fmnist_vit_tiny")
    third = epochs / 3
    common = dict(base, epochs=epochs, train_subset=train_subset, output=output, seed=seed, progress=progress,
                  data_dir=data_dir, warmup_epochs=min(1, epochs - 1))
    results = {
        "full tokens": train(TrainConfig(**common, method="full", name="full")),
        "ToE": train(TrainConfig(**common, method="toe", name="toe", toe_milestones=(0, third, 2 * third))),
    }
    plot = viz.plot_accuracy_vs_time({k: v["history"] for k, v in results.items()},
                                     Path(output) / "accuracy_vs_time.png",
                                     title=f"Fashion-MNIST tiny ViT, {epochs} epochs, {train_subset} images")
    return compare_rows(results), plot


def main(**kwargs) -> None:
    rows, plot = run_demo(**kwargs)
    print()
    print(report.table(rows))
    print(f"\nplot: {plot}")
