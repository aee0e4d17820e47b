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
        raise ValueError(f"{path} is not an idx file of the expected kind (magic {found}, expected {magic})")
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
            raise FileNotFoundError(
                f"Fashion-MNIST not found: no {images_file.name} / {labels_file.name} in {root}. Either install "
                f"Debian's package (apt-get install dataset-fashion-mnist, which fills {FASHION_MNIST_DIR}) or "
                "point --data-dir at a folder holding the idx .gz files; add --download to let torchvision "
                "fetch them instead.")
        if len(self.images) != len(self.labels):
            raise ValueError(f"Fashion-MNIST files in {root} disagree: {len(self.images)} images, "
                             f"{len(self.labels)} labels")
        self.transform = transform
        self.targets = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i].unsqueeze(0)  # (1, 28, 28) uint8
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def build_transform(train: bool, img_size: int, in_chans: int, info: DatasetInfo) -> T.Compose:
    """Standard transforms. Small images (<= 64 px): pad-and-crop + flip, resized to the model's size.
    Large images: RandomResizedCrop + flip for training, resize + 87.5 % centre crop for evaluation."""
    small = 0 < info.native_size <= 64
    steps: list = [T.ToImage()]
    if small:
        if info.native_size != img_size:
            steps.append(T.Resize(img_size, antialias=True))
        if train:
            steps += [T.RandomCrop(img_size, padding=max(1, img_size // 14)), T.RandomHorizontalFlip()]
    elif train:
        steps += [T.RandomResizedCrop(img_size, antialias=True), T.RandomHorizontalFlip()]
    else:
        steps += [T.Resize(int(round(img_size / 0.875)), antialias=True), T.CenterCrop(img_size)]
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
            raise ValueError(f"cannot feed {info.channels}-channel images to a model with in_chans={in_chans}")
    steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


def dataset_info(spec: str) -> DatasetInfo:
    key = "imagefolder" if spec.startswith("imagefolder:") else spec
    if key not in INFO:
        raise ValueError(f"unknown dataset {spec!r}; choose one of {', '.join(DATASETS)}")
    return INFO[key]


def _imagefolder_split(root: Path, train: bool) -> Path:
    names = ("train",) if train else ("val", "validation", "test")
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"ImageFolder tree {root} has no {' or '.join(names)}/ folder; expected "
                            f"{root}/train/<class>/<image> and {root}/val/<class>/<image>")


def build_dataset(spec: str, train: bool, img_size: int, in_chans: int, data_dir: str | None = None,
                  download: bool = False, subset: int | None = None, seed: int = 0,
                  augment: bool | None = None) -> tuple[Dataset, DatasetInfo]:
    """The training (``train``) or evaluation split of ``spec``, optionally a fixed random subset.

    ``augment`` picks the transform: the training augmentation or the plain evaluation transform
    (default: augment the training split only; ``train=True, augment=False`` gives the training images
    as the model sees them at test time). ``subset=N`` keeps the same N images on every call (chosen
    with ``seed``), so short runs are reproducible. Returns the dataset and its :class:`DatasetInfo`
    (num_classes filled in).
    """
    info = dataset_info(spec)
    transform = build_transform(train if augment is None else augment, img_size, in_chans, info)
    if spec == "fashion-mnist":
        ds = FashionMNIST(data_dir, train=train, transform=transform, download=download)
    elif spec in ("cifar10", "cifar100"):
        from torchvision import datasets
        cls = datasets.CIFAR10 if spec == "cifar10" else datasets.CIFAR100
        root = data_dir or "data"
        try:
            ds = cls(root, train=train, transform=transform, download=download)
        except RuntimeError as err:
            raise FileNotFoundError(f"{spec} not found under {root}: pass --data-dir pointing at the folder that "
                                    f"holds cifar-*-batches-py, or add --download") from err
    else:
        from torchvision.datasets import ImageFolder
        root = Path(spec.split(":", 1)[1])
        ds = ImageFolder(str(_imagefolder_split(root, train)), transform=transform)
        info = DatasetInfo(len(ds.classes), 0, 3, info.mean, info.std)
    if subset is not None:
        if not 0 < subset <= len(ds):
            raise ValueError(f"subset size {subset} must be between 1 and the dataset size {len(ds)}")
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:subset]
        ds = Subset(ds, order.sort().values.tolist())
    return ds, info
