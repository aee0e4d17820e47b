"""The main job on a very small budget: both tables come out and their columns are what they claim."""
import pytest

from tokenthrift.demo import run_demo


def test_demo_tables_are_consistent(tmp_path):
    rows, inference, merged, plot = run_demo(epochs=1, train_subset=256, eval_subset=300, output=str(tmp_path),
                                     progress=False)
    full, toe = rows
    assert (full["run"], full["speedup"], full["MACs_ratio"]) == ("full tokens", 1.0, 1.0)
    assert toe["MACs_ratio"] == pytest.approx(0.535, abs=0.01)  # one epoch = ToE stage 1 (keep 0.5)
    assert toe["speedup"] == pytest.approx(full["train_s"] / toe["train_s"])
    assert toe["efficiency"] == pytest.approx(toe["speedup"] * toe["MACs_ratio"])
    grid, adaptive = inference
    assert grid["MACs_ratio"] == 1.0 and 0 < adaptive["MACs_ratio"] < 1.02  # <= full grid + a 2 % assigner
    assert adaptive["efficiency"] == pytest.approx(adaptive["speedup"] * adaptive["MACs_ratio"])
    base, ltm = merged
    assert base["MACs_ratio"] == 1.0 and base["speedup"] == 1.0
    assert ltm["MACs_ratio"] == pytest.approx(0.851, abs=0.005)  # the recipe's calibrated ratios
    assert ltm["MMACs"] == pytest.approx(base["MMACs"] * ltm["MACs_ratio"])
    assert ltm["efficiency"] == pytest.approx(ltm["speedup"] * ltm["MACs_ratio"])
    assert plot.exists() and plot.stat().st_size > 1000
