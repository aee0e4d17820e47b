"""Token-length labels: each training image labelled with the smallest ReViT grid that still classifies it
correctly, and the small file format that carries them to the assigner's training run.

Zhou & Zhu, "Make A Long Image Short: Adaptive Token Length for Vision Transformers", ECML-PKDD 2023
(arXiv 2307.02092), docs/methods.md §3. Grid index convention (as everywhere in ``tokenthrift.revit``): ``k``
indexes ``revit.grids``, sorted largest first, so 0 = largest grid (full tokens) and K-1 = smallest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from .. import measure
from ..errors import InvalidArgumentError, MissingFileError

__all__ = ["UNSOLVED", "smallest_correct_grid", "assign_labels", "label_histogram", "balanced_class_weights",
           "TokenLengthLabels", "save_labels", "load_labels"]

LABELS_FORMAT = "tokenthrift.revit.token_length_labels"


UNSOLVED = ("smallest", "largest")


def smallest_correct_grid(correct: torch.Tensor, unsolved: str = "smallest") -> torch.Tensor:
    """correct (B, K) bool, column k = grid k (0 = largest) -> (B,) label: the largest k (smallest grid)
    that is correct. Where no grid is correct: ``unsolved="smallest"`` (default) the smallest grid, K-1, since no
    pick changes the accuracy and the smallest wastes the fewest MACs; ``"largest"`` index 0 (the rule before
    2026-12, the costliest wasted forward)."""
    if correct.dim() != 2:
        raise InvalidArgumentError(f"correct must be (B, K) booleans; got shape {tuple(correct.shape)}")
    if unsolved not in UNSOLVED:
        raise InvalidArgumentError(f"unsolved={unsolved!r}: label images no grid gets right with one of "
                                   f"{', '.join(UNSOLVED)}")
    K = correct.shape[1]
    k = torch.arange(K, device=correct.device)
    best = torch.where(correct, k, -1).amax(dim=1)
    return torch.where(best >= 0, best, K - 1 if unsolved == "smallest" else 0)


def label_histogram(labels: torch.Tensor, num_grids: int) -> torch.Tensor:
    """(N,) grid indices -> (K,) counts per grid index."""
    return torch.bincount(labels.long().flatten().cpu(), minlength=num_grids)


def balanced_class_weights(histogram: torch.Tensor) -> torch.Tensor:
    """Class-balanced CE weights from label counts (K,): w_k = N / (K' · n_k), K' = grids with labels,
    0 for grids without any; the weights average to 1 over the labelled images."""
    counts = torch.as_tensor(histogram, dtype=torch.float64)
    if counts.dim() != 1 or (counts < 0).any() or not counts.sum() > 0:
        raise InvalidArgumentError("histogram must be non-negative counts per grid with at least one label; got "
                                   f"{counts.tolist()}")
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


@torch.no_grad()
def assign_labels(revit: nn.Module, loader: Iterable, margin: float = 0.0,
                  device: torch.device | str | None = None,
                  amp_dtype: torch.dtype | None = None, unsolved: str = "smallest") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-length labels of every image in ``loader`` (docs/methods.md §3).

    Runs ``revit`` (eval mode, no grad) at every grid of ``revit.grids``. An image's label is the index of
    the smallest grid whose top-1 prediction is correct and, if ``margin > 0``, whose true-class
    probability is at least ``margin`` (a confidence margin; default off). Images no grid gets right get
    the smallest grid (``unsolved``, see :func:`smallest_correct_grid`).

    Args:
        revit: a :class:`~tokenthrift.revit.ResizableViT` (anything with ``grids`` and ``forward(x, grid=g)``).
        loader: yields (images (B, C, H, W) at full size, class targets (B,)) in dataset order. Use the
            evaluation transform (no augmentation) and no shuffling: label i belongs to dataset item i.
        margin: minimum true-class probability, in [0, 1).
        device: where to run (default: the model's device).
        amp_dtype: run the forwards under ``torch.autocast`` with this dtype (default: full precision).

    Returns:
        labels (N,) int64 grid indices, and the histogram (K,) int64 counts per grid index.
    """
    if not 0.0 <= margin < 1.0:
        raise InvalidArgumentError(f"margin={margin} must lie in [0, 1): it is a minimum true-class probability")
    smallest_correct_grid(torch.zeros(0, 1, dtype=torch.bool), unsolved)  # refuse a wrong rule before any forward
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, RandomSampler):
        raise InvalidArgumentError("assign_labels needs the images in dataset order: build the DataLoader with "
                                   "shuffle=False (label i must belong to dataset item i)")
    grids = tuple(revit.grids)
    device = torch.device(device) if device is not None else measure.device_of(revit)
    was_training = revit.training
    revit.eval()
    labels = []
    try:
        for images, targets in loader:
            if targets.dim() != 1 or targets.dtype.is_floating_point:
                raise InvalidArgumentError(f"assign_labels needs hard class labels (B,); got {targets.dtype} of shape "
                                           f"{tuple(targets.shape)}")
            images, targets = images.to(device), targets.to(device)
            correct = []
            for g in grids:  # K forwards per batch; never a loop over images
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = revit(images, grid=g)
                probs = logits.float().softmax(-1)
                ok = probs.argmax(-1) == targets
                if margin > 0:
                    ok &= probs.gather(1, targets[:, None]).squeeze(1) >= margin
                correct.append(ok)
            labels.append(smallest_correct_grid(torch.stack(correct, dim=1), unsolved).cpu())
    finally:
        revit.train(was_training)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    return labels, label_histogram(labels, len(grids))


class TokenLengthLabels(NamedTuple):
    """What :func:`load_labels` returns."""

    labels: torch.Tensor  # (N,) int64 grid indices, 0 = largest grid
    grids: tuple[int, ...]  # largest first
    meta: dict

    @property
    def histogram(self) -> torch.Tensor:
        return label_histogram(self.labels, len(self.grids))


def save_labels(path: str | Path, labels: torch.Tensor, grids: Sequence[int], meta: dict | None = None) -> None:
    """Write token-length labels to a small torch file that also records the grids and ``meta``.

    ``meta`` holds plain values (str, int, float, bool, None, lists/dicts of them). Keys the training
    method (:class:`tokenthrift.train.methods.TLAMethod`) reads when present: ``split`` (the dataset
    split the images come from, "train" or "eval"; record held-out labelling separately, e.g.
    ``heldout=True``), ``data`` (dataset spec), ``subset`` and ``seed`` (the fixed random subset of that
    split), ``input_size`` (C, H, W of the backbone), ``backbone_macs`` (MACs at the largest grid).
    Worth recording too: ``margin``, the ReViT checkpoint, the label histogram.
    """
    grids = tuple(int(g) for g in grids)
    labels = torch.as_tensor(labels).long().flatten().cpu()
    if list(grids) != sorted(grids, reverse=True):
        raise InvalidArgumentError(f"grids {grids} must be ordered largest first (as ResizableViT.grids)")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < len(grids)):
        raise InvalidArgumentError(f"labels must be grid indices in [0, {len(grids)}) for grids {grids}; got values in "
                                   f"[{int(labels.min())}, {int(labels.max())}]")
    torch.save({"format": LABELS_FORMAT, "version": 1, "labels": labels, "grids": list(grids),
                "meta": dict(meta or {})}, Path(path))


def load_labels(path: str | Path, grids: Sequence[int] | None = None) -> TokenLengthLabels:
    """Read a file written by :func:`save_labels`. With ``grids``, check they are the recorded ones."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"token-length label file {path} does not exist; make one with "
                               "tokenthrift.revit.assign_labels + save_labels")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != LABELS_FORMAT:
        raise InvalidArgumentError(f"{path} is not a token-length label file (written by "
                                   "tokenthrift.revit.save_labels)")
    found = tuple(int(g) for g in data["grids"])
    if grids is not None and tuple(int(g) for g in sorted(grids, reverse=True)) != found:
        raise InvalidArgumentError(f"{path} holds labels for grids {found}, but grids {tuple(grids)} were asked for; "
                                   "relabel with the ResizableViT you use, or use its grids")
    return TokenLengthLabels(data["labels"].long(), found, dict(data["meta"]))
