"""``tokenthrift macs``: MACs per image and parameters of a method's variants against the model without it, on a
model built from a recipe and flags (a training method: one row per training stage and the mean over its
schedule). The rows: :func:`.variants.macs_rows`."""
from __future__ import annotations

import argparse

from .common import model_flags, resolve_model

HELP = "MACs per image of a method's variants against the model without it (training stages for a training method)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    model_flags(p, "macs", "take the model and method settings from a recipe")
    p.add_argument("--epochs", type=int, help="a method with a training schedule: the training length for the mean "
                                              "over the schedule")


def run(args: argparse.Namespace) -> None:
    from . import report
    from .variants import macs_rows

    shown = resolve_model(args, epochs=args.epochs)
    method, model, size = shown.method, shown.model, shown.size
    variants = method.training_variants(model, size) or shown.variants()
    print(report.table(macs_rows(variants, size, detector=shown.cfg.task == "detection")))
