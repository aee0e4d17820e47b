"""The confidence cascade over a ReViT's grids: exits and executed MACs against a per-image reference,
CascadeViT against running every image at every grid, the threshold calibration against a brute-force search,
and the calibration images against the run's own training and evaluation images."""
import itertools

import pytest
import torch

import tokenthrift.revit as rv
from tokenthrift import measure
from tokenthrift.revit.cascade import _candidates

from test_revit import make_revit


def reference_exit(conf_row, thresholds, start):
    """Walk one image from its start grid towards the largest, as the method is described."""
    for k in range(start, -1, -1):
        if k == 0 or conf_row[k] >= thresholds[k - 1]:
            return k


def test_confidence_kinds():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    p = logits.softmax(-1)
    assert torch.allclose(rv.confidence(logits), p.max(-1).values)
    top = p.sort(-1, descending=True).values
    assert torch.allclose(rv.confidence(logits, "margin"), top[:, 0] - top[:, 1])
    with pytest.raises(ValueError, match="unknown confidence 'entropy'"):
        rv.confidence(logits, "entropy")


def test_exits_and_executed_macs_match_a_per_image_walk():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(300, 3, generator=g)
    start = torch.randint(0, 3, (300,), generator=g)
    macs = [100.0, 40.0, 17.0]
    for thresholds in ((0.5, 0.7), (0.0, 2.0), (1.1, 1.1), (0.3, 0.9)):
        for begin in (None, start):
            exits = rv.cascade_exits(conf, thresholds, begin)
            s = torch.full((300,), 2) if begin is None else begin
            want = [reference_exit(conf[i].tolist(), thresholds, int(s[i])) for i in range(300)]
            assert exits.tolist() == want
            cost = rv.executed_macs(exits, macs, begin)
            assert cost.tolist() == pytest.approx([sum(macs[k] for k in range(e, int(b) + 1))
                                                   for e, b in zip(want, s.tolist())])
    with pytest.raises(ValueError, match="takes 2 thresholds"):
        rv.cascade_exits(conf, (0.5,))
    with pytest.raises(ValueError, match="exits at a grid index above its start"):
        rv.executed_macs(torch.tensor([2]), macs, torch.tensor([1]))


def test_cascade_vit_runs_each_stage_once_on_the_undecided_images():
    revit = make_revit().eval()
    x = torch.randn(12, 1, 28, 28)
    with torch.no_grad():
        every = {g: revit(x, grid=g) for g in revit.grids}
    conf = torch.stack([rv.confidence(every[g]) for g in revit.grids], 1)
    thresholds = tuple(conf[:, 1:].median(0).values.tolist())  # some images stop at each grid
    cascade = rv.CascadeViT(revit, thresholds).eval()
    calls = []
    forward = revit.forward
    revit.forward = lambda images, grid: calls.append((grid, len(images))) or forward(images, grid=grid)
    with torch.no_grad():
        out = cascade(x)
    exits = rv.cascade_exits(conf, thresholds)
    assert torch.equal(cascade.last_grid_index, exits) and len(set(exits.tolist())) == 3
    for i, k in enumerate(exits.tolist()):  # each image's logits are those of the grid it stopped at
        torch.testing.assert_close(out[i], every[revit.grids[k]][i], rtol=1e-4, atol=1e-5)
    # one forward per stage, smallest first, each on the images still undecided
    assert calls == [(7, 12), (10, int((exits <= 1).sum())), (14, int((exits == 0).sum()))]
    grid_macs = [measure.macs(revit, (1, 28, 28), grid=g) for g in revit.grids]
    assert cascade.last_macs().tolist() == pytest.approx(rv.executed_macs(exits, grid_macs).tolist())


def test_cascade_starts_where_the_assigner_says():
    revit = make_revit().eval()
    tla = rv.TokenLengthAssigner(3, revit.input_size).eval()
    x = torch.randn(10, 1, 28, 28)
    cascade = rv.CascadeViT(revit, (0.99, 0.99), "margin", assigner=tla).eval()
    with torch.no_grad():
        cascade(x)
        start = tla(x).argmax(-1)
        conf = torch.stack([rv.confidence(revit(x, grid=g), "margin") for g in revit.grids], 1)
    assert torch.equal(cascade.last_start_index, start)
    assert torch.equal(cascade.last_grid_index, rv.cascade_exits(conf, (0.99, 0.99), start))
    grid_macs = cascade.grid_macs()
    assert cascade.last_macs().tolist() == pytest.approx(
        (rv.executed_macs(cascade.last_grid_index, grid_macs, start) + cascade.assigner_macs()).tolist())
    with pytest.raises(ValueError, match="picks its grids itself"):
        cascade(x, grid_index=start)


def test_calibration_finds_the_best_thresholds_within_the_budget():
    g = torch.Generator().manual_seed(1)
    n = 200
    conf = torch.rand(n, 3, generator=g)
    correct = torch.rand(n, 3, generator=g) < conf * torch.tensor([1.0, 0.9, 0.8])  # confident: right more often
    macs = [100.0, 40.0, 17.0]
    steps = 9
    cands = [_candidates(conf[:, k], steps).tolist() for k in (1, 2)]
    for budget in (0.3, 0.45, 0.8, None):
        chosen = rv.calibrate_thresholds(conf, correct, macs, budget, steps=steps)
        best = None
        for t in itertools.product(*cands):  # brute force, one combination at a time
            exits = torch.tensor([reference_exit(conf[i].tolist(), t, 2) for i in range(n)])
            cost = rv.executed_macs(exits, macs).mean().item() / macs[0]
            top1 = 100.0 * correct[torch.arange(n), exits].double().mean().item()
            if budget is None or cost <= budget + 1e-12:
                if best is None or (top1, -cost) > (best[0], -best[1]):
                    best = (top1, cost)
        assert (chosen.top1, chosen.macs_ratio) == pytest.approx(best)
        assert budget is None or chosen.macs_ratio <= budget
    front = chosen.front
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in zip(front, front[1:]))  # cheaper first, each more accurate
    with pytest.raises(ValueError, match="no cascade fits a budget of 0.1"):
        rv.calibrate_thresholds(conf, correct, macs, 0.1)  # below the smallest grid's 0.17


def test_calibration_images_are_training_images_the_run_never_saw():
    from tokenthrift.apps.labels import split_loader
    from tokenthrift.train import TrainConfig

    cfg = TrainConfig(train_subset=500, eval_subset=100, seed=3)
    size = (1, 28, 28)

    def indices(loader):
        ds = loader.dataset
        return set(ds.indices if not hasattr(ds.dataset, "indices") else [ds.dataset.indices[i] for i in ds.indices])

    trained = indices(split_loader(cfg, "train", size, 64, None))
    rest = split_loader(cfg, "calibration", size, 64, None, limit=700)
    assert len(rest.dataset) == 700 and not trained & indices(rest)
    held = TrainConfig(train_subset=500, train_holdout=50, seed=3)
    fit, calib = indices(split_loader(held, "train", size, 64, None)), split_loader(held, "calibration", size, 64, None)
    assert len(calib.dataset) == 50 and not fit & indices(calib)
    with pytest.raises(ValueError, match="trained on every training image"):
        split_loader(TrainConfig(), "calibration", size, 64, None)


def test_calibrate_cascade_builds_the_chosen_cascade():
    from torch.utils.data import DataLoader, TensorDataset

    revit = make_revit().eval()
    g = torch.Generator().manual_seed(2)
    loader = DataLoader(TensorDataset(torch.randn(40, 1, 28, 28, generator=g), torch.randint(0, 5, (40,), generator=g)),
                        batch_size=16)
    seen = rv.grid_outcomes(revit, loader)
    assert seen.correct.shape == (40, 3) and set(seen.conf) == set(rv.CONFIDENCES) and seen.probs is None
    cascade, chosen = rv.calibrate_cascade(revit, seen, 0.5, "margin")
    assert cascade.kind == "margin"
    assert cascade.thresholds == pytest.approx([round(t, 4) for t in chosen.thresholds], abs=1e-6)
    grid_macs = cascade.grid_macs()
    with torch.no_grad():
        spent = torch.cat([(cascade(x), cascade.last_macs())[1] for x, _ in loader])
    exits = rv.cascade_exits(seen.conf["margin"], cascade.thresholds)
    assert spent.tolist() == pytest.approx(rv.executed_macs(exits, grid_macs).tolist())
    assert spent.mean().item() / grid_macs[0] <= 0.5 + 1e-3  # rounding may move an image at a threshold
    with pytest.raises(ValueError, match="no assigner probabilities"):
        rv.calibrate_cascade(revit, seen, 0.5, assigner=rv.TokenLengthAssigner(3, revit.input_size))
