"""The command line: each subcommand end to end on tiny inputs, and errors as messages, not tracebacks."""
import pytest

from tokenthrift.cli import main

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "28", "--patch-size", "4", "--in-chans", "1",
        "--embed-dim", "32", "--depth", "3", "--num-heads", "2"]


def test_macs_command_prints_pinned_value(capsys):
    main(["macs", "--model", "deit_small_patch16_224"])
    out = capsys.readouterr().out
    assert "deit_small_patch16_224" in out and "4.599" in out and "22.05" in out  # GMACs, M params


def test_macs_command_per_toe_stage(capsys):
    main(["macs", "--model", "deit_small_patch16_224", "--method", "toe"])
    out = capsys.readouterr().out
    assert "2.461" in out and "3.524" in out and "mean over 300 epochs" in out and "3.528" in out


def test_bench_command_reports_ratios(capsys):
    main(["bench", *TINY, "--batch-size", "8", "--repeats", "2", "--warmup", "1", "--toe-milestones", "0", "1", "2"])
    out = capsys.readouterr().out
    for column in ("img_s", "speedup", "MACs_ratio", "efficiency", "full tokens"):
        assert column in out


def test_train_eval_visualize_round_trip(tmp_path, capsys):
    main(["train", *TINY, "--method", "toe", "--epochs", "1", "--train-subset", "128", "--eval-subset", "100",
          "--batch-size", "64", "--warmup-epochs", "0", "--ema", "--no-progress", "--output", str(tmp_path),
          "--name", "cli"])
    out = capsys.readouterr().out
    assert "top-1" in out and "train_MMACs" in out
    ckpt = tmp_path / "cli" / "last.pth"
    main(["eval", "--checkpoint", str(ckpt), "--ema", "--eval-subset", "100"])
    out = capsys.readouterr().out
    assert "EMA" in out and "model" in out and "100" in out
    png = tmp_path / "tokens.png"
    main(["visualize", "--checkpoint", str(ckpt), "--images", "3", "--out", str(png)])
    assert png.stat().st_size > 1000


def test_errors_are_messages(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["macs", "--model", "vit_nonexistent_patch16"])
    assert exit_info.value.code == 2
    assert "unknown timm model 'vit_nonexistent_patch16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", "imagenet", "--no-progress"])
    assert "unknown dataset 'imagenet'" in capsys.readouterr().err


def test_ltm_macs_bench_and_recipe_model_kwargs(capsys):
    main(["macs", "--model", "vit_small_patch16_224", "--method", "ltm"])  # calibrated default ratios
    out = capsys.readouterr().out
    assert "LTM vit_small_patch16_224" in out and "0.8599" in out and "22.05" in out
    main(["macs", "-c", "fmnist_swin_tiny_ltm", "--num-classes", "10"])  # model_kwargs from the recipe
    out = capsys.readouterr().out
    assert "0.5293" in out and "0.8476" in out  # params (M) of the base and LTM, and the calibrated ratio
    main(["bench", *TINY, "--method", "ltm", "--ltm-ratio", "0.5", "--batch-size", "8", "--repeats", "2",
          "--warmup", "1"])
    out = capsys.readouterr().out
    for column in ("img_s", "MACs_saving", "time_saving", "saving_share", "LTM vit_tiny_patch16_224"):
        assert column in out
    with pytest.raises(SystemExit):
        main(["macs", "--model", "ltm_vit_small_patch16_224", "--method", "ltm", "--ltm-ratio", "0.5"])
    assert "already an LTM model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["macs", *TINY, "--method", "ltm"])
    assert "no calibrated LTM ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["macs", *TINY, "--model-kwargs", "depths"])
    assert "key=value" in capsys.readouterr().err


def test_ltm_train_and_visualize_round_trip(tmp_path, capsys):
    main(["train", *TINY, "--method", "ltm", "--ltm-ratio", "0.7", "--epochs", "2", "--train-subset", "128",
          "--eval-subset", "100", "--batch-size", "64", "--warmup-epochs", "0", "--ltm-ib-start", "0.5",
          "--no-progress", "--output", str(tmp_path), "--name", "ltm"])
    out = capsys.readouterr().out
    assert "top-1" in out
    png = tmp_path / "merges.png"
    main(["visualize", "--checkpoint", str(tmp_path / "ltm" / "last.pth"), "--images", "2", "--out", str(png)])
    assert capsys.readouterr().out.strip() == str(png) and png.stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["visualize", "--checkpoint", str(tmp_path / "ltm" / "last.pth"), "--sites", "head", "--out", str(png)])
    assert "matched none of the merge sites" in capsys.readouterr().err
