"""The GPU rows of BENCHMARKS.md in one run (about 5 minutes on one H200): every figure a ratio against its
baseline timed in the same run, under autocast with one dtype. Every speed comparison goes through
measure.paired_throughput: the models compared are timed in alternating rounds, each round starting one model
later and each timed call after an untimed one of the same model, so that no model is always timed first or
always right after the same other one.

- ToE: training step (forward + backward + AdamW) of each stage against full tokens, DeiT-S (batch 256)
  and DeiT-B (batch 128).
- ReViT + TLA: DeiT-S converted to a ResizableViT (14/10/7), inference throughput at every grid against
  14x14, and the adaptive path (assigner + one grouped forward per grid) at fixed grid shares (by
  default those the Fashion-MNIST assigner picks, 0.22 / 0.36 / 0.42) against 14x14.
- LTM: the seven registered ltm_* models against their base: batch-1 latency and batch 64 and 256
  throughput; time saving next to MACs saving (the LTM issue's bar: saving_share >= 0.7).
- Deployment: eager and torch.compile'd, batch 1 and 256: ToMe r=13 on DeiT-S (proportional attention folded
  into a q/k channel, which keeps the flash kernels, and as an additive mask), LTM ViT-S and ReViT 10x10, each
  against its plain model run the same way, ToMe and LTM also against their same-shape oracle (overhead share).
- Modern encoders (benchmarks/modern_encoders.py's rows): DINOv3-S, EVA-02-S, SigLIP-B (MAP) and PE-core-S at
  224 px, eager and compiled, batch 1 and 256: ToMe at r = 8 and 13 with their oracles, ReViT 10x10, LTM at 0.85
  of the MACs (with its oracle too).
- Visual tokens in a VLM (benchmarks/vlm_speed.py's rows): LLaVA-1.5-7B's full shape (random weights, built on
  the GPU in the suite's dtype), sdpa, batch 1: prefill, time to first token and decode tokens/s with all 576
  visual tokens and with pooling, DivPrune and ToMe in the tower at 50 / 25 / 11 % of them.

Weights are random (pretrained=False: speed does not depend on them). Writes
benchmarks/results/gpu_suite.{json,md} (or --out).

    python benchmarks/gpu_suite.py                 # on the GPU machine
    python benchmarks/gpu_suite.py --smoke         # small models and inputs on the CPU (the test suite runs this)
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import timm
import torch
from torch import nn

import tokenthrift as tt
from tokenthrift import measure
from tokenthrift.apps import report
from tokenthrift.hosts import host_of
from tokenthrift.ltm.registry import PAPER_RATIOS
from tokenthrift.measure import run_metadata
from tokenthrift.train.methods.toe import stage_speed_rows

OUT = Path(__file__).parent / "results" / "gpu_suite"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def toe_rows(args, device, dtype) -> list[dict]:
    rows = []
    for name, batch in (("deit_small_patch16_224", args.toe_batch[0]), ("deit_base_patch16_224", args.toe_batch[1])):
        model = timm.create_model(name, pretrained=False, **args.model_kwargs, **args.toe_kwargs).to(device)
        size = (3, args.img_size, args.img_size)
        for r in stage_speed_rows(model, size, batch, {"milestones": (0, 1, 2)}, warmup=args.warmup,
                                  repeats=args.repeats, dtype=dtype):
            rows.append({"model": name, "batch": batch, **r})
        del model
    return rows


class FixedShares(nn.Module):
    """The adaptive ReViT path at fixed grid shares: the assigner runs (its cost is real), the grids come from
    ``index`` (one per image of the batch)."""

    def __init__(self, assigner: nn.Module, adaptive: nn.Module, index: torch.Tensor):
        super().__init__()
        self.assigner, self.adaptive = assigner, adaptive
        self.register_buffer("index", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.assigner(x)
        return self.adaptive(x, grid_index=self.index)


def revit_rows(args, device, dtype) -> list[dict]:
    size = (3, args.img_size, args.img_size)
    vit = timm.create_model("deit_small_patch16_224", pretrained=False, **args.model_kwargs)
    native = args.img_size // 16
    grids = (native, round(native * 10 / 14), round(native * 7 / 14))
    revit = tt.revit.convert(vit, grids).to(device).eval()
    assigner = tt.revit.TokenLengthAssigner(len(grids), size, args.assigner).to(device).eval()
    adaptive = tt.revit.AdaptiveViT(revit, assigner).eval()
    batch = args.revit_batch
    counts = [round(s * batch) for s in args.shares[:-1]]
    counts.append(batch - sum(counts))
    index = torch.cat([torch.full((c,), k, device=device) for k, c in enumerate(counts)])
    index = index[torch.randperm(batch, generator=torch.Generator().manual_seed(0)).to(device)]

    nets = [measure.FixedForward(revit, grid=g) for g in grids] + [FixedShares(assigner, adaptive, index)]
    speeds = measure.paired_throughput(nets, size, batch, warmup=args.warmup, repeats=args.repeats, dtype=dtype)
    grid_macs = [measure.macs(revit, size, grid=g) for g in grids]
    shares = torch.tensor(counts, dtype=torch.float64) / batch
    adaptive_macs = adaptive.expected_macs(shares)
    rows = []
    for g, macs, ips in zip(grids, grid_macs, speeds):
        rows.append({"path": f"{g}x{g}", "batch": batch, "GMACs": macs / 1e9, "img_s": ips,
                     "speedup": ips / speeds[0], "MACs_ratio": macs / grid_macs[0],
                     "efficiency": ips / speeds[0] * macs / grid_macs[0]})
    rows.append({"path": f"adaptive ({args.assigner}, shares {'/'.join(f'{s:.2f}' for s in shares.tolist())})",
                 "batch": batch, "GMACs": adaptive_macs / 1e9, "img_s": speeds[-1], "speedup": speeds[-1] / speeds[0],
                 "MACs_ratio": adaptive_macs / grid_macs[0],
                 "efficiency": speeds[-1] / speeds[0] * adaptive_macs / grid_macs[0]})
    return rows


def ltm_rows(args, device, dtype) -> list[dict]:
    rows = []
    for name in args.ltm_models:
        torch.manual_seed(0)
        base = timm.create_model(name, pretrained=False, **args.model_kwargs).to(device).eval()
        merged = timm.create_model(f"ltm_{name}", pretrained=False, **args.model_kwargs).to(device).eval()
        size = (3, args.img_size, args.img_size)
        macs_b, macs_m = measure.macs(base, size), measure.macs(merged, size)
        row = {"model": name, "MACs_ratio": macs_m / macs_b}
        for batch in args.ltm_batch:
            b, m = measure.paired_throughput([base, merged], size, batch, warmup=args.warmup, repeats=args.repeats,
                                             dtype=dtype)
            if batch == 1:
                row.update(ms_base=1000 / b, ms_ltm=1000 / m)
            row[f"speedup_b{batch}"] = m / b
            row[f"saving_share_b{batch}"] = (1 - b / m) / (1 - macs_m / macs_b)
        rows.append(row)
        print(row, flush=True)
        del base, merged
    return rows


def deploy_rows(args, device, dtype) -> list[dict]:
    """Eager and compiled (torch.compile, inductor), batch 1 and a large batch, each model against its plain model
    run the same way and, for ToMe and LTM, against the same-shape oracle (overhead share); ToMe with proportional
    attention folded into a q/k channel (flash kernels) and as an additive mask."""
    from tokenthrift.measure import FixedForward

    size, kw = (3, args.img_size, args.img_size), args.model_kwargs
    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224", **kw).to(device).eval()
    vit = timm.create_model("vit_small_patch16_224", **kw).to(device).eval()
    ltm = timm.create_model("ltm_vit_small_patch16_224", **kw).to(device).eval()
    ltm.load_state_dict(vit.state_dict())
    side = args.img_size // 16  # 14 at 224 px: grids 14 / 10 / 7, the middle one timed
    grids = (side, round(side * 10 / 14), side // 2)
    revit = FixedForward(tt.revit.convert(copy.deepcopy(vit), grids=grids), grid=grids[1]).to(device).eval()
    rows = []
    tome_r = min(13, tt.tome.largest_r(deit.patch_embed.num_patches + 1, 1, len(deit.blocks)))  # 13 at 224 px
    for compiled in args.deploy_compile:
        for batch in args.deploy_batch:
            for label, base, merged in (
                    (f"ToMe r={tome_r}, fold", deit, tt.tome.merging_copy(deit, tome_r, prop_kernel="fold")),
                    (f"ToMe r={tome_r}, mask", deit, tt.tome.merging_copy(deit, tome_r, prop_kernel="mask")),
                    ("LTM ViT-S", vit, ltm)):
                for r in measure.merging_speed_rows(base, merged, size, batch, warmup=args.warmup, repeats=args.repeats,
                                                    dtype=dtype, compile=compiled, label=label, oracle=host_of(base))[1:]:
                    rows.append({"model": r["model"] if r["model"] == label else f"{label}: oracle", **r})
            plain_ips, revit_ips = measure.paired_throughput([vit, revit], size, batch, warmup=args.warmup,
                                                             repeats=args.repeats, dtype=dtype, compile=compiled)
            ratio = measure.macs(revit, size) / measure.macs(vit, size)
            rows.append({"model": "ReViT 10x10 on ViT-S", "mode": "compiled" if compiled else "eager", "batch": batch,
                         "img_s": revit_ips, "speedup": revit_ips / plain_ips, "MACs_ratio": ratio,
                         "efficiency": revit_ips / plain_ips * ratio})
            print(rows[-1], flush=True)
    return rows


def modern_rows(args, device, dtype) -> list[dict]:
    """benchmarks/modern_encoders.py's rows on this device and dtype."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("modern_encoders", Path(__file__).with_name("modern_encoders.py"))
    modern = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modern)
    rows = []
    for label, (name, kw, r_values) in modern.ENCODERS.items():
        if args.smoke and label not in ("DINOv3-S", "SigLIP-B (MAP)"):
            continue
        if not timm.is_model(name):  # an older timm than the tested pin: the row says so instead of failing
            rows.append({"encoder": label, "model": name, "note": f"not in timm {timm.__version__}"})
            continue
        patch = 14 if "patch14" in name else 16
        side = args.img_size // 16 * patch  # 224 px; EVA-02's patch 14 then gives a 16x16 grid, as at 224 px
        kw = {**kw, "img_size": side if patch == 14 else args.img_size, **({"depth": 2} if args.smoke else {})}
        torch.manual_seed(0)
        model = timm.create_model(name, **kw).to(device).eval()
        grid = model.patch_embed.grid_size[0]
        grids = (round(grid * 10 / 14), round(grid * 7 / 14))  # 10x10 and 7x7 of a 14x14 grid
        r_values = (1, 2) if args.smoke else r_values
        size = (3, kw["img_size"], kw["img_size"])
        for compiled in args.deploy_compile:
            for batch in args.deploy_batch[-1:] if args.smoke else args.deploy_batch:
                rows += modern.rows_for(label, model, r_values, batch, compiled, args.repeats, size=size,
                                        dtype=dtype, grids=grids, warmup=args.warmup)
    return rows


def vlm_rows(args, device, dtype) -> list[dict]:
    """benchmarks/vlm_speed.py's rows for LLaVA-1.5-7B's full shape (24 tower layers, 32 text layers), built on the
    device in the suite's dtype: prefill, time to first token and decode tokens/s against K, sdpa, batch 1."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vlm_speed", Path(__file__).with_name("vlm_speed.py"))
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype if device.type == "cuda" else torch.float32)  # 7B parameters built in bf16
    try:
        with torch.device(device):
            model = (speed.llava(2, 1, "sdpa", small=True) if args.smoke else speed.llava(24, 32, "sdpa")).eval()
    finally:
        torch.set_default_dtype(default)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    shares, methods = ((1.0, 0.25), ("pool",)) if args.smoke else (speed.SHARES, speed.METHODS)
    return speed.speed_rows(model, speed.inputs(model, device, next(model.parameters()).dtype), "sdpa",
                            args.repeats, 2 if args.smoke else 16, sync, shares, methods)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny inputs on the CPU: checks the script, not the speed")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--parts", nargs="+", choices=["toe", "revit", "ltm", "deploy", "modern", "vlm"],
                    default=["toe", "revit", "ltm", "deploy", "modern", "vlm"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shares", type=float, nargs=3, default=(0.22, 0.36, 0.42),
                    help="grid shares 14/10/7 of the adaptive ReViT path")
    ap.add_argument("--assigner", default="mobilenetv3_small_050")
    ap.add_argument("--out", default=str(OUT), help="result files without suffix")
    args = ap.parse_args(argv)
    args.img_size, args.model_kwargs, args.toe_kwargs = 224, {}, {}
    args.toe_batch, args.revit_batch, args.ltm_batch = (256, 128), 256, (1, 64, 256)
    args.ltm_models = list(PAPER_RATIOS)
    args.deploy_batch, args.deploy_compile = (1, 256), (False, True)
    if args.smoke:  # the same code paths on 64 px inputs and few models, on the CPU
        args.device, args.repeats, args.warmup, args.img_size = "cpu", 1, 1, 64
        args.model_kwargs = {"img_size": 64}
        args.toe_kwargs = {"depth": 3}  # training steps in bf16 on the CPU are slow: three blocks show the stages
        args.toe_batch, args.revit_batch, args.ltm_batch = (2, 2), 4, (1, 2)
        args.ltm_models = ["vit_small_patch16_224", "mobilevit_xs"]
        args.assigner = "test_byobnet"
        args.deploy_batch, args.deploy_compile = (1, 2), (False,)  # compiling is the GPU run's, not the smoke's
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke on the CPU, or on the GPU machine")
        torch.backends.cudnn.benchmark = True
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    meta = run_metadata(device=name, dtype=args.dtype, img_size=args.img_size, repeats=args.repeats, smoke=args.smoke)
    parts = {"toe": toe_rows, "revit": revit_rows, "ltm": ltm_rows, "deploy": deploy_rows, "modern": modern_rows,
             "vlm": vlm_rows}
    results = {"meta": meta}
    sections = [f"{json.dumps(meta)}\n"]
    for part in args.parts:
        t0 = time.perf_counter()
        results[part] = parts[part](args, device, dtype)
        seconds = time.perf_counter() - t0
        print(f"{part}: {seconds:.0f} s\n{report.table(results[part])}", flush=True)
        sections.append(f"**{part}** ({seconds:.0f} s)\n\n{report.table(results[part], markdown=True)}\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text("\n".join(sections))
    return results


if __name__ == "__main__":
    main()
