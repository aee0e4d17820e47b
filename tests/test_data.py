"""Datasets: Fashion-MNIST from the Debian files, clear errors, subsets, ImageFolder, channel handling."""
import numpy as np
import pytest
import torch
from PIL import Image

from tokenthrift.data import FashionMNIST, build_dataset


def test_fashion_mnist_from_local_files():
    train, test = FashionMNIST(train=True), FashionMNIST(train=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == torch.uint8
    assert sorted(set(test.targets)) == list(range(10)) and np.bincount(test.targets).tolist() == [1000] * 10
    image, label = train[0]
    assert image.shape == (1, 28, 28) and label == 9  # the first training image is an ankle boot


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        FashionMNIST(tmp_path)
    text = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in text and "--data-dir" in text and "--download" in text


def test_transforms_and_deterministic_subset():
    ds, info = build_dataset("fashion-mnist", train=False, img_size=32, in_chans=3, subset=50, seed=3)
    again, _ = build_dataset("fashion-mnist", train=False, img_size=32, in_chans=3, subset=50, seed=3)
    assert info.num_classes == 10 and len(ds) == 50 and ds.indices == again.indices
    x, _ = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1])  # grey image repeated into three channels
    full, _ = build_dataset("fashion-mnist", train=False, img_size=28, in_chans=1)
    mean = torch.stack([full[i][0] for i in range(0, 10000, 10)]).mean()
    assert abs(float(mean)) < 0.1  # normalised with the dataset's own statistics
    with pytest.raises(ValueError, match="between 1 and the dataset size"):
        build_dataset("fashion-mnist", train=False, img_size=28, in_chans=1, subset=20000)


def test_training_transform_augments():
    ds, _ = build_dataset("fashion-mnist", train=True, img_size=28, in_chans=1)
    torch.manual_seed(0)
    views = [ds[0][0] for _ in range(6)]
    assert any(not torch.equal(views[0], v) for v in views[1:])


def test_imagefolder_tree(tmp_path):
    for split in ("train", "val"):
        for c, colour in enumerate(["red", "blue", "green"]):
            folder = tmp_path / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), colour).save(folder / f"{i}.png")
    ds, info = build_dataset(f"imagefolder:{tmp_path}", train=False, img_size=16, in_chans=3)
    assert info.num_classes == 3 and len(ds) == 6
    assert ds[0][0].shape == (3, 16, 16)
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        build_dataset(f"imagefolder:{tmp_path / 'val'}", train=True, img_size=16, in_chans=3)


def test_unknown_and_missing_datasets(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*fashion-mnist"):
        build_dataset("mnist", True, 28, 1)
    with pytest.raises(FileNotFoundError, match="cifar10 not found.*--download"):
        build_dataset("cifar10", True, 32, 3, data_dir=str(tmp_path))
