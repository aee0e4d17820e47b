"""The command line: each subcommand end to end on tiny inputs, its numbers against independent references
(analytic MACs, direct computations), flags that do not apply as errors, mistakes as messages, bugs as
tracebacks."""
import pytest
import timm
import torch

from tokenthrift.apps.cli import build_parser, main

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "28", "--patch-size", "4", "--in-chans", "1",
        "--embed-dim", "32", "--depth", "3", "--num-heads", "2"]
RUN = ["--epochs", "1", "--train-subset", "128", "--eval-subset", "100", "--batch-size", "64", "--warmup-epochs", "0",
       "--no-progress"]


def parse_table(out: str) -> list[dict]:
    """The rows of the last aligned table printed (header, dashes, rows; columns where the dashes are),
    numbers as floats."""
    import re

    lines = [line for line in out.splitlines() if line.strip()]
    dash = max(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"})
    spans = [m.span() for m in re.finditer(r"-+", lines[dash])]
    cut = lambda line: [line[a:b].strip() for a, b in spans]  # noqa: E731
    header, rows = cut(lines[dash - 1]), []
    for line in lines[dash + 1:]:
        if len(line) != len(lines[dash]):
            break
        rows.append({k: _number(v) for k, v in zip(header, cut(line))})
    return rows


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def vit_analytic_gmacs(grid: int, dim: int, depth: int, patch: int, chans: int, classes: int,
                       tokens_after_block0: int | None = None, operator: float = 0.0) -> float:
    """docs/methods.md §1: 12·N·D² + 2·N²·D per block (N with the CLS token), patch embedding, head."""
    n = grid * grid + 1
    blocks = [n] + [tokens_after_block0 or n] * (depth - 1)
    total = grid * grid * dim * chans * patch * patch + dim * classes + operator
    total += sum(12 * t * dim * dim + 2 * t * t * dim for t in blocks)
    return total / 1e9


def test_macs_command_against_analytic_counts(capsys):
    main(["macs", "--model", "deit_small_patch16_224"])
    row = parse_table(capsys.readouterr().out)[0]
    assert row["GMACs"] == pytest.approx(vit_analytic_gmacs(14, 384, 12, 16, 3, 1000), rel=1e-3)
    params = sum(p.numel() for p in timm.create_model("deit_small_patch16_224").parameters()) / 1e6
    assert row["params_M"] == pytest.approx(params, rel=1e-3)
    main(["macs", "--model", "vit_tiny_patch16_224", "--img-size", "112", "--num-classes", "10"])
    row = parse_table(capsys.readouterr().out)[0]
    assert row["input"] == "3x112x112"
    assert row["GMACs"] == pytest.approx(vit_analytic_gmacs(7, 192, 12, 16, 3, 10), rel=1e-3)


def test_macs_command_per_toe_stage_against_analytic_counts(capsys):
    main(["macs", "--model", "deit_small_patch16_224", "--method", "toe"])
    rows = parse_table(capsys.readouterr().out)
    N, D = 196, 384
    stages = {}
    for stage, kept in ((1, 98), (2, 147)):  # keep 0.5, 0.75 of 196 patches after block 0
        # the operator: every patch against the seeds and each chunk (selection), then against all M kept
        # (merging): 2·N·M·D MACs of similarity matmuls
        stages[stage] = vit_analytic_gmacs(14, D, 12, 16, 3, 1000, tokens_after_block0=1 + kept,
                                           operator=2 * N * kept * D)
    full = vit_analytic_gmacs(14, D, 12, 16, 3, 1000)
    assert rows[0]["GMACs"] == pytest.approx(full, rel=1e-3)
    assert rows[1]["GMACs"] == pytest.approx(stages[1], rel=1e-3)
    assert rows[2]["GMACs"] == pytest.approx(stages[2], rel=1e-3)
    # milestones 0 / 100 / 200 of 300 epochs: a third of the run in each stage
    assert rows[3]["stage"] == "mean over 300 epochs"
    assert rows[3]["GMACs"] == pytest.approx((stages[1] + stages[2] + full) / 3, rel=1e-3)
    main(["macs", "--model", "deit_small_patch16_224", "--method", "toe", "--epochs", "30"])  # stages at 0/10/20
    assert parse_table(capsys.readouterr().out)[3]["GMACs"] == pytest.approx(rows[3]["GMACs"], rel=1e-9)


def test_bench_command_reports_ratios_and_its_dtype(capsys):
    main(["bench", *TINY, "--batch-size", "8", "--repeats", "2", "--warmup", "1", "--toe-milestones", "0", "1", "2",
          "--amp", "bf16"])
    out = capsys.readouterr().out
    assert "autocast bfloat16" in out.splitlines()[0] and "fp32" not in out.splitlines()[0]
    rows = parse_table(out)
    assert [r["stage"] for r in rows] == ["full tokens", 1.0, 2.0]
    for r in rows:
        assert r["efficiency"] == pytest.approx(r["speedup"] * r["MACs_ratio"], rel=2e-3)
    main(["bench", *TINY, "--batch-size", "8", "--repeats", "1", "--warmup", "0", "--toe-milestones", "0", "1", "2"])
    assert ", fp32," in capsys.readouterr().out.splitlines()[0]


def test_train_eval_visualize_round_trip(tmp_path, capsys):
    main(["train", *TINY, *RUN, "--method", "toe", "--ema", "--output", str(tmp_path), "--name", "cli"])
    out = capsys.readouterr().out
    assert "train_MMACs" in out and "x a full-token training forward of the same model" in out
    ckpt = tmp_path / "cli" / "last.pth"
    main(["eval", "--checkpoint", str(ckpt), "--ema", "--eval-subset", "100"])
    rows = parse_table(capsys.readouterr().out)
    assert [r["weights"] for r in rows] == ["model", "EMA"] and all(r["images"] == 100 for r in rows)
    saved = torch.load(ckpt, weights_only=False)["history"][-1]
    assert rows[0]["top1"] == pytest.approx(saved["top1"], abs=0.01)  # the same eval-mode number as the run's log
    assert rows[1]["top1"] == pytest.approx(saved["top1_ema"], abs=0.01)
    assert rows[0]["GMACs"] == pytest.approx(vit_analytic_gmacs(7, 32, 3, 4, 1, 10), rel=1e-3)
    png = tmp_path / "tokens.png"
    main(["visualize", "--checkpoint", str(ckpt), "--images", "3", "--out", str(png)])
    assert png.stat().st_size > 1000
    main(["bench", "--checkpoint", str(ckpt), "--batch-size", "4", "--repeats", "1", "--warmup", "1"])
    rows = parse_table(capsys.readouterr().out)  # a ToE run times its training steps per stage, as --method toe
    assert len(rows) >= 2 and all(r["img_s"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        main(["bench", "--checkpoint", str(ckpt), "--model", "deit_small_patch16_224"])
    assert "--model describe a model to build" in capsys.readouterr().err


def test_visualize_draws_every_class_names_them_and_calls_a_full_token_checkpoint_a_preview(tmp_path, monkeypatch):
    """Six images of the first class only, titled vit_tiny_patch16_224 for the 28 px model, a full-token run drawn
    as if it were ToE: the picture now takes a class in turn, captions each with its class and the prediction,
    and names the model as built and a preview as one."""
    from tokenthrift import viz

    main(["train", *TINY, *RUN, "--output", str(tmp_path), "--name", "full"])
    drawn = {}
    real = viz.plot_token_groups

    def spy(images, groups, kept, grid, path, title="", captions=None):
        drawn.update(title=title, captions=captions)
        return real(images, groups, kept, grid, path, title, captions)

    monkeypatch.setattr(viz, "plot_token_groups", spy)
    main(["visualize", "--checkpoint", str(tmp_path / "full" / "last.pth"), "--images", "6", "--out",
          str(tmp_path / "t.png")])
    classes = [c.split("\n")[0] for c in drawn["captions"]]
    assert classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal"]  # a class in turn
    assert all("(predicted: " in c for c in drawn["captions"])
    assert drawn["title"].startswith("preview on a --method full run: ToE vit_tiny_patch16_224 (28 px, patch 4, ")


def test_every_failure_is_one_line_before_any_work_and_warnings_are_short(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for argv in (["train", *TINY, *RUN, "--output", str(blocker / "runs")],
                 ["visualize", *TINY, "--out", str(blocker / "t.png")],
                 ["assign-labels", "--checkpoint", str(tmp_path / "none.pth"), "--out", str(blocker / "l.pt")],
                 ["demo", "--output", str(blocker / "demo")]):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "is a file" in err, argv
    main(["train", *TINY, *RUN, "--output", str(tmp_path), "--name", "w"])
    capsys.readouterr()
    main(["train", *TINY, *RUN, "--output", str(tmp_path), "--name", "w"])  # a second run under the same name
    err = capsys.readouterr().err
    assert "tokenthrift train: warning: run folder" in err and "UserWarning" not in err and ".py:" not in err


def test_method_flags_that_do_not_apply_are_errors(tmp_path, capsys):
    cases = [
        (["train", *TINY, *RUN, "--method", "full", "--toe-r0", "0.3"],
         "--toe-r0 applies to --method toe, but this run is --method full"),
        (["train", *TINY, *RUN, "--method", "ltm", "--ltm-site-ratio", "0.7", "--revit-grids", "7", "5"],
         "--revit-grids applies to --method revit, but this run is --method ltm"),
        (["train", *TINY, *RUN, "--method", "toe", "--no-ltm-ib"], "--ltm-ib applies to --method ltm"),
        (["macs", *TINY, "--method", "ltm", "--ltm-site-ratio", "0.5", "--toe-k", "3"],
         "--toe-k applies to --method toe, but this run is --method ltm"),
        (["macs", *TINY, "--epochs", "30"], "--epochs sets the length of a training schedule; --method full has none"),
        (["eval", "--checkpoint", "x.pth", "--gamma", "0.5"], "unrecognized arguments: --gamma"),
        (["eval", "--checkpoint", "x.pth", "--adaptive", "--assigner", "y.pth"],
         "eval --adaptive is now its own command: tokenthrift adaptive"),
        (["adaptive", "--checkpoint", "x.pth", "--gamma", "0.5"], "--gamma thresholds an assigner's probabilities"),
        (["visualize", "--method", "ltm", *TINY, "--ltm-site-ratio", "0.5", "--stage", "1"],
         "--stage do not apply to the --method ltm picture"),
        (["visualize", *TINY, "--sites", "blocks"], "--sites do not apply to the --method toe picture"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_errors_are_messages_bugs_are_tracebacks_and_debug_goes_anywhere(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(["macs", "--model", "vit_nonexistent_patch16"])
    assert exit_info.value.code == 2
    assert "unknown timm model 'vit_nonexistent_patch16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", "imagenet", "--no-progress"])
    assert "unknown dataset 'imagenet'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown timm model"):  # --debug after the subcommand: the traceback
        main(["macs", "--model", "vit_nonexistent_patch16", "--debug"])
    with pytest.raises(ValueError, match="unknown timm model"):
        main(["--debug", "macs", "--model", "vit_nonexistent_patch16"])

    from tokenthrift import measure

    def broken(*args, **kwargs):
        raise TypeError("a bug, not a user's mistake")

    monkeypatch.setattr(measure, "macs", broken)
    with pytest.raises(TypeError, match="a bug"):  # not turned into a one-line message
        main(["macs", *TINY])


def test_every_train_flag_has_a_help_text():
    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train"))
    for action in train._actions:
        if action.dest in ("help",):
            continue
        text = (action.help or "").split("(default")[0].strip()
        assert len(text) > 5, action.dest


def test_ltm_macs_bench_and_recipe_model_kwargs(capsys):
    main(["macs", "--model", "vit_small_patch16_224", "--method", "ltm"])  # calibrated default ratios
    base, merged = parse_table(capsys.readouterr().out)
    assert base["GMACs"] == pytest.approx(vit_analytic_gmacs(14, 384, 12, 16, 3, 1000), rel=1e-3)
    assert merged["MACs_ratio"] == pytest.approx(merged["GMACs"] / base["GMACs"], rel=1e-3)
    assert abs(merged["MACs_ratio"] - 0.860) <= 0.005 and merged["params_M"] == base["params_M"]
    main(["macs", "-c", "fmnist_swin_tiny_ltm", "--num-classes", "10"])  # model_kwargs from the recipe
    base, merged = parse_table(capsys.readouterr().out)
    assert abs(merged["MACs_ratio"] - 0.85) <= 0.005  # the recipe's calibrated ratio
    main(["bench", *TINY, "--method", "ltm", "--ltm-site-ratio", "0.5", "--batch-size", "8", "--repeats", "2",
          "--warmup", "1"])
    base, merged, oracle = parse_table(capsys.readouterr().out)  # a ViT: the same-shape oracle too
    time_saving = 1 - base["img_s"] / merged["img_s"]
    # (the table prints 4 significant digits: a share far from 0, from timing noise at this size, is rounded)
    assert merged["saving_share"] == pytest.approx(time_saving / (1 - merged["MACs_ratio"]), rel=1e-3, abs=5e-3)
    assert merged["overhead_share"] == pytest.approx(1 - merged["img_s"] / oracle["img_s"], abs=5e-3)
    assert oracle["MACs_ratio"] < merged["MACs_ratio"] < 1  # the oracle skips the mask module's work
    with pytest.raises(SystemExit):
        main(["macs", "--model", "ltm_vit_small_patch16_224", "--method", "ltm", "--ltm-site-ratio", "0.5"])
    assert "already an LTM model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["macs", *TINY, "--method", "ltm"])
    assert "no calibrated LTM ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["macs", *TINY, "--model-kwargs", "depths"])
    assert "key=value" in capsys.readouterr().err


def test_ltm_train_eval_and_visualize_round_trip(tmp_path, capsys):
    main(["train", *TINY, *RUN, "--epochs", "2", "--method", "ltm", "--ltm-site-ratio", "0.7", "--ltm-ib-start", "0.5",
          "--output", str(tmp_path), "--name", "ltm"])
    out = capsys.readouterr().out
    assert "x a training forward of the same model without merging" in out
    ckpt = tmp_path / "ltm" / "last.pth"
    main(["eval", "--checkpoint", str(ckpt)])
    row = parse_table(capsys.readouterr().out)[0]
    assert row["baseline_GMACs"] == pytest.approx(vit_analytic_gmacs(7, 32, 3, 4, 1, 10), rel=1e-3)
    assert row["GMACs"] < 0.9 * row["baseline_GMACs"] and row["MACs_ratio"] == pytest.approx(
        row["GMACs"] / row["baseline_GMACs"], rel=2e-3)
    png = tmp_path / "merges.png"
    main(["visualize", "--checkpoint", str(ckpt), "--images", "2", "--out", str(png)])
    assert capsys.readouterr().out.strip() == str(png) and png.stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["visualize", "--checkpoint", str(ckpt), "--sites", "head", "--out", str(png)])
    assert "matched none of the merge sites" in capsys.readouterr().err
    # bench converts a copy per row: a second batch size pairs the same plain model with the same LTM one
    main(["bench", *TINY, "--method", "ltm", "--ltm-site-ratio", "0.7", "--batch-size", "1", "2", "--repeats", "1",
          "--warmup", "0"])
    rows = parse_table(capsys.readouterr().out)
    ltm_rows = [r for r in rows if str(r["model"]).startswith("LTM") and "oracle" not in str(r["model"])]
    assert [r["batch"] for r in ltm_rows] == [1, 2] and ltm_rows[0]["MACs_ratio"] == ltm_rows[1]["MACs_ratio"] < 0.9


def test_visualize_swin_checkpoints(tmp_path, capsys):
    swin = ["--model", "swin_tiny_patch4_window7_224", "--img-size", "28", "--in-chans", "1", "--model-kwargs",
            "patch_size=2", "window_size=7", "embed_dim=16", "depths=[2,2]", "num_heads=[1,2]"]
    main(["train", *swin, *RUN, "--method", "ltm", "--ltm-site-ratio", "0.5", "--no-ltm-ib", "--output", str(tmp_path),
          "--name", "swin_ltm"])
    main(["train", *swin, *RUN, "--output", str(tmp_path), "--name", "swin"])
    capsys.readouterr()
    png = tmp_path / "swin.png"
    main(["visualize", "--checkpoint", str(tmp_path / "swin_ltm" / "last.pth"), "--images", "2", "--out", str(png)])
    assert png.stat().st_size > 1000
    with pytest.raises(SystemExit):  # a plain Swin has no tokenthrift method to draw: say so, and how to preview LTM
        main(["visualize", "--checkpoint", str(tmp_path / "swin" / "last.pth"), "--out", str(png)])
    assert "plain SwinTransformer" in capsys.readouterr().err
    main(["visualize", "--checkpoint", str(tmp_path / "swin" / "last.pth"), "--method", "ltm", "--ltm-site-ratio",
          "0.5",
          "--images", "2", "--out", str(png)])
    assert png.stat().st_size > 1000
