"""At convergence on Fashion-MNIST: the recipe and schedule of the shipped vit_fmnist_tiny_patch2_28 (recipe
fmnist_vit_tiny, 30 epochs on all 60 000 training images, EMA on, seed 0) run again with LTM (0.85 of the MACs,
IB on and off) and with ToE (stages at 0 / 10 / 20 of the 30 epochs, as the DeiT schedule is over 300); and the
shipped model fine-tuned on equal terms three ways (ft_full: all tokens, the control; ft_ltm: LTM with the same
ratios; ft_tome: ToMe r=9, the uniform r closest to LTM's MACs, merging while it trains; ft_evit: EViT keeping 0.9 of
the patch tokens in blocks 1, 3 and 4, 0.850 of the MACs, pruning while it trains, the pruned tokens fused as the
authors' code fuses them; ft_evitmean: the same with our normalised fusion), FINETUNE_EPOCHS on all
60 000 images at a quarter of the pretraining peak rate, seeds 0 and 1.

Every run is resumable: run the same command again and it continues from runs/converge/<name>/last.pth; a
finished run (summary.json) is skipped. Several runs in parallel: one process per run, --threads 1 each.
A run longer than one working session on a fresh machine is carried in the repository: `--carry` copies each
unfinished run's last.pth to benchmarks/results/converge/<name>.last.pth (commit it, `git add -f`), and a
machine without runs/converge/<name>/last.pth resumes from that copy; a finished run's summary and log are
carried the same way (<name>.summary.json, <name>.jsonl), so --report works on any machine.

    python benchmarks/converge_fmnist.py --runs ltm_ib toe --threads 1
    python benchmarks/converge_fmnist.py --runs ltm_ib --ship   # the finished LTM model into the package
    python benchmarks/converge_fmnist.py --report               # benchmarks/results/converge_fmnist.{json,md}
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tokenthrift.ltm.registry import FMNIST_LTM
from tokenthrift.pretrained import FMNIST_VIT, weights_path
from tokenthrift.train import TrainConfig, load_recipe
from tokenthrift.train.checkpoint import export_weights

from suite import run_or_reuse, write_result

OUTPUT = "runs/converge"
CARRIED = Path(__file__).parent / "results" / "converge"  # checkpoints carried between machines
SHIPPED = dict(epochs=30, ema=True, seed=0)  # the shipped model's run (benchmarks/pretrain_fmnist.py)

# name -> (recipe, overrides): from scratch with exactly the shipped model's recipe and schedule
SCRATCH = {
    "ltm_ib": ("fmnist_vit_tiny_ltm", {"ltm_ib": True}),
    "ltm_noib": ("fmnist_vit_tiny_ltm", {"ltm_ib": False}),
    "toe": ("fmnist_vit_tiny_toe", {}),
}
FINETUNE_EPOCHS = 3
FINETUNE = dict(model=FMNIST_VIT, pretrained=True, epochs=FINETUNE_EPOCHS, ema=True, lr_base=0.002, warmup_epochs=0,
                min_lr=1e-5)  # the demo's fine-tuning rate (a quarter of the pretraining peak), on all 60 000 images
TOME_R = 9  # 0.842 of the MACs: the uniform r closest to LTM's 0.851 (tokenthrift.train.methods.tome.r_for_macs)
EVIT_KEEP = 0.9  # 0.850 of the MACs at EViT's default blocks (1, 3, 4 of 6): LTM's 0.851
_LTM = {k: v for k, v in load_recipe("fmnist_vit_tiny_ltm").items() if k.startswith("ltm_")}
FINETUNES = {f"ft_{kind}_s{seed}": (extra, seed) for seed in (0, 1) for kind, extra in (
    ("full", {"method": "full"}), ("ltm", {"method": "ltm", **_LTM}), ("tome", {"method": "tome", "tome_r": TOME_R}),
    ("evit", {"method": "evit", "evit_keep_rate": EVIT_KEEP}),
    ("evitmean", {"method": "evit", "evit_keep_rate": EVIT_KEEP, "evit_fusion": "mean"}))}
RUNS = [*SCRATCH, *FINETUNES]


def run_config(name: str, threads: int | None) -> TrainConfig:
    common = {"name": name, "output": OUTPUT, "threads": threads, "progress": False}
    if name in SCRATCH:
        recipe, extra = SCRATCH[name]
        return TrainConfig(**{**load_recipe(recipe), **SHIPPED, **extra, **common})
    extra, seed = FINETUNES[name]
    base = {k: v for k, v in load_recipe("fmnist_vit_tiny").items()  # the model's own architecture, not the recipe's
            if k not in ("model", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")}
    return TrainConfig(**{**base, **FINETUNE, **extra, "seed": seed, **common})


def train_run(name: str, threads: int | None) -> dict:
    """suite.run_or_reuse, where a machine without the run's own summary.json or last.pth uses the copy carried
    in the repository."""
    run_dir, cfg = Path(OUTPUT) / name, run_config(name, threads)
    if not (run_dir / "summary.json").exists() and (CARRIED / f"{name}.summary.json").exists():
        return json.loads((CARRIED / f"{name}.summary.json").read_text())
    if (CARRIED / f"{name}.last.pth").exists():  # the run's own last.pth, where it has one, comes first
        cfg.resume = str(CARRIED / f"{name}.last.pth")
    return run_or_reuse(cfg, resume=True)


def carry(name: str) -> None:
    """Copy a run's state into the repository: an unfinished run's last.pth, a finished run's summary and log."""
    run_dir = Path(OUTPUT) / name
    if (run_dir / "summary.json").exists():
        shutil.copyfile(run_dir / "summary.json", CARRIED / f"{name}.summary.json")
        shutil.copyfile(run_dir / "metrics.jsonl", CARRIED / f"{name}.jsonl")
        (CARRIED / f"{name}.last.pth").unlink(missing_ok=True)
        print("carried", name, "(finished): summary and log")
    elif (run_dir / "last.pth").exists():
        shutil.copyfile(run_dir / "last.pth", CARRIED / f"{name}.last.pth")
        shutil.copyfile(run_dir / "metrics.jsonl", CARRIED / f"{name}.partial.jsonl")
        print("carried", name, "(unfinished): last.pth and its log so far")


def run_state(name: str) -> tuple[list[dict], dict | None]:
    """A run's per-epoch log and, once it has finished, its summary (from runs/ or carried in the repository)."""
    run_dir = Path(OUTPUT) / name
    for summary in (run_dir / "summary.json", CARRIED / f"{name}.summary.json"):
        if summary.exists():
            done = json.loads(summary.read_text())
            return done["history"], done
    for log in (run_dir / "metrics.jsonl", CARRIED / f"{name}.partial.jsonl"):
        if log.exists():
            return [json.loads(line) for line in log.read_text().splitlines() if line.strip()], None
    return [], None


def report() -> None:
    """benchmarks/results/converge_fmnist.{json,md}: every run's top-1 (model and EMA weights, all 10 000 test
    images, after its last finished epoch), inference MACs and mean training MACs against the shipped model, and
    training time; beside them the shipped model and ToMe r=TOME_R applied to it without training."""
    import statistics

    import timm
    import torch

    from tokenthrift import measure, tome
    from tokenthrift.data import build_dataset
    from tokenthrift.train import build_method, evaluate

    size = (1, 28, 28)
    base = timm.create_model(FMNIST_VIT, pretrained=True).eval()
    base_macs = measure.macs(base, size)
    shipped = json.loads(weights_path().with_suffix(".json").read_text())
    test, _ = build_dataset("fashion-mnist", False, 28, 1)
    merged = tome.merging_copy(base, TOME_R)
    rows = [{"run": f"shipped {FMNIST_VIT} (full tokens)", "kind": "scratch", "epochs": f"{shipped['epochs']}/30",
             "top1": shipped["top1_model"], "top1_ema": shipped["top1_ema"], "MACs_ratio": 1.0,
             "train_MACs_ratio": 1.0},
            {"run": f"ToMe r={TOME_R} on the shipped model, no training", "kind": "training-free", "epochs": "-",
             "top1": evaluate(merged, torch.utils.data.DataLoader(test, 500), torch.device("cpu")),
             "MACs_ratio": measure.macs(merged, size) / base_macs}]
    for name in RUNS:
        history, done = run_state(name)
        if not history:
            continue
        cfg = run_config(name, None)
        if done:
            inference_macs = done["inference_macs"]
        else:  # the method's inference model, random weights: its MACs
            cfg.pretrained = False
            method = build_method(cfg)
            inference_macs = measure.macs(method.attach(method.create_model(cfg)).eval(), size)
        last = [r for r in history if "top1" in r][-1]
        rows.append({"run": name, "kind": "scratch" if name in SCRATCH else "fine-tune",
                     "epochs": f"{len(history)}/{cfg.epochs}" + ("" if done else " (running)"),
                     "top1": last["top1"], "top1_ema": last.get("top1_ema"),
                     "MACs_ratio": inference_macs / base_macs,
                     "train_MACs_ratio": statistics.fmean(r["train_macs"] for r in history) / base_macs,
                     "train_time_h": sum(r["train_time_s"] for r in history) / 3600})
    kinds = {}
    for r in rows:  # fine-tunes: the mean of their seeds
        if r["kind"] == "fine-tune" and r["epochs"].endswith(f"/{FINETUNE_EPOCHS}"):
            kinds.setdefault(r["run"].rsplit("_s", 1)[0], []).append(r)
    means = [{"fine-tune": k, "seeds": len(v), "top1_mean": statistics.fmean(r["top1"] for r in v),
              "top1_ema_mean": statistics.fmean(r["top1_ema"] for r in v), "MACs_ratio": v[0]["MACs_ratio"]}
             for k, v in kinds.items()]
    meta = measure.run_metadata(test_images=len(test), finetune_epochs=FINETUNE_EPOCHS, tome_r=TOME_R)
    print(write_result(Path(__file__).parent / "results" / "converge_fmnist", meta,
                       {"rows": rows, "finetune_means": means}, rows, means))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--carry", action="store_true",
                    help="copy each unfinished run's last.pth (a finished one's summary and log) into "
                         "benchmarks/results/converge and exit")
    ap.add_argument("--ship", action="store_true", help="export the finished ltm_ib run as the package's "
                    f"{FMNIST_LTM} weights (safetensors, training log, summary) and exit")
    ap.add_argument("--report", action="store_true", help="tabulate every run so far and exit")
    args = ap.parse_args()
    if args.report:
        report()
        return
    if args.carry:
        for name in args.runs:
            carry(name)
        return
    if args.ship:
        run_dir = Path(OUTPUT) / "ltm_ib"
        if not (run_dir / "summary.json").exists():
            raise SystemExit(f"ltm_ib has not finished ({run_dir / 'summary.json'} is missing): train it first")
        summary = export_weights(run_dir / "last.pth", weights_path(FMNIST_LTM), FMNIST_LTM,
                                 "python benchmarks/converge_fmnist.py --runs ltm_ib")
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
        return
    for name in args.runs:
        summary = train_run(name, args.threads)
        print(name, {k: summary.get(k) for k in ("top1", "top1_ema", "train_time_s", "macs_ratio")}, flush=True)


if __name__ == "__main__":
    main()
