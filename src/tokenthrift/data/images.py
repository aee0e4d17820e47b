"""Images: Fashion-MNIST from its local idx files, and the standard image transforms (small images:
pad-and-crop; large ones: RandomResizedCrop). CIFAR and ImageFolder come from torchvision (:mod:`.build`)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from ..errors import InvalidArgumentError, MissingFileError
from .info import FASHION_MNIST_DIR, DatasetInfo


def _read_idx(path: Path, magic: int, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise InvalidArgumentError(f"{path} is not an idx file of the expected kind (magic {found}, expected {magic})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


class FashionMNIST(Dataset):
    """Fashion-MNIST (60k train / 10k test, 28x28 grey) from the idx ``.gz`` files in ``root``.

    ``root`` defaults to Debian's ``dataset-fashion-mnist`` location. With ``download=True`` and no
    local files, torchvision fetches the data into ``root`` instead.
    """

    FILES = {True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}

    def __init__(self, root: str | os.PathLike | None = None, train: bool = True, transform=None,
                 download: bool = False):
        root = Path(root or FASHION_MNIST_DIR)
        images_file, labels_file = (root / name for name in self.FILES[train])
        if images_file.exists() and labels_file.exists():
            images = _read_idx(images_file, 2051, 16).reshape(-1, 28, 28)
            labels = _read_idx(labels_file, 2049, 8)
            self.images, self.labels = torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
        elif download:
            from torchvision.datasets import FashionMNIST as TVFashionMNIST
            ds = TVFashionMNIST(str(root), train=train, download=True)
            self.images, self.labels = ds.data, ds.targets
        else:
            raise MissingFileError(
                f"Fashion-MNIST not found: no {images_file.name} / {labels_file.name} in {root}. Either install "
                f"Debian's package (apt-get install dataset-fashion-mnist, which fills {FASHION_MNIST_DIR}) or point "
                "--data-dir at a folder holding the idx .gz files; add --download to let torchvision fetch them "
                "instead.")
        if len(self.images) != len(self.labels):
            raise InvalidArgumentError(f"Fashion-MNIST files in {root} disagree: {len(self.images)} images, "
                                       f"{len(self.labels)} labels")
        self.transform = transform
        self.targets = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i].unsqueeze(0)  # (1, 28, 28) uint8
        return (self.transform(image) if self.transform else image), int(self.labels[i])


AUGMENTATIONS = ("standard", "flip", "none")
INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


class SpatialCrops:
    """``n`` square crops of side ``size`` spread along the longer side of (..., H, W) frames (3: the two ends
    and the centre, TimeSformer's multi-view test), stacked as views in front: (n, ..., size, size)."""

    def __init__(self, size: int, n: int = 3):
        self.size, self.n = size, n

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        h, w = frames.shape[-2:]
        s = self.size
        starts = torch.linspace(0, max(h, w) - s, self.n).round().long().tolist()
        if w >= h:
            views = [frames[..., (h - s) // 2:(h - s) // 2 + s, x:x + s] for x in starts]
        else:
            views = [frames[..., y:y + s, (w - s) // 2:(w - s) // 2 + s] for y in starts]
        return torch.stack([v.as_subclass(torch.Tensor) for v in views])


def build_transform(augment: bool | str, img_size: int, in_chans: int, info: DatasetInfo,
                    video: bool = False, test_crops: int = 1, hflip: float = 0.5, crop_pad: int | None = None,
                    interpolation: str = "bilinear", crop_pct: float = 0.875) -> T.Compose:
    """Standard transforms. ``augment``: ``"standard"`` (or True) is the training augmentation, ``"flip"`` a
    mild one (the evaluation transform plus a random horizontal flip: e.g. for the token-length assigner,
    whose labels describe the images as the backbone sees them at test time), ``"none"`` (or False) the
    evaluation transform. Small images (stored at <= 64 px): pad-and-crop (``crop_pad`` pixels of padding,
    default model side / 14; 0: no crop) + flip for training, resized to the model's size. Large images:
    RandomResizedCrop + flip for training, resize + ``crop_pct`` centre crop for evaluation. ``hflip`` is
    the probability of the horizontal flip (0: never, for digits or text). ``interpolation`` (timm's names:
    bilinear, bicubic, nearest) resizes. Normalisation: ``info.mean`` / ``info.std`` (see :func:`channel_steps`). ``video=True``: for ``tv_tensors.Video`` frames (T, C, H, W), every frame transformed alike.
    ``test_crops=3`` (evaluation of large frames): the shorter side resized to ``img_size`` and three crops
    along the longer side, stacked as views (3, T, C, H, W).
    """
    mode = {True: "standard", False: "none"}.get(augment, augment)
    if mode not in AUGMENTATIONS:
        raise InvalidArgumentError(f"augment={augment!r}: choose one of {', '.join(AUGMENTATIONS)}")
    if not 0.0 <= hflip <= 1.0:
        raise InvalidArgumentError(f"hflip={hflip}: a flip probability between 0 (never) and 1")
    if crop_pad is not None and crop_pad < 0:
        raise InvalidArgumentError(f"crop_pad={crop_pad}: pixels of padding before the random crop, 0 or more")
    if not 0.0 < crop_pct <= 1.0:
        raise InvalidArgumentError(f"crop_pct={crop_pct}: the evaluation centre crop's share of the side, in (0, 1]")
    if interpolation not in INTERPOLATIONS:
        raise InvalidArgumentError(f"interpolation={interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
    resize = dict(interpolation=INTERPOLATIONS[interpolation], antialias=True)
    small = 0 < info.native_size <= 64
    steps: list = [] if video else [T.ToImage()]
    if small:  # shorter side to the model's size; square images (Fashion-MNIST, CIFAR) need no crop at test time
        if info.native_size != img_size:
            steps.append(T.Resize(img_size, **resize))
        pad = max(1, img_size // 14) if crop_pad is None else crop_pad
        steps.append(T.RandomCrop(img_size, padding=pad) if mode == "standard" and pad else T.CenterCrop(img_size))
    elif mode == "standard":
        steps.append(T.RandomResizedCrop(img_size, **resize))
    elif test_crops > 1:
        steps.append(T.Resize(img_size, **resize))  # the crops come last: they stack the views
    else:
        steps += [T.Resize(int(round(img_size / crop_pct)), **resize), T.CenterCrop(img_size)]
    if mode != "none" and hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    steps.append(T.ToDtype(torch.float32, scale=True))
    steps += channel_steps(in_chans, info)
    if test_crops > 1:
        steps.append(SpatialCrops(img_size, test_crops))
    return T.Compose(steps)


def channel_steps(in_chans: int, info: DatasetInfo) -> list:
    """Match the data's channels to the model's (repeat grey, or average colour to grey), then normalise with
    ``info.mean`` / ``info.std``: the dataset's statistics, or a pretrained model's (one value per model
    channel, used as they are); statistics of the data's channels follow the conversion. Works on (C, H, W)
    images and (T, C, H, W) frames."""
    mean, std = tuple(info.mean), tuple(info.std)
    steps: list = []
    if in_chans != info.channels:
        if info.channels == 1:  # grey data, colour model: repeat the channel
            steps.append(T.Lambda(lambda x: x.expand(*x.shape[:-3], in_chans, *x.shape[-2:])))
        elif in_chans == 1:
            steps.append(T.Grayscale(1))
        else:
            raise InvalidArgumentError(f"cannot feed {info.channels}-channel images to a model with "
                                       f"in_chans={in_chans}")
    if len(mean) != in_chans or len(std) != in_chans:
        if len(mean) == 1 and len(std) == 1:
            mean, std = mean * in_chans, std * in_chans
        elif in_chans == 1:
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        else:
            raise InvalidArgumentError(f"normalisation mean {mean} / std {std} do not fit a model with "
                                       f"in_chans={in_chans}: give one value or {in_chans}")
    return steps + [T.Normalize(mean, std)]
