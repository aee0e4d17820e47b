"""Checkpoints carry their format and the library versions; every bad file gets one clear message naming it."""
import pytest
import torch

from tokenthrift.apps.cli import main
from tokenthrift.train import TrainConfig, Trainer, load_trained
from tokenthrift.train.checkpoint import FORMAT_VERSION, read_checkpoint

TINY = dict(model="vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
            data="fashion-mnist", train_subset=128, eval_subset=64, batch_size=64, epochs=1, warmup_epochs=0,
            progress=False, threads=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    Trainer(TrainConfig(**TINY, output=str(out), name="run")).fit()
    return out / "run" / "last.pth"


def test_checkpoints_record_their_format_and_versions(ckpt, capsys):
    import timm

    data = read_checkpoint(ckpt)
    assert data["format_version"] == FORMAT_VERSION and data["versions"]["timm"] == timm.__version__
    assert data["versions"]["torch"] == torch.__version__
    main(["eval", "--checkpoint", str(ckpt)])
    first = capsys.readouterr().out.splitlines()[0]
    assert f"checkpoint format {FORMAT_VERSION}" in first and f"timm {timm.__version__}" in first


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("text", "is not a tokenthrift checkpoint (torch cannot read it"),
    ("truncated", "is truncated or damaged"),
    ("state_dict", "is not a tokenthrift checkpoint: it holds a dict with keys"),
    ("newer", f"format version {FORMAT_VERSION + 1}; this tokenthrift reads up to version {FORMAT_VERSION}"),
    ("unknown_option", "options this tokenthrift does not know (brand_new_flag"),
    ("edited_weights", "do not fit the model its config describes"),
])
def test_bad_checkpoints_get_one_clear_message(ckpt, tmp_path, capsys, case, message):
    bad = tmp_path / "bad.pth"
    data = torch.load(ckpt, weights_only=False)
    if case == "text":
        bad.write_text("epoch,loss\n0,1.2\n")
    elif case == "truncated":
        bad.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif case == "state_dict":
        torch.save(data["model"], bad)
    elif case == "newer":
        torch.save({**data, "format_version": FORMAT_VERSION + 1}, bad)
    elif case == "unknown_option":
        torch.save({**data, "config": {**data["config"], "brand_new_flag": 3}}, bad)
    elif case == "edited_weights":
        weights = dict(data["model"])
        weights.pop("head.weight")
        torch.save({**data, "model": weights}, bad)
    with pytest.raises(ValueError if case != "missing" else FileNotFoundError, match="bad.pth"):
        load_trained(bad)
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(bad)])
    err = capsys.readouterr().err
    assert message in err and str(bad) in err and err.count("\n") == 1  # one line


def test_resume_from_another_model_or_method_says_so(ckpt, tmp_path):
    with pytest.raises(ValueError, match="trained with --method full, not toe"):
        Trainer(TrainConfig(**TINY, output=str(tmp_path), name="x", method="toe", resume=str(ckpt)))
    with pytest.raises(ValueError, match="trained as --model vit_tiny_patch16_224, this run is --model deit_tiny"):
        Trainer(TrainConfig(**{**TINY, "model": "deit_tiny_patch16_224"}, output=str(tmp_path), name="x",
                            resume=str(ckpt)))


def test_export_weights_ships_the_better_of_model_and_ema(ckpt, tmp_path):
    """export_weights writes the weights whose last top-1 is higher (model or EMA) as safetensors, the run's log and
    a summary; loaded into the run's architecture they give the checkpoint's own model."""
    import json

    from tokenthrift.train.checkpoint import export_weights, read_weights

    data = read_checkpoint(ckpt)
    for ema_top1, want in ((-1.0, "model"), (200.0, "EMA")):
        data["history"][-1]["top1_ema"] = ema_top1
        data["ema"] = {k: v + 1 for k, v in data["model"].items()} if want == "EMA" else None
        torch.save(data, tmp_path / "last.pth")
        (tmp_path / "metrics.jsonl").write_text("{}\n")
        summary = export_weights(tmp_path / "last.pth", tmp_path / "out" / "m.safetensors", "m", "cmd")
        assert summary["weights"] == want and summary["finished"] and summary["command"] == "cmd"
        shipped = read_weights(tmp_path / "out" / "m.safetensors")
        source = data["ema"] if want == "EMA" else data["model"]
        assert shipped.keys() == source.keys() and all(torch.equal(shipped[k], source[k]) for k in source)
        assert json.loads((tmp_path / "out" / "m.json").read_text())["weights"] == want
        assert (tmp_path / "out" / "m.jsonl").read_text() == "{}\n"
    model, _ = load_trained(ckpt)
    model.load_state_dict(read_weights(tmp_path / "out" / "m.safetensors"))  # fits the run's architecture
