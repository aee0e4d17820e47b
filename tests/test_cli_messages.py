"""The command line's messages, which a user must not miss: tokenthrift's warnings reach the terminal whatever
``-W`` / ``PYTHONWARNINGS`` say (once each), the run's first line names the run folder it writes and any channel
conversion, an unknown flag is its subcommand's error, a warm-up that spends a whole epoch at its start rate says
so, and ``export --legacy`` prints no onnxruntime log."""
import os
import subprocess
import sys
import warnings

import pytest
from PIL import Image

from tokenthrift.apps.cli import main
from tokenthrift.train import TrainConfig, Trainer

TINY = dict(model="vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=3, num_heads=2)
TINY_FLAGS = ["--model", "vit_tiny_patch16_224", "--img-size", "28", "--patch-size", "4", "--embed-dim", "32",
              "--depth", "3", "--num-heads", "2"]


def folder(root, mode="L", per_class=2, val_classes=("ant", "bee", "cat")):
    """An ImageFolder of 3 classes (train/) in PIL ``mode`` ("L": grey files, "RGB": colour ones), each class
    its own shade; val/ holds ``val_classes``."""
    for split, classes in (("train", ("ant", "bee", "cat")), ("val", val_classes)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (28, 28), (60 + 60 * c, 200 - 50 * c, 30 * i)).convert(mode).save(
                    root / split / name / f"{i}.png")
    return root


def tiny_cfg(tmp_path, data, **kw):
    return TrainConfig(**{**TINY, "data": data, "epochs": 2, "batch_size": 4, "eval_batch_size": 8, "warmup_epochs": 0,
                          "progress": False, "threads": 1, "device": "cpu", "output": str(tmp_path / "runs"), **kw})


@pytest.mark.parametrize("how", ["PYTHONWARNINGS=ignore", "python -W ignore"])
def test_tokenthrift_warnings_reach_the_terminal_whatever_python_is_told(tmp_path, how):
    """A val/ without one class, a warm-up that trains epoch 1 at 1e-6: the command's own messages, shown once each
    on stderr even when Python is told to ignore warnings (the library warns; the command line shows)."""
    root = folder(tmp_path / "d", val_classes=("ant", "bee"))
    env, flags = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}, ["-W", "ignore"]
    if how == "PYTHONWARNINGS=ignore":
        env["PYTHONWARNINGS"], flags = "ignore", []
    run = subprocess.run([sys.executable, *flags, "-m", "tokenthrift", "train", *TINY_FLAGS, "--in-chans", "3",
                          "--data", f"imagefolder:{root}", "--epochs", "2", "--batch-size", "4", "--threads", "1",
                          "--device", "cpu", "--no-progress", "--output", str(tmp_path / "runs"), "--name", "r"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    err = run.stderr
    missing = "tokenthrift train: warning: imagefolder:"
    assert err.count(missing) == 1 and "has no images of 1 of the 3 classes (cat)" in err, err
    assert err.count("one optimizer step") == 1, err
    assert "UserWarning" not in err and ".py:" not in err  # lines, not Python's warning format


def test_a_renamed_flag_is_said_once_as_it_is_read_even_under_ignore(capsys):
    """The parsing itself warns (a flag under its former name): inside the command's own warning handling."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["macs", *TINY_FLAGS, "--method", "ltm", "--ltm-ratio", "0.8"])
    err = capsys.readouterr().err
    assert err.count("tokenthrift macs: warning: --ltm-ratio is now --ltm-site-ratio") == 1, err


def test_the_first_line_says_grey_to_colour_and_colour_to_grey(tmp_path, capsys):
    """docs/cli.md: colour images for a 1-channel model (or grey ones for a colour model) are converted, and the run's
    first line says so. A folder of grey files into a colour model said nothing."""
    grey, colour = folder(tmp_path / "grey"), folder(tmp_path / "colour", mode="RGB")
    Trainer(tiny_cfg(tmp_path, f"imagefolder:{grey}", in_chans=3, name="g3"))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("g3: normalisation") and "grey images are repeated over the model's 3 channels" in first
    Trainer(tiny_cfg(tmp_path, f"imagefolder:{colour}", in_chans=1, name="c1"))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("c1: normalisation") and "colour images are turned grey for this 1-channel model" in first
    Trainer(tiny_cfg(tmp_path, f"imagefolder:{colour}", in_chans=3, name="c3"))
    first = capsys.readouterr().out.splitlines()[0]
    assert "repeated over" not in first and "turned grey" not in first  # nothing converted, nothing said


def test_an_unknown_flag_is_the_subcommands_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--bogus", "1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("tokenthrift train: error: unrecognized arguments: --bogus 1 (tokenthrift train "
                                       "--help lists its flags)\n")  # was: the top level's usage and error
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", "x.pth", "--bogus"])
    err = capsys.readouterr().err
    assert err.startswith("tokenthrift eval: error: unrecognized arguments: --bogus") and len(err.splitlines()) == 1


def test_a_warmup_that_spends_a_whole_epoch_at_its_start_rate_says_so(tmp_path):
    """6 images, batch 4 (the last partial batch dropped): one optimizer step per epoch, and timm's warm-up runs
    the first one at --warmup-lr. The schedule stays timm's; a warning says what it does to this run."""
    from tokenthrift.errors import TokenthriftWarning

    data = f"imagefolder:{folder(tmp_path / 'd')}"
    said = (r"one optimizer step \(6 training images in batches of 4, 2 left out each epoch\)"
            r".*epoch 1 at 1e-06 \(peak 3\.9e-06")
    with pytest.warns(TokenthriftWarning, match=said + ".*--warmup-epochs 0"):
        trainer = Trainer(tiny_cfg(tmp_path, data, in_chans=1, name="w", warmup_epochs=1))
    assert len(trainer.train_loader) == 1 and trainer.optimizer.param_groups[0]["lr"] == 1e-6  # timm's warm-up
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # more steps per epoch, or no warm-up: nothing to say
        Trainer(tiny_cfg(tmp_path, data, in_chans=1, name="w0"))
        Trainer(tiny_cfg(tmp_path, data, in_chans=1, name="w2", warmup_epochs=1, batch_size=2))


def test_a_renamed_runs_first_line_names_the_folder_it_writes(tmp_path, capsys):
    data = f"imagefolder:{folder(tmp_path / 'd')}"
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "metrics.jsonl").write_text("")  # another run's records: this run goes to r-1
    with pytest.warns(UserWarning, match="this run writes .*r-1"):
        trainer = Trainer(tiny_cfg(tmp_path, data, in_chans=1, name="r"))
    assert trainer.run_dir.name == "r-1" and trainer.cfg.name == "r-1"  # the config records the folder it wrote
    assert capsys.readouterr().out.splitlines()[0].startswith("r-1: normalisation")
    Trainer(tiny_cfg(tmp_path, data, in_chans=1))  # no --name: the run folder's own name
    assert capsys.readouterr().out.splitlines()[0].startswith("vit_tiny_patch16_224-full-s0: normalisation")


def test_export_legacy_prints_no_onnxruntime_log(tmp_path, capfd):
    """ToMe through the legacy exporter: the dynamic-batch check fails in onnxruntime (the file is written again at
    a fixed batch, and the result says so); onnxruntime's own coloured log of that failure is not shown."""
    main(["export", *TINY_FLAGS, "--in-chans", "1", "--num-classes", "3", "--method", "tome", "--tome-r", "2",
          "--legacy", "--out", str(tmp_path / "t.onnx")])
    out, err = capfd.readouterr()
    assert "this file takes batches of 2 images only" in out
    assert "\x1b[" not in err and "onnxruntime" not in err, err
    assert "Converting a tensor to a Python boolean" not in err  # the tracer's doubts: the export's check answers them
