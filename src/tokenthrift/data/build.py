"""``build_dataset``: one entry point for every dataset spec, with fixed subsets and held-out slices."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2 as T

from ..errors import InvalidArgumentError, MissingFileError, TokenthriftWarning
from .images import FashionMNIST, build_transform, channel_steps
from .info import DatasetInfo, Preprocess, dataset_info, dataset_key, is_video
from .video import MovingFashionMNIST, VideoFolder

__all__ = ["PARTS", "ClassMapped", "image_folder", "build_dataset", "fixed_subset", "match_classes", "name_list",
           "split_folder"]

PARTS = ("all", "fit", "holdout", "rest")


def split_folder(root: Path, train: bool) -> Path:
    """The split folder of an ImageFolder or VideoFolder tree: ``root/train``, or ``root/val`` (``validation``,
    ``test``) for evaluation."""
    names = ("train",) if train else ("val", "validation", "test")
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise MissingFileError(f"folder tree {root} has no {' or '.join(names)}/ folder; expected "
                           f"{root}/train/<class>/<file> and {root}/val/<class>/<file>")


def _image_side(path: str) -> int:
    """The longer side of one image file, read from its header."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return max(image.size)
    except Exception as err:  # PIL raises several kinds for a damaged file
        raise InvalidArgumentError(f"cannot read image {path} ({err}); delete or re-save the file, or pass "
                                   "--skip-bad-images to leave unreadable files out") from err


CHANNEL_CHECKS = 1000  # image headers read to tell grey from colour files (a folder's spread, or all of a smaller one)


def _stored_channels(paths: Sequence[str]) -> tuple[int, ...]:
    """The channel counts of image files as stored, 1 (grey: PIL modes based on L, e.g. L, LA, I;16) or 3 (colour,
    palettes included), read from the headers of at most :data:`CHANNEL_CHECKS` of ``paths`` spread evenly over
    them (the loader reads every file as RGB; this is what the run's first line reports); unreadable files are
    left to the loader's error."""
    from PIL import Image, ImageMode

    step = max(1, len(paths) / CHANNEL_CHECKS)
    found = set()
    for k in range(min(len(paths), CHANNEL_CHECKS)):
        try:
            with Image.open(paths[int(k * step)]) as image:
                found.add(1 if ImageMode.getmode(image.mode).basemode == "L" else 3)
        except Exception:  # PIL raises many kinds for damaged files; the loader names them
            continue
    return tuple(sorted(found))


def _open_rgb(path: str):
    """torchvision's default image loader, with an error that names the file and the ways out."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InvalidArgumentError(f"cannot read image {path} ({type(err).__name__}: {err}); delete or re-save the "
                                   "file, or pass --skip-bad-images to leave unreadable files out") from err


def _readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many kinds for damaged files; any of them means unreadable
        return False


def image_folder(root: Path, skip_bad_images: bool = False):
    """torchvision's ImageFolder whose unreadable files raise one clear error naming the file, or, with
    ``skip_bad_images``, are checked up front and left out (a warning counts them and names the first)."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root), loader=_open_rgb)
    if skip_bad_images:
        bad = [path for path, _ in ds.samples if not _readable(path)]
        if bad:
            unreadable = set(bad)
            ds.samples = [s for s in ds.samples if s[0] not in unreadable]
            ds.imgs, ds.targets = ds.samples, [t for _, t in ds.samples]
            warnings.warn(f"--skip-bad-images: left out {len(bad)} unreadable file(s) of {len(bad) + len(ds.samples)} "
                          f"in {root} (first: {bad[0]})", TokenthriftWarning, stacklevel=2)
        if not ds.samples:
            raise InvalidArgumentError(f"no readable image is left in {root}")
    return ds


def _holdout_split(n: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the images kept for training and of the ``holdout`` held-out ones (a fixed random slice,
    chosen with ``seed``), each in dataset order."""
    if not 0 <= holdout < n:
        raise InvalidArgumentError(f"train_holdout={holdout} must leave some of the {n} training images for training")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))  # not the subset's draw
    return order[holdout:].sort().values.tolist(), order[:holdout].sort().values.tolist()


def fixed_subset(ds: Dataset, n: int | None, seed: int, rest: bool = False) -> Dataset:
    """The same ``n`` items of ``ds`` on every call (chosen with ``seed``, in dataset order); all for None.
    ``rest=True``: the items that subset leaves out (what a run on the subset never saw)."""
    if n is None:
        if rest:
            raise InvalidArgumentError("the rest of a subset needs a subset size: this run used the whole split")
        return ds
    if not 0 < n <= len(ds):
        raise InvalidArgumentError(f"subset size {n} must be between 1 and the dataset size {len(ds)}")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    order = order[n:] if rest else order[:n]
    if rest and not len(order):
        raise InvalidArgumentError(f"a subset of {n} is the whole split of {len(ds)}: it leaves no images out")
    return Subset(ds, order.sort().values.tolist())


class ClassMapped(Dataset):
    """``ds`` with every label ``y`` replaced by ``mapping[y]`` (an evaluation folder's labels re-indexed to the
    model's classes by name, :func:`match_classes`)."""

    def __init__(self, ds: Dataset, mapping: Sequence[int]):
        self.ds, self.mapping = ds, list(mapping)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item, label = self.ds[i]
        return item, self.mapping[label]


def match_classes(found: Sequence[str], wanted: Sequence[str], where: str) -> list[int] | None:
    """How the labels of data with classes ``found`` (in label order) map onto ``wanted``, the classes a model
    predicts, by name: None when they are the same list (nothing to do), else the index in ``wanted`` of each
    class of ``found``. Data with a class the model has no output for raises an error naming it; data that
    lacks some of the model's classes maps (a warning names what is missing: top-1 counts the classes present).
    ``where`` names the data in messages."""
    found, wanted = list(found), list(wanted)
    if found == wanted:
        return None
    index = {name: i for i, name in enumerate(wanted)}
    extra = [c for c in found if c not in index]
    missing = [c for c in wanted if c not in set(found)]
    if extra:
        raise InvalidArgumentError(
            f"{where} has classes that the model does not: {name_list(extra)}"
            + (f" (and lacks {name_list(missing)})" if missing else "")
            + f". The model predicts {len(wanted)} classes ({name_list(wanted)}); give the data the same class folders "
              "(rename or remove the extra ones), or train on data that holds every class")
    if missing:
        warnings.warn(f"{where} has no images of {len(missing)} of the {len(wanted)} classes "
                      f"({name_list(missing)}); its labels are matched to the model's classes by name and top-1 "
                      f"counts the other {len(found)}", TokenthriftWarning, stacklevel=3)
    return [index[c] for c in found]


def name_list(classes: Sequence[str], limit: int = 8) -> str:
    """Class names for a message: the first ``limit``, and how many there are in all."""
    shown = ", ".join(map(str, classes[:limit]))
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > limit else "")


def build_dataset(spec: str, train: bool, img_size: int, in_chans: int, data_dir: str | None = None,
                  download: bool = False, subset: int | None = None, seed: int = 0,
                  augment: bool | str | None = None, holdout: int = 0, part: str = "fit",
                  frames: int | None = None, test_crops: int = 1, preprocess: Preprocess | None = None,
                  skip_bad_images: bool = False, classes: Sequence[str] | None = None) -> tuple[Dataset, DatasetInfo]:
    """The training (``train``) or evaluation split of ``spec``, optionally a fixed random subset.

    Images: ``fashion-mnist``, ``cifar10``, ``cifar100``, ``imagefolder:PATH``; items (C, H, W). Video:
    ``moving-fashion-mnist`` and ``videofolder:PATH``; items (C, T, H, W) with T = ``frames``.
    ``augment`` picks the transform (see :func:`build_transform`): default the training augmentation on
    the training split and none on the evaluation split; ``train=True, augment=False`` gives the
    training images as the model sees them at test time. Moving Fashion-MNIST is never augmented (a flip
    would turn left-to-right into right-to-left); its canvas is ``img_size``. ``subset=N`` keeps the same
    N items on every call (chosen with ``seed``), so short runs are reproducible. ``holdout=H`` (training
    split only) sets H of those aside, again a fixed slice chosen with ``seed``: ``part="fit"`` returns
    the others (what a run trains on), ``"holdout"`` the H set aside, ``"all"`` both; ``"rest"`` (no held-out
    slice) the items of the split outside ``subset``. Returns the dataset
    and its :class:`DatasetInfo` (num_classes filled in; for a folder, ``native_size`` is the size of its
    first image, which decides between the small- and the large-image transforms; for videos 0).
    ``test_crops=3`` (``videofolder`` evaluation split only): three spatial views per clip, (3, C, T, H, W),
    whose predictions :func:`tokenthrift.train.evaluate` averages (TimeSformer's 3-crop test).
    ``preprocess`` (:class:`Preprocess`): normalisation (default the dataset's statistics; a pretrained
    model's come from :func:`tokenthrift.data.model_preprocess`), interpolation, crop and flip; the returned
    info holds the mean / std used. ``skip_bad_images`` (image folders): leave unreadable files out
    instead of stopping at the first with an error that names it. ``classes``: the class names a model predicts,
    in its output order (e.g. a checkpoint's): the data's labels are matched to them by name
    (:func:`match_classes`: a class the model lacks is an error), and the returned info holds the data's own
    ``classes`` as read (a folder's subfolder names, sorted).
    """
    info = dataset_info(spec)
    key = dataset_key(spec)
    if part not in PARTS:
        raise InvalidArgumentError(f"part={part!r}: choose one of {', '.join(PARTS)}")
    if holdout and not train:
        raise InvalidArgumentError("a held-out slice is taken from the training split; the evaluation split has none")
    if spec in ("imagefolder", "videofolder"):
        raise InvalidArgumentError(f"{spec} needs its folder: --data {spec}:PATH")
    if is_video(spec) and not frames:
        raise InvalidArgumentError(f"{spec} is video data: it needs the model's frame count (a video model, e.g. "
                                   "timesformer_*, with --num-frames)")
    if not is_video(spec) and frames:
        raise InvalidArgumentError(f"{spec} holds images; a video model (frames={frames}) needs moving-fashion-mnist "
                                   "or videofolder:PATH")
    if test_crops not in (1, 3):
        raise InvalidArgumentError(f"test_crops={test_crops}: 1 (a centre crop) or 3 (crops along the longer side)")
    if test_crops > 1 and (key != "videofolder" or train):
        split = "training" if train else "evaluation"
        raise InvalidArgumentError(f"--test-crops {test_crops} applies to evaluating videofolder:PATH clips (large "
                                   f"frames of any aspect); {spec} {split} data has one view per item")
    augment = train if augment is None else augment
    pre = preprocess or Preprocess()
    if pre.mean is not None or pre.std is not None:
        info = replace(info, mean=tuple(pre.mean or info.mean), std=tuple(pre.std or info.std))
    options = dict(hflip=pre.hflip, crop_pad=pre.crop_pad, interpolation=pre.interpolation, crop_pct=pre.crop_pct)
    if skip_bad_images and key != "imagefolder":
        raise InvalidArgumentError(f"--skip-bad-images checks the files of imagefolder:PATH; {spec} has none to skip")
    if key == "imagefolder":
        ds = image_folder(split_folder(Path(spec.split(":", 1)[1]), train), skip_bad_images)
        info = replace(info, num_classes=len(ds.classes), native_size=_image_side(ds.samples[0][0]),
                       classes=tuple(ds.classes), stored_channels=_stored_channels([p for p, _ in ds.samples]))
        ds.transform = build_transform(augment, img_size, in_chans, info, **options)
    elif key == "videofolder":
        ds = VideoFolder(split_folder(Path(spec.split(":", 1)[1]), train), frames)
        info = replace(info, num_classes=len(ds.classes), native_size=0, classes=tuple(ds.classes))
        ds.transform = build_transform(augment, img_size, in_chans, info, video=True, test_crops=test_crops,
                                       **options)
    elif key == "moving-fashion-mnist":
        transform = T.Compose(channel_steps(in_chans, info))
        ds = MovingFashionMNIST(data_dir, train=train, frames=frames, size=img_size, seed=seed, transform=transform,
                                download=download)
    elif key == "fashion-mnist":
        ds = FashionMNIST(data_dir, train=train, transform=build_transform(augment, img_size, in_chans, info,
                                                                           **options), download=download)
    else:
        from torchvision import datasets
        cls = datasets.CIFAR10 if spec == "cifar10" else datasets.CIFAR100
        root = data_dir or "data"
        try:
            ds = cls(root, train=train, transform=build_transform(augment, img_size, in_chans, info, **options),
                     download=download)
        except RuntimeError as err:
            raise MissingFileError(f"{spec} not found under {root}: pass --data-dir pointing at the folder that holds "
                                   "cifar-*-batches-py, or add --download") from err
        info = replace(info, classes=tuple(ds.classes))
    if classes is not None and info.classes:
        split = ("training" if train else "evaluation") + " split"
        mapping = match_classes(info.classes, classes, f"{spec} ({split})")
        if mapping is not None:
            ds = ClassMapped(ds, mapping)
    elif classes is not None and len(classes) != info.num_classes:
        raise InvalidArgumentError(f"{spec} has {info.num_classes} classes but the model predicts {len(classes)}; "
                                   "evaluate it on the data it was trained on")
    if part == "rest":  # the training images a run on ``subset`` never saw
        if holdout:
            raise InvalidArgumentError("part='rest' is the complement of the subset; with a held-out slice use "
                                       "part='holdout'")
        return fixed_subset(ds, subset, seed, rest=True), info
    ds = fixed_subset(ds, subset, seed)
    if holdout and part != "all":
        fit, held = _holdout_split(len(ds), holdout, seed)
        ds = Subset(ds, fit if part == "fit" else held)
    return ds, info
