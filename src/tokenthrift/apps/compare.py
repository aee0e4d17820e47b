"""``tokenthrift compare``: every method on one harness, against the reference method at equal MACs.

One full-token model (a checkpoint, or a timm model with shipped pretrained weights) and, optionally,
checkpoints of runs trained on the same data (``--runs``). Rows: the full model; every method that applies
off the shelf (``Method.off_the_shelf``: ToMe at several r, ...) on it; each run's variants
(``Method.variants`` and ``Method.harness_variants``: a ReViT its grids and cascades, an assigner the adaptive
ReViT + TLA with the ReViT among the runs, a merging model itself), and for a run whose model infers as the
plain one (full tokens, ToE) its model with every off-the-shelf method; then the reference method
(``Method.reference``, ToMe) at the MACs of every variant that saves MACs at inference (``Method.matched``:
the setting whose MACs come closest). Every row: top-1 on the same evaluation images, MACs per image from
:func:`tokenthrift.measure.macs` (matching and assigner included), and measured speed at batch 1 (median
latency) and at batch 64 (images/s), each timed against the full model in alternating rounds on the same real
images.

Writes ``compare.json``, ``compare.md`` and ``compare.png`` (top-1 against MACs and against measured
throughput, Pareto fronts drawn) into the output folder; ``tokenthrift compare`` (:func:`run`) prints the tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import measure
from ..data import Preprocess, build_dataset, model_classes, model_preprocess
from ..errors import InvalidArgumentError, TokenthriftWarning, UnsupportedModelError
from ..train import TrainConfig, data_shape, evaluate, load_trained, model_input_size, run_preprocess
from ..train.engine import load_run
from ..train.methods import METHODS, inference_method
from ..train.protocol import HarnessContext, Variant
from . import report


def _load_full(spec: str, data: str | None) -> tuple[nn.Module, str, int | None, Preprocess]:
    """A checkpoint path, or a timm model name whose pretrained weights are on this machine; with the data,
    subset and normalisation it was trained with (a pretrained model's: its cfg's)."""
    if Path(spec).is_file():
        model, cfg = load_trained(spec)
        return model, cfg.data, cfg.eval_subset, run_preprocess(cfg)
    if timm.is_model(spec):
        if data is None:
            raise InvalidArgumentError(f"--full {spec} is a model name: give --data (the data it was trained on)")
        model = timm.create_model(spec, pretrained=True).eval()
        return model, data, None, model_preprocess(model)
    raise InvalidArgumentError(f"--full {spec} is neither a checkpoint file nor a timm model name")


def _row(v: Variant, kind: str, top1: float, **extra) -> dict:
    """One row: label, method, top-1, MACs, the variant to time and whether the reference is matched to it."""
    return {"model": v.label, "kind": kind, "top1": top1, "MMACs": v.macs / 1e6, **v.columns, "net": v,
            "match": v.match, **extra}


def reference_method():
    """The adapter compare matches every other method to at equal MACs (``Method.reference``)."""
    return next(a for a in METHODS.values() if a.reference)()


def compare(full: str, output: str | Path, runs: Sequence[str | Path] = (), *, shelf: dict | None = None,
            data: str | None = None, eval_subset: int | None = None, batch_sizes: tuple[int, int] = (1, 64),
            repeats: int = 5, data_dir: str | None = None, compile: bool = False, progress: bool = False) -> dict:
    """Build every row, evaluate, time, and write compare.{json,md,png} into ``output``. ``runs``: checkpoints
    of trained runs on the same data, each adding its method's rows. ``shelf``: method name -> the values of its
    ``shelf_option`` to show it at off the shelf (default: every such method at its ``shelf_values``).
    ``compile``: also time every row (and every oracle) through ``torch.compile``, against the full model
    compiled. ``progress``: a line on stderr as each stage starts. Returns the result."""
    say = (lambda text: print(f"compare: {text}", file=sys.stderr, flush=True)) if progress else (lambda text: None)
    if shelf is None:
        shelf = {name: a.shelf_values for name, a in METHODS.items() if a.shelf_option}
    unknown = sorted(set(shelf) - {name for name, a in METHODS.items() if a.shelf_option})
    if unknown:
        raise InvalidArgumentError(f"{', '.join(unknown)}: not a method that applies off the shelf")
    base, data, subset, pre = _load_full(full, data)
    eval_subset = eval_subset if eval_subset is not None else subset
    size = model_input_size(base, TrainConfig(model="-", data=data))
    c, side, frames = data_shape(size)
    classes = model_classes(base)
    ds, _ = build_dataset(data, False, side, c, data_dir, subset=eval_subset, frames=frames, preprocess=pre,
                          classes=classes)
    loader = DataLoader(ds, 256)
    images = next(iter(DataLoader(ds, max(batch_sizes))))[0]

    def top1_of(model: nn.Module, **kw) -> float:
        return evaluate(model, loader, torch.device("cpu"), **kw)

    def off_the_shelf(model: nn.Module, suffix: str = "") -> list[dict]:
        out = []
        for name, values in shelf.items():
            method = METHODS[name]()
            for value in values:
                try:
                    v = method.off_the_shelf(model, size, value)
                except UnsupportedModelError as err:  # e.g. a method that needs a class token: said, not hidden
                    warnings.warn(f"compare: no {method.label} rows off the shelf{suffix}: {err}", TokenthriftWarning)
                    break
                v.label += suffix
                out.append(_row(v, name, top1_of(v.model, **v.kwargs), panel="inference"))
        return out

    loaded = []
    for path in runs:
        model, cfg, trained = load_run(path)
        own = model_classes(model)
        if trained.data_classes and own and classes and own != classes:  # scored on the full model's labels
            raise InvalidArgumentError(f"--runs {path} predicts the classes {list(own)[:6]}, --full {full} "
                                       f"{list(classes)[:6]}: compare runs trained on the same data")
        loaded.append((model, cfg, inference_method(cfg, model, trained)))
    ctx = HarnessContext(top1=top1_of, loader=loader, input_size=size, runs=loaded)
    shown = ", ".join(f"{METHODS[n].label} {METHODS[n].shelf_option}={', '.join(map(str, v))}"
                      for n, v in shelf.items() if v)
    say(f"the full model{f' and {shown} off the shelf' if shown else ''} on {len(ds)} evaluation images")
    full_tokens = Variant("full tokens", base, measure.macs(base, size), match=False)
    rows = [_row(full_tokens, "full", top1_of(base)), *off_the_shelf(base)]
    run_rows = []
    for path, (model, cfg, method) in zip(runs, loaded):  # every method adds its own rows
        say(f"{path}: the variants of its --method {method.name}")
        # a run whose model infers as the plain one (full tokens, ToE) differs by its training: plotted apart
        panel = "training" if method.plain_inference else "inference"
        variants = [v for v in method.variants(model, size) if v.score is None] + method.harness_variants(model, cfg,
                                                                                                          ctx)
        for v in variants:
            if v.label == method.label and method.plain_inference:
                v.label = f"{method.label}, run {cfg.name or cfg.model} ({cfg.epochs} epochs)"
            top1 = v.top1 if v.top1 is not None else top1_of(v.model, **v.kwargs)
            run_rows.append((_row(v, method.name, top1, panel=panel), Path(path).parent.name))
        if method.plain_inference:  # a training method's model: the off-the-shelf methods stack on it
            run_rows += [({**r, "panel": panel}, Path(path).parent.name)
                         for r in off_the_shelf(model, f", on {method.label} run {cfg.name or cfg.model}")]
    labels = Counter(r["model"] for r, _ in run_rows)
    for r, run in run_rows:  # two runs of one method (LTM from scratch and fine-tuned): each row names its run folder
        rows.append({**r, "model": f"{r['model']}, run {run}"} if labels[r["model"]] > 1 else r)
    reference = reference_method()
    targets = [(r["model"], r["MMACs"] * 1e6, r["top1"]) for r in rows if r["match"]]
    verdicts = []
    for name, macs, top1 in targets:
        say(f"{reference.label} at the MACs of {name}")
        v = reference.matched(base, size, macs)
        v.label += f" (at {name}'s MACs)"
        ref_top1 = top1_of(v.model, **v.kwargs)
        rows.append(_row(v, reference.name, ref_top1))
        ref = reference.label
        verdicts.append({"method": name, "MMACs": macs / 1e6, "top1": top1,
                         **{f"{ref}_{k}": value for k, value in v.columns.items()}, f"{ref}_MMACs": v.macs / 1e6,
                         f"{ref}_top1": ref_top1, "delta_top1": top1 - ref_top1,
                         f"beats_{ref}": "yes" if top1 > ref_top1 else "no"})
    # speed: every row (and every merging row's same-shape oracle) against the full model, alternating rounds,
    # the same real images; with compile, again with every model compiled
    with_oracle = [r for r in rows if r["net"].oracle is not None]
    nets = [r["net"] for r in rows] + [r["net"].oracle for r in with_oracle]
    for suffix in ("", "_compiled") if compile else ("",):
        for batch in batch_sizes:
            say(f"timing {len(nets)} models{' compiled' if suffix else ''} at batch {batch}, {repeats} alternating "
                "rounds")
            speeds = measure.paired_throughput([measure.OnImages(n, images[:batch]) for n in nets], size, batch,
                                               repeats=repeats, warmup=2, compile=bool(suffix))
            for r, ips in zip(rows, speeds):
                if batch == 1:
                    r[f"latency_ms{suffix}"] = 1000.0 / ips
                else:
                    r[f"img_s_b{batch}{suffix}"] = ips
                    r[f"speedup_b{batch}{suffix}"] = ips / speeds[0]
            for r, ips in zip(with_oracle, speeds[len(rows):]):  # share of the row's time spent merging
                r[f"overhead_b{batch}{suffix}"] = 1 - speeds[rows.index(r)] / ips
    for r in rows:
        r["MACs_ratio"] = r["MMACs"] / rows[0]["MMACs"]
        del r["net"], r["match"]
    meta = measure.run_metadata(device="cpu", dtype="fp32", data=data, eval_images=len(ds),
                                batch_sizes=list(batch_sizes), repeats=repeats, full=full,
                                depth=len(getattr(base, "blocks", ())), compiled=compile, reference=reference.label,
                                off_the_shelf={n: list(v) for n, v in shelf.items()})
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "rows": rows, "verdicts": verdicts}
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    md = (f"{json.dumps(meta)}\n\n{report.table(rows, markdown=True)}\n\n**Against {reference.label} at equal MACs**\n\n"
          f"{report.table(verdicts, markdown=True)}\n")
    (out / "compare.md").write_text(md)
    from .. import viz

    result["plot"] = viz.plot_compare(rows, out / "compare.png", speed_key=f"img_s_b{batch_sizes[-1]}",
                                      title=f"{full} on {data}: every method, one harness")
    return result


HELP = ("every method on one harness: top-1, MACs and measured speed of the full model, the methods off the shelf "
        "and the trained methods' checkpoints, against the reference method (ToMe) at equal MACs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Its flags; one per method that applies off the shelf (``Method.shelf_option``: the values of that option)."""
    p.add_argument("--full", required=True, help="the full-token model: a checkpoint, or a timm model name with "
                                                 "pretrained weights on this machine (e.g. vit_fmnist_tiny_patch2_28)")
    p.add_argument("--runs", nargs="+", default=[], metavar="CHECKPOINT",
                   help="checkpoints of runs on the same data; each adds its method's variants (and a run whose model "
                        "infers as the plain one, its model with every off-the-shelf method)")
    for name, adapter in METHODS.items():
        if adapter.shelf_option:
            option = next(f for f in dataclasses.fields(adapter.Options) if f.name == adapter.shelf_option)
            p.add_argument(f"--{name}-{adapter.shelf_option.replace('_', '-')}", dest=f"{name}_{adapter.shelf_option}",
                           type=type(adapter.shelf_values[0]), nargs="*", default=list(adapter.shelf_values),
                           help=f"{adapter.label} off the shelf at these values of {option.name} "
                                f"({option.metadata['help']}; none: no such rows; default: "
                                f"{' '.join(map(str, adapter.shelf_values))})")
    p.add_argument("--data", help="dataset (default: the full checkpoint's)")
    p.add_argument("--data-dir", help="dataset folder")
    p.add_argument("--eval-subset", type=int, help="evaluation images (default: the full checkpoint's)")
    p.add_argument("--batch-size", type=int, default=64, help="the throughput batch (batch 1 is always timed)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    p.add_argument("--compile", action="store_true", help="also time every row through torch.compile, against the "
                                                          "full model compiled (columns *_compiled)")
    p.add_argument("--output", default="runs/compare", help="folder for compare.json/.md/.png")


def run(args: argparse.Namespace) -> None:
    from ..train.checkpoint import check_writable

    check_writable(args.output, "--output")
    shelf = {name: tuple(getattr(args, f"{name}_{a.shelf_option}")) for name, a in METHODS.items() if a.shelf_option}
    result = compare(args.full, args.output, args.runs, shelf=shelf, data=args.data,
                     eval_subset=args.eval_subset, batch_sizes=(1, args.batch_size), repeats=args.repeats,
                     data_dir=args.data_dir, compile=args.compile, progress=True)
    meta = result["meta"]
    print(f"{meta['data']}, {meta['eval_images']} evaluation images; {meta['device']} ({meta['cpu']}, "
          f"{meta['threads']} threads), {meta['dtype']}; speed against the full model in alternating rounds")
    print(report.table(result["rows"]))
    print(f"\nEach row that saves MACs against {meta['reference']} at equal MACs (its setting chosen to match):")
    print(report.table(result["verdicts"]))
    print(f"\n-> {args.output}/compare.json, compare.md, compare.png")
