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


def test_small_imagefolder_images_get_the_small_image_transforms(tmp_path):
    """A folder of 28 px images is augmented like Fashion-MNIST (pad-and-crop, shift of at most 2 px, flip),
    not with RandomResizedCrop, which would zoom into 8-100 % of a 28 px image."""
    import numpy as np
    from torchvision.transforms import v2 as T

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            folder = tmp_path / split / f"class{c}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(folder / "0.png")
    ds, info = build_dataset(f"imagefolder:{tmp_path}", train=True, img_size=28, in_chans=3)
    assert info.native_size == 28
    kinds = [type(t) for t in ds.transform.transforms]
    assert T.RandomResizedCrop not in kinds and T.RandomCrop in kinds
    plain, _ = build_dataset(f"imagefolder:{tmp_path}", train=True, img_size=28, in_chans=3, augment=False)
    reference = plain[0][0]
    torch.manual_seed(0)
    for _ in range(5):  # every augmented view is a shift of at most 2 px of the image, maybe mirrored
        view = ds[0][0]
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
        inner = view[:, 2:-2, 2:-2]
        assert any(torch.allclose(inner, candidate[:, 2 + dy:26 + dy, 2 + dx:26 + dx], atol=1e-5)
                   for dy, dx in shifts for candidate in (reference, reference.flip(-1)))
    big_folder = tmp_path / "big"
    (big_folder / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (300, 200)).save(big_folder / "train" / "a" / "0.png")
    big, big_info = build_dataset(f"imagefolder:{big_folder}", train=True, img_size=64, in_chans=3)
    assert big_info.native_size == 300 and T.RandomResizedCrop in [type(t) for t in big.transform.transforms]


def test_holdout_slice_and_mild_augmentation():
    fit, _ = build_dataset("fashion-mnist", True, 28, 1, subset=300, seed=1, holdout=100, augment=False)
    held, _ = build_dataset("fashion-mnist", True, 28, 1, subset=300, seed=1, holdout=100, part="holdout",
                            augment=False)
    both, _ = build_dataset("fashion-mnist", True, 28, 1, subset=300, seed=1, augment=False)
    assert len(fit) == 200 and len(held) == 100
    ids = lambda ds: {ds.dataset.indices[i] for i in ds.indices}  # noqa: E731  (index into the full split)
    assert ids(fit).isdisjoint(ids(held)) and ids(fit) | ids(held) == set(both.indices)
    flip, _ = build_dataset("fashion-mnist", True, 28, 1, subset=300, seed=1, augment="flip")
    torch.manual_seed(0)
    views = [flip[0][0] for _ in range(8)]
    assert all(torch.equal(v, both[0][0]) or torch.equal(v, both[0][0].flip(-1)) for v in views)
    with pytest.raises(ValueError, match="must leave some"):
        build_dataset("fashion-mnist", True, 28, 1, subset=100, holdout=100)
    with pytest.raises(ValueError, match="augment='crop'"):
        build_dataset("fashion-mnist", True, 28, 1, augment="crop")
