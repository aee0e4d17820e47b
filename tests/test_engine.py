"""Training engine: resume equals uninterrupted training, logs, recipes and flags, clear errors."""
import json

import pytest
import torch

from tokenthrift.apps.cli import build_parser
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
              **({"toe_milestones": (0, 1, 2)} if method == "toe" else {}))
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
    assert lines[0]["train_macs"] < lines[1]["train_macs"] < summary["inference_macs"]  # keep 0.5, then 0.75
    assert summary["macs_ratio"] == pytest.approx((lines[0]["train_macs"] + lines[1]["train_macs"])
                                                  / 2 / summary["inference_macs"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["top1"] == summary["top1"]
    assert (tmp_path / "run" / "config.yaml").exists()
    assert 0 <= summary["top1"] <= 100
    with pytest.warns(UserWarning, match="already holds a run, which is kept; this run writes .*run-1"):
        again = train(tiny(tmp_path, name="run", epochs=1))  # the same --name: a new folder, the old run kept
    assert again["run_dir"] == str(tmp_path / "run-1") and epochs_logged(tmp_path / "run-1") == [0]
    assert epochs_logged(tmp_path / "run") == [0, 1] and (tmp_path / "run" / "summary.json").exists()
    train(tiny(tmp_path, name="run", epochs=1, overwrite=True))  # asked to: replaces the records
    assert epochs_logged(tmp_path / "run") == [0]


def test_recipe_then_flags_override(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["train", "-c", "fmnist_vit_tiny_toe", "--epochs", "3", "--toe-keep-rates", "0.4",
                              "0.8", "1.0", "--no-progress"])
    cfg = config_mod.config_from_args(args)
    recipe = load_recipe("fmnist_vit_tiny_toe")
    assert cfg.epochs == 3 and cfg.options.keep_rates == (0.4, 0.8, 1.0) and cfg.progress is False
    assert cfg.embed_dim == recipe["embed_dim"] and cfg.method == "toe"
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown keys \\['learning_rate'\\]"):
        load_recipe(str(bad))
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped recipe"):
        load_recipe("no_such_recipe")


@pytest.mark.parametrize("kw,error,message", [
    (dict(model="not_a_model"), ValueError, "unknown timm model"),
    (dict(img_size=30, patch_size=4), ValueError, "image height 30 is not a multiple of the patch size 4"),
    (dict(method="tome_typo"), ValueError, "unknown method 'tome_typo'"),
    (dict(model="resnet10t", img_size=None, patch_size=None, embed_dim=None, depth=None, num_heads=None,
          method="toe"), TypeError, "supports timm VisionTransformer"),
    (dict(toe_keep_rates=(0.75, 0.5, 1.0), method="toe"), ValueError, "non-decreasing"),
    (dict(train_subset=32), ValueError, "fewer than one batch"),
    (dict(num_classes=5), ValueError, r"10 classes \(T-shirt/top, .*\) but the model has 5 outputs; drop --num-classes"),
])
def test_clear_errors(tmp_path, kw, error, message):
    with pytest.raises(error, match=message):
        Trainer(tiny(tmp_path, **kw))


def test_config_validation():
    with pytest.raises(ValueError, match="at least one epoch"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="choose auto, on, off, bf16, fp16"):
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
    # the end-of-run ratio is against a training forward at the largest grid: a ReViT step runs both grids
    from tokenthrift import measure
    per_grid = [measure.macs(model, (1, 28, 28), train=True, grid=g) for g in (7, 5)]
    assert summary["baseline"].startswith("a training forward at the largest grid only (7x7")
    assert summary["macs_ratio"] == pytest.approx(sum(per_grid) / per_grid[0], rel=1e-6)

    from tokenthrift.train import evaluate
    model.train()
    evaluate(model, DataLoader(ds, 100), torch.device("cpu"), grid=5)
    assert all(m.training for m in model.modules())  # flags restored


def test_learning_rate_scales_with_the_global_batch(tmp_path):
    cfg = TrainConfig(lr_base=8e-3, batch_size=128)
    assert cfg.learning_rate() == pytest.approx(2e-3) and cfg.learning_rate(world_size=4) == pytest.approx(8e-3)
    assert TrainConfig(lr=0.1, batch_size=7).learning_rate(world_size=3) == 0.1  # an explicit lr is taken as is
    trainer = Trainer(tiny(tmp_path, lr=None, lr_base=4e-3, batch_size=64, warmup_epochs=0))
    assert trainer.lr == pytest.approx(4e-3 * 64 / 512)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.lr)
    for name in load_recipe.__globals__["recipe_names"]():  # every recipe states its rate per 512 images
        recipe = load_recipe(name)
        assert "lr" not in recipe and recipe["lr_base"] > 0, name
    with pytest.raises(ValueError, match="learning rate must be positive"):
        TrainConfig(lr_base=0)


def test_toe_milestones_default_to_the_run_length_and_resume_checks_the_schedule(tmp_path):
    from tokenthrift.toe import get_handle

    trainer = Trainer(tiny(tmp_path, name="a", epochs=6, method="toe"))
    assert get_handle(trainer.model).schedule.milestones == (0, 2, 4)  # 0, E/3, 2E/3
    assert Trainer(tiny(tmp_path, name="b", epochs=3, method="toe", toe_keep_rates=(0.5, 1.0))) \
        .method.handle.schedule.milestones == (0, 1.5)
    trainer.fit(stop_after=1)
    ckpt = str(tmp_path / "a" / "last.pth")
    with pytest.raises(ValueError, match=r"other ToE settings: --toe-milestones 0 2 4 \(this run: 0 3 6\)"):
        Trainer(tiny(tmp_path, name="c", epochs=9, method="toe", resume=ckpt))
    with pytest.raises(ValueError, match=r"--toe-r0 0.25 \(this run: 0.2\)"):
        Trainer(tiny(tmp_path, name="c", epochs=6, method="toe", toe_r0=0.2, resume=ckpt))
    Trainer(tiny(tmp_path, name="c", epochs=6, method="toe", resume=ckpt))  # the same schedule resumes


def test_toe_refuses_patch_dropout(tmp_path):
    with pytest.raises(ValueError, match="drops 25% of the patches.*patch_drop_rate=0"):
        Trainer(tiny(tmp_path, method="toe", model_kwargs={"patch_drop_rate": 0.25}))


def test_fit_in_steps_continues_and_equals_one_fit(tmp_path):
    """fit(stop_after=k) then fit(stop_after=k+1) continues where it stopped (the demo's race alternates the
    epochs of two runs this way) and ends where one fit() ends."""
    straight = train(tiny(tmp_path, name="straight", epochs=2))
    stepped = Trainer(tiny(tmp_path, name="stepped", epochs=2))
    stepped.fit(stop_after=1)
    summary = stepped.fit(stop_after=2)
    assert [r["epoch"] for r in summary["history"]] == [0, 1] and epochs_logged(tmp_path / "stepped") == [0, 1]
    assert [r["train_loss"] for r in summary["history"]] == [r["train_loss"] for r in straight["history"]]


def test_timing_beyond_the_macs_bound_is_flagged():
    from tokenthrift.apps.bench import compare_rows, timing_note

    assert timing_note(1.0) == "ok" and timing_note(3.196).startswith("disturbed (efficiency 3.20")
    base = dict(top1=50.0, train_time_s=100.0, mean_train_macs=1.0)
    rows = compare_rows({"full": base, "ToE": dict(top1=50.0, train_time_s=24.0, mean_train_macs=0.77)})
    assert rows[1]["timing"].startswith("disturbed")  # the demo's 4.14x at 0.77 of the MACs
