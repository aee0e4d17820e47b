"""Every Python block of README.md and docs/ runs (each in a fresh namespace after ``import timm, torch,
tokenthrift as tt``), so an example cannot rot. The names a block takes as given (``model``, ``images``,
``x``, ``y``, ``eval_loader``, ``state_dict``, ...) are filled in at the shapes the block's model needs; the one
speed measurements run small (batch 2, or compare's timing at batches 1 and 8, one round: their numbers are not
checked here, BENCHMARKS.md holds them); blocks that
open run folders (``runs/demo/...``) get tiny runs of those names in a temporary folder, and the evaluation set
of the compare example is cut to 500 images (:data:`SHRINK`)."""
import re
from pathlib import Path

import pytest
import timm
import torch

import tokenthrift as tt
from tokenthrift.apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SHRINK = {"eval_subset=5000": "eval_subset=500"}  # the one block sized for a benchmark: its evaluation set, smaller
TIMM_MIN = re.search(r'"timm>=([0-9.]+)', (ROOT / "pyproject.toml").read_text()).group(1)


SLOW = {"docs/recipes/compare.md:0"}  # every method on the harness (trains and times): make test-slow (CI)


def blocks():
    for path in DOCS:
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            name = f"{path.relative_to(ROOT)}:{i}"
            yield pytest.param(code, id=name, marks=[pytest.mark.slow] if name in SLOW else [])


def given_names(code: str) -> dict:
    """What the block uses without defining it, built small."""
    torch.manual_seed(0)
    names = {"timm": timm, "torch": torch, "tt": tt}
    if re.search(r"\bmodel\b", code):
        names["model"] = timm.create_model("deit_small_patch16_224", num_classes=1000)
    names["x"] = torch.randn(2, 197, 384)  # DeiT-S tokens: CLS + 14x14 patches
    names["images"] = torch.randn(2, 3, 224, 224)
    names["y"] = torch.tensor([3, 7])
    names["eval_loader"] = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(4, 3, 224, 224), torch.tensor([0, 1, 2, 3])), batch_size=2)
    names["features"], names["labels"] = torch.randn(40, 384), torch.arange(40) % 10
    names["feats"], names["ce"] = torch.randn(2, 384), torch.tensor(0.0)
    if "state_dict" in code:  # an official TimeSformer checkpoint's keys ("model." + ours)
        ours = timm.create_model("timesformer_base_patch16_224", num_classes=400).state_dict()
        names["state_dict"] = {f"model.{k}": v for k, v in ours.items()}
    return names


@pytest.fixture
def demo_runs(tmp_path, monkeypatch):
    """runs/demo/{revit,tla,ltm} of the shipped ViT, one short epoch each, in a temporary working folder."""
    monkeypatch.chdir(tmp_path)
    tiny = ["--model", "vit_fmnist_tiny_patch2_28", "--pretrained", "--epochs", "1", "--train-subset", "128",
            "--eval-subset", "64", "--batch-size", "64", "--output", "runs/demo", "--threads", "2", "--no-progress"]
    main(["train", *tiny, "--method", "revit", "--name", "revit"])
    for split in ("train", "eval"):
        main(["assign-labels", "--checkpoint", "runs/demo/revit/last.pth", "--split", split,
              "--out", f"runs/demo/labels_{split}.pt"])
    main(["train", *tiny[:2], *tiny[3:], "--method", "tla", "--name", "tla", "--tla-model", "test_byobnet",
          "--tla-labels", "runs/demo/labels_train.pt", "--tla-eval-labels", "runs/demo/labels_eval.pt"])
    main(["train", *tiny, "--method", "ltm", "--name", "ltm", "--config", "fmnist_vit_tiny_ltm"])


def missing_from_timm(code: str) -> list[str]:
    """The timm models and modules a block names that the installed timm lacks."""
    models = [m for m in re.findall(r'create_model\(\s*"([^"]+)"', code) if not timm.is_model(m)]
    modules = []
    for module in re.findall(r"^from (timm\.[\w.]+) import", code, re.M):
        try:
            __import__(module)
        except ModuleNotFoundError:
            modules.append(module)
    return models + modules


def small_timing(monkeypatch):
    real = tt.measure.throughput

    def at_batch_2(model, input_size, batch_size=2, **kw):
        return real(model, input_size, batch_size=2, **{**kw, "repeats": 1, "warmup": 1})

    monkeypatch.setattr(tt.measure, "throughput", at_batch_2)
    from tokenthrift.apps import compare
    timing = {**compare.compare.__kwdefaults__, "batch_sizes": (1, 8), "repeats": 1}
    monkeypatch.setattr(compare.compare, "__kwdefaults__", timing)  # compare's timing rounds, small


@pytest.mark.parametrize("code", blocks())
def test_doc_block_runs(code, monkeypatch, request):
    missing = missing_from_timm(code)
    if missing and timm.__version__ == TIMM_MIN:  # make test-compat: the oldest timm declared lacks newer encoders
        pytest.skip(f"timm {timm.__version__} has no {', '.join(missing)}")
    if "runs/demo" in code:
        request.getfixturevalue("demo_runs")
    elif "save_pretrained" in code:  # a block that writes a folder: in a temporary working folder
        monkeypatch.chdir(request.getfixturevalue("tmp_path"))
    small_timing(monkeypatch)
    for large, small in SHRINK.items():
        code = code.replace(large, small)
    exec(compile(code, "<doc block>", "exec"), given_names(code))
