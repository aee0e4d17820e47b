"""Training engine: resume equals uninterrupted training, logs, recipes and flags, clear errors."""
import json

import pytest
import torch

from tokenthrift.cli import build_parser
from tokenthrift.train import TrainConfig, Trainer, load_recipe, train
from tokenthrift.train import config as config_mod

TINY = dict(model="vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2,
            data="fashion-mnist", train_subset=256, eval_subset=200, batch_size=64, eval_batch_size=200,
            warmup_epochs=1, lr=1e-3, progress=False, threads=2)


def tiny(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "output": str(tmp_path), **kw})


@pytest.mark.parametrize("method", ["full", "toe"])
def test_resume_equals_uninterrupted_training(tmp_path, method):
    kw = dict(epochs=2, method=method, ema=True, ema_decay=0.9, mixup=0.2, drop_path=0.1,
              toe_milestones=(0, 1, 2))
    straight = train(tiny(tmp_path, name="straight", **kw))
    Trainer(tiny(tmp_path, name="stopped", **kw)).fit(stop_after=1)  # as if killed after epoch 1
    ckpt = tmp_path / "stopped" / "last.pth"
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1
    resumed = Trainer(tiny(tmp_path, name="resumed", resume=str(ckpt), **kw)).fit()
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pth", weights_only=False)
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert a["method"] == b["method"]
    assert resumed["top1"] == straight["top1"] and resumed["top1_ema"] == straight["top1_ema"]
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in straight["history"]]
    if method == "toe":
        assert [r["toe_keep_rate"] for r in resumed["history"]] == [0.5, 0.75]
    assert epochs_logged(tmp_path / "resumed") == [0, 1]  # the carried-over epoch is in the new folder's log


def epochs_logged(run_dir):
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_log_and_run_folder(tmp_path):
    summary = train(tiny(tmp_path, name="run", epochs=2, method="toe", toe_milestones=(0, 1, 2)))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    for key in ("train_loss", "top1", "train_time_s", "images_per_s", "train_macs", "elapsed_train_s", "lr"):
        assert key in lines[0]
    assert lines[0]["train_macs"] < lines[1]["train_macs"] < summary["full_macs"]  # keep 0.5, then 0.75
    assert summary["macs_ratio"] == pytest.approx((lines[0]["train_macs"] + lines[1]["train_macs"])
                                                  / 2 / summary["full_macs"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["top1"] == summary["top1"]
    assert (tmp_path / "run" / "config.yaml").exists()
    assert 0 <= summary["top1"] <= 100
    with pytest.warns(UserWarning, match="already holds a run; this one replaces it"):
        train(tiny(tmp_path, name="run", epochs=1))  # a new run in the same folder: a new log, not appended
    assert epochs_logged(tmp_path / "run") == [0]


def test_recipe_then_flags_override(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["train", "-c", "fmnist_vit_tiny_toe", "--epochs", "3", "--toe-keep-rates", "0.4",
                              "0.8", "1.0", "--no-progress"])
    cfg = config_mod.config_from_args(args)
    recipe = load_recipe("fmnist_vit_tiny_toe")
    assert cfg.epochs == 3 and cfg.toe_keep_rates == (0.4, 0.8, 1.0) and cfg.progress is False
    assert cfg.embed_dim == recipe["embed_dim"] and cfg.method == "toe"
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown keys \\['learning_rate'\\]"):
        load_recipe(str(bad))
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped recipe"):
        load_recipe("no_such_recipe")


@pytest.mark.parametrize("kw,error,message", [
    (dict(model="not_a_model"), ValueError, "unknown timm model"),
    (dict(img_size=30, patch_size=4), ValueError, "not divisible by patch size"),
    (dict(method="tome"), ValueError, "unknown method 'tome'"),
    (dict(model="resnet10t", img_size=None, patch_size=None, embed_dim=None, depth=None, num_heads=None,
          method="toe"), TypeError, "supports timm VisionTransformer"),
    (dict(toe_keep_rates=(0.75, 0.5, 1.0), method="toe"), ValueError, "non-decreasing"),
    (dict(train_subset=32), ValueError, "fewer than one batch"),
    (dict(num_classes=5), ValueError, "10 classes but the model has 5 outputs"),
])
def test_clear_errors(tmp_path, kw, error, message):
    with pytest.raises(error, match=message):
        Trainer(tiny(tmp_path, **kw))


def test_config_validation():
    with pytest.raises(ValueError, match="at least one epoch"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="choose auto, on or off"):
        TrainConfig(amp="maybe")


def test_logged_top1_of_every_grid_is_an_eval_mode_number(tmp_path):
    """ReViT logs one top-1 per grid; each must come from the model in eval mode (drop path off), i.e. equal
    a direct count on the saved weights, and the model's train flags must be as before."""
    from torch.utils.data import DataLoader

    from tokenthrift.data import build_dataset
    from tokenthrift.train import load_trained

    summary = train(tiny(tmp_path, name="revit", epochs=1, method="revit", revit_grids=(7, 5), drop_path=0.5,
                         warmup_epochs=0))
    model, cfg = load_trained(tmp_path / "revit" / "last.pth")
    ds, _ = build_dataset(cfg.data, False, 28, 1, subset=cfg.eval_subset, seed=cfg.seed)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.tensor([ds[i][1] for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        direct = {g: 100.0 * (model(images, grid=g).argmax(-1) == labels).float().mean().item() for g in (7, 5)}
    logged = summary["history"][-1]
    assert logged["top1_g7"] == pytest.approx(direct[7]) and logged["top1_g5"] == pytest.approx(direct[5])
    assert logged["top1"] == logged["top1_g7"]

    from tokenthrift.train import evaluate
    model.train()
    evaluate(model, DataLoader(ds, 100), torch.device("cpu"), grid=5)
    assert all(m.training for m in model.modules())  # flags restored
