"""What the datasets are: class count, stored image size, channels and normalisation statistics."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgumentError
from ..pretrained import FMNIST_CLASSES as FASHION_MNIST_CLASSES  # the shipped model's cfg names them too

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH", "moving-fashion-mnist", "videofolder:PATH")
VIDEO = ("moving-fashion-mnist", "videofolder")


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    native_size: int  # side of the stored images (folders: unknown, 0)
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()  # class names in label order (folders: filled in when the folder is read)
    # channels of the stored images where they differ from the items': an image folder's files, read as RGB (1 for
    # grey files, 3 for colour ones; filled in when the folder is read); empty: the items' ``channels``
    stored_channels: tuple[int, ...] = ()


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MOVING_FASHION_MNIST_CLASSES = ("left to right", "right to left", "approach", "recede", "rotate clockwise",
                                "rotate anticlockwise")

INFO = {
    "fashion-mnist": DatasetInfo(10, 28, 1, (0.2860,), (0.3530,), FASHION_MNIST_CLASSES),
    "cifar10": DatasetInfo(10, 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10_CLASSES),
    "cifar100": DatasetInfo(100, 32, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),  # names: torchvision's
    "imagefolder": DatasetInfo(0, 0, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # measured on 2000 training clips of 8 frames at 28 px (tokenthrift.data.video.MovingFashionMNIST)
    "moving-fashion-mnist": DatasetInfo(6, 28, 1, (0.0953,), (0.2288,), MOVING_FASHION_MNIST_CLASSES),
    "videofolder": DatasetInfo(0, 0, 3, (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)),  # Kinetics, as TimeSformer
}


@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs beyond the dataset itself (timm's data config plus the small-image
    augmentation): normalisation ``mean`` / ``std`` (None: the dataset's statistics), resize
    ``interpolation``, the evaluation ``crop_pct`` of large images, the training flip probability ``hflip``
    and the padding ``crop_pad`` of the small-image random crop (None: model side / 14). ``source`` says
    where the normalisation came from, for the line a run prints."""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    hflip: float = 0.5
    crop_pad: int | None = None
    source: str = "the dataset's statistics"

    def describe(self, info: "DatasetInfo", in_chans: int | None = None) -> str:
        """The line a run prints: the normalisation and where it came from, and, when the model takes another
        channel count than the data's images hold (``in_chans``), the conversion (grey to colour, colour to grey)."""
        mean, std = self.mean or info.mean, self.std or info.std
        rounded = lambda values: "(" + ", ".join(f"{v:.4g}" for v in values) + ")"  # noqa: E731
        line = f"normalisation mean {rounded(mean)} std {rounded(std)}: {self.source}"
        if in_chans is not None:
            line += "".join(f"; {channel_conversion(c, in_chans)}"
                            for c in sorted(set(info.stored_channels or (info.channels,))) if c != in_chans)
        return line


def channel_conversion(channels: int, in_chans: int) -> str:
    """What feeding ``channels``-channel images to an ``in_chans``-channel model does to them."""
    if in_chans == 1:
        return ("colour images are turned grey for this 1-channel model (luma 0.299 R + 0.587 G + 0.114 B: their "
                "colour is lost; grey images pass unchanged)")
    if channels == 1:
        return f"grey images are repeated over the model's {in_chans} channels"
    return f"{channels}-channel images for a {in_chans}-channel model"


def dataset_key(spec: str) -> str:
    """``imagefolder:PATH`` -> ``imagefolder`` (the same for ``videofolder:``); other specs as they are."""
    return spec.split(":", 1)[0] if spec.startswith(("imagefolder:", "videofolder:")) else spec


def is_video(spec: str) -> bool:
    return dataset_key(spec) in VIDEO


def dataset_info(spec: str) -> DatasetInfo:
    key = dataset_key(spec)
    if key not in INFO:
        raise InvalidArgumentError(f"unknown dataset {spec!r}; choose one of {', '.join(DATASETS)}")
    return INFO[key]
