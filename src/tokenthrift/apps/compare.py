"""``tokenthrift compare``: every method on one harness, against ToMe at equal MACs.

One full-token model (a checkpoint, or a timm model with shipped pretrained weights) and, optionally,
checkpoints of runs trained on the same data (``--runs``), each of which adds the rows its method owns
(``Method.comparison_rows``): a ReViT its grids, an assigner the adaptive ReViT + TLA (with the ReViT among
the runs), LTM its merged model, ToE its model alone and with ToMe, a full-token run (e.g. the one with
ToE's training budget) its model. Rows: the full model; ToMe off the shelf at several r; the runs' rows;
ToMe at the MACs of every row that saves MACs at inference (the r whose MACs come closest). Every row: top-1 on the same
evaluation images, MACs per image from :func:`tokenthrift.measure.macs` (matching and assigner included),
and measured speed at batch 1 (median latency) and at batch 64 (images/s), each timed against the full model
in alternating rounds on the same real images. LTM + ToMe is not offered: LTM's blocks merge themselves,
and ToMe runs timm's plain blocks only.

Writes ``compare.json``, ``compare.md`` and ``compare.png`` (top-1 against MACs and against measured
throughput, Pareto fronts drawn) into the output folder.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import measure, tome, viz
from ..data import Preprocess, build_dataset, model_classes, model_preprocess
from ..errors import InvalidArgumentError
from ..hosts import host_of
from ..train import TrainConfig, data_shape, evaluate, load_trained, model_input_size, run_preprocess
from ..train.engine import load_run
from ..train.methods import inference_method
from ..train.protocol import CompareContext, Variant, comparison_row
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


def tome_r_for(model: nn.Module, size: tuple[int, ...], target_macs: float, max_r: int) -> tuple[int, float]:
    """The uniform ToMe r whose MACs come closest to ``target_macs``, and those MACs (MACs fall as r grows:
    bisection, then the better of the two neighbours)."""
    cache: dict[int, float] = {}

    def macs_at(r: int) -> float:
        if r not in cache:
            cache[r] = measure.macs(tome.merging_copy(model, r), size)
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


def compare(full: str, output: str | Path, runs: Sequence[str | Path] = (), *, tome_r: tuple[int, ...] = (2, 4, 8),
            data: str | None = None, eval_subset: int | None = None, batch_sizes: tuple[int, int] = (1, 64),
            repeats: int = 5, data_dir: str | None = None, compile: bool = False, progress: bool = False) -> dict:
    """Build every row, evaluate, time, and write compare.{json,md,png} into ``output``. ``runs``: checkpoints
    of trained runs on the same data, each adding its method's rows. ``compile``: also time every row (and
    every oracle) through ``torch.compile``, against the full model compiled. ``progress``: a line on stderr as each
    stage starts. Returns the result."""
    say = (lambda text: print(f"compare: {text}", file=sys.stderr, flush=True)) if progress else (lambda text: None)
    base, data, subset, pre = _load_full(full, data)
    eval_subset = eval_subset if eval_subset is not None else subset
    size = model_input_size(base, TrainConfig(model="-", data=data))
    c, side, frames = data_shape(size)
    classes = model_classes(base)
    ds, _ = build_dataset(data, False, side, c, data_dir, subset=eval_subset, frames=frames, preprocess=pre,
                          classes=classes)
    loader = DataLoader(ds, 256)
    images = next(iter(DataLoader(ds, max(batch_sizes))))[0]
    depth = len(base.blocks)
    max_r = tome.largest_r(base.patch_embed.num_patches + base.num_prefix_tokens, base.num_prefix_tokens, depth)

    def top1_of(model: nn.Module, **kw) -> float:
        return evaluate(model, loader, torch.device("cpu"), **kw)

    loaded = []
    for path in runs:
        model, cfg, trained = load_run(path)
        own = model_classes(model)
        if trained.data_classes and own and classes and own != classes:  # scored on the full model's labels
            raise InvalidArgumentError(f"--runs {path} predicts the classes {list(own)[:6]}, --full {full} "
                                       f"{list(classes)[:6]}: compare runs trained on the same data")
        loaded.append((model, cfg, inference_method(cfg, model, trained)))
    ctx = CompareContext(top1=top1_of, loader=loader, input_size=size, tome_r=tuple(tome_r), runs=loaded)
    say(f"the full model and ToMe r={', '.join(map(str, tome_r))} on {len(ds)} evaluation images")
    full_tokens = Variant("full tokens", base, measure.macs(base, size))
    rows = [comparison_row("full tokens", "full", full_tokens, top1_of(base), match_tome=False)]
    for r in tome_r:
        m = tome.merging_copy(base, r)
        v = Variant(f"ToMe r={r} (off the shelf)", m, measure.macs(m, size),
                    oracle=measure.TokenCutOracle.of(base, m, size, host_of(base)))
        rows.append(comparison_row(v.label, "tome", v, top1_of(m), match_tome=False, r=r))
    run_rows = []
    for path, (model, cfg, method) in zip(runs, loaded):  # every method adds its own rows
        say(f"{path}: the rows of its --method {method.name}")
        # a run whose model infers as the plain one (full tokens, ToE) differs by its training: plotted apart
        panel = "training" if method.plain_inference else "inference"
        run_rows += [({**r, "panel": panel}, Path(path).parent.name) for r in method.comparison_rows(model, cfg, ctx)]
    labels = Counter(r["model"] for r, _ in run_rows)
    for r, run in run_rows:  # two runs of one method (LTM from scratch and fine-tuned): each row names its run folder
        rows.append({**r, "model": f"{r['model']}, run {run}"} if labels[r["model"]] > 1 else r)
    targets = [(r["model"], r["MMACs"] * 1e6, r["top1"]) for r in rows if r["match_tome"]]
    verdicts = []
    for name, macs, top1 in targets:
        say(f"ToMe at the MACs of {name}")
        r, tome_macs = tome_r_for(base, size, macs, max_r)
        m = tome.merging_copy(base, r)
        v = Variant(f"ToMe r={r} (at {name}'s MACs)", m, tome_macs,
                    oracle=measure.TokenCutOracle.of(base, m, size, host_of(base)))
        rows.append(comparison_row(v.label, "tome", v, top1_of(m), match_tome=False, r=r))
        verdicts.append({"method": name, "MMACs": macs / 1e6, "top1": top1, "ToMe_r": r, "ToMe_MMACs": tome_macs / 1e6,
                         "ToMe_top1": rows[-1]["top1"], "delta_top1": top1 - rows[-1]["top1"],
                         "beats_ToMe": "yes" if top1 > rows[-1]["top1"] else "no"})
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
        del r["net"], r["match_tome"]
    meta = measure.run_metadata(device="cpu", dtype="fp32", data=data, eval_images=len(ds),
                                batch_sizes=list(batch_sizes), repeats=repeats, full=full, depth=depth,
                                compiled=compile)
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
