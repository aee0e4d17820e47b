"""Modern encoders on the CPU: ToMe at two r, ReViT at 10x10 and LTM at 0.85 of the MACs on DINOv3-S, EVA-02-S,
SigLIP-B (MAP head) and PE-core-S, all at 224 px (PE-core-S is built at 224 instead of its native 384: a 14x14
grid like the others), fp32, eval mode, random weights (speed and MACs do not depend on them). Every row against
the plain model run the same way (eager against eager, compiled against compiled), at batch 1 and 32, timed in
alternating rounds; ToMe rows also against their same-shape oracle (the plain blocks at ToMe's token counts, the
rotary table cut with the tokens): overhead share = 1 - oracle time / method time. Efficiency = speed-up x MACs
ratio. LTM at 0.85 of the MACs (per-site ratios fitted on the model, untrained merges: speed and MACs only) also
against its same-shape oracle.

    python benchmarks/modern_encoders.py --threads 2    # -> benchmarks/results/modern_encoders.{json,md}
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import timm
import torch

import tokenthrift as tt
from tokenthrift.apps.report import table
from tokenthrift.errors import UnsupportedModelError
from tokenthrift.hosts import host_of
from tokenthrift.measure import FixedForward, merging_speed_rows, paired_throughput

SIZE = (3, 224, 224)
ENCODERS = {  # name -> (timm model, keywords, the two ToMe r)
    "DINOv3-S": ("vit_small_patch16_dinov3", {"img_size": 224}, (8, 13)),  # built at 256 px by default
    "EVA-02-S": ("eva02_small_patch14_224", {}, (8, 13)),  # patch 14: a 16x16 grid at 224 px
    "SigLIP-B (MAP)": ("vit_base_patch16_siglip_224", {}, (8, 13)),
    "PE-core-S (MAP)": ("vit_pe_core_small_patch16_384", {"img_size": 224}, (8, 13)),
}
OUT = Path("benchmarks/results/modern_encoders")


def rows_for(label: str, model: torch.nn.Module, r_values, batch: int, compiled: bool, repeats: int,
             size: tuple[int, ...] = SIZE, dtype: torch.dtype | None = None, grids: tuple[int, int] = (10, 7),
             warmup: int = 2) -> list[dict]:
    """ToMe at each r (with its oracle), ReViT at the grid ``grids[0]`` and LTM at 0.85 of the MACs on ``model``
    (on its device; ``dtype``: autocast), each against the plain model timed in the same alternating rounds.
    The GPU suite calls this too."""
    out = []
    host = host_of(model)
    mode = "compiled" if compiled else "eager"
    for r in r_values:
        merged = tt.tome.merging_copy(model, r)
        for row in merging_speed_rows(model, merged, size, batch, warmup=warmup, repeats=repeats, dtype=dtype,
                                      compile=compiled, label=f"ToMe r={r}", oracle=host)[1:]:
            out.append({"encoder": label, **row})
    grid = host.grid_size[0]
    revit = FixedForward(tt.revit.convert(copy.deepcopy(model), grids=(grid, *grids)), grid=grids[0]).eval()
    plain_ips, revit_ips = paired_throughput([model, revit], size, batch, warmup=warmup, repeats=repeats, dtype=dtype,
                                             compile=compiled)
    plain_macs = tt.measure.macs(model, size)
    ratio = tt.measure.macs(revit, size) / plain_macs
    out.append({"encoder": label, "model": f"ReViT {grids[0]}x{grids[0]}", "mode": mode, "batch": batch,
                "GMACs": ratio * plain_macs / 1e9, "img_s": revit_ips, "speedup": revit_ips / plain_ips,
                "MACs_ratio": ratio, "efficiency": revit_ips / plain_ips * ratio})
    try:
        ltm = tt.ltm.convert(copy.deepcopy(model), macs=0.85, input_size=size).eval()
    except UnsupportedModelError as err:
        out.append({"encoder": label, "model": "LTM 0.85", "mode": mode, "batch": batch,
                    "note": str(err).split(";")[0]})
    else:
        for row in merging_speed_rows(model, ltm, size, batch, warmup=warmup, repeats=repeats, dtype=dtype,
                                      compile=compiled, label="LTM 0.85", oracle=host)[1:]:
            out.append({"encoder": label, **row})
    return out


def main() -> None:
    # imported here, not above: gpu_suite.py loads this file by its path (for rows_for), from any folder
    from suite import write_result

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for label in args.encoders:
        name, kw, r_values = ENCODERS[label]
        torch.manual_seed(0)
        model = timm.create_model(name, **kw).eval()
        for mode in args.modes:
            for batch in args.batches:
                new = rows_for(label, model, r_values, batch, mode == "compiled", args.repeats)
                print(table(new), flush=True)
                rows += new
    meta = tt.measure.run_metadata(device="cpu", dtype="fp32", size=list(SIZE), repeats=args.repeats,
                                   command="python benchmarks/modern_encoders.py --threads 2")
    write_result(OUT, meta, {"rows": rows}, rows)


if __name__ == "__main__":
    main()
