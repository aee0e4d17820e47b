"""A user's own data: normalisation from a pretrained model's cfg, fine-tuning defaults, the augmentation
switches, unreadable files, and runs that are never lost (no overwrite, atomic checkpoints)."""
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision.transforms import v2 as T

import tokenthrift  # noqa: F401  (registers vit_fmnist_tiny_patch2_28)
from tokenthrift.apps.cli import build_parser
from tokenthrift.data import build_dataset, dataset_for_model
from tokenthrift.train import TrainConfig, Trainer, engine, load_trained
from tokenthrift.train.checkpoint import read_checkpoint

SHIPPED = "vit_fmnist_tiny_patch2_28"
SHIPPED_MEAN, SHIPPED_STD = 0.2860, 0.3530  # its pretrained cfg (the Fashion-MNIST statistics it was trained with)


def grey_folder(root, value=128, per_class=4, classes=3, side=28):
    """An ImageFolder of flat grey RGB images (every pixel ``value``), train/ and val/."""
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (side, side), (value, value, value)).save(folder / f"{i}.png")
    return root


def finetune_cfg(tmp_path, data, **kw):
    return TrainConfig(**{**dict(model=SHIPPED, pretrained=True, data=data, num_classes=3, epochs=1, batch_size=4,
                                 eval_batch_size=8, progress=False, threads=1, output=str(tmp_path / "runs")), **kw})


def test_pretrained_run_normalises_as_the_model_was_trained_and_records_it(tmp_path, capsys):
    """An ImageFolder defaults to ImageNet statistics, but a --pretrained run feeds the model as its cfg says:
    a flat grey 128 image becomes (128/255 - 0.286) / 0.353 in every pixel, and the config records it."""
    data = f"imagefolder:{grey_folder(tmp_path / 'grey')}"
    trainer = Trainer(finetune_cfg(tmp_path, data, name="ft"))
    assert "pretrained cfg" in capsys.readouterr().out  # the run says which normalisation and why
    image = trainer.eval_loader.dataset[0][0]  # (the training crop pads with zeros)
    assert image.shape == (1, 28, 28)
    assert torch.allclose(image, torch.full_like(image, (128 / 255 - SHIPPED_MEAN) / SHIPPED_STD), atol=1e-3)
    assert trainer.cfg.mean == pytest.approx((SHIPPED_MEAN,)) and trainer.cfg.std == pytest.approx((SHIPPED_STD,))
    trainer.fit()
    _, cfg = load_trained(tmp_path / "runs" / "ft" / "last.pth")  # eval, labels, compare read it from here
    assert cfg.mean == pytest.approx((SHIPPED_MEAN,))

    scratch = Trainer(finetune_cfg(tmp_path, data, name="scratch", pretrained=False))
    assert "statistics (trained from scratch" in capsys.readouterr().out
    grey = (128 / 255 - np.mean((0.485, 0.456, 0.406))) / np.mean((0.229, 0.224, 0.225))  # ImageNet, to grey
    assert scratch.eval_loader.dataset[0][0].mean().item() == pytest.approx(grey, abs=1e-3)
    given = Trainer(finetune_cfg(tmp_path, data, name="given", mean=(0.5,), std=(0.25,)))
    assert "given with --mean" in capsys.readouterr().out
    assert given.eval_loader.dataset[0][0].mean().item() == pytest.approx((128 / 255 - 0.5) / 0.25, abs=1e-3)


def test_dataset_for_model_is_the_python_path(tmp_path):
    model = timm.create_model(SHIPPED, pretrained=True, num_classes=3)
    ds, info = dataset_for_model(f"imagefolder:{grey_folder(tmp_path)}", model, train=False)
    assert info.mean == pytest.approx((SHIPPED_MEAN,)) and ds[0][0].shape == (1, 28, 28)
    assert ds[0][0].mean().item() == pytest.approx((128 / 255 - SHIPPED_MEAN) / SHIPPED_STD, abs=1e-3)
    _, scratch = dataset_for_model(f"imagefolder:{tmp_path}", model, train=False, pretrained=False)
    assert scratch.mean == (0.485, 0.456, 0.406)  # a model trained from scratch keeps the dataset's statistics


def test_finetuning_defaults_and_the_warmup_warning():
    tune, scratch = TrainConfig(pretrained=True, epochs=2), TrainConfig(epochs=30)
    assert (tune.lr_base, tune.warmup_epochs) == (2e-3, pytest.approx(0.2))
    assert (scratch.lr_base, scratch.warmup_epochs) == (5e-4, 1.0)
    assert TrainConfig(epochs=1).warmup_epochs == 0.5  # a 1-epoch run still reaches its peak rate
    assert TrainConfig(pretrained=True, lr_base=1e-3, warmup_epochs=0).warmup_epochs == 0  # given values win
    with pytest.warns(UserWarning, match="covers the whole 2-epoch run"):
        TrainConfig(epochs=2, warmup_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(pretrained=True, epochs=2)


def test_a_two_epoch_finetune_reaches_its_peak_rate_in_the_first_epoch(tmp_path):
    """The issue's 2-epoch fine-tune ran epoch 0 at 1e-6 and epoch 1 at 6.75e-5: with the fine-tuning defaults
    the rate is at its peak (5e-4 at batch 128) after a tenth of the run."""
    data = f"imagefolder:{grey_folder(tmp_path / 'g', per_class=8)}"
    trainer = Trainer(finetune_cfg(tmp_path, data, epochs=2, batch_size=4))
    steps = len(trainer.train_loader)  # 6 updates per epoch; the warm-up is a tenth of 2 epochs: 1.2 updates
    trainer.scheduler.step_update(num_updates=steps // 2)  # half-way through epoch 0: at the peak, decaying
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * 4 / 512, rel=0.1)


def test_flip_and_crop_switches(tmp_path):
    grey_folder(tmp_path)
    kinds = lambda ds: [type(t) for t in ds.transform.transforms]  # noqa: E731
    from tokenthrift.data import Preprocess
    default, _ = build_dataset(f"imagefolder:{tmp_path}", True, 28, 1)
    assert T.RandomHorizontalFlip in kinds(default) and T.RandomCrop in kinds(default)
    plain, _ = build_dataset(f"imagefolder:{tmp_path}", True, 28, 1, preprocess=Preprocess(hflip=0, crop_pad=0))
    assert T.RandomHorizontalFlip not in kinds(plain) and T.RandomCrop not in kinds(plain)
    args = build_parser().parse_args(["train", "--hflip", "0", "--crop-pad", "3", "--mean", "0.5", "--skip-bad-images"])
    assert (args.hflip, args.crop_pad, args.mean, args.skip_bad_images) == (0.0, 3, [0.5], True)
    with pytest.raises(ValueError, match="hflip=2.*probability"):
        build_dataset(f"imagefolder:{tmp_path}", True, 28, 1, preprocess=Preprocess(hflip=2))


def test_an_unreadable_image_is_named_or_skipped(tmp_path):
    grey_folder(tmp_path)
    broken = tmp_path / "train" / "c1" / "broken.png"
    broken.write_bytes(b"not an image")
    ds, _ = build_dataset(f"imagefolder:{tmp_path}", True, 28, 1)
    index = [p for p, _ in ds.samples].index(str(broken))
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png.*--skip-bad-images"):
        ds[index]
    with pytest.warns(UserWarning, match=r"left out 1 unreadable file\(s\) of 13.*broken\.png"):
        kept, _ = build_dataset(f"imagefolder:{tmp_path}", True, 28, 1, skip_bad_images=True)
    assert len(kept) == 12 and str(broken) not in [p for p, _ in kept.samples]
    with pytest.raises(ValueError, match="--skip-bad-images checks the files of imagefolder"):
        build_dataset("fashion-mnist", True, 28, 1, skip_bad_images=True)


def test_an_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    engine.save_atomic({"epoch": 1, "config": {}, "model": {}, "method": {}}, path)
    real_save = torch.save

    def killed_half_way(obj, f, *a, **kw):  # writes part of the file, then the process "dies"
        real_save(obj, f, *a, **kw)
        with open(f, "r+b") as handle:
            handle.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        engine.save_atomic({"epoch": 2, "config": {}, "model": {}, "method": {}}, path)
    assert read_checkpoint(path)["epoch"] == 1 and list(tmp_path.iterdir()) == [path]


def test_a_second_run_with_the_same_name_keeps_the_first(tmp_path):
    data = f"imagefolder:{grey_folder(tmp_path / 'g')}"
    first = Trainer(finetune_cfg(tmp_path, data, name="keep")).fit()
    before = {p.name: p.read_bytes() for p in (tmp_path / "runs" / "keep").iterdir()}
    with pytest.warns(UserWarning, match="is kept; this run writes"):
        second = Trainer(finetune_cfg(tmp_path, data, name="keep", lr=1e-3))
    assert second.run_dir.name == "keep-1"
    after = {p.name: p.read_bytes() for p in (tmp_path / "runs" / "keep").iterdir()}
    assert after == before and json.loads(after["summary.json"])["top1"] == first["top1"]


def class_folder(root, train_classes=("ant", "bee", "cat", "dog"), val_classes=None, per_class=4):
    """An ImageFolder as users bring one: PNG and JPEG files of different sizes, one greyscale, and each class
    drawn in its own brightness (so that a model can tell them apart) ; ``val_classes`` (default: the training
    ones) gives val/ other class folders."""
    for split, classes in (("train", train_classes), ("val", val_classes or train_classes)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            level = 40 + 50 * (sorted(set(train_classes) | set(val_classes or ())).index(name) % 5)
            for i in range(per_class):
                side = 20 + 4 * i
                image = Image.new("RGB", (side, side + 2), (level, level // 2, 255 - level))
                if i == 0:
                    image = image.convert("L")
                image.save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_val_labels_are_matched_to_the_training_classes_by_name(tmp_path):
    """A val/ that lacks one of train/'s classes shifted every label by index (top-1 0 %): labels now follow the
    class names, with a warning naming the missing class; a class only val/ has is an error naming it."""
    root = class_folder(tmp_path / "d", val_classes=("ant", "cat", "dog"))
    train_ds, info = build_dataset(f"imagefolder:{root}", True, 28, 1)
    assert info.classes == ("ant", "bee", "cat", "dog")
    with pytest.warns(UserWarning, match=r"no images of 1 of the 4 classes \(bee\).*by name"):
        val, val_info = build_dataset(f"imagefolder:{root}", False, 28, 1, classes=info.classes)
    assert val_info.classes == ("ant", "cat", "dog")
    assert sorted({y for _, y in val}) == [0, 2, 3]  # ant, cat, dog: their training indices, not 0, 1, 2
    extra = class_folder(tmp_path / "e", val_classes=("ant", "bee", "cat", "dog", "eel"))
    with pytest.raises(ValueError, match=r"classes that the model does not: eel.*predicts 4 classes \(ant, bee"):
        build_dataset(f"imagefolder:{extra}", False, 28, 1, classes=("ant", "bee", "cat", "dog"))
    with pytest.raises(ValueError, match=r"\(evaluation split\) has classes that the model does not: eel"):
        Trainer(finetune_cfg(tmp_path, f"imagefolder:{extra}", num_classes=None))


def test_the_class_count_comes_from_the_data_and_a_wrong_one_is_an_error(tmp_path):
    data = f"imagefolder:{class_folder(tmp_path / 'd')}"
    with pytest.raises(ValueError, match=r"has 4 classes \(ant, bee, cat, dog\) but the model has 10 outputs; drop "
                                         "--num-classes"):
        Trainer(finetune_cfg(tmp_path, data, num_classes=10))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing left behind
    trainer = Trainer(finetune_cfg(tmp_path, data, num_classes=None, name="four"))
    assert trainer.model.num_classes == 4 and trainer.classes == ["ant", "bee", "cat", "dog"]
    summary = trainer.fit()
    assert summary["classes"] == ["ant", "bee", "cat", "dog"]
    ckpt = tmp_path / "runs" / "four" / "last.pth"
    assert read_checkpoint(ckpt)["classes"] == ["ant", "bee", "cat", "dog"]
    model, _ = load_trained(ckpt)
    from tokenthrift.data import model_classes
    assert model_classes(model) == ("ant", "bee", "cat", "dog")  # as timm holds them: pretrained_cfg label_names
    from tokenthrift.apps.evaluation import evaluate_checkpoint
    with pytest.raises(ValueError, match=r"fashion-mnist \(evaluation split\) has classes that the model does not: "
                                         "T-shirt/top"):
        evaluate_checkpoint(ckpt, data="fashion-mnist", device="cpu")
    assert evaluate_checkpoint(ckpt, device="cpu")[0]["top1"] == summary["top1"]


def test_the_readme_own_data_command_runs_on_a_folder_of_any_class_count(tmp_path, capsys):
    """docs/cli.md's command, unchanged but for the folder and a short run; the run prints the colour conversion."""
    from tokenthrift.apps.cli import main

    readme = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    command = re.search(r"tokenthrift train --model vit_fmnist_tiny_patch2_28 --pretrained --data imagefolder:DIR"
                        r"[^\n]*\\\n\s+[^\n]*?#", readme).group(0).rstrip("#").replace("\\\n", " ").split()[2:]
    root = class_folder(tmp_path / "three", train_classes=("ant", "bee", "cat"))
    args = [{"imagefolder:DIR": f"imagefolder:{root}", "5": "1"}.get(a, a) for a in command]  # a 1-epoch run
    main(["train", *args, "--batch-size", "4", "--threads", "1", "--output", str(tmp_path / "runs"), "--name", "r"])
    out = capsys.readouterr().out
    assert "colour images are turned grey for this 1-channel model" in out and out.count("turned grey") == 1
    assert read_checkpoint(tmp_path / "runs" / "r" / "last.pth")["classes"] == ["ant", "bee", "cat"]


def test_an_image_size_that_is_not_a_multiple_of_the_patch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"image height 29 is not a multiple of the patch size 2.*--img-size 28 or 30"):
        Trainer(finetune_cfg(tmp_path, "fashion-mnist", num_classes=None, img_size=29))


def test_initial_checkpoint_starts_from_a_local_weights_file(tmp_path, capsys):
    """--initial-checkpoint: a tokenthrift last.pth or a .safetensors file, loaded the way timm loads pretrained
    weights: the same weights, a fresh classifier for another class count (a warning-free note in the run's
    normalisation line says where the statistics came from)."""
    from safetensors.torch import save_file

    shipped = timm.create_model(SHIPPED, pretrained=True)
    save_file(shipped.state_dict(), str(tmp_path / "w.safetensors"))
    four = f"imagefolder:{class_folder(tmp_path / 'd')}"
    trainer = Trainer(finetune_cfg(tmp_path, four, pretrained=False, initial_checkpoint=str(tmp_path / "w.safetensors"),
                                   num_classes=None, name="from_file"))
    start = trainer.model.state_dict()
    assert all(torch.equal(v, start[k]) for k, v in shipped.state_dict().items() if not k.startswith("head."))
    assert start["head.weight"].shape == (4, 48) and trainer.cfg.lr_base == 2e-3  # fine-tuning defaults
    trainer.fit()
    again = Trainer(finetune_cfg(tmp_path, four, pretrained=False, num_classes=None, name="from_run",
                                 initial_checkpoint=str(tmp_path / "runs" / "from_file" / "last.pth")))
    trained = load_trained(tmp_path / "runs" / "from_file" / "last.pth")[0].state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in again.model.state_dict().items())  # same classes: the head too
    assert "as the run of --initial-checkpoint" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--pretrained and --initial-checkpoint"):
        finetune_cfg(tmp_path, four, initial_checkpoint=str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="does not fit --model vit_tiny_patch16_224"):
        Trainer(finetune_cfg(tmp_path, four, model="vit_tiny_patch16_224", pretrained=False, num_classes=None,
                             img_size=28, in_chans=1, initial_checkpoint=str(tmp_path / "w.safetensors")))


def test_best_checkpoint_beside_the_last_and_one_line_per_epoch_without_progress_bars(tmp_path, capsys):
    data = f"imagefolder:{class_folder(tmp_path / 'd')}"
    summary = Trainer(finetune_cfg(tmp_path, data, num_classes=None, epochs=3, name="b")).fit()
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == ["1/3", "2/3", "3/3"]
    best = read_checkpoint(tmp_path / "runs" / "b" / "best.pth")
    top = max(r["top1"] for r in summary["history"])
    first_best = next(r["epoch"] for r in summary["history"] if r["top1"] == top)
    assert best["epoch"] == first_best + 1 and best["history"][-1]["top1"] == top  # the first epoch that reached it
    Trainer(finetune_cfg(tmp_path, data, num_classes=None, name="quiet"), verbose=False).fit()
    assert "epoch 1/1" not in capsys.readouterr().out


def test_a_run_that_fails_before_its_first_epoch_leaves_no_folder(tmp_path, monkeypatch):
    data = f"imagefolder:{class_folder(tmp_path / 'd')}"
    trainer = Trainer(finetune_cfg(tmp_path, data, num_classes=None, name="broken"))

    def boom(*args, **kwargs):
        raise RuntimeError("a failure in the first step")

    monkeypatch.setattr(trainer.method, "forward_backward", boom)
    with pytest.raises(RuntimeError, match="first step"):
        trainer.fit()
    assert not (tmp_path / "runs" / "broken").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hint about a run that is not there
        Trainer(finetune_cfg(tmp_path, data, num_classes=None, name="broken"))
    (tmp_path / "runs" / "stub").mkdir(parents=True)
    (tmp_path / "runs" / "stub" / "metrics.jsonl").write_text("")  # an older version's leftover: kept, no resume hint
    with pytest.warns(UserWarning, match=r"stub-1.*\(it has no last.pth to resume from\)"):
        Trainer(finetune_cfg(tmp_path, data, num_classes=None, name="stub"))
