"""Datasets and transforms: Fashion-MNIST from local files, CIFAR-10/100 and ImageFolder via torchvision.

``build_dataset(spec, train, ...)`` takes ``fashion-mnist``, ``cifar10``, ``cifar100`` or
``imagefolder:PATH`` (PATH/train and PATH/val, or PATH/test). Images come out as float tensors of the
model's size and channel count, normalised with the dataset's statistics.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2 as T

from .errors import InvalidArgumentError, MissingFileError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH")


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    native_size: int  # side of the stored images (ImageFolder: unknown, 0)
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


INFO = {
    "fashion-mnist": DatasetInfo(10, 28, 1, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(10, 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(100, 32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": DatasetInfo(0, 0, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


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
                f"Debian's package (apt-get install dataset-fashion-mnist, which fills {FASHION_MNIST_DIR}) or "
                "point --data-dir at a folder holding the idx .gz files; add --download to let torchvision "
                "fetch them instead.")
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


def build_transform(augment: bool | str, img_size: int, in_chans: int, info: DatasetInfo) -> T.Compose:
    """Standard transforms. ``augment``: ``"standard"`` (or True) is the training augmentation, ``"flip"`` a
    mild one (the evaluation transform plus a random horizontal flip: e.g. for the token-length assigner,
    whose labels describe the images as the backbone sees them at test time), ``"none"`` (or False) the
    evaluation transform. Small images (stored at <= 64 px): pad-and-crop + flip for training, resized to
    the model's size. Large images: RandomResizedCrop + flip for training, resize + 87.5 % centre crop for
    evaluation."""
    mode = {True: "standard", False: "none"}.get(augment, augment)
    if mode not in AUGMENTATIONS:
        raise InvalidArgumentError(f"augment={augment!r}: choose one of {', '.join(AUGMENTATIONS)}")
    small = 0 < info.native_size <= 64
    steps: list = [T.ToImage()]
    if small:  # shorter side to the model's size; square images (Fashion-MNIST, CIFAR) need no crop at test time
        if info.native_size != img_size:
            steps.append(T.Resize(img_size, antialias=True))
        steps.append(T.RandomCrop(img_size, padding=max(1, img_size // 14)) if mode == "standard"
                     else T.CenterCrop(img_size))
    elif mode == "standard":
        steps.append(T.RandomResizedCrop(img_size, antialias=True))
    else:
        steps += [T.Resize(int(round(img_size / 0.875)), antialias=True), T.CenterCrop(img_size)]
    if mode != "none":
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.ToDtype(torch.float32, scale=True))
    mean, std = info.mean, info.std
    if in_chans != info.channels:
        if info.channels == 1:  # grey data, colour model: repeat the channel
            steps.append(T.Lambda(lambda x: x.expand(in_chans, -1, -1)))
            mean, std = mean * in_chans, std * in_chans
        elif in_chans == 1:
            steps.append(T.Grayscale(1))
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        else:
            raise InvalidArgumentError(f"cannot feed {info.channels}-channel images to a model with "
                                       f"in_chans={in_chans}")
    steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


def dataset_info(spec: str) -> DatasetInfo:
    key = "imagefolder" if spec.startswith("imagefolder:") else spec
    if key not in INFO:
        raise InvalidArgumentError(f"unknown dataset {spec!r}; choose one of {', '.join(DATASETS)}")
    return INFO[key]


def _imagefolder_split(root: Path, train: bool) -> Path:
    names = ("train",) if train else ("val", "validation", "test")
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise MissingFileError(f"ImageFolder tree {root} has no {' or '.join(names)}/ folder; expected "
                            f"{root}/train/<class>/<image> and {root}/val/<class>/<image>")


def _image_side(path: str) -> int:
    """The longer side of one image file, read from its header."""
    from PIL import Image

    with Image.open(path) as image:
        return max(image.size)


def _holdout_split(n: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the images kept for training and of the ``holdout`` held-out ones (a fixed random slice,
    chosen with ``seed``), each in dataset order."""
    if not 0 <= holdout < n:
        raise InvalidArgumentError(f"train_holdout={holdout} must leave some of the {n} training images for training")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))  # not the subset's draw
    return order[holdout:].sort().values.tolist(), order[:holdout].sort().values.tolist()


PARTS = ("all", "fit", "holdout")


def build_dataset(spec: str, train: bool, img_size: int, in_chans: int, data_dir: str | None = None,
                  download: bool = False, subset: int | None = None, seed: int = 0,
                  augment: bool | str | None = None, holdout: int = 0, part: str = "fit"
                  ) -> tuple[Dataset, DatasetInfo]:
    """The training (``train``) or evaluation split of ``spec``, optionally a fixed random subset.

    ``augment`` picks the transform (see :func:`build_transform`): default the training augmentation on
    the training split and none on the evaluation split; ``train=True, augment=False`` gives the
    training images as the model sees them at test time. ``subset=N`` keeps the same N images on every
    call (chosen with ``seed``), so short runs are reproducible. ``holdout=H`` (training split only)
    sets H of those images aside, again a fixed slice chosen with ``seed``: ``part="fit"`` returns the
    others (what a run trains on), ``"holdout"`` the H set aside, ``"all"`` both. Returns the dataset
    and its :class:`DatasetInfo` (num_classes filled in; for an ImageFolder, ``native_size`` is the size
    of its first image, which decides between the small- and the large-image transforms).
    """
    info = dataset_info(spec)
    if part not in PARTS:
        raise InvalidArgumentError(f"part={part!r}: choose one of {', '.join(PARTS)}")
    if holdout and not train:
        raise InvalidArgumentError("a held-out slice is taken from the training split; the evaluation split has none")
    if spec == "imagefolder":
        raise InvalidArgumentError("imagefolder needs its folder: --data imagefolder:PATH")
    if spec.startswith("imagefolder:"):
        from torchvision.datasets import ImageFolder
        root = Path(spec.split(":", 1)[1])
        ds = ImageFolder(str(_imagefolder_split(root, train)))
        info = DatasetInfo(len(ds.classes), _image_side(ds.samples[0][0]), 3, info.mean, info.std)
    augment = train if augment is None else augment
    transform = build_transform(augment, img_size, in_chans, info)
    if spec == "fashion-mnist":
        ds = FashionMNIST(data_dir, train=train, transform=transform, download=download)
    elif spec in ("cifar10", "cifar100"):
        from torchvision import datasets
        cls = datasets.CIFAR10 if spec == "cifar10" else datasets.CIFAR100
        root = data_dir or "data"
        try:
            ds = cls(root, train=train, transform=transform, download=download)
        except RuntimeError as err:
            raise MissingFileError(f"{spec} not found under {root}: pass --data-dir pointing at the folder that "
                                    f"holds cifar-*-batches-py, or add --download") from err
    else:
        ds.transform = transform
    if subset is not None:
        if not 0 < subset <= len(ds):
            raise InvalidArgumentError(f"subset size {subset} must be between 1 and the dataset size {len(ds)}")
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:subset]
        ds = Subset(ds, order.sort().values.tolist())
    if holdout and part != "all":
        fit, held = _holdout_split(len(ds), holdout, seed)
        ds = Subset(ds, fit if part == "fit" else held)
    return ds, info
