"""What the benchmark scripts share: train a run or reuse it once it has finished, and write a result file pair.

The scripts import it as ``suite`` (``python benchmarks/X.py`` puts this folder first on ``sys.path``).

    summary = run_or_reuse(TrainConfig(..., output="runs/bench_x", name="full-s0"), resume=True)
    print(write_result(OUT / "x", run_metadata(device="cpu"), {"rows": rows}, rows))
"""
from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

from tokenthrift.apps.report import table
from tokenthrift.train import TrainConfig, train


def run_or_reuse(cfg: TrainConfig, resume: bool = False) -> dict:
    """The summary of the run ``cfg`` names (``<cfg.output>/<cfg.name>``): read from its ``summary.json`` when the
    run has finished, else trained. ``resume``: an unfinished run continues from its ``last.pth`` (without it, or
    without a ``last.pth``, the run trains as ``cfg`` says, ``cfg.resume`` included)."""
    if not cfg.name:
        raise ValueError("run_or_reuse needs cfg.name: the run's folder under cfg.output")
    run_dir = Path(cfg.output) / cfg.name
    if (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    if resume and (run_dir / "last.pth").exists():
        cfg = copy.copy(cfg)
        cfg.resume = str(run_dir / "last.pth")
    return train(cfg)


def write_result(stem: str | Path, meta: dict, data: dict | None, *parts: Sequence[dict] | str) -> str:
    """Write ``<stem>.json``, ``{"meta": meta, **data}`` (skipped when ``data`` is None), and, when ``parts`` are
    given, ``<stem>.md``: the metadata as one JSON line, then each part (a list of rows as a markdown table, a
    string as it is), a blank line between them. Creates the folder; returns the markdown ("" without parts).
    A value JSON cannot hold is written as its ``str()``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        stem.with_name(f"{stem.name}.json").write_text(json.dumps({"meta": meta, **data}, indent=1, default=str))
    if not parts:
        return ""
    shown = [json.dumps(meta, default=str)] + [p if isinstance(p, str) else table(p, markdown=True) for p in parts]
    md = "\n\n".join(shown) + "\n"
    stem.with_name(f"{stem.name}.md").write_text(md)
    return md
