"""The Token-Length Assigner as a training-engine method: a small timm CNN trained on token-length labels.

Zhou & Zhu, "Make A Long Image Short: Adaptive Token Length for Vision Transformers", ECML-PKDD 2023
(arXiv 2307.02092). docs/methods.md §3. Labels come from ``tokenthrift assign-labels`` (:mod:`tokenthrift.apps.labels`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ... import measure
from ...data import DatasetInfo, Preprocess
from ...errors import InvalidArgumentError, UnsupportedModelError
from ...revit import (
    DEFAULT_ASSIGNER,
    AdaptiveViT,
    TokenLengthAssigner,
    TokenLengthLabels,
    balanced_class_weights,
    check_assigner_budget,
    convert,
    label_histogram,
    load_labels,
)
from ..build import build_model, model_input_size
from ..config import TrainConfig, option
from ..protocol import EvalContext, HarnessContext, Method, PictureOptions, Variant
from .revit import ReViTMethod

__all__ = ["RelabeledDataset", "TLAMethod", "TLAOptions"]


@dataclasses.dataclass
class TLAOptions:
    model: str | None = option(None, "timm CNN for the Token-Length Assigner (default: mobilenetv3_small_050)")
    labels: str | None = option(None, "token-length label file of the training images (assign-labels --split train or "
                                "holdout)")
    eval_labels: str | None = option(None, "token-length label file of the evaluation images (assign-labels --split "
                                     "eval)")
    balanced: bool = option(False, "class-balanced cross-entropy")
    cost_weight: float = option(0.0, "add this weight times the expected MACs share of the predicted grids to the "
                                "loss (a cost-aware assigner; 0: cross-entropy only)")
    motion: bool = option(False, "video: also feed the assigner the clip's mean absolute frame difference")
    scale: float = option(0.5, "assigner input resolution as a fraction of the backbone's")
    max_macs_fraction: float = option(0.02, "refuse an assigner costing more than this share of the backbone's MACs")

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RelabeledDataset(Dataset):
    """``dataset`` with its targets replaced: item i is (image_i, int(labels[i]))."""

    def __init__(self, dataset: Dataset, labels: torch.Tensor):
        if len(dataset) != len(labels):
            raise InvalidArgumentError(f"{len(labels)} labels for a dataset of {len(dataset)} items")
        self.dataset, self.labels = dataset, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.dataset[i][0]
        return image, int(self.labels[i])


class TLAMethod(Method):
    """Train the Token-Length Assigner (docs/methods.md §3) on labels from :func:`tokenthrift.revit.assign_labels`.

    ``create_model`` builds a :class:`~tokenthrift.revit.TokenLengthAssigner` for the backbone the
    config describes (its input size; K = number of grids in the label file) and checks the 2 % MACs
    budget against that backbone. ``datasets`` replaces the class targets of the training and
    evaluation sets with the token-length labels of ``tla_labels`` / ``tla_eval_labels``; each file
    must have been made on exactly those images (same data, split, subset, held-out slice and seed),
    which is checked. Labels of the ReViT run's held-out slice (``assign-labels --split holdout``,
    docs/methods.md §3: labels made on the backbone's own training images lean short) make the assigner train on
    that slice. Augmentation is mild, a horizontal flip only (the labels describe the images as the
    backbone sees them at test time); mixup/cutmix are refused. With ``tla_balanced`` the CE is
    class-balanced (:func:`~tokenthrift.revit.balanced_class_weights` from the training-label histogram;
    the config's label smoothing still applies). With ``tla_cost_weight`` λ > 0 the loss adds λ times the
    expected MACs share Σ_k p_k · MACs(grid k) / MACs(largest) of the assigner's probabilities: a cost-aware
    objective that trades label accuracy for cheaper picks (class balance spreads picks evenly instead, whatever
    they cost). A checkpoint is rebuilt without its label files
    (:meth:`from_checkpoint`).
    """

    name = "tla"
    summary = "Token-Length Assigner on labels from assign-labels"
    label = "TLA"
    order = 30
    Options = TLAOptions
    data_classes = False  # its outputs are token grids
    tasks = ("classification",)
    previewable = False
    plain_inference = False
    train_augment = "flip"

    def __init__(self, cfg, labels: bool = True):
        super().__init__(cfg)
        self.cfg = cfg
        o = self.options
        self.model_name = o.model or DEFAULT_ASSIGNER
        self.scale = float(o.scale)
        self.balanced = bool(o.balanced)
        self.cost_weight = float(o.cost_weight)
        if self.cost_weight < 0:
            raise InvalidArgumentError(f"--tla-cost-weight {self.cost_weight} must be >= 0 (0: cross-entropy only)")
        self.grid_cost: torch.Tensor | None = None  # (K,) MACs of each grid over the largest's
        self.max_fraction = float(o.max_macs_fraction)
        self.label_smoothing = cfg.smoothing()
        if cfg.mixup or cfg.cutmix:
            raise InvalidArgumentError("the token-length assigner trains with mild augmentation only: mixup/cutmix "
                                       "blend images whose token-length labels do not blend; set --mixup 0 --cutmix 0")
        self.grids: tuple[int, ...] | None = None
        self.train_labels: TokenLengthLabels | None = None
        self.eval_labels: TokenLengthLabels | None = None
        self.weights: torch.Tensor | None = None
        self.assigner_fraction: float | None = None
        self.backbone_macs: float | None = None
        if labels:
            self._load_labels()

    def _load_labels(self) -> None:
        train_path, eval_path = self.options.labels, self.options.eval_labels
        if not train_path or not eval_path:
            raise InvalidArgumentError(
                "--method tla needs token-length label files for the training and the evaluation images (--tla-labels, "
                "--tla-eval-labels): make them with tokenthrift assign-labels on a --method revit run (--split train "
                "or holdout, and --split eval)")
        self.train_labels = load_labels(train_path)
        self.eval_labels = load_labels(eval_path, grids=self.train_labels.grids)
        self.grids = self.train_labels.grids
        if self.train_labels.meta.get("split") == "holdout":
            self.train_part = "holdout"
        self.weights = balanced_class_weights(self.train_labels.histogram) if self.balanced else None
        self.backbone_macs = self.train_labels.meta.get("backbone_macs")

    def preprocess(self, pre: Preprocess) -> Preprocess:
        """The assigner sees the images as the backbone that made its labels saw them (recorded in the label
        file), unless --mean / --std say otherwise."""
        meta = self.train_labels.meta if self.train_labels is not None else {}
        if self.cfg.mean is not None or self.cfg.std is not None or not meta.get("mean"):
            return pre
        return dataclasses.replace(pre, mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                       source="the ReViT backbone's, as its label file records")

    def refuse_eval_options(self, ctx: EvalContext) -> None:
        if ctx.data is not None:
            raise InvalidArgumentError("an assigner is scored on the images its label file was made on; drop --data")
        if ctx.test_crops > 1:
            raise InvalidArgumentError("an assigner decides from one view of each clip: evaluate it with --test-crops 1")

    def variants(self, model: nn.Module, input_size: tuple[int, ...]) -> list[Variant]:
        """The assigner alone, scored on token-length labels (:meth:`score`)."""
        return [Variant(f"token-length assigner ({model.model_name})", model, measure.macs(model, model.input_size),
                        match=False, score=lambda ctx: self.score(model, ctx))]

    def score(self, model: nn.Module, ctx: EvalContext) -> dict:
        """The assigner's accuracy on the token-length labels of the evaluation images (``ctx.labels``, default
        the run's ``--tla-eval-labels``), its predicted grid shares and its MACs against the backbone's."""
        path = ctx.labels or self.options.eval_labels
        if not path:
            raise InvalidArgumentError("an assigner is scored on the token-length labels of the evaluation images: "
                                       "pass --labels FILE (tokenthrift assign-labels --split eval)")
        file = load_labels(path, grids=model.grids)
        relabeled = self.relabel(ctx.loader.dataset, file, "--labels", "eval")
        loader = DataLoader(relabeled, ctx.loader.batch_size, num_workers=ctx.loader.num_workers)
        chosen, targets = [], []
        with torch.no_grad(), measure.training_mode(model, False):
            for images, grid_labels in loader:
                chosen.append(model(images.to(ctx.device)).argmax(-1).cpu())
                targets.append(grid_labels)
        picks, labels = torch.cat(chosen), torch.cat(targets)
        shares = label_histogram(picks, len(file.grids)).double()
        macs = measure.macs(model, model.input_size)
        row = {"images": len(relabeled), "assigner_top1": 100.0 * (picks == labels).double().mean().item(),
               "label_file": str(path), "GMACs": macs / 1e9}
        backbone = file.meta.get("backbone_macs")
        if backbone:
            row["share_of_backbone"] = macs / backbone
        row.update({f"picks_g{g}": s for g, s in zip(file.grids, (shares / shares.sum()).tolist())})
        return row

    def harness_variants(self, model: nn.Module, cfg: TrainConfig, ctx: HarnessContext) -> list[Variant]:
        """ReViT + this assigner (argmax): top-1 and MACs per image as executed (assigner included), on the
        ReViT run among the compared ones whose grids the assigner was trained for."""
        revits = [m for m, _, method in ctx.runs if isinstance(method, ReViTMethod) and tuple(m.grids) == self.grids]
        if not revits:
            raise InvalidArgumentError(f"an assigner (grids {self.grids}) is compared on a ReViT: give the ReViT run "
                                       "it was trained for too")
        adaptive = AdaptiveViT(revits[0], model).eval()
        with torch.no_grad(), measure.training_mode(model, False):
            picks = torch.cat([adaptive.choose(images) for images, _ in ctx.loader])
        return [Variant("ReViT + TLA, adaptive", adaptive, adaptive.expected_macs(adaptive.grid_shares(picks)),
                        baseline=revits[0])]

    def draw(self, model: nn.Module, cfg: TrainConfig, images: torch.Tensor, options: PictureOptions) -> Path:
        """The image at each grid, the assigner's pick framed."""
        from ... import viz

        backbone = build_model(cfg)
        patch = backbone.patch_embed.patch_size[0] if hasattr(backbone, "patch_embed") else None
        if patch is None or model.grids is None:
            raise UnsupportedModelError("this assigner checkpoint does not record its grids or its backbone's patch "
                                        "size; draw it with its ReViT: visualize --checkpoint REVIT --assigner THIS")
        with torch.no_grad():
            probs = model(images).float().softmax(-1)
        views = [(g, F.interpolate(images, size=(g * patch, g * patch), mode="bilinear", antialias=True,
                                   align_corners=False) if g * patch != images.shape[-1] else images)
                 for g in model.grids]
        title = f"token-length assigner ({model.model_name}): the grid it picks per image (red)"
        return viz.plot_revit_grids(views, options.out, title, probs=probs, grids=model.grids,
                                    captions=options.captions)

    @classmethod
    def restore(cls, cfg, state: dict) -> TLAMethod:
        """The assigner of a saved run, rebuilt from its grids and backbone MACs: no label files needed."""
        method = cls(cfg, labels=False)
        method.grids = tuple(state["grids"])
        method.backbone_macs = state.get("backbone_macs")
        return method

    def create_model(self, cfg) -> nn.Module:
        backbone = build_model(cfg)
        input_size = model_input_size(backbone, cfg)
        recorded = self.train_labels.meta.get("input_size") if self.train_labels is not None else None
        if recorded is not None and tuple(recorded) != tuple(input_size):
            raise InvalidArgumentError(f"the labels were made for images of size {tuple(recorded)} but this config's "
                                       f"backbone takes {tuple(input_size)}; use the backbone's --img-size / "
                                       "--in-chans")
        assigner = TokenLengthAssigner(len(self.grids), input_size, self.model_name, self.scale,
                                       motion=bool(self.options.motion))
        assigner.grids = self.grids
        self.backbone_macs = float(self.backbone_macs or measure.macs(backbone, input_size))
        if self.cost_weight:
            resizable = convert(backbone, self.grids, tal_ln=False)
            macs = [measure.macs(resizable, input_size, grid=g) for g in self.grids]
            self.grid_cost = torch.tensor([m / macs[0] for m in macs])
        self.assigner_fraction = check_assigner_budget(assigner, self.backbone_macs, self.max_fraction)
        return assigner

    def relabel(self, dataset: Dataset, file: TokenLengthLabels, flag: str, split: str) -> RelabeledDataset:
        """``dataset`` with the labels of ``file`` as targets, after checking the file was made on exactly
        these images (``flag`` names the file in the error)."""
        meta, cfg = file.meta, self.cfg
        evaluation = split == "eval"
        expected = {"split": split, "data": cfg.data,
                    "subset": getattr(cfg, "eval_subset" if evaluation else "train_subset"),
                    "holdout": 0 if evaluation else cfg.train_holdout,
                    "seed": cfg.seed}
        if not expected["subset"] and not expected["holdout"]:
            del expected["seed"]  # the whole split: the seed picks nothing
        wrong = {k: (meta[k], v) for k, v in expected.items() if k in meta and meta[k] != v}
        if wrong or len(file.labels) != len(dataset):
            found = ", ".join(f"{k}={meta.get(k)!r}" for k in expected if k in meta)
            mine = ", ".join(f"{k}={v!r}" for k, v in expected.items())
            raise InvalidArgumentError(
                f"{flag} holds {len(file.labels)} labels ({found or 'no split recorded'}) but the {split} set has "
                f"{len(dataset)} images ({mine}){'; mismatched: ' + ', '.join(wrong) if wrong else ''}. Label exactly "
                "the images this run uses (same --data, --train-subset / --eval-subset, --train-holdout and --seed as "
                "the ReViT run).")
        return RelabeledDataset(dataset, file.labels)

    def datasets(self, train_ds: Dataset, eval_ds: Dataset, info: DatasetInfo
                 ) -> tuple[Dataset, Dataset, DatasetInfo]:
        split = self.train_labels.meta.get("split", "train")
        train = self.relabel(train_ds, self.train_labels, "--tla-labels", split)
        evaluation = self.relabel(eval_ds, self.eval_labels, "--tla-eval-labels", "eval")
        return train, evaluation, dataclasses.replace(info, num_classes=len(self.grids),
                                                      classes=tuple(f"{g}x{g}" for g in self.grids))

    def forward_backward(self, net: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion: Criterion,
                         autocast: Callable[[], ContextManager], backward: Callable[[torch.Tensor], None]
                         ) -> torch.Tensor:
        if self.weights is None and not self.cost_weight:
            return super().forward_backward(net, images, targets, criterion, autocast, backward)
        with autocast():
            logits = net(images).float()
            weight = None if self.weights is None else self.weights.to(logits.device)
            loss = F.cross_entropy(logits, targets, weight=weight, label_smoothing=self.label_smoothing)
            if self.cost_weight:  # the expected MACs share of the grids it would pick: cheaper picks, at a price
                loss = loss + self.cost_weight * (logits.softmax(-1) @ self.grid_cost.to(logits.device)).mean()
        backward(loss)
        return loss.detach()

    def baseline_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> tuple[float, str]:
        return measure.macs(model, input_size, train=True), "a training forward of the assigner"

    def log(self) -> dict:
        record = {"tla_grids": list(self.grids), "tla_label_hist": self.train_labels.histogram.tolist()}
        if self.assigner_fraction is not None:
            record["tla_macs_fraction"] = self.assigner_fraction
        return record

    def state_dict(self) -> dict:
        return {"grids": list(self.grids), "backbone_macs": self.backbone_macs}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state.get("grids", self.grids)) != self.grids:
            raise InvalidArgumentError(f"checkpoint's assigner was trained for grids {tuple(state['grids'])}, the "
                                       f"label file has {self.grids}")
