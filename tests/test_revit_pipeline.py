"""ReViT + TLA end to end from the command line on a tiny run: train, label, train the assigner, evaluate."""
import pytest
import torch

from tokenthrift.cli import main
from tokenthrift.revit import load_labels
from tokenthrift.revit.pipeline import adaptive_report

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "28", "--patch-size", "2", "--in-chans", "1",
        "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--epochs", "1", "--train-subset", "256",
        "--eval-subset", "200", "--batch-size", "64", "--warmup-epochs", "0", "--no-progress"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("revit")
    main(["train", *TINY, "--method", "revit", "--output", str(out), "--name", "revit"])
    for split in ("train", "eval"):
        main(["assign-labels", "--checkpoint", str(out / "revit" / "last.pth"), "--split", split,
              "--out", str(out / f"{split}.pt")])
    main(["train", *TINY, "--method", "tla", "--tla-labels", str(out / "train.pt"), "--tla-eval-labels",
          str(out / "eval.pt"), "--output", str(out), "--name", "tla",
          "--tla-max-macs-fraction", "0.1"])  # this 2-block backbone is tiny: the assigner is 6 % of it
    return out


def test_labels_match_the_per_grid_predictions(pipeline):
    from tokenthrift.data import build_dataset
    from tokenthrift.train import load_trained

    train, evaluation = load_labels(pipeline / "train.pt"), load_labels(pipeline / "eval.pt")
    assert len(train.labels) == 256 and len(evaluation.labels) == 200 and train.grids == (14, 10, 7)
    assert train.meta["split"] == "train" and evaluation.meta["split"] == "eval"
    assert int(train.histogram.sum()) == 256
    revit, cfg = load_trained(pipeline / "revit" / "last.pth")
    for labels, is_train, subset in ((train, True, 256), (evaluation, False, 200)):
        # the very images the run trained on (train split, same subset) or evaluated on, unaugmented
        ds, _ = build_dataset("fashion-mnist", is_train, 28, 1, subset=subset, seed=cfg.seed, augment=False)
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        targets = torch.tensor([ds[i][1] for i in range(len(ds))])
        with torch.no_grad():
            right = torch.stack([revit(images, grid=g).argmax(-1) == targets for g in revit.grids], 1)
        # smallest correct grid = the last correct index (grids run largest first); none correct: index 0
        last = torch.where(right, torch.arange(3), torch.full_like(right, -1, dtype=torch.long)).amax(1)
        assert torch.equal(labels.labels, last.clamp_min(0))


def test_adaptive_report_is_consistent(pipeline):
    summary = torch.load(pipeline / "revit" / "last.pth", weights_only=False)["history"][-1]
    rows = {r["rule"]: r for r in adaptive_report(pipeline / "revit" / "last.pth", pipeline / "tla" / "last.pth",
                                                  gammas=(None, 0.5, 1.0), oracle_labels=pipeline / "eval.pt",
                                                  throughput_batch=32, repeats=2)}
    # fixed grids agree with the engine's per-grid evaluation of the same checkpoint
    for g in (14, 10, 7):
        assert rows[f"always {g}x{g}"]["top1"] == pytest.approx(summary[f"top1_g{g}"])
    assert rows["always 14x14"]["MACs_ratio"] == 1.0
    assert rows["always 7x7"]["MACs_ratio"] == pytest.approx(rows["always 7x7"]["MMACs_total"]
                                                             / rows["always 14x14"]["MMACs_total"])
    assert rows["always 7x7"]["MACs_ratio"] < 0.25  # 7x7 of 14x14 tokens: under a quarter of the compute
    # the oracle picks a correct grid whenever there is one: at least as accurate as any fixed grid
    assert rows["oracle labels"]["top1"] >= max(rows[f"always {g}x{g}"]["top1"] for g in (14, 10, 7))
    # gamma = 1 always reaches the cumulative threshold only at the largest grid
    assert rows["gamma=1"]["share_g14"] == 1.0
    argmax = rows["argmax"]
    assert argmax["MMACs_total"] > argmax["MMACs_backbone"]  # the assigner's cost is counted
    assert argmax["img_s"] > 0 and argmax["speedup"] == pytest.approx(argmax["img_s"] / argmax["img_s_full"])
    assert sum(argmax[f"share_g{g}"] for g in (14, 10, 7)) == pytest.approx(1.0)


def test_labels_need_a_revit_checkpoint(tmp_path, capsys):
    main(["train", *TINY, "--method", "full", "--output", str(tmp_path), "--name", "plain"])
    with pytest.raises(SystemExit):
        main(["assign-labels", "--checkpoint", str(tmp_path / "plain" / "last.pth"), "--out", str(tmp_path / "x")])
    assert "labels need a --method revit checkpoint" in capsys.readouterr().err
