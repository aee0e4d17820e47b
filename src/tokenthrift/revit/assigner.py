"""Token-length labels, the Token-Length Assigner (TLA) and adaptive inference.

Zhou & Zhu, "Make A Long Image Short: Adaptive Token Length for Vision Transformers", ECML-PKDD 2023
(arXiv 2307.02092). docs/methods.md §3:

1. :func:`assign_labels` runs a trained :class:`~tokenthrift.revit.ResizableViT` at every grid and labels
   each image with the smallest grid that still classifies it correctly.
2. :class:`TokenLengthAssigner` is a small timm CNN on a low-resolution copy of the image that predicts
   that label; its MACs must stay at or under 2 % of the backbone at the largest grid
   (:func:`check_assigner_budget`).
3. :class:`AdaptiveViT` runs the assigner, groups the batch by predicted grid, runs each group once and
   scatters the logits back into input order.

Grid index convention (as everywhere in ``tokenthrift.revit``): ``k`` indexes ``revit.grids``, sorted
largest first, so 0 = largest grid (full tokens) and K-1 = smallest. Labels, assigner outputs, histograms
and ``grid_shares`` all use it.

Public API: :func:`smallest_correct_grid`, :func:`assign_labels`, :func:`label_histogram`,
:func:`balanced_class_weights`, :func:`save_labels`, :func:`load_labels`, :class:`TokenLengthLabels`,
:class:`TokenLengthAssigner`, :func:`assigner_macs_fraction`, :func:`check_assigner_budget`, :func:`select_grids`,
:class:`AdaptiveViT`, :data:`DEFAULT_ASSIGNER`.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from .. import measure
from ..errors import InvalidArgumentError, MissingFileError, UnsupportedModelError

__all__ = ["DEFAULT_ASSIGNER", "MAX_MACS_FRACTION", "smallest_correct_grid", "assign_labels", "label_histogram",
           "balanced_class_weights", "TokenLengthLabels", "save_labels", "load_labels", "TokenLengthAssigner",
           "assigner_macs_fraction", "check_assigner_budget", "select_grids", "AdaptiveViT"]

# mobilenetv3_small_050 fits every backbone we ship (measured with tokenthrift.measure.macs, 3 grids):
# 6.46 MMACs at 112 px (DeiT-S at 224: 0.14 %, DeiT-T: 0.52 %) and 0.59 MMACs at 14 px, one channel
# (the 28 px Fashion-MNIST ViT, patch 2, width 48, depth 6, 55.1 MMACs: 1.07 %).
DEFAULT_ASSIGNER = "mobilenetv3_small_050"
MAX_MACS_FRACTION = 0.02  # docs/methods.md §3: the assigner costs at most 2 % of the backbone at the largest grid
LABELS_FORMAT = "tokenthrift.revit.token_length_labels"


# ---------------------------------------------------------------------------------------------- labels
def smallest_correct_grid(correct: torch.Tensor) -> torch.Tensor:
    """correct (B, K) bool, column k = grid k (0 = largest) -> (B,) label: the largest k (smallest grid)
    that is correct; 0 (the largest grid) where no grid is correct."""
    if correct.dim() != 2:
        raise InvalidArgumentError(f"correct must be (B, K) booleans; got shape {tuple(correct.shape)}")
    k = torch.arange(correct.shape[1], device=correct.device)
    return torch.where(correct, k, 0).amax(dim=1)


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
                  amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-length labels of every image in ``loader`` (docs/methods.md §3).

    Runs ``revit`` (eval mode, no grad) at every grid of ``revit.grids``. An image's label is the index of
    the smallest grid whose top-1 prediction is correct and, if ``margin > 0``, whose true-class
    probability is at least ``margin`` (a confidence margin; default off). Images no grid gets right get
    the largest grid (index 0).

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
            labels.append(smallest_correct_grid(torch.stack(correct, dim=1)).cpu())
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


# ---------------------------------------------------------------------------------------------- assigner
class TokenLengthAssigner(nn.Module):
    """The TLA: a small timm CNN that maps a full-size image to K grid logits (docs/methods.md §3).

    The image (B, C, H, W) at the backbone's native size is downsampled inside (bilinear, antialias) by
    ``scale`` (default 0.5: half resolution) and classified into K grid indices (0 = largest grid). For
    video (``input_size`` (C, T, H, W)) it decides once per clip (B, C, T, H, W) from a cheap view, *decision*
    (docs/methods.md §6): the middle frame (index T // 2) at the same reduced resolution.

    Args:
        num_grids: K, the number of ReViT grids.
        input_size: (C, H, W) of the backbone's images, or (C, T, H, W) of its clips.
        model_name: any timm classification model (default :data:`DEFAULT_ASSIGNER`); check its cost with
            :func:`check_assigner_budget`.
        scale: side of the assigner's input as a fraction of the full image (0 < scale <= 1).
        pretrained: load timm's pretrained weights (needs them locally or network access).
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``); ``num_classes`` and
            ``in_chans`` are set from ``num_grids`` and ``input_size``.

    forward: (B, C, H, W) or (B, C, T, H, W) -> logits (B, K).
    """

    def __init__(self, num_grids: int, input_size: Sequence[int] = (3, 224, 224), model_name: str = DEFAULT_ASSIGNER,
                 scale: float = 0.5, pretrained: bool = False, **model_kwargs):
        super().__init__()
        import timm

        if num_grids < 1:
            raise InvalidArgumentError(f"the assigner needs at least one grid; got num_grids={num_grids}")
        if len(input_size) not in (3, 4):
            raise InvalidArgumentError("input_size must be (channels, height, width), or (channels, frames, height, "
                                       f"width) for clips; got {tuple(input_size)}")
        if not 0.0 < scale <= 1.0:
            raise InvalidArgumentError(f"assigner scale={scale} must lie in (0, 1]: it is the fraction of the image "
                                       "side")
        if not timm.is_model(model_name):
            raise InvalidArgumentError(f"unknown timm model {model_name!r} for the assigner; e.g. {DEFAULT_ASSIGNER}, "
                                       "lcnet_035, resnet10t (timm.list_models() lists all)")
        for key in ("num_classes", "in_chans"):
            if key in model_kwargs:
                raise InvalidArgumentError(f"{key} is set by the assigner itself (from num_grids / input_size)")
        self.input_size = tuple(int(v) for v in input_size)
        c, h, w = self.input_size[0], self.input_size[-2], self.input_size[-1]
        self.scale = float(scale)
        self.low_res = (max(1, round(h * scale)), max(1, round(w * scale)))
        self.num_classes = int(num_grids)
        self.grids: tuple[int, ...] | None = None  # the grid sizes behind the K outputs, when known (TLA runs)
        self.model_name = model_name
        self.net = timm.create_model(model_name, pretrained=pretrained, num_classes=num_grids, in_chans=c,
                                     **model_kwargs)
        # timm.data.resolve_model_data_config (and so the training engine) reads the input size from here:
        # the assigner takes full-size images, not its CNN's default size
        self.pretrained_cfg = {**getattr(self.net, "pretrained_cfg", {}), "input_size": self.input_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_size:
            kind = "clips" if len(self.input_size) == 4 else "images"
            raise InvalidArgumentError(f"TokenLengthAssigner takes full-size {kind} (B, "
                                       f"{', '.join(map(str, self.input_size))}); got {tuple(x.shape)}")
        if x.dim() == 5:  # one decision per clip, from its middle frame
            x = x[:, :, x.shape[2] // 2]
        if self.low_res != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=self.low_res, mode="bilinear", antialias=True, align_corners=False)
        return self.net(x)

    def extra_repr(self) -> str:
        return f"model={self.model_name}, num_grids={self.num_classes}, input_size={self.input_size}, " \
               f"low_res={self.low_res}"


def _backbone_macs(backbone: nn.Module | float) -> float:
    if isinstance(backbone, (int, float)):
        return float(backbone)
    return measure.macs(backbone, backbone.input_size, grid=backbone.grids[0])


def assigner_macs_fraction(assigner: TokenLengthAssigner, backbone: nn.Module | float) -> float:
    """MACs of the assigner / MACs of the backbone at its largest grid (both per image, measured with
    :func:`tokenthrift.measure.macs`). ``backbone``: a ResizableViT, or its MACs as a number."""
    return measure.macs(assigner, assigner.input_size) / _backbone_macs(backbone)


def check_assigner_budget(assigner: TokenLengthAssigner, backbone: nn.Module | float,
                          max_fraction: float = MAX_MACS_FRACTION, on_exceed: str = "raise") -> float:
    """Check the docs/methods.md §3 budget: assigner MACs <= ``max_fraction`` (2 %) of the backbone at the largest grid.

    Returns the measured fraction. Over budget: ``on_exceed="raise"`` raises ValueError, ``"warn"``
    warns (UserWarning).
    """
    if on_exceed not in ("raise", "warn"):
        raise InvalidArgumentError(f"on_exceed={on_exceed!r}: choose raise or warn")
    fraction = assigner_macs_fraction(assigner, backbone)
    if fraction > max_fraction:
        message = (f"the token-length assigner ({assigner.model_name}, input {assigner.low_res}) costs "
                   f"{100 * fraction:.2f} % of the backbone's MACs at the largest grid, over the "
                   f"{100 * max_fraction:.1f} % budget; pick a smaller timm model or a lower scale")
        if on_exceed == "raise":
            raise InvalidArgumentError(message)
        warnings.warn(message, stacklevel=2)
    return fraction


# ---------------------------------------------------------------------------------------------- inference
def select_grids(probs: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
    """Assigner probabilities (B, K) (column 0 = largest grid) -> (B,) grid index per image.

    ``gamma=None``: argmax. Otherwise the smallest grid whose cumulative probability, summed from the
    smallest grid upward, reaches ``gamma`` (0 < gamma <= 1; small gamma favours short token lengths,
    gamma near 1 long ones); where rounding keeps the total below gamma, the largest grid.
    """
    if probs.dim() != 2:
        raise InvalidArgumentError(f"probs must be (B, K); got shape {tuple(probs.shape)}")
    if gamma is None:
        return probs.argmax(dim=1)
    if not 0.0 < gamma <= 1.0:
        raise InvalidArgumentError(f"gamma={gamma} must lie in (0, 1]")
    K = probs.shape[1]
    reached = probs.float().flip(1).cumsum(1) >= gamma  # column j = grid index K-1-j
    first = reached.int().argmax(dim=1)  # argmax returns the first maximal column
    return torch.where(reached.any(dim=1), K - 1 - first, 0)


class AdaptiveViT(nn.Module):
    """Adaptive token length at inference (docs/methods.md §3): the TLA picks a grid per image, the batch is grouped
    by grid, each group runs once, and the logits are scattered back into input order.

    forward(x (B, C, H, W), grid_index=None) -> logits (B, num_classes), row i for image i. Pass
    ``grid_index`` (B,) to bypass the assigner (e.g. oracle labels). ``last_grid_index`` holds the (B,)
    grid indices of the latest call (0 = largest grid).

    Args:
        revit: the :class:`~tokenthrift.revit.ResizableViT`.
        assigner: a :class:`TokenLengthAssigner` with K = len(revit.grids) outputs.
        gamma: None for argmax, or the cumulative-probability threshold of :func:`select_grids`.
    """

    def __init__(self, revit: nn.Module, assigner: nn.Module, gamma: float | None = None):
        super().__init__()
        K = len(revit.grids)
        if getattr(assigner, "num_classes", K) != K:
            raise InvalidArgumentError(f"the assigner predicts {assigner.num_classes} grids but the ResizableViT has "
                                       f"{K} ({tuple(revit.grids)}); train the assigner on labels for these grids")
        if gamma is not None and not 0.0 < gamma <= 1.0:
            raise InvalidArgumentError(f"gamma={gamma} must lie in (0, 1]")
        self.revit, self.assigner, self.gamma = revit, assigner, gamma
        self.last_grid_index: torch.Tensor | None = None
        self._grid_macs: list[float] | None = None
        self._assigner_macs: float | None = None

    @property
    def grids(self) -> tuple[int, ...]:
        return tuple(self.revit.grids)

    @property
    def num_classes(self) -> int:
        return self.revit.num_classes

    @property
    def last_grids(self) -> torch.Tensor | None:
        """(B,) grid size (tokens per side) each image of the latest call ran at."""
        if self.last_grid_index is None:
            return None
        return torch.tensor(self.grids, device=self.last_grid_index.device)[self.last_grid_index]

    def choose(self, x: torch.Tensor) -> torch.Tensor:
        """Full-size images (B, C, H, W) -> (B,) grid index chosen by the assigner."""
        return select_grids(self.assigner(x).float().softmax(-1), self.gamma)

    def forward(self, x: torch.Tensor, grid_index: torch.Tensor | None = None) -> torch.Tensor:
        index = self.choose(x) if grid_index is None else grid_index.to(x.device).long()
        if index.shape != (x.shape[0],):
            raise InvalidArgumentError(f"grid_index must be (B,) = ({x.shape[0]},); got {tuple(index.shape)}")
        out = None
        for k, grid in enumerate(self.grids):  # one forward per grid, never per image
            members = (index == k).nonzero().squeeze(1)
            if members.numel() == 0:
                continue
            logits = self.revit(x.index_select(0, members), grid=grid)
            if not isinstance(logits, torch.Tensor):
                raise UnsupportedModelError("AdaptiveViT is for inference: the model returned several heads (a "
                                            "distilled DeiT in distilled-training mode); call .eval() first")
            if out is None:
                out = logits.new_empty((x.shape[0], *logits.shape[1:]))
            out.index_copy_(0, members, logits)
        self.last_grid_index = index.detach()
        if out is None:  # empty batch
            out = x.new_empty((0, self.num_classes))
        return out

    # ------------------------------------------------------------------ cost
    def grid_macs(self) -> list[float]:
        """MACs per image of the backbone at each grid (largest first), measured once with
        :func:`tokenthrift.measure.macs` and cached."""
        if self._grid_macs is None:
            self._grid_macs = [measure.macs(self.revit, self.revit.input_size, grid=g) for g in self.grids]
        return list(self._grid_macs)

    def assigner_macs(self) -> float:
        """MACs per image of the assigner (measured once, cached)."""
        if self._assigner_macs is None:
            self._assigner_macs = measure.macs(self.assigner, self.revit.input_size)
        return self._assigner_macs

    def grid_shares(self, grid_index: torch.Tensor | None = None) -> torch.Tensor:
        """(K,) share of images sent to each grid, from ``grid_index`` (default: the last call)."""
        index = self.last_grid_index if grid_index is None else grid_index
        if index is None or index.numel() == 0:
            raise InvalidArgumentError("no grid choices yet: run the model on a batch or pass grid_index")
        counts = label_histogram(index, len(self.grids)).double()
        return counts / counts.sum()

    def expected_macs(self, grid_shares: Sequence[float] | torch.Tensor | None = None,
                      include_assigner: bool = True) -> float:
        """Expected MACs per image = MACs(TLA) + Σ_k p_k · MACs(grid k) (docs/methods.md §3).

        ``grid_shares``: p_k per grid index (or counts: they are normalised); default the shares of the
        last call. ``include_assigner=False`` gives the backbone-only figure.
        """
        shares = self.grid_shares() if grid_shares is None else torch.as_tensor(grid_shares, dtype=torch.float64)
        if shares.shape != (len(self.grids),) or (shares < 0).any() or not shares.sum() > 0:
            raise InvalidArgumentError(f"grid_shares must be {len(self.grids)} non-negative numbers (one per grid, "
                                       f"largest first); got {shares.tolist()}")
        shares = shares / shares.sum()
        backbone = float(sum(p * m for p, m in zip(shares.tolist(), self.grid_macs())))
        return backbone + (self.assigner_macs() if include_assigner else 0.0)
