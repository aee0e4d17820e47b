"""``tokenthrift train``: train a timm model from a recipe and flags (every engine field and every registered
method's options is a flag, :mod:`tokenthrift.train.config`), then one row per epoch and what the training cost
against the model without the method."""
from __future__ import annotations

import argparse

from ..train.config import add_config_arguments, add_method_arguments, config_from_args

HELP = "train a timm model: full tokens or a tokenthrift method"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML recipe file, or a shipped recipe name (tokenthrift recipes)")
    add_config_arguments(p)
    add_method_arguments(p)


def run(args: argparse.Namespace) -> None:
    from ..train import train
    from . import report

    cfg = config_from_args(args)
    summary = train(cfg)
    metric = summary["metric"]
    extra = ("mask_AP",) if metric == "box_AP" else ()
    ema = "top1_ema" if metric == "top1" else f"{metric}_ema"
    rows = [{k: r.get(k, "-") for k in ("epoch", "train_loss", metric, *extra, ema, "train_time_s", "images_per_s",
                                         "train_macs")} for r in summary["history"]]
    for r in rows:
        r["train_macs"] = r["train_macs"] / 1e6
    print(report.table(rows).replace("train_macs", "train_MMACs"))
    what = "backbone " if cfg.task == "detection" else ""
    print(f"{metric} {summary[metric]:.2f}  training {summary['train_time_s']:.1f} s  mean training {what}MACs per "
          f"image "
          f"{summary['mean_train_macs'] / 1e6:.4g} M = {summary['macs_ratio']:.3f} x {summary['baseline']} "
          f"({summary['baseline_macs'] / 1e6:.4g} M)  ->  {summary['run_dir']}")
