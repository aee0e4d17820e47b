"""Rows for benchmark scripts that compare two models directly: a token-reducing model against its plain model
(and its same-shape oracle), timed in alternating rounds with its MACs (:func:`merging_speed_rows`), and the
MACs of detectors, backbone and whole (:func:`detector_macs_rows`). The entry points build theirs from a
method's variants (tokenthrift.apps.variants)."""
from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
from torch import nn

from .counting import macs
from .oracle import TokenCutOracle
from .timing import paired_throughput

__all__ = ["detector_macs_rows", "merging_speed_rows"]


def merging_speed_rows(base: nn.Module, merged: nn.Module, input_size: Sequence[int], batch_size: int,
                       warmup: int = 2, repeats: int = 5, dtype: torch.dtype | None = None, compile: bool = False,
                       label: str = "merged", oracle=None) -> list[dict]:
    """Inference throughput of a token-merging model (ToMe, LTM) against its plain model, timed in alternating
    rounds, eager or compiled alike, with MACs ratio, efficiency (speed-up x MACs ratio) and ``saving_share``
    (time saved / MACs saved; 1.0: every MAC saved became time saved). ``oracle``: the base's host
    (:mod:`tokenthrift.hosts`) to also time the same-shape oracle (:class:`TokenCutOracle`) through, and the merged
    model's
    ``overhead_share`` = 1 - oracle time / merged time, the share of its time spent on merging (matching, gathers,
    unmerging)."""
    models, names = [base, merged], ["plain", label]
    if oracle:
        models.append(TokenCutOracle.of(base, merged, input_size, oracle))
        names.append("oracle (tokens cut)")
    counted = [macs(m, input_size) for m in models]
    ips = paired_throughput(models, input_size, batch_size, warmup=warmup, repeats=repeats, dtype=dtype,
                            compile=compile)
    rows = [{"model": name, "mode": "compiled" if compile else "eager", "batch": batch_size, "GMACs": m / 1e9,
             "img_s": speed, "speedup": speed / ips[0], "MACs_ratio": m / counted[0],
             "efficiency": speed / ips[0] * m / counted[0]} for name, m, speed in zip(names, counted, ips)]
    saved = 1 - rows[1]["MACs_ratio"]
    rows[1]["saving_share"] = (1 - ips[0] / ips[1]) / saved if saved > 0 else "-"
    if oracle:
        rows[1]["overhead_share"] = 1 - ips[1] / ips[2]
    return rows


def detector_macs_rows(*models: nn.Module, input_size: Sequence[int] | None = None, labels: Sequence[str] = (),
                       images: Sequence[torch.Tensor] | None = None) -> list[dict]:
    """MACs of detectors (a plain one, then versions of it), named by ``labels``: backbone with FPN, and the
    whole detector in eval mode, averaged over ``images`` (real images: the mask head runs once per detection,
    so the whole detector's count depends on what it finds; default one random image of ``input_size``); the
    ratios to the first."""
    if input_size is None and images is None:
        raise TypeError("give input_size or images")
    rows = []
    for k, model in enumerate(models):
        size = tuple(images[0].shape) if images is not None else tuple(input_size)
        backbone = macs(model.backbone, size)
        if images is None:
            whole = macs(model, size)
        else:
            whole = statistics.fmean(macs(model, size, example=i[None]) for i in images)
        rows.append({"model": labels[k] if k < len(labels) else f"model {k}", "backbone_GMACs": backbone / 1e9,
                     "detector_GMACs": whole / 1e9})
    for r in rows:
        r["backbone_ratio"] = r["backbone_GMACs"] / rows[0]["backbone_GMACs"]
        r["detector_ratio"] = r["detector_GMACs"] / rows[0]["detector_GMACs"]
    return rows
