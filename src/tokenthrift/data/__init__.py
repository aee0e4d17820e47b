"""Datasets and transforms. ``build_dataset(spec, train, ...)`` takes images (``fashion-mnist`` from its local
idx files, ``cifar10``, ``cifar100``, ``imagefolder:PATH``: items (C, H, W)) and video
(``moving-fashion-mnist``, generated offline from Fashion-MNIST; ``videofolder:PATH``, decoded with
TorchCodec: items (C, T, H, W)), as float tensors of the model's size and channel count, normalised with the
dataset's statistics or, for a pretrained model, its cfg's (``dataset_for_model``). Folder trees: PATH/train/<class>/<file> and PATH/val (or validation, test).
"""
from .build import (
    PARTS,
    ClassMapped,
    build_dataset,
    fixed_subset,
    image_folder,
    match_classes,
    name_list,
    split_folder,
)
from .for_model import dataset_for_model, model_classes, model_input_shape, model_preprocess, set_model_classes
from .images import AUGMENTATIONS, INTERPOLATIONS, FashionMNIST, build_transform
from .info import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    INFO,
    DatasetInfo,
    Preprocess,
    dataset_info,
    is_video,
)
from .video import MovingFashionMNIST, VideoFolder, uniform_indices

__all__ = ["AUGMENTATIONS", "DATASETS", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "INFO", "INTERPOLATIONS", "PARTS",
           "ClassMapped", "DatasetInfo", "FashionMNIST", "MovingFashionMNIST", "Preprocess", "VideoFolder",
           "build_dataset", "build_transform", "dataset_for_model", "dataset_info", "fixed_subset", "image_folder",
           "is_video", "match_classes", "model_classes", "name_list", "model_input_shape", "model_preprocess", "set_model_classes",
           "split_folder", "uniform_indices"]
