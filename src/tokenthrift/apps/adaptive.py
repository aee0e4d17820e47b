"""``tokenthrift adaptive``: adaptive token length on a ReViT checkpoint (the fixed grids, the confidence cascade
and, with an assigner, the TLA and TLA + cascade), a table and a Pareto plot (:func:`.labels.adaptive_report`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidArgumentError
from .common import device, runtime_flags

HELP = ("adaptive token length on a ReViT checkpoint: the fixed grids, the confidence cascade, and with --assigner "
        "the TLA and TLA + cascade; a table and a Pareto plot")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint of a --method revit run")
    p.add_argument("--assigner", help="checkpoint of the --method tla run")
    p.add_argument("--budget", type=float, nargs="+",
                   help="MACs budgets (share of the largest grid's) the cascade's thresholds are calibrated to, on "
                        "training images the ReViT never trained on (default: each middle grid's cost, and 0.6)")
    p.add_argument("--thresholds", type=float, nargs="+",
                   help="the cascade's thresholds, one per grid but the largest, largest first")
    p.add_argument("--confidence", nargs="+", choices=["max_prob", "margin"],
                   help="the cascade's confidence (default: both, one row each)")
    p.add_argument("--calibration-images", type=int, default=5000,
                   help="at most this many held-out training images to calibrate on (default 5000)")
    p.add_argument("--plot", help="the Pareto figure (default: adaptive.png beside --checkpoint)")
    p.add_argument("--gamma", type=float, nargs="+", help="also evaluate these cumulative-probability thresholds")
    p.add_argument("--oracle-labels", help="assign-labels file of the eval split (oracle row)")
    p.add_argument("--throughput-batch", type=int, default=256, help="batch of the timed run (default: 256)")
    p.add_argument("--data-dir", help="dataset folder (default: the run's)")
    runtime_flags(p)


def run(args: argparse.Namespace) -> None:
    from ..train.checkpoint import check_writable
    from . import report
    from .labels import CONFIDENCES, adaptive_report

    if args.gamma and not args.assigner:
        raise InvalidArgumentError("--gamma thresholds an assigner's probabilities: give --assigner CHECKPOINT")
    if args.budget and args.thresholds:
        raise InvalidArgumentError("--budget calibrates the cascade's thresholds, --thresholds gives them: pass one")
    gammas = [None] + list(args.gamma or [])
    plot = args.plot or str(Path(args.checkpoint).parent / "adaptive.png")
    check_writable(plot, "--plot", directory=False)
    rows = adaptive_report(args.checkpoint, args.assigner, gammas, batch_size=args.batch_size,
                           data_dir=args.data_dir, oracle_labels=args.oracle_labels,
                           throughput_batch=args.throughput_batch, device=device(args.device), workers=args.workers,
                           budgets=args.budget, thresholds=args.thresholds, kinds=args.confidence or CONFIDENCES,
                           calibration_images=args.calibration_images, plot=plot, progress=True)
    print(report.table(rows))
    print(f"plot: {plot}")
