"""Which assigner objective makes TLA worth its name: the demo's ReViT (runs/demo, `make demo`) with assigners
trained on its training-image labels four ways (images no grid gets right labelled with the smallest grid or,
as before 2026-12, the largest; class-balanced cross-entropy or plain; with or without the cost-aware term),
each evaluated alone (argmax) and as the start of the confidence cascade, on the demo's 5 000 test images.
Writes benchmarks/results/tla_objectives.{json,md}.

    python benchmarks/tla_objectives.py [--demo runs/demo]
"""
import argparse
from pathlib import Path

from tokenthrift.apps import report
from tokenthrift.apps.demo import FINETUNE
from tokenthrift.apps.labels import adaptive_report, label_split
from tokenthrift.measure import run_metadata
from tokenthrift.pretrained import FMNIST_VIT
from tokenthrift.train import TrainConfig, load_recipe

from suite import run_or_reuse, write_result

OUT = Path(__file__).parent / "results"
VARIANTS = {  # name -> (unsolved rule of the training labels, class-balanced, cost weight)
    "balanced, unsolved -> largest (before 2026-12)": ("largest", True, 0.0),
    "balanced, unsolved -> smallest": ("smallest", True, 0.0),
    "plain CE, unsolved -> smallest": ("smallest", False, 0.0),
    "plain CE + cost 0.5, unsolved -> smallest": ("smallest", False, 0.5),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", default="runs/demo")
    args = ap.parse_args()
    demo = Path(args.demo)
    common = dict(load_recipe("fmnist_vit_tiny"), train_subset=7000, eval_subset=5000, seed=0, progress=False,
                  output=str(demo / "tla_objectives"), model=FMNIST_VIT, epochs=2, eval_every=2, lr_base=0.008,
                  warmup_epochs=FINETUNE["warmup_epochs"], overwrite=True)
    for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
        common.pop(key)
    rows = []
    for i, (name, (unsolved, balanced, cost)) in enumerate(VARIANTS.items()):
        labels = demo / f"labels_train_{unsolved}.pt"
        if not labels.exists():
            label_split(demo / "revit" / "last.pth", "train", labels, unsolved=unsolved)
        run = demo / "tla_objectives" / f"tla{i}"
        run_or_reuse(TrainConfig(**common, method="tla", name=f"tla{i}", tla_labels=str(labels),
                                 tla_eval_labels=str(demo / "labels_eval.pt"), tla_balanced=balanced,
                                 tla_cost_weight=cost, tla_model="test_byobnet"))
        for r in adaptive_report(demo / "revit" / "last.pth", run / "last.pth", throughput_batch=0,
                                 budgets=(0.411, 0.6), kinds=("margin",)):
            if r["family"] in ("TLA", "TLA + cascade") or (i == 0 and r["family"] != "oracle"):
                rows.append({"assigner": name if r["family"] != "fixed grid" and r["family"] != "cascade" else "-",
                             **{k: r.get(k) for k in ("rule", "top1", "MACs_ratio", "share_g14", "share_g10",
                                                      "share_g7", "note")}})
    meta = run_metadata(device="cpu", data="fashion-mnist", eval_images=5000, revit=str(demo / "revit" / "last.pth"))
    write_result(OUT / "tla_objectives", meta, {"rows": rows}, rows)
    print(report.table(rows))


if __name__ == "__main__":
    main()
