"""The rows every entry point shows, built from a method's variants (:class:`~tokenthrift.train.protocol.Variant`):
``eval``'s top-1 and MACs, ``macs``' MACs and parameters, ``bench``'s measured speed. A variant is measured
against its baseline (the same model without the method; by default the first variant of its list), so every
method gets the same columns and no entry point knows a method."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import measure
from ..train.protocol import EvalContext, Variant


def baseline_macs(v: Variant, variants: Sequence[Variant], input_size: tuple[int, ...]) -> float:
    """The MACs a variant is measured against: its baseline's (as given, or counted), else the first variant's."""
    if v.baseline_macs is not None:
        return v.baseline_macs
    if v.baseline is not None:
        return measure.macs(v.baseline, input_size, train=v.train)
    return variants[0].macs


def with_baselines(variants: Sequence[Variant], input_size: tuple[int, ...]) -> list[Variant]:
    """``variants`` with a row for each baseline that is not itself one of them (the plain model a merging
    variant is measured against), placed before the first variant measured against it."""
    out: list[Variant] = []
    shown = {id(v.model) for v in variants}
    for v in variants:
        if v.baseline is not None and id(v.baseline) not in shown:
            shown.add(id(v.baseline))
            macs = v.baseline_macs if v.baseline_macs is not None else measure.macs(v.baseline, input_size,
                                                                                    train=v.train)
            out.append(Variant("without the method", v.baseline, macs, match=False, train=v.train))
        out.append(v)
    return out


def _params(model: nn.Module | None) -> float | str:
    return sum(p.numel() for p in model.parameters()) / 1e6 if model is not None else "-"


def macs_rows(variants: Sequence[Variant], input_size: tuple[int, ...], detector: bool = False) -> list[dict]:
    """MACs per image (training forward for a training variant), parameters and the MACs ratio to the baseline,
    the baseline's own row included; a detector's variants count its backbone (``backbone_GMACs``), and the
    whole detector's MACs and their ratio are added."""
    variants = with_baselines(variants, input_size)
    rows = []
    for v in variants:
        ratio = v.macs / baseline_macs(v, variants, input_size)
        row = {"model": v.label, **v.columns, "input": "x".join(map(str, input_size)), "GMACs": v.macs / 1e9,
               "params_M": _params(v.model), "MACs_ratio": ratio}
        if detector and v.model is not None:
            row = {"model": v.label, **v.columns, "input": row["input"], "backbone_GMACs": v.macs / 1e9,
                   "backbone_ratio": ratio, "detector_GMACs": measure.macs(v.model, input_size) / 1e9,
                   "params_M": row["params_M"]}
        rows.append(row)
    if detector and rows and "detector_GMACs" in rows[0]:
        for row in rows:
            if "detector_GMACs" in row:
                row["detector_ratio"] = row["detector_GMACs"] / rows[0]["detector_GMACs"]
    return rows


def evaluation_rows(variants: Sequence[Variant], input_size: tuple[int, ...], ctx: EvalContext) -> list[dict]:
    """Top-1 on the evaluation images (or the variant's own score) and MACs, with the ratio to the baseline."""
    rows = []
    for v in variants:
        scored = v.score(ctx) if v.score is not None else {"images": ctx.images, "top1": ctx.top1(v.model, **v.kwargs)}
        row = {"variant": v.label, **v.columns, **scored}
        row.setdefault("GMACs", v.macs / 1e9)
        if v.baseline is not None:
            row["baseline_GMACs"] = baseline_macs(v, variants, input_size) / 1e9
        if len(variants) > 1 or v.baseline is not None:
            row["MACs_ratio"] = v.macs / baseline_macs(v, variants, input_size)
        rows.append(row)
    return rows


def bench_rows(variants: Sequence[Variant], input_size: tuple[int, ...], batch_size: int, warmup: int = 2,
               repeats: int = 5, dtype: torch.dtype | None = None, compile: bool = False) -> list[dict]:
    """Every variant with a model, its baseline and its same-shape oracle timed in alternating rounds (eager or
    compiled alike; a training variant as a training step), with the speed-up and MACs ratio to its baseline,
    the efficiency (speed-up x MACs ratio), the ``saving_share`` (time saved / MACs saved) and, with an oracle,
    the ``overhead_share`` (1 - oracle time / variant time: the share spent on the method's bookkeeping)."""
    variants = with_baselines(variants, input_size)
    timed = [v for v in variants if v.model is not None]
    train = any(v.train for v in timed)
    nets: list[nn.Module] = []

    def slot(model: nn.Module) -> int:
        for k, n in enumerate(nets):
            if n is model:
                return k
        nets.append(model)
        return len(nets) - 1

    forwards = {id(v): v.forward_model() for v in timed}
    own = [slot(forwards[id(v)]) for v in timed]
    base = [slot(v.baseline) if v.baseline is not None else own[0] for v in timed]
    oracle = [slot(v.oracle) if v.oracle is not None else None for v in timed]
    ips = measure.paired_throughput(nets, input_size, batch_size, train=train, warmup=warmup, repeats=repeats,
                                    dtype=dtype, compile=compile)
    rows = []
    for v, k, b, o in zip(timed, own, base, oracle):
        ratio = v.macs / baseline_macs(v, variants, input_size)
        speedup = ips[k] / ips[b]
        row = {"model": v.label, **v.columns, "mode": "compiled" if compile else "eager", "batch": batch_size,
               "GMACs": v.macs / 1e9, "img_s": ips[k], "speedup": speedup, "MACs_ratio": ratio,
               "efficiency": speedup * ratio}
        if k != b and ratio < 1:
            row["saving_share"] = (1 - ips[b] / ips[k]) / (1 - ratio)
        if o is not None:
            row["overhead_share"] = 1 - ips[k] / ips[o]
        rows.append(row)
        if o is not None:  # what the same token counts cost without the method's bookkeeping
            oracle_macs = measure.macs(v.oracle, input_size)
            rows.append({"model": f"{v.label}: oracle (tokens cut)", "mode": row["mode"], "batch": batch_size,
                         "GMACs": oracle_macs / 1e9, "img_s": ips[o], "speedup": ips[o] / ips[b],
                         "MACs_ratio": oracle_macs / baseline_macs(v, variants, input_size),
                         "efficiency": ips[o] / ips[b] * oracle_macs / baseline_macs(v, variants, input_size)})
    return rows
