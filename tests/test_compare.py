"""tokenthrift compare: every method on one harness, against ToMe at equal MACs (tiny runs)."""
import copy
import json

import pytest

from tokenthrift import measure, tome
from tokenthrift.apps.cli import main
from tokenthrift.apps.compare import compare
from tokenthrift.train.methods.tome import r_for_macs

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "28", "--patch-size", "4", "--in-chans", "1",
        "--embed-dim", "32", "--depth", "3", "--num-heads", "2", "--epochs", "1", "--train-subset", "256",
        "--eval-subset", "128", "--batch-size", "64", "--warmup-epochs", "0", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    common = [*TINY, "--output", str(out)]
    main(["train", *common, "--name", "full"])
    main(["train", *common, "--method", "toe", "--name", "toe"])
    main(["train", *common, "--method", "ltm", "--ltm-site-ratio", "0.7", "--no-ltm-ib", "--name", "ltm"])
    main(["train", *common, "--method", "revit", "--revit-grids", "7", "5", "4", "--name", "revit"])
    for split in ("train", "eval"):
        main(["assign-labels", "--checkpoint", str(out / "revit" / "last.pth"), "--split", split, "--out",
              str(out / f"{split}.pt")])
    main(["train", *common, "--method", "tla", "--tla-labels", str(out / "train.pt"), "--tla-eval-labels",
          str(out / "eval.pt"), "--tla-model", "test_byobnet", "--tla-max-macs-fraction", "0.5", "--name", "tla"])
    return out


def test_compare_rows_and_verdicts(runs, tmp_path):
    trained = [str(runs / name / "last.pth") for name in ("toe", "full", "revit", "tla", "ltm")]
    result = compare(str(runs / "full" / "last.pth"), tmp_path, trained, shelf={"tome": (2, 4)}, batch_sizes=(1, 8), repeats=2)
    rows = {r["model"]: r for r in result["rows"]}
    full = rows["full tokens"]
    assert full["MACs_ratio"] == 1 and full["speedup_b8"] == 1 and full["latency_ms"] > 0
    for name in ("ToMe r=2 (off the shelf)", "ReViT 7x7", "ReViT 4x4", "ReViT + TLA, adaptive", "LTM",
                 "ToE-trained (inference = full)", "ToMe r=4 (off the shelf), on ToE run toe",
                 "full tokens, run full (1 epochs)"):
        assert name in rows, name
    assert rows["ReViT 7x7"]["MMACs"] == pytest.approx(full["MMACs"])  # the largest grid costs the full model's
    assert rows["ToE-trained (inference = full)"]["MMACs"] == pytest.approx(full["MMACs"])
    assert rows["ToMe r=4 (off the shelf)"]["MMACs"] < rows["ToMe r=2 (off the shelf)"]["MMACs"] < full["MMACs"]
    verdicts = {v["method"] for v in result["verdicts"]}
    cascades = {m for m in verdicts if m.startswith("ReViT cascade, budget ")}  # calibrated on unseen training images
    assert verdicts - cascades == {"ReViT 5x5", "ReViT 4x4", "ReViT + TLA, adaptive", "LTM"} and len(cascades) == 2
    for name in cascades:  # within its budget, above the smallest grid's cost
        assert rows["ReViT 4x4"]["MMACs"] <= rows[name]["MMACs"] <= 0.62 * rows["ReViT 7x7"]["MMACs"]
    assert rows["ToE-trained (inference = full)"]["panel"] == "training" and rows["LTM"]["panel"] == "inference"
    for v in result["verdicts"]:
        matched = rows[f"ToMe r={v['ToMe_r']} (at {v['method']}'s MACs)"]
        assert matched["top1"] == v["ToMe_top1"] and v["delta_top1"] == pytest.approx(v["top1"] - v["ToMe_top1"])
        assert v["beats_ToMe"] == ("yes" if v["delta_top1"] > 0 else "no")
    assert json.loads((tmp_path / "compare.json").read_text())["meta"]["eval_images"] == 128
    assert (tmp_path / "compare.png").stat().st_size > 1000
    assert "ToMe at equal MACs" in (tmp_path / "compare.md").read_text()


def test_rows_of_two_runs_of_one_method_name_their_run(runs, tmp_path):
    """LTM from scratch beside LTM fine-tuned: rows (and verdicts) that would read the same carry the run folder."""
    import shutil
    other = tmp_path / "ltm_finetuned" / "last.pth"
    other.parent.mkdir()
    shutil.copyfile(runs / "ltm" / "last.pth", other)
    result = compare(str(runs / "full" / "last.pth"), tmp_path / "out", [str(runs / "ltm" / "last.pth"), str(other)],
                     shelf={"tome": (2,)}, batch_sizes=(1, 8), repeats=1)
    labels = [r["model"] for r in result["rows"]]
    assert "LTM, run ltm" in labels and "LTM, run ltm_finetuned" in labels and "LTM" not in labels
    assert [v["method"] for v in result["verdicts"]] == ["LTM, run ltm", "LTM, run ltm_finetuned"]
    assert len(set(labels)) == len(labels)  # ToMe at each one's MACs is named after it too


def test_tome_r_matches_macs_by_bisection(runs):
    from tokenthrift.train import load_trained

    model, _ = load_trained(runs / "full" / "last.pth")
    target = 0.6 * measure.macs(model, (1, 28, 28))
    largest = tome.largest_r(model.patch_embed.num_patches + 1, 1, len(model.blocks))  # 12 for 49 tokens, 3 blocks
    r, macs = r_for_macs(model, (1, 28, 28), target, largest)
    every = {}
    for q in range(0, largest + 1):
        m = copy.deepcopy(model)
        tome.apply(m, q)
        every[q] = measure.macs(m, (1, 28, 28))
    assert abs(macs - target) == min(abs(v - target) for v in every.values()) and every[r] == macs


def test_compare_from_the_command_line(runs, tmp_path, capsys):
    main(["compare", "--full", str(runs / "full" / "last.pth"), "--runs", str(runs / "ltm" / "last.pth"),
          "--tome-r", "3", "--batch-size", "8", "--repeats", "1", "--output", str(tmp_path)])
    captured = capsys.readouterr()
    out = captured.out
    assert "against ToMe at equal MACs" in out and "LTM" in out and (tmp_path / "compare.md").exists()
    stages = [line for line in captured.err.splitlines() if line.startswith("compare: ")]  # never minutes of silence
    assert stages[0].startswith("compare: the full model and ToMe r=3") and any("timing" in s for s in stages)
    with pytest.raises(SystemExit):
        main(["compare", "--full", str(runs / "full" / "last.pth"), "--runs", str(runs / "tla" / "last.pth")])
    assert "give the ReViT run it was trained for too" in capsys.readouterr().err


def test_compare_compiled_rows_and_merge_overhead(runs, tmp_path):
    """--compile times every row again through torch.compile against the full model compiled; a merging row
    also gets its same-shape oracle's verdict: the share of its time spent merging."""
    # one merging row keeps the compile time down (each row and oracle compiles per batch size); LTM's compiled
    # graph is tested in test_compile.py
    result = compare(str(runs / "full" / "last.pth"), tmp_path, [], shelf={"tome": (4,)}, batch_sizes=(1, 4), repeats=1,
                     compile=True)
    rows = {r["model"]: r for r in result["rows"]}
    full, tome4 = rows["full tokens"], rows["ToMe r=4 (off the shelf)"]
    assert full["speedup_b4_compiled"] == 1 and full["latency_ms_compiled"] > 0 and "overhead_b4" not in full
    for r in (tome4,):
        for key in ("overhead_b1", "overhead_b4", "overhead_b1_compiled", "overhead_b4_compiled"):
            assert r[key] < 1, key  # 1 - method time / oracle time
    assert result["meta"]["compiled"] is True


def test_compare_plot_reads_at_a_glance(tmp_path, monkeypatch):
    """An outlier sits on the lower edge (named in the legend) instead of stretching the axis; the training
    panel is scaled to its own runs against their own full-token run, not to the pretrained model."""
    from tokenthrift import viz

    seen = {}
    monkeypatch.setattr(viz, "_save", lambda fig, path: seen.setdefault("fig", fig))
    rows = [dict(model="full tokens", kind="full", top1=90.0, MMACs=55, img_s=100),
            dict(model="ToMe r=98", kind="tome", top1=65.4, MMACs=12, img_s=300),
            dict(model="ReViT 10x10", kind="revit", top1=88.5, MMACs=22, img_s=200),
            dict(model="ToE-trained", kind="toe", top1=35.9, MMACs=55, img_s=100, panel="training"),
            dict(model="full, race", kind="full", top1=34.1, MMACs=55, img_s=110, panel="training")]
    viz.plot_compare(rows, tmp_path / "c.png", speed_key="img_s")
    cost, speed, train_cost, _ = seen["fig"].axes
    low, high = cost.get_ylim()
    assert 81 < low < 82 and 90 < high < 91  # 8 points below the best, not down to 65.4
    labels = [t.get_text() for t in speed.get_legend().get_texts()]
    assert "ToMe r=98 [tome] (65.4 %, below the axis)" in labels and "ReViT 10x10 [revit]" in labels
    low, high = train_cost.get_ylim()
    assert 33.9 < low < 34.1 and 35.9 < high < 36.1
