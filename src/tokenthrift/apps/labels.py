"""The ReViT + TLA pipeline on trained checkpoints: token-length labels for a split, and the adaptive
evaluation (top-1, mean MACs with and without the assigner, grid histogram, measured throughput).
Used by ``tokenthrift assign-labels`` and ``tokenthrift eval --adaptive``."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from .. import measure
from ..data import build_dataset
from ..errors import InvalidArgumentError
from ..revit import AdaptiveViT, ResizableViT, assign_labels, load_labels, save_labels, select_grids
from ..train import TrainConfig, data_shape, load_trained, model_input_size, run_preprocess

SPLITS = ("train", "holdout", "eval")


def split_loader(cfg: TrainConfig, split: str, input_size, batch_size: int, data_dir: str | None,
                 workers: int = 0) -> DataLoader:
    """The images a run trained on (``train``), held out of its training (``holdout``, --train-holdout) or
    evaluated on (``eval``), in dataset order, with the evaluation transform."""
    if split not in SPLITS:
        raise InvalidArgumentError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if split == "holdout" and not cfg.train_holdout:
        raise InvalidArgumentError("this run held no training images out (--train-holdout 0): train the ReViT with "
                                   "--train-holdout N to label a held-out slice, or label --split train")
    c, h, frames = data_shape(input_size)
    training = split != "eval"
    ds, _ = build_dataset(cfg.data, training, h, c, data_dir or cfg.data_dir, cfg.download,
                          cfg.train_subset if training else cfg.eval_subset, cfg.seed, augment=False,
                          holdout=cfg.train_holdout if training else 0, part="holdout" if split == "holdout" else "fit",
                          frames=frames, preprocess=run_preprocess(cfg))
    return DataLoader(ds, batch_size, shuffle=False, num_workers=workers)


def split_meta(cfg: TrainConfig, split: str) -> dict:
    """What identifies the images of ``split`` of a run: the label file records it, the TLA run checks it."""
    return {"split": split, "data": cfg.data, "subset": cfg.eval_subset if split == "eval" else cfg.train_subset,
            "seed": cfg.seed, "holdout": 0 if split == "eval" else cfg.train_holdout}


def label_split(revit_checkpoint: str | Path, split: str, out: str | Path, margin: float = 0.0,
                batch_size: int = 256, data_dir: str | None = None, ema: bool = False, device: str = "cpu",
                workers: int = 0) -> tuple[torch.Tensor, dict]:
    """Token-length labels for the ``train``, ``holdout`` or ``eval`` images of a ``--method revit`` run,
    saved to ``out`` with what the TLA run checks (split, data, subset, seed, held-out count, input size,
    backbone MACs)."""
    revit, cfg = load_trained(revit_checkpoint, ema=ema, device=device)
    if not isinstance(revit, ResizableViT):  # labels need a model that runs at several grids
        raise InvalidArgumentError(f"{revit_checkpoint} was trained with --method {cfg.method}; labels need a --method "
                                   "revit checkpoint")
    size = model_input_size(revit, cfg)
    labels, hist = assign_labels(revit, split_loader(cfg, split, size, batch_size, data_dir, workers), margin=margin)
    meta = {**split_meta(cfg, split), "input_size": list(size), "backbone_macs": measure.macs(revit, size),
            "margin": margin, "checkpoint": str(revit_checkpoint),
            # how the backbone saw the images (None: the dataset's statistics): the assigner must see them so too
            "mean": list(cfg.mean) if cfg.mean else None, "std": list(cfg.std) if cfg.std else None}
    save_labels(out, labels, revit.grids, meta)
    return labels, {"grids": list(revit.grids), "histogram": hist.tolist()}


@torch.no_grad()
def adaptive_report(revit_checkpoint: str | Path, assigner_checkpoint: str | Path,
                    gammas: Sequence[float | None] = (None,), batch_size: int = 256,
                    data_dir: str | None = None, oracle_labels: str | Path | None = None,
                    throughput_batch: int = 256, repeats: int = 5, device: str = "cpu",
                    workers: int = 0) -> list[dict]:
    """One row per decision rule: each fixed grid, the assigner's argmax (gamma None) and each gamma, and
    with ``oracle_labels`` (an ``assign-labels --split eval`` file) the oracle: top-1, mean MACs of the
    backbone and with the assigner, MACs ratio against the largest grid, grid shares. The argmax row also
    gets the measured throughput of :class:`AdaptiveViT` against the largest grid on real eval images
    (``throughput_batch=0``: not timed).

    One pass over the eval set: every grid's correctness and the assigner's probabilities per image;
    a rule's top-1 is then the correctness at the grid it picks (what AdaptiveViT computes, tested)."""

    revit, cfg = load_trained(revit_checkpoint, device=device)
    assigner, _ = load_trained(assigner_checkpoint, device=device)
    size = model_input_size(revit, cfg)
    adaptive = AdaptiveViT(revit, assigner).eval()
    correct, probs, sample = [], [], None
    for images, targets in split_loader(cfg, "eval", size, batch_size, data_dir, workers):
        images, targets = images.to(device), targets.to(device)
        sample = images if sample is None else sample
        correct.append(torch.stack([revit(images, grid=g).argmax(-1) == targets for g in revit.grids], 1))
        probs.append(assigner(images).float().softmax(-1))
    correct, probs = torch.cat(correct).cpu(), torch.cat(probs).cpu()
    full = adaptive.grid_macs()[0]

    def row(name: str, index: torch.Tensor, with_assigner: bool = True) -> dict:
        shares = adaptive.grid_shares(index)
        backbone = adaptive.expected_macs(shares, include_assigner=False)
        total = backbone + (adaptive.assigner_macs() if with_assigner else 0.0)
        top1 = 100.0 * correct.gather(1, index[:, None].long()).double().mean().item()
        return {"rule": name, "top1": top1, "MMACs_backbone": backbone / 1e6, "MMACs_total": total / 1e6,
                "MACs_ratio": total / full, **{f"share_g{g}": s for g, s in zip(revit.grids, shares.tolist())}}

    n = len(correct)
    rows = [row(f"always {g}x{g}", torch.full((n,), k), with_assigner=False) for k, g in enumerate(revit.grids)]
    rows += [row("argmax" if gamma is None else f"gamma={gamma:g}", select_grids(probs, gamma)) for gamma in gammas]
    if oracle_labels is not None:
        oracle = load_labels(oracle_labels, grids=revit.grids)
        if len(oracle.labels) != n:
            raise InvalidArgumentError(f"{oracle_labels} has {len(oracle.labels)} labels for {n} eval images")
        rows.append(row("oracle labels", oracle.labels, with_assigner=False))
    if not throughput_batch:
        return rows
    # measured speed of the adaptive path (assigner + grouped forwards) against the largest grid, same run
    batch = sample[:throughput_batch]
    t_adaptive, t_full = measure.paired_throughput([measure.OnImages(adaptive, batch),
                                                    measure.OnImages(lambda x: revit(x, grid=revit.grids[0]), batch)],
                                                   size, len(batch), repeats=repeats)
    for r in rows:
        if r["rule"] == "argmax":
            r.update(img_s=t_adaptive, img_s_full=t_full, speedup=t_adaptive / t_full,
                     efficiency=t_adaptive / t_full * r["MACs_ratio"])
    return rows
