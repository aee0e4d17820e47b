"""The main job (``make demo``): every method on a Fashion-MNIST ViT, the way practitioners use it.

- **ToE is a training method**, so it runs as a race from scratch: the tiny ViT trained with full tokens
  and with ToE for the same epochs on the same images; top-1 at equal epochs and at equal wall-clock, and
  the curve. A few epochs on a subset are a race, not a converged model: its top-1 is that of a short run.
- **ReViT + TLA and LTM are applied to a converged model**: the shipped pretrained ViT
  (``vit_fmnist_tiny_patch2_28``, full tokens, 30 epochs on all 60k images) is fine-tuned into a ReViT
  (then labelled, and an assigner trained) and into an LTM model; they are compared with the pretrained
  model itself on top-1, MACs and measured inference speed.

One closing table puts every method against its full-token counterpart (top-1, MACs ratio, measured
speed-up, efficiency), and one figure shows the race and the accuracy-against-MACs of the inference
methods. ``tokenthrift demo`` (:func:`run`) runs it and prints the tables.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import measure
from ..data import build_dataset
from ..pretrained import FMNIST_VIT
from ..train import TrainConfig, Trainer, build_model, evaluate, load_recipe, load_trained, train
from . import report
from .bench import compare_rows, timing_note
from .labels import adaptive_report, label_split

FINETUNE = dict(lr_base=0.002, warmup_epochs=0, min_lr=1e-5)  # a quarter of the pretraining peak (0.008), no warm-up


def equal_time_top1(history: list[dict], seconds: float) -> float | None:
    """Top-1 of a run after ``seconds`` of training, linear between its evaluated epochs (None before the
    first evaluation)."""
    points = [(r["elapsed_train_s"], r["top1"]) for r in history if "top1" in r]
    if not points or seconds < points[0][0]:
        return None
    for (t0, a0), (t1, a1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return a0 + (a1 - a0) * (seconds - t0) / (t1 - t0)
    return points[-1][1]


def stage(text: str) -> None:
    """One line as each stage of the demo starts (also with --quiet: minutes must not pass in silence)."""
    print(f"demo: {text}", flush=True)


def toe_race(common: dict, epochs: int) -> tuple[dict[str, dict], list[dict]]:
    """Full tokens against ToE, from scratch, the same epochs; the DeiT stages spread over the run. Adds the
    full-token run's top-1 at the wall-clock ToE took (interpolated between its evaluated epochs)."""
    verbose = common["progress"]  # --quiet: the stage lines only
    trainers = {"full tokens": Trainer(TrainConfig(**common, method="full", name="race_full"), verbose=verbose),
                "ToE": Trainer(TrainConfig(**common, method="toe", name="race_toe"), verbose=verbose)}
    results: dict[str, dict] = {}
    for epoch in range(1, epochs + 1):  # epochs alternate, so load from other work hits both runs alike
        for label, trainer in trainers.items():
            stage(f"ToE race, {label}, epoch {epoch}/{epochs} ({common['train_subset']} images)")
            results[label] = trainer.fit(stop_after=epoch)
    rows = compare_rows(results)
    at_toe_time = equal_time_top1(results["full tokens"]["history"], results["ToE"]["train_time_s"])
    rows.append({"run": "full tokens, at ToE's wall-clock", "top1": "-" if at_toe_time is None else at_toe_time,
                 "train_s": results["ToE"]["train_time_s"]})
    return results, rows


def run_demo(epochs: int = 3, finetune_epochs: int = 1, train_subset: int = 7000, eval_subset: int | None = 5000,
             output: str = "runs/demo", seed: int = 0, progress: bool = True, data_dir: str | None = None,
             adaptive: bool = True, merging: bool = True) -> dict:
    """Run the demo; returns {"race": rows, "inference": rows, "summary": rows, "plot": path}."""
    out = Path(output)
    common = dict(load_recipe("fmnist_vit_tiny"), epochs=epochs, train_subset=train_subset, eval_subset=eval_subset,
                  output=output, seed=seed, progress=progress, data_dir=data_dir, warmup_epochs=min(1, epochs - 1),
                  overwrite=True)  # the demo's folder is its own: a second demo replaces the first
    race, race_rows = toe_race(common, epochs)

    # the converged full-token model, and fine-tuning from it
    tune = dict(common, model=FMNIST_VIT, pretrained=True, epochs=finetune_epochs, eval_every=finetune_epochs,
                **FINETUNE)
    for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):  # the model's own
        tune.pop(key)
    stage(f"the pretrained {FMNIST_VIT} on {eval_subset or 'all'} test images")
    base = build_model(TrainConfig(**tune)).eval()
    size = (1, 28, 28)
    eval_ds, _ = build_dataset("fashion-mnist", False, 28, 1, data_dir, subset=eval_subset, seed=seed)
    loader = torch.utils.data.DataLoader(eval_ds, 256)
    full_top1 = evaluate(base, loader, torch.device("cpu"))
    inference = [{"model": f"pretrained ViT ({FMNIST_VIT}), all 196 tokens", "top1": full_top1,
                  "MMACs": measure.macs(base, size) / 1e6, "net": base}]
    if adaptive:
        inference += _revit_tla(tune, out, len(eval_ds))
    if merging:
        inference += _ltm(tune)
    stage(f"timing {len(inference)} models against the pretrained ViT (batch 256, 5 alternating rounds)")
    _time_inference(inference, loader)
    for row in inference:
        row.pop("net")
    from .. import viz

    plot = viz.plot_demo({k: v["history"] for k, v in race.items()}, inference, out / "demo.png",
                         title=f"Fashion-MNIST tiny ViT ({train_subset} training images)")
    return {"race": race_rows, "inference": inference, "summary": summary_rows(race_rows, inference), "plot": plot}


def _revit_tla(tune: dict, out: Path, eval_images: int) -> list[dict]:
    """Fine-tune the pretrained ViT into a ReViT (every grid each step, TAL-LN, TLSD), label both splits,
    train the assigner (test_byobnet: cheap in time at 14 px, not only in MACs) and evaluate adaptively: the fixed
    grids, TLA and the confidence cascades, calibrated on as many training images the ReViT never saw as there
    are evaluation images (at most 5000)."""
    verbose = tune["progress"]
    stage(f"fine-tuning the pretrained ViT into a ReViT, grids 14/10/7 ({tune['epochs']} epoch)")
    train(TrainConfig(**tune, method="revit", name="revit"), verbose=verbose)
    stage("token-length labels of the training and test images")
    for split in ("train", "eval"):
        label_split(out / "revit" / "last.pth", split, out / f"labels_{split}.pt")
    stage("training the token-length assigner (2 epochs)")
    assigner_cfg = dict(tune, pretrained=False, epochs=2, eval_every=2, lr_base=0.008)  # a fresh CNN
    train(TrainConfig(**assigner_cfg, method="tla", name="tla", tla_labels=str(out / "labels_train.pt"),
                      tla_eval_labels=str(out / "labels_eval.pt"), tla_balanced=True, tla_model="test_byobnet"),
          verbose=verbose)
    stage("adaptive evaluation: the fixed grids, TLA, and the cascades calibrated on held-out training images")
    nets: dict = {}
    rows = adaptive_report(out / "revit" / "last.pth", out / "tla" / "last.pth", kinds=("max_prob",), models=nets,
                           throughput_batch=0, calibration_images=min(5000, eval_images))  # timed below, with every model; calibrated on unseen training images
    rules = {r["rule"]: r for r in rows}
    argmax = rules["argmax"]
    grids = load_trained(out / "revit" / "last.pth")[0].grids
    shares = "/".join(f"{argmax[f'share_g{g}']:.2f}" for g in grids)
    picked = [(f"ReViT at {g}x{g} (fine-tuned)" if k == 0 else f"ReViT at {g}x{g}", rules[f"always {g}x{g}"])
              for k, g in enumerate(grids)]
    picked.append((f"ReViT + TLA, adaptive (grid shares {shares})", argmax))
    for r in rows:  # the confidence cascades, thresholds calibrated to each budget on held-out training images
        if r["family"] in ("cascade", "TLA + cascade") and "top1" in r:
            picked.append((f"ReViT, {r['family']} (max prob, budget {r['rule'].rsplit(' ', 1)[1]})", r))
        elif "note" in r:  # e.g. an assigner that starts too many images at large grids for this budget
            print(f"{r['rule']}: not shown: {r['note']}")
    return [{"model": label, "top1": r["top1"], "MMACs": r["MMACs_total"], "net": nets[r["rule"]]}
            for label, r in picked]


def _ltm(tune: dict) -> list[dict]:
    """Fine-tune the pretrained ViT with learnable token merging (the fmnist_vit_tiny_ltm recipe's ratios,
    0.85 of the MACs; CE + IB)."""
    recipe = load_recipe("fmnist_vit_tiny_ltm")
    stage(f"fine-tuning the pretrained ViT with learned token merging ({tune['epochs']} epoch)")
    run = train(TrainConfig(**tune, method="ltm", name="ltm", **{k: v for k, v in recipe.items()
                                                                  if k.startswith("ltm_")}), verbose=tune["progress"])
    merged, _ = load_trained(Path(run["run_dir"]) / "last.pth")
    return [{"model": "LTM ViT, learned merging (fine-tuned)", "top1": run["top1"],
             "MMACs": measure.macs(merged, (1, 28, 28)) / 1e6, "net": merged}]


def _time_inference(rows: list[dict], loader, batch: int = 256, repeats: int = 5) -> None:
    """Inference images/s of every row's model (``net``, in eval mode) against the first (the pretrained
    ViT), in alternating rounds on the same real batch; adds speedup, MACs_ratio and efficiency."""
    images = next(iter(loader))[0][:batch]
    speeds = measure.paired_throughput([measure.OnImages(r["net"], images) for r in rows], tuple(images.shape[1:]),
                                       len(images), repeats=repeats)
    for r, ips in zip(rows, speeds):
        r.update(img_s=ips, speedup=ips / speeds[0], MACs_ratio=r["MMACs"] / rows[0]["MMACs"])
        r["efficiency"] = r["speedup"] * r["MACs_ratio"]


def summary_rows(race_rows: list[dict], inference: list[dict]) -> list[dict]:
    """Every method against its full-token counterpart, in one table."""
    full, toe = race_rows[0], race_rows[1]
    rows = [{"method": "ToE (training, from scratch)", "against": "full-token training, same epochs",
             "top1": toe["top1"], "top1_full": full["top1"], "MACs_ratio": toe["MACs_ratio"],
             "speedup": toe["speedup"], "efficiency": toe["efficiency"], "timing": toe["timing"]}]
    base = inference[0]
    for r in inference[1:]:
        rows.append({"method": r["model"], "against": "the pretrained ViT (inference)", "top1": r["top1"],
                     "top1_full": base["top1"], "MACs_ratio": r["MACs_ratio"], "speedup": r["speedup"],
                     "efficiency": r["efficiency"], "timing": timing_note(r["efficiency"])})
    return rows


def main(**kwargs) -> None:
    result = run_demo(**kwargs)
    print(f"\nToE, a training race from scratch ({kwargs.get('epochs', 3)} epochs each on the same images: a short "
          "run, not a converged model; speed-up = training wall-clock ratio; the last row is the full-token "
          "run's top-1 interpolated at the moment ToE finished)")
    print(report.table(result["race"]))
    print("\nInference: methods applied to the pretrained ViT (batch 256, measured in alternating rounds; "
          "ReViT + TLA MACs include the assigner)")
    print(report.table([{k: v for k, v in r.items() if k != "img_s"} for r in result["inference"]]))
    print("\nEvery method against its full-token counterpart (efficiency = speed-up x MACs ratio; 1.0: every MAC "
          "saved became time saved)")
    print(report.table(result["summary"]))
    print(f"\nplot: {result['plot']}")


HELP = ("the main job: a Fashion-MNIST ViT: ToE training race, ReViT + TLA and LTM fine-tuned from the shipped "
        "pretrained model, one table against the full model")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=3, help="epochs of the ToE race (each run, from scratch)")
    p.add_argument("--finetune-epochs", type=int, default=1,
                   help="epochs of the ReViT and LTM fine-tuning from the pretrained ViT")
    p.add_argument("--train-subset", type=int, default=7000, help="training images (a fixed random subset)")
    p.add_argument("--eval-subset", type=int, default=5000, help="test images (a fixed random subset)")
    p.add_argument("--output", default="runs/demo", help="folder for the runs, tables and plot")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: Debian's package location)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-adaptive", action="store_true", help="skip the ReViT + TLA part")
    p.add_argument("--no-ltm", action="store_true", help="skip the LTM part")


def run(args: argparse.Namespace) -> None:
    from ..train.checkpoint import check_writable

    check_writable(args.output, "--output")
    main(epochs=args.epochs, finetune_epochs=args.finetune_epochs, train_subset=args.train_subset,
         eval_subset=args.eval_subset, output=args.output, seed=args.seed, progress=not args.quiet,
         data_dir=args.data_dir, adaptive=not args.no_adaptive, merging=not args.no_ltm)
