"""Datasets and transforms. ``build_dataset(spec, train, ...)`` takes images (``fashion-mnist`` from its local
idx files, ``cifar10``, ``cifar100``, ``imagefolder:PATH``: items (C, H, W)) and video
(``moving-fashion-mnist``, generated offline from Fashion-MNIST; ``videofolder:PATH``, decoded with
TorchCodec: items (C, T, H, W)), as float tensors of the model's size and channel count, normalised with the
dataset's statistics. Folder trees: PATH/train/<class>/<file> and PATH/val (or validation, test).
"""
from .build import PARTS, build_dataset, fixed_subset, split_folder
from .images import AUGMENTATIONS, FashionMNIST, build_transform
from .info import DATASETS, FASHION_MNIST_DIR, INFO, DatasetInfo, dataset_info, is_video
from .video import MovingFashionMNIST, VideoFolder, uniform_indices

__all__ = ["AUGMENTATIONS", "DATASETS", "FASHION_MNIST_DIR", "INFO", "PARTS", "DatasetInfo", "FashionMNIST",
           "MovingFashionMNIST", "VideoFolder", "build_dataset", "build_transform", "dataset_info", "fixed_subset",
           "is_video", "split_folder", "uniform_indices"]
