"""The pretrained ViT shipped in the package: loads the timm way, offline, and is as accurate as its summary says."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from tokenthrift.data import build_dataset
from tokenthrift.pretrained import FMNIST_VIT, weights_path
from tokenthrift.train import evaluate


@pytest.mark.slow  # make test-slow (CI): minutes on two cores
def test_shipped_weights_load_through_timm_and_reach_their_top1():
    summary = json.loads(weights_path().with_suffix(".json").read_text())
    model = timm.create_model(FMNIST_VIT, pretrained=True).eval()
    stored = load_file(str(weights_path()))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())
    assert model.pretrained_cfg["input_size"] == (1, 28, 28) and model.num_classes == 10
    test, _ = build_dataset("fashion-mnist", False, 28, 1)
    top1 = evaluate(model, DataLoader(test, 500), torch.device("cpu"))
    assert top1 == pytest.approx(summary["top1"], abs=0.01)  # the full 10k test split, as the summary says
    assert summary["epochs"] <= summary["epochs_planned"] == 30
    if summary["finished"]:  # interim weights of an unfinished run say so in their summary (and in docs/pretrained.md)
        assert top1 >= 87.0
    assert weights_path().with_suffix(".jsonl").exists()  # the training log ships beside the weights


def test_timm_adapts_the_pretrained_weights():
    plain = timm.create_model(FMNIST_VIT, pretrained=True)
    other = timm.create_model(FMNIST_VIT, pretrained=True, num_classes=3, in_chans=3, img_size=56)
    assert other.head.weight.shape == (3, 48)  # a fresh head for another class count
    assert other.patch_embed.proj.weight.shape == (48, 3, 2, 2)  # grey filters adapted to colour
    assert other.pos_embed.shape == (1, 1 + 28 * 28, 48)  # position table resampled to the 28x28 grid
    assert torch.equal(other.blocks[3].mlp.fc1.weight, plain.blocks[3].mlp.fc1.weight)
    assert other(torch.randn(2, 3, 56, 56)).shape == (2, 3)


@pytest.mark.slow  # make test-slow (CI): minutes on two cores
def test_the_shipped_ltm_model_loads_through_timm_and_reaches_its_top1():
    """The converged LTM model (trained from scratch with the base model's schedule) ships like the base one: timm
    loads its own weights, at 0.851 of the base model's MACs, with the top-1 its summary states."""
    from tokenthrift import ltm, measure
    from tokenthrift.ltm.registry import FMNIST_LTM
    summary = json.loads(weights_path(FMNIST_LTM).with_suffix(".json").read_text())
    model = timm.create_model(FMNIST_LTM, pretrained=True).eval()
    stored = load_file(str(weights_path(FMNIST_LTM)))
    assert ltm.is_ltm(model) and all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())
    base = timm.create_model(FMNIST_VIT).eval()
    assert measure.macs(model, (1, 28, 28)) / measure.macs(base, (1, 28, 28)) == pytest.approx(0.851, abs=0.001)
    test, _ = build_dataset("fashion-mnist", False, 28, 1)
    top1 = evaluate(model, DataLoader(test, 500), torch.device("cpu"))
    assert top1 == pytest.approx(summary["top1"], abs=0.01)  # all 10 000 test images
    assert summary["finished"] and summary["epochs"] == summary["epochs_planned"] == 30 and top1 >= 87.0
    assert weights_path(FMNIST_LTM).with_suffix(".jsonl").exists()
