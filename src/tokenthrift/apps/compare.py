"""``tokenthrift compare``: every method on one harness, against ToMe at equal MACs.

One full-token model (a checkpoint, or a timm model with shipped pretrained weights) and, optionally,
checkpoints of the trained methods on the same data: ToE (its inference is the full model's; with the
full-token run of the same budget as its baseline), ReViT (+ the TLA assigner), LTM. Rows: the full model;
ToMe off the shelf at several r; ToMe at each trained method's MACs (the r whose MACs come closest);
ReViT per grid and adaptive; LTM; the ToE-trained model, alone and with ToMe. Every row: top-1 on the same
evaluation images, MACs per image from :func:`tokenthrift.measure.macs` (matching and assigner included),
and measured speed at batch 1 (median latency) and at batch 64 (images/s), each timed against the full model
in alternating rounds on the same real images. LTM + ToMe is not offered: LTM's blocks merge themselves,
and ToMe patches timm's plain Block only.

Writes ``compare.json``, ``compare.md`` and ``compare.png`` (top-1 against MACs and against measured
throughput, Pareto fronts drawn) into the output folder.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import measure, tome
from ..data import Preprocess, build_dataset, model_preprocess
from ..errors import InvalidArgumentError
from ..revit import AdaptiveViT
from ..train import TrainConfig, data_shape, evaluate, load_trained, model_input_size, run_preprocess
from . import report, viz
from .bench import OnImages, paired_throughput
from .labels import adaptive_report


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


def with_tome(model: nn.Module, r: int) -> nn.Module:
    """A copy of ``model`` with ToMe applied at ``r`` (the model itself stays plain)."""
    merged = copy.deepcopy(model)
    tome.apply(merged, r)
    return merged


def tome_r_for(model: nn.Module, size: tuple[int, ...], target_macs: float, max_r: int) -> tuple[int, float]:
    """The uniform ToMe r whose MACs come closest to ``target_macs``, and those MACs (MACs fall as r grows:
    bisection, then the better of the two neighbours)."""
    cache: dict[int, float] = {}

    def macs_at(r: int) -> float:
        if r not in cache:
            candidate = with_tome(model, r)
            cache[r] = measure.macs(candidate, size)
        return cache[r]

    lo, hi = 0, max_r  # macs_at(lo) >= target, as far as known
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if macs_at(mid) >= target_macs:
            lo = mid
        else:
            hi = mid
    r = min((lo, hi), key=lambda q: abs(macs_at(q) - target_macs))
    return r, macs_at(r)


def compare(full: str, output: str | Path, *, toe: str | None = None, toe_baseline: str | None = None,
            revit: str | None = None, tla: str | None = None, ltm: str | None = None,
            tome_r: tuple[int, ...] = (2, 4, 8), data: str | None = None, eval_subset: int | None = None,
            batch_sizes: tuple[int, int] = (1, 64), repeats: int = 5, data_dir: str | None = None) -> dict:
    """Build every row, evaluate, time, and write compare.{json,md,png} into ``output``. Returns the result."""
    if tla and not revit:
        raise InvalidArgumentError("--tla is the assigner of a ReViT: give --revit too")
    base, data, subset, pre = _load_full(full, data)
    eval_subset = eval_subset if eval_subset is not None else subset
    size = model_input_size(base, TrainConfig(model="-", data=data))
    c, side, frames = data_shape(size)
    ds, _ = build_dataset(data, False, side, c, data_dir, subset=eval_subset, frames=frames, preprocess=pre)
    loader = DataLoader(ds, 256)
    images = next(iter(DataLoader(ds, max(batch_sizes))))[0]
    depth = len(base.blocks)
    max_r = (base.patch_embed.num_patches // 2)  # more than any block can merge: capped inside
    rows: list[dict] = []

    def add(name: str, kind: str, net: Callable, top1: float, macs: float, **extra) -> None:
        rows.append({"model": name, "kind": kind, "top1": top1, "MMACs": macs / 1e6, "net": net, **extra})

    def top1_of(model: nn.Module, **kw) -> float:
        return evaluate(model, loader, torch.device("cpu"), **kw)

    add("full tokens", "full", base, top1_of(base), measure.macs(base, size))
    for r in tome_r:
        m = with_tome(base, r)
        add(f"ToMe r={r} (off the shelf)", "tome", m, top1_of(m), measure.macs(m, size), r=r)
    targets: list[tuple[str, float, float]] = []  # (method row, its MACs, its top-1) to match with ToMe
    if revit:
        rv, _ = load_trained(revit)
        for g in rv.grids:
            macs = measure.macs(rv, size, grid=g)
            add(f"ReViT {g}x{g}", "revit", lambda x, g=g: rv(x, grid=g), top1_of(rv, grid=g), macs)
            if g != rv.grids[0]:
                targets.append((rows[-1]["model"], macs, rows[-1]["top1"]))
        if tla:
            rule = next(r for r in adaptive_report(revit, tla, throughput_batch=0) if r["rule"] == "argmax")
            assigner, _ = load_trained(tla)
            add("ReViT + TLA, adaptive", "revit", AdaptiveViT(rv, assigner).eval(), rule["top1"],
                rule["MMACs_total"] * 1e6)
            targets.append((rows[-1]["model"], rule["MMACs_total"] * 1e6, rule["top1"]))
    if ltm:
        merged, _ = load_trained(ltm)
        macs = measure.macs(merged, size)
        add("LTM", "ltm", merged, top1_of(merged), macs)
        targets.append(("LTM", macs, rows[-1]["top1"]))
    if toe:
        toe_model, _ = load_trained(toe)
        add("ToE-trained (inference = full)", "toe", toe_model, top1_of(toe_model), measure.macs(toe_model, size))
        if toe_baseline:
            same_budget, _ = load_trained(toe_baseline)
            add("full tokens, ToE's training budget", "toe", same_budget, top1_of(same_budget),
                measure.macs(same_budget, size))
        for r in tome_r:
            m = with_tome(toe_model, r)
            add(f"ToE-trained + ToMe r={r}", "toe", m, top1_of(m), measure.macs(m, size), r=r)
    verdicts = []
    for name, macs, top1 in targets:
        r, tome_macs = tome_r_for(base, size, macs, max_r)
        m = with_tome(base, r)
        add(f"ToMe r={r} (at {name}'s MACs)", "tome", m, top1_of(m), tome_macs, r=r)
        verdicts.append({"method": name, "MMACs": macs / 1e6, "top1": top1, "ToMe_r": r, "ToMe_MMACs": tome_macs / 1e6,
                         "ToMe_top1": rows[-1]["top1"], "delta_top1": top1 - rows[-1]["top1"],
                         "beats_ToMe": "yes" if top1 > rows[-1]["top1"] else "no"})
    # speed: every row against the full model, alternating rounds, the same real images
    for batch in batch_sizes:
        speeds = paired_throughput([OnImages(r["net"], images[:batch]) for r in rows], size, batch, repeats=repeats)
        for r, ips in zip(rows, speeds):
            if batch == 1:
                r["latency_ms"] = 1000.0 / ips
            else:
                r[f"img_s_b{batch}"] = ips
                r[f"speedup_b{batch}"] = ips / speeds[0]
    for r in rows:
        r["MACs_ratio"] = r["MMACs"] / rows[0]["MMACs"]
        del r["net"]
    meta = measure.run_metadata(device="cpu", dtype="fp32", data=data, eval_images=len(ds),
                                batch_sizes=list(batch_sizes), repeats=repeats, full=full, depth=depth)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "rows": rows, "verdicts": verdicts}
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    md = (f"{json.dumps(meta)}\n\n{report.table(rows, markdown=True)}\n\n**Against ToMe at equal MACs**\n\n"
          f"{report.table(verdicts, markdown=True)}\n")
    (out / "compare.md").write_text(md)
    result["plot"] = viz.plot_compare(rows, out / "compare.png", speed_key=f"img_s_b{batch_sizes[-1]}",
                                      title=f"{full} on {data}: every method, one harness")
    return result
