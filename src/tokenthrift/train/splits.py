"""The images of a run's splits, as its models see them at test time: what it trained on, held out, evaluated
on, and training images it never trained on (to calibrate an inference rule without touching the evaluation
images)."""
from __future__ import annotations

from torch.utils.data import DataLoader

from ..data import build_dataset, fixed_subset
from ..errors import InvalidArgumentError
from .build import data_shape, run_preprocess
from .config import TrainConfig

__all__ = ["SPLITS", "calibration_source", "split_loader"]

SPLITS = ("train", "holdout", "eval", "calibration")


def calibration_source(cfg: TrainConfig) -> str | None:
    """Which training images a run never trained on: its held-out slice, else the rest of its training subset;
    None when it trained on the whole split."""
    if cfg.train_holdout:
        return f"its --train-holdout slice ({cfg.train_holdout} training images)"
    if cfg.train_subset:
        return f"training images outside its --train-subset {cfg.train_subset}"
    return None


def split_loader(cfg: TrainConfig, split: str, input_size, batch_size: int, data_dir: str | None,
                 workers: int = 0, limit: int | None = None, classes=None) -> DataLoader:
    """The images a run trained on (``train``), held out of its training (``holdout``, --train-holdout),
    evaluated on (``eval``), or training images it never trained on (``calibration``: the held-out slice,
    else the training images outside its --train-subset; at most ``limit`` of them, a fixed draw), in dataset
    order, with the evaluation transform; ``classes``: the run's class names (its model's), which the labels are
    matched to by name (a folder's val/ may lack a class of train/)."""
    if split not in SPLITS:
        raise InvalidArgumentError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if split == "holdout" and not cfg.train_holdout:
        raise InvalidArgumentError("this run held no training images out (--train-holdout 0): train the ReViT with "
                                   "--train-holdout N to label a held-out slice, or label --split train")
    if split == "calibration" and calibration_source(cfg) is None:
        raise InvalidArgumentError("this run trained on every training image and held none out, so nothing is left to "
                                   "calibrate on without touching the evaluation images: train the ReViT with "
                                   "--train-holdout N (or --train-subset N), or give the thresholds directly")
    c, h, frames = data_shape(input_size)
    training = split != "eval"
    part = {"holdout": "holdout", "calibration": "holdout" if cfg.train_holdout else "rest"}.get(split, "fit")
    ds, _ = build_dataset(cfg.data, training, h, c, data_dir or cfg.data_dir, cfg.download,
                          cfg.train_subset if training else cfg.eval_subset, cfg.seed, augment=False,
                          holdout=cfg.train_holdout if training else 0, part=part,
                          frames=frames, preprocess=run_preprocess(cfg), classes=classes)
    if limit is not None and len(ds) > limit:
        ds = fixed_subset(ds, limit, cfg.seed + 1)
    return DataLoader(ds, batch_size, shuffle=False, num_workers=workers)
