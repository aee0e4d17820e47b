"""What the engine trains: image/video classification, or detection and instance segmentation.

A task supplies what differs between them: the datasets and how batches are collated and moved to the
device, the criterion, the evaluation (top-1, or COCO box and mask AP), its main metric, and the module
whose MACs a method changes. The epoch loop, checkpoints, EMA, AMP and DDP are the engine's, shared.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import DatasetInfo, build_dataset, fixed_subset
from ..measure import training_mode
from ..errors import InvalidArgumentError
from .build import data_shape, run_preprocess
from .config import TrainConfig
from .distributed import DistInfo, all_gather_objects, all_reduce_sum

TASKS = ("classification", "detection")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, dist_info: DistInfo | None = None,
             autocast=nullcontext, **forward_kwargs) -> float:
    """Top-1 (%) of ``model(images, **forward_kwargs)`` over the loader (under DDP each process its shard,
    summed). The model runs in eval mode (dropout and drop path off, a distilled DeiT gives one output);
    its own train/eval flags are restored afterwards. ``forward_kwargs`` select a variant of the forward,
    such as ``grid=10`` for a ResizableViT. Batches of clips with several views each, (B, V, C, T, H, W)
    (``test_crops=3``), are scored on the views' class probabilities averaged."""
    if not isinstance(model, nn.Module):
        raise TypeError("evaluate takes the model itself (an nn.Module), so that it can run in eval mode; got "
                        f"{type(model).__name__}. Pass forward keywords (e.g. grid=10) instead of a lambda")
    correct = total = 0
    with training_mode(model, False):
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast():
                if images.dim() == 6:  # views of each clip: one forward over all, probabilities averaged
                    logits = model(images.flatten(0, 1), **forward_kwargs)
                    logits = logits.float().softmax(-1).view(*images.shape[:2], -1).mean(1)
                else:
                    logits = model(images, **forward_kwargs)
            correct += (logits.argmax(-1) == targets).sum().item()
            total += targets.numel()
    correct, total = all_reduce_sum([correct, total], device, dist_info or DistInfo())
    return 100.0 * correct / max(total, 1)


class ClassificationTask:
    """Images or clips with class labels: cross-entropy (label smoothing, mixup/cutmix), top-1."""

    name, metric, collate = "classification", "top1", None

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def datasets(self, input_size: tuple[int, ...], method) -> tuple[Dataset, Dataset, DatasetInfo]:
        cfg, (c, h, frames) = self.cfg, data_shape(input_size)
        pre = run_preprocess(cfg)
        train_ds, info = build_dataset(cfg.data, True, h, c, cfg.data_dir, cfg.download, cfg.train_subset, cfg.seed,
                                       augment=method.train_augment, holdout=cfg.train_holdout,
                                       part=method.train_part, frames=frames, preprocess=pre,
                                       skip_bad_images=cfg.skip_bad_images)
        # evaluation labels matched to the training classes by name (a folder tree's val/ may lack a class)
        eval_ds, _ = build_dataset(cfg.data, False, h, c, cfg.data_dir, cfg.download, cfg.eval_subset, cfg.seed,
                                   frames=frames, test_crops=cfg.test_crops, preprocess=pre,
                                   skip_bad_images=cfg.skip_bad_images, classes=info.classes or None)
        return method.datasets(train_ds, eval_ds, info)

    def criterion(self, num_classes: int) -> tuple[Callable, Mixup | None]:
        cfg = self.cfg
        smoothing = cfg.smoothing()
        if cfg.mixup > 0 or cfg.cutmix > 0:
            return SoftTargetCrossEntropy(), Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                                                   label_smoothing=smoothing, num_classes=num_classes)
        return (LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()), None

    def batch(self, images, targets, device: torch.device):
        return images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, dist_info: DistInfo,
                 autocast, **forward_kwargs) -> dict:
        return {"top1": evaluate(model, loader, device, dist_info, autocast, **forward_kwargs)}

    def macs_module(self, model: nn.Module) -> nn.Module:
        return model

    def log(self) -> dict:
        return {}


class DetectionLoss:
    """torchvision's loss dict summed; keeps running means of every term for the epoch's log."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps = 0

    def __call__(self, losses: dict[str, torch.Tensor], targets) -> torch.Tensor:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.steps += 1
        return sum(losses.values())

    def take(self) -> dict:
        out = {k: v / self.steps for k, v in self.sums.items()} if self.steps else {}
        self.sums, self.steps = {}, 0
        return out


def _flip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Horizontal flip of an image with its boxes and masks, with probability 0.5."""
    if torch.rand(()) < 0.5:
        return image, target
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


class DetectionTask:
    """COCO-layout instance data (``--data coco:PATH``), torchvision's summed losses, COCO box/mask AP.

    Methods that apply are those whose adapter lists the task in ``Method.tasks`` (full tokens, and LTM,
    which merges inside the backbone; its IB term needs class labels per image and is refused there). Mixup, cutmix and label smoothing are classification's and are refused.
    Training images get a random horizontal flip.
    """

    name, metric = "detection", "box_AP"

    def __init__(self, cfg: TrainConfig):
        from ..data.coco import detection_collate

        if cfg.mixup or cfg.cutmix or cfg.label_smoothing is not None:
            raise InvalidArgumentError("mixup, cutmix and label smoothing are classification's: drop them for --task "
                                       "detection")
        if not cfg.data.startswith("coco:"):
            raise InvalidArgumentError(f"--task detection reads COCO-layout data: --data coco:PATH (got {cfg.data}); "
                                       "tokenthrift make-collage writes an offline set")
        self.cfg, self.collate = cfg, detection_collate
        self.loss = DetectionLoss()
        self.coco = None

    def datasets(self, input_size: tuple[int, ...], method) -> tuple[Dataset, Dataset, DatasetInfo]:
        from ..data.coco import CocoInstances

        cfg = self.cfg
        root = cfg.data.split(":", 1)[1]
        train_ds = CocoInstances(root, "train", train=True, transform=_flip)
        eval_ds = CocoInstances(root, "val")
        self.coco = eval_ds.coco
        num_classes = max(train_ds.categories) + 1
        train_ds = fixed_subset(train_ds, cfg.train_subset, cfg.seed)
        eval_ds = fixed_subset(eval_ds, cfg.eval_subset, cfg.seed)
        return train_ds, eval_ds, DatasetInfo(num_classes, 0, 3, (), ())

    def criterion(self, num_classes: int) -> tuple[Callable, None]:
        return self.loss, None

    def batch(self, images, targets, device: torch.device):
        from ..detection import DetectionBatch

        return DetectionBatch(images, targets).to(device), targets

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, dist_info: DistInfo,
                 autocast, **forward_kwargs) -> dict:
        from ..data.coco import coco_metrics, to_coco_results

        masks = hasattr(model, "roi_heads") and model.roi_heads.has_mask()
        results, ids = [], []
        with training_mode(model, False):
            for images, targets in loader:
                with autocast():
                    outputs = model([image.to(device) for image in images], **forward_kwargs)
                image_ids = [t["image_id"] for t in targets]
                results += to_coco_results(outputs, image_ids, masks)
                ids += image_ids
        results = [r for part in all_gather_objects(results, dist_info) for r in part]
        ids = [i for part in all_gather_objects(ids, dist_info) for i in part]
        return coco_metrics(self.coco, results, ids, masks)

    def macs_module(self, model: nn.Module) -> nn.Module:
        """The backbone (with its FPN): what a method changes, and a forward without targets."""
        return model.backbone

    def log(self) -> dict:
        return self.loss.take()


def build_task(cfg: TrainConfig):
    if cfg.task not in TASKS:
        raise InvalidArgumentError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    return ClassificationTask(cfg) if cfg.task == "classification" else DetectionTask(cfg)
