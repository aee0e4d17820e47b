"""The main job on a very small budget: every table comes out and its columns are what they claim."""
import pytest

from tokenthrift.apps.demo import equal_time_top1, run_demo


@pytest.mark.slow  # make test-slow (CI): minutes on two cores
def test_demo_tables_are_consistent(tmp_path, capsys):
    result = run_demo(epochs=1, finetune_epochs=1, train_subset=256, eval_subset=300, output=str(tmp_path),
                      progress=False)
    out = capsys.readouterr().out  # --quiet: one line per stage, none per epoch, never minutes of silence
    stages = [line for line in out.splitlines() if line.startswith("demo: ")]
    assert len(stages) >= 8 and stages[0].startswith("demo: ToE race, full tokens, epoch 1/1")
    assert not any(line.startswith("epoch ") for line in out.splitlines())
    full, toe, at_time = result["race"]
    assert (full["run"], full["speedup"], full["MACs_ratio"]) == ("full tokens", 1.0, 1.0)
    assert toe["MACs_ratio"] == pytest.approx(0.535, abs=0.01)  # one epoch = ToE stage 1 (keep 0.5)
    assert toe["speedup"] == pytest.approx(full["train_s"] / toe["train_s"])
    assert toe["efficiency"] == pytest.approx(toe["speedup"] * toe["MACs_ratio"])
    assert at_time["train_s"] == toe["train_s"]
    base, grid, g10, g7, adaptive, *cascades, ltm = result["inference"]
    assert base["MACs_ratio"] == 1.0 and base["speedup"] == 1.0 and 0 <= base["top1"] <= 100
    assert grid["MMACs"] == pytest.approx(base["MMACs"])  # the ReViT at its largest grid is the full model's cost
    assert (g10["model"], g7["model"]) == ("ReViT at 10x10", "ReViT at 7x7")
    assert g7["MACs_ratio"] < g10["MACs_ratio"] < 0.5
    assert 0 < adaptive["MACs_ratio"] < 1.02  # at most the full grid plus a 2 % assigner
    # the cascades, calibrated on training images the ReViT never saw, to the 10x10 grid's cost and to 0.6
    ratio = f"{round(g10['MACs_ratio'], 3):g}"
    names = [c["model"] for c in cascades]
    # the cascade from the smallest grid meets every budget; one started by this barely trained assigner may
    # cost more than a budget allows (the demo then says so)
    assert names[:2] == [f"ReViT, cascade (max prob, budget {b})" for b in (ratio, "0.6")]
    assert set(names[2:]) <= {f"ReViT, TLA + cascade (max prob, budget {b})" for b in (ratio, "0.6")}
    assert all(g7["MACs_ratio"] - 1e-9 <= c["MACs_ratio"] <= 0.7 for c in cascades)
    assert ltm["MACs_ratio"] == pytest.approx(0.851, abs=0.005)  # the recipe's calibrated ratios
    for r in result["inference"]:
        assert r["efficiency"] == pytest.approx(r["speedup"] * r["MACs_ratio"])
        assert r["MACs_ratio"] == pytest.approx(r["MMACs"] / base["MMACs"])
    summary = result["summary"]
    assert [r["top1_full"] for r in summary] == [full["top1"]] + [base["top1"]] * (len(result["inference"]) - 1)
    assert result["plot"].exists() and result["plot"].stat().st_size > 1000


def test_equal_time_top1_interpolates_between_evaluated_epochs():
    history = [{"elapsed_train_s": 10.0, "top1": 50.0}, {"elapsed_train_s": 20.0}, {"elapsed_train_s": 30.0,
                                                                                    "top1": 70.0}]
    assert equal_time_top1(history, 5.0) is None
    assert equal_time_top1(history, 20.0) == pytest.approx(60.0)
    assert equal_time_top1(history, 40.0) == 70.0
