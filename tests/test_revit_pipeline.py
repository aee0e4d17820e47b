"""ReViT + TLA end to end from the command line on a tiny run: train, label, train the assigner, evaluate."""
import pytest
import torch

from tokenthrift.apps.cli import main
from tokenthrift.apps.labels import adaptive_report
from tokenthrift.revit import load_labels

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
        # smallest correct grid = the last correct index (grids run largest first); none correct: the smallest
        last = torch.where(right, torch.arange(3), torch.full_like(right, -1, dtype=torch.long)).amax(1)
        assert torch.equal(labels.labels, torch.where(last >= 0, last, 2))
        assert labels.meta["unsolved"] == "smallest"


def test_adaptive_report_is_consistent(pipeline):
    summary = torch.load(pipeline / "revit" / "last.pth", weights_only=False)["history"][-1]
    rows = {r["rule"]: r for r in adaptive_report(pipeline / "revit" / "last.pth", pipeline / "tla" / "last.pth",
                                                  gammas=(None, 0.5, 1.0), oracle_labels=pipeline / "eval.pt",
                                                  throughput_batch=32, repeats=2, calibration_images=200)}
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


def test_eval_reports_every_grid_and_the_assigners_own_accuracy(pipeline, capsys, tmp_path):
    from test_cli import parse_table

    from tokenthrift.data import build_dataset
    from tokenthrift.train import load_trained
    from tokenthrift.train.methods import RelabeledDataset

    summary = torch.load(pipeline / "revit" / "last.pth", weights_only=False)["history"][-1]
    main(["eval", "--checkpoint", str(pipeline / "revit" / "last.pth")])
    rows = parse_table(capsys.readouterr().out)
    assert [r["grid"] for r in rows] == ["14x14", "10x10", "7x7"]
    for r, g in zip(rows, (14, 10, 7)):
        assert r["top1"] == pytest.approx(summary[f"top1_g{g}"], abs=0.01)
    assert rows[2]["MACs_ratio"] < 0.3 and rows[0]["MACs_ratio"] == 1

    # the assigner, scored on the token-length labels of the evaluation images (a direct count here)
    main(["eval", "--checkpoint", str(pipeline / "tla" / "last.pth")])
    row = parse_table(capsys.readouterr().out)[0]
    assigner, cfg = load_trained(pipeline / "tla" / "last.pth")
    ds, _ = build_dataset("fashion-mnist", False, 28, 1, subset=200, seed=cfg.seed)
    labelled = RelabeledDataset(ds, load_labels(pipeline / "eval.pt").labels)
    images = torch.stack([labelled[i][0] for i in range(200)])
    targets = torch.tensor([labelled[i][1] for i in range(200)])
    with torch.no_grad():
        picks = assigner(images).argmax(-1)
    assert row["assigner_top1"] == pytest.approx(100 * (picks == targets).float().mean().item(), abs=0.01)
    assert row["picks_g7"] == pytest.approx((picks == 2).float().mean().item(), abs=1e-3)

    # the checkpoint loads without its label files; eval then takes the label file explicitly
    moved = tmp_path / "eval_labels.pt"
    (pipeline / "eval.pt").rename(moved)
    (pipeline / "train.pt").rename(tmp_path / "train_labels.pt")
    try:
        assert load_trained(pipeline / "tla" / "last.pth")[0].grids == (14, 10, 7)
        with pytest.raises(SystemExit):
            main(["eval", "--checkpoint", str(pipeline / "tla" / "last.pth")])
        assert "does not exist" in capsys.readouterr().err
        main(["eval", "--checkpoint", str(pipeline / "tla" / "last.pth"), "--labels", str(moved)])
        assert parse_table(capsys.readouterr().out)[0]["assigner_top1"] == row["assigner_top1"]
        png = tmp_path / "grids.png"
        main(["visualize", "--checkpoint", str(pipeline / "tla" / "last.pth"), "--images", "3", "--out", str(png)])
        assert png.stat().st_size > 1000
        main(["visualize", "--checkpoint", str(pipeline / "revit" / "last.pth"), "--assigner",
              str(pipeline / "tla" / "last.pth"), "--images", "3", "--out", str(png)])
        assert png.stat().st_size > 1000
    finally:
        moved.rename(pipeline / "eval.pt")
        (tmp_path / "train_labels.pt").rename(pipeline / "train.pt")


def test_assigner_on_labels_of_a_held_out_slice(tmp_path, capsys):
    """docs/methods.md §3 option: the ReViT trains without a held-out slice of its training images; the assigner
    learns from that slice's labels, with a flip as its only augmentation."""
    from tokenthrift.train import load_trained

    main(["train", *TINY, "--method", "revit", "--train-holdout", "64", "--output", str(tmp_path), "--name", "revit"])
    summary = torch.load(tmp_path / "revit" / "last.pth", weights_only=False)["history"][-1]
    assert summary["images_per_s"] > 0
    for split in ("holdout", "eval"):
        main(["assign-labels", "--checkpoint", str(tmp_path / "revit" / "last.pth"), "--split", split,
              "--out", str(tmp_path / f"{split}.pt"), "--batch-size", "50", "--device", "cpu", "--workers", "0"])
    held = load_labels(tmp_path / "holdout.pt")
    assert len(held.labels) == 64 and held.meta["split"] == "holdout" and held.meta["holdout"] == 64
    main(["train", *TINY, "--method", "tla", "--train-holdout", "64", "--tla-labels", str(tmp_path / "holdout.pt"),
          "--tla-eval-labels", str(tmp_path / "eval.pt"), "--output", str(tmp_path), "--name", "tla",
          "--batch-size", "32", "--tla-max-macs-fraction", "0.1"])
    capsys.readouterr()
    from tokenthrift.train import TrainConfig, Trainer
    cfg = TrainConfig.from_saved(torch.load(tmp_path / "tla" / "last.pth", weights_only=False)["config"])
    trainer = Trainer(cfg)
    assert len(trainer.train_loader.dataset) == 64  # the held-out slice, not the 192 the ReViT trained on
    flips = [type(t).__name__ for t in trainer.train_loader.dataset.dataset.dataset.dataset.transform.transforms]
    assert "RandomHorizontalFlip" in flips and "RandomCrop" not in flips and "RandomResizedCrop" not in flips
    revit, _ = load_trained(tmp_path / "revit" / "last.pth")
    with pytest.raises(SystemExit):  # a ReViT run without a held-out slice has none to label
        main(["assign-labels", "--checkpoint", str(pipeline_free_revit(tmp_path)), "--split", "holdout",
              "--out", str(tmp_path / "x.pt")])
    assert "held no training images out" in capsys.readouterr().err


def pipeline_free_revit(tmp_path):
    main(["train", *TINY, "--method", "revit", "--train-subset", "64", "--output", str(tmp_path), "--name", "plain"])
    return tmp_path / "plain" / "last.pth"


def test_cascade_rows_are_calibrated_off_the_evaluation_images_and_hold_when_run(pipeline, tmp_path, capsys):
    from test_cli import parse_table

    from tokenthrift.apps.labels import split_loader
    from tokenthrift.revit import CascadeViT
    from tokenthrift.train import evaluate, load_trained

    rows = adaptive_report(pipeline / "revit" / "last.pth", pipeline / "tla" / "last.pth", budgets=(0.5,),
                           calibration_images=300, throughput_batch=0, plot=tmp_path / "adaptive.png")
    by = {r["rule"]: r for r in rows}
    assert {"cascade max_prob, budget 0.5", "cascade margin, budget 0.5", "TLA + cascade max_prob, budget 0.5",
            "TLA + cascade margin, budget 0.5"} <= set(by)
    revit, cfg = load_trained(pipeline / "revit" / "last.pth")
    loader = split_loader(cfg, "eval", (1, 28, 28), 64, None)
    for name in ("cascade max_prob, budget 0.5", "TLA + cascade margin, budget 0.5"):
        row = by[name]
        assert row["calibration_MACs_ratio"] <= 0.5 and "300 training images outside" in row["calibrated_on"]
        # the row's offline top-1 and MACs are what the cascade computes when run
        assigner = load_trained(pipeline / "tla" / "last.pth")[0] if name.startswith("TLA") else None
        kind = "margin" if "margin" in name else "max_prob"
        cascade = CascadeViT(revit, [float(t) for t in row["thresholds"].split("/")], kind, assigner).eval()
        assert evaluate(cascade, loader, torch.device("cpu")) == pytest.approx(row["top1"], abs=1e-9)
        spent = []
        with torch.no_grad():
            for images, _ in loader:
                cascade(images)
                spent.append(cascade.last_macs())
        assert torch.cat(spent).mean().item() / cascade.grid_macs()[0] == pytest.approx(row["MACs_ratio"], rel=1e-6)
    assert (tmp_path / "adaptive.png").stat().st_size > 10_000
    # the command line: no assigner needed for the cascade; given thresholds are used as given
    main(["adaptive", "--checkpoint", str(pipeline / "revit" / "last.pth"), "--thresholds", "0.9", "0.8",
          "--confidence", "margin", "--throughput-batch", "0", "--plot", str(tmp_path / "cli.png")])
    captured = capsys.readouterr()
    table = {r["rule"]: r for r in parse_table(captured.out)}
    assert "evaluation images at 3 grids" in captured.err  # a progress bar over the pass, not minutes of silence
    assert set(table) == {"always 14x14", "always 10x10", "always 7x7", "cascade margin, thresholds 0.9/0.8"}
    with pytest.raises(SystemExit):
        main(["adaptive", "--checkpoint", str(pipeline / "revit" / "last.pth"), "--gamma", "0.5"])
    assert "--gamma thresholds an assigner's probabilities" in capsys.readouterr().err
