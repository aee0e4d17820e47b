"""The ReViT + TLA pipeline on trained checkpoints: token-length labels for a split, and the adaptive
evaluation (top-1, mean MACs with and without the assigner, grid histogram, measured throughput).
Used by ``tokenthrift assign-labels`` and ``tokenthrift adaptive``."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Sequence

import torch

from .. import measure
from ..data import model_classes
from ..errors import InvalidArgumentError
from ..revit import (
    CONFIDENCES,
    AdaptiveViT,
    CascadeViT,
    ResizableViT,
    assign_labels,
    calibrate_cascade,
    cascade_exits,
    default_budgets,
    executed_macs,
    grid_outcomes,
    load_labels,
    save_labels,
    select_grids,
)
from ..train import TrainConfig, load_trained, model_input_size
from ..train.splits import calibration_source, split_loader


def split_meta(cfg: TrainConfig, split: str) -> dict:
    """What identifies the images of ``split`` of a run: the label file records it, the TLA run checks it."""
    return {"split": split, "data": cfg.data, "subset": cfg.eval_subset if split == "eval" else cfg.train_subset,
            "seed": cfg.seed, "holdout": 0 if split == "eval" else cfg.train_holdout}


def label_split(revit_checkpoint: str | Path, split: str, out: str | Path, margin: float = 0.0,
                batch_size: int = 256, data_dir: str | None = None, ema: bool = False, device: str = "cpu",
                workers: int = 0, unsolved: str = "smallest") -> tuple[torch.Tensor, dict]:
    """Token-length labels for the ``train``, ``holdout`` or ``eval`` images of a ``--method revit`` run,
    saved to ``out`` with what the TLA run checks (split, data, subset, seed, held-out count, input size,
    backbone MACs) and the ``unsolved`` rule (the label of images no grid gets right)."""
    revit, cfg = load_trained(revit_checkpoint, ema=ema, device=device)
    if not isinstance(revit, ResizableViT):  # labels need a model that runs at several grids
        raise InvalidArgumentError(f"{revit_checkpoint} was trained with --method {cfg.method}; labels need a --method "
                                   "revit checkpoint")
    size = model_input_size(revit, cfg)
    loader = split_loader(cfg, split, size, batch_size, data_dir, workers, classes=model_classes(revit))
    labels, hist = assign_labels(revit, loader, margin=margin, unsolved=unsolved)
    meta = {**split_meta(cfg, split), "input_size": list(size), "backbone_macs": measure.macs(revit, size),
            "margin": margin, "unsolved": unsolved, "checkpoint": str(revit_checkpoint),
            # how the backbone saw the images (None: the dataset's statistics): the assigner must see them so too
            "mean": list(cfg.mean) if cfg.mean else None, "std": list(cfg.std) if cfg.std else None}
    save_labels(out, labels, revit.grids, meta)
    return labels, {"grids": list(revit.grids), "histogram": hist.tolist()}


@torch.no_grad()
def adaptive_report(revit_checkpoint: str | Path, assigner_checkpoint: str | Path | None = None,
                    gammas: Sequence[float | None] = (None,), batch_size: int = 256,
                    data_dir: str | None = None, oracle_labels: str | Path | None = None,
                    throughput_batch: int = 256, repeats: int = 5, device: str = "cpu",
                    workers: int = 0, budgets: Sequence[float] | None = None,
                    thresholds: Sequence[float] | None = None, kinds: Sequence[str] = CONFIDENCES,
                    calibration_images: int = 5000, plot: str | Path | None = None,
                    models: dict | None = None, progress: bool = False) -> list[dict]:
    """One row per decision rule on the ReViT run's evaluation images: each fixed grid; with an assigner its
    argmax (gamma None) and each gamma; the confidence cascade (:class:`~tokenthrift.revit.CascadeViT`) for each
    confidence ``kind`` and each MACs ``budget`` (share of the largest grid's MACs; default
    :func:`~tokenthrift.revit.default_budgets`), its thresholds calibrated on at most ``calibration_images``
    training images the run never trained on (:func:`~tokenthrift.train.splits.calibration_source`; never the evaluation images), or
    ``thresholds`` given directly; with an assigner also the cascade that starts at the assigner's pick; with
    ``oracle_labels`` (an ``assign-labels --split eval`` file) the oracle. Each row: top-1, mean MACs per image
    as executed (backbone; total with the assigner), MACs ratio against the largest grid, grid shares (where
    images stopped); cascade rows also the thresholds and what calibration saw. Measured images/s of every
    rule's model against the largest grid in alternating rounds on real evaluation images
    (``throughput_batch=0``: not timed). ``plot``: the Pareto figure (top-1 against MACs and against images/s;
    the cascades' calibrated fronts as curves). ``models``: a dict to fill with each rule's model (rule name ->
    callable on images), to run or time it elsewhere. ``progress``: a bar for each pass over images and a line
    before each stage (on stderr).

    A rule's top-1 and MACs come from one pass over the images (every grid's output per image): what
    AdaptiveViT and CascadeViT compute, tested against them."""
    revit, cfg = load_trained(revit_checkpoint, device=device)
    assigner = load_trained(assigner_checkpoint, device=device)[0] if assigner_checkpoint else None
    size = model_input_size(revit, cfg)
    grids = tuple(revit.grids)
    adaptive = AdaptiveViT(revit, assigner).eval()
    say = _stage_printer(progress)
    classes = model_classes(revit)
    seen = grid_outcomes(revit, _bar(split_loader(cfg, "eval", size, batch_size, data_dir, workers, classes=classes),
                                     f"evaluation images at {len(grids)} grids", progress), assigner, device)
    n = len(seen.correct)
    grid_macs = torch.tensor(adaptive.grid_macs(), dtype=torch.float64)
    extra = adaptive.assigner_macs()

    def row(name: str, family: str, exits: torch.Tensor, start: torch.Tensor | None = None, **more) -> dict:
        """A rule's row from where each image stopped (and started: a cascade pays every grid on the way)."""
        begin = exits if start is None else start
        backbone = executed_macs(exits, grid_macs, begin).mean().item()
        total = backbone + (extra if family in ("TLA", "TLA + cascade") else 0.0)
        top1 = 100.0 * seen.correct.gather(1, exits[:, None].long()).double().mean().item()
        return {"rule": name, "family": family, "top1": top1, "MMACs_backbone": backbone / 1e6,
                "MMACs_total": total / 1e6, "MACs_ratio": total / grid_macs[0].item(),
                **{f"share_g{g}": s for g, s in zip(grids, adaptive.grid_shares(exits).tolist())}, **more}

    rows, nets = [], {}
    for k, g in enumerate(grids):
        rows.append(row(f"always {g}x{g}", "fixed grid", torch.full((n,), k, dtype=torch.long)))
        nets[rows[-1]["rule"]] = (lambda g: lambda x: revit(x, grid=g))(g)
    if assigner is not None:
        for gamma in gammas:
            rows.append(row("argmax" if gamma is None else f"gamma={gamma:g}", "TLA", select_grids(seen.probs, gamma)))
            nets[rows[-1]["rule"]] = AdaptiveViT(revit, assigner, gamma).eval()
    if oracle_labels is not None:
        oracle = load_labels(oracle_labels, grids=grids)
        if len(oracle.labels) != n:
            raise InvalidArgumentError(f"{oracle_labels} has {len(oracle.labels)} labels for {n} eval images")
        rows.append(row("oracle labels", "oracle", oracle.labels.long()))

    curves: dict = {}
    if len(grids) > 1:
        families = {"cascade": None} if assigner is None else {"cascade": None, "TLA + cascade": assigner}
        smallest = torch.full((n,), len(grids) - 1, dtype=torch.long)  # where a cascade without an assigner starts
        if thresholds is not None:
            for kind, (family, tla) in itertools.product(kinds, families.items()):
                cascade = CascadeViT(revit, thresholds, kind, tla).eval()
                start = smallest if tla is None else seen.probs.argmax(-1)
                name = f"{family} {kind}, thresholds {'/'.join(f'{t:g}' for t in thresholds)}"
                rows.append(row(name, family, cascade_exits(seen.conf[kind], cascade.thresholds, start), start,
                                thresholds=_shown(cascade.thresholds)))
                nets[name] = cascade
        elif calibration_source(cfg) is None:
            rows.append({"rule": "cascade", "family": "cascade", "note": "not calibrated: the ReViT run trained on "
                         "every training image (train it with --train-holdout N, or give --thresholds)"})
        else:
            calib = grid_outcomes(revit, _bar(split_loader(cfg, "calibration", size, batch_size, data_dir, workers,
                                                           limit=calibration_images, classes=classes),
                                              "calibration images (held-out training images)", progress),
                                  assigner, device)
            say(f"calibrating the cascade's thresholds to {len(budgets or default_budgets(grid_macs.tolist()))} "
                "MACs budgets")
            source = f"{len(calib.correct)} {calibration_source(cfg)}"
            for kind, (family, tla) in itertools.product(kinds, families.items()):
                start = smallest if tla is None else seen.probs.argmax(-1)
                # the calibrated front, scored on the evaluation images (thresholds from calibration only)
                _, front = calibrate_cascade(revit, calib, None, kind, tla)
                curves[f"{family} ({kind})"] = [(r["MACs_ratio"], r["top1"]) for r in (
                    row("", family, cascade_exits(seen.conf[kind], t, start), start) for _, _, t in front.front)]
                for budget in budgets or default_budgets(grid_macs.tolist()):
                    name = f"{family} {kind}, budget {budget:g}"
                    try:
                        cascade, chosen = calibrate_cascade(revit, calib, budget, kind, tla)
                    except InvalidArgumentError as err:  # this budget is below what the rule can cost
                        rows.append({"rule": name, "family": family, "note": str(err)})
                        continue
                    rows.append(row(name, family, cascade_exits(seen.conf[kind], cascade.thresholds, start), start,
                                    thresholds=_shown(cascade.thresholds), calibration_top1=chosen.top1,
                                    calibration_MACs_ratio=chosen.macs_ratio, calibrated_on=source))
                    nets[name] = cascade
    if models is not None:
        models.update(nets)
    if throughput_batch:
        # measured speed of every rule (assigner and grouped forwards included) against the largest grid, same run
        batch = seen.sample[:throughput_batch]
        timed = [r for r in rows if r["rule"] in nets]
        say(f"timing {len(timed)} rules at batch {len(batch)} in {repeats} alternating rounds")
        speeds = measure.paired_throughput([measure.OnImages(nets[r["rule"]], batch) for r in timed], size,
                                           len(batch), repeats=repeats)
        for r, ips in zip(timed, speeds):
            r.update(img_s=ips, img_s_full=speeds[0], speedup=ips / speeds[0],
                     efficiency=ips / speeds[0] * r["MACs_ratio"])
    if plot is not None:
        from .. import viz

        viz.plot_adaptive(rows, curves, plot, title=f"{cfg.model} ReViT {'/'.join(map(str, grids))}: {n} "
                                                    f"evaluation images ({cfg.data})")
    return rows


def _bar(loader, desc: str, on: bool):
    """``loader`` with a progress bar (on stderr) when ``on``."""
    from tqdm import tqdm

    return tqdm(loader, desc=desc, leave=False, disable=not on, file=sys.stderr, dynamic_ncols=True)


def _stage_printer(on: bool):
    """A function that prints a stage line on stderr when ``on`` (else does nothing)."""
    return (lambda text: print(text, file=sys.stderr, flush=True)) if on else (lambda text: None)


def _shown(thresholds: Sequence[float]) -> str:
    return "/".join(f"{t:.4f}" for t in thresholds)
