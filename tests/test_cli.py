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
