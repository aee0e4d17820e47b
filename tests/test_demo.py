"""The main job on a very small budget: every table comes out and its columns are what they claim."""
import pytest

from tokenthrift.apps.demo import equal_time_top1, run_demo


def test_demo_tables_are_consistent(tmp_path):
    result = run_demo(epochs=1, finetune_epochs=1, train_subset=256, eval_subset=300, output=str(tmp_path),
                      progress=False)
    full, toe, at_time = result["race"]
    assert (full["run"], full["speedup"], full["MACs_ratio"]) == ("full tokens", 1.0, 1.0)
    assert toe["MACs_ratio"] == pytest.approx(0.535, abs=0.01)  # one epoch = ToE stage 1 (keep 0.5)
    assert toe["speedup"] == pytest.approx(full["train_s"] / toe["train_s"])
    assert toe["efficiency"] == pytest.approx(toe["speedup"] * toe["MACs_ratio"])
    assert at_time["train_s"] == toe["train_s"]
    base, grid, adaptive, ltm = result["inference"]
    assert base["MACs_ratio"] == 1.0 and base["speedup"] == 1.0 and 0 <= base["top1"] <= 100
    assert grid["MMACs"] == pytest.approx(base["MMACs"])  # the ReViT at its largest grid is the full model's cost
    assert 0 < adaptive["MACs_ratio"] < 1.02  # at most the full grid plus a 2 % assigner
    assert ltm["MACs_ratio"] == pytest.approx(0.851, abs=0.005)  # the recipe's calibrated ratios
    for r in result["inference"]:
        assert r["efficiency"] == pytest.approx(r["speedup"] * r["MACs_ratio"])
        assert r["MACs_ratio"] == pytest.approx(r["MMACs"] / base["MMACs"])
    summary = result["summary"]
    assert [r["top1_full"] for r in summary] == [full["top1"]] + [base["top1"]] * 3
    assert result["plot"].exists() and result["plot"].stat().st_size > 1000


def test_equal_time_top1_interpolates_between_evaluated_epochs():
    history = [{"elapsed_train_s": 10.0, "top1": 50.0}, {"elapsed_train_s": 20.0}, {"elapsed_train_s": 30.0,
                                                                                    "top1": 70.0}]
    assert equal_time_top1(history, 5.0) is None
    assert equal_time_top1(history, 20.0) == pytest.approx(60.0)
    assert equal_time_top1(history, 40.0) == 70.0
