"""Deployment speed on the CPU: every inference method eager and compiled (torch.compile, inductor), at batch 1
and batch 32, each against its plain model run the same way (eager against eager, compiled against compiled),
timed in alternating rounds (medians of 20 rounds at batch 1, 5 at batch 32). 224 px, fp32, eval mode,
random weights (speed does not depend on them; ToMe's and LTM's token counts do not either).

    python benchmarks/deploy_cpu.py --threads 2            # results: benchmarks/results/deploy_cpu.json

Rows: ToMe r=13 on DeiT-S (against DeiT-S; proportional attention as the CPU default, an additive mask, and
folded into a q/k channel), LTM ViT-S (ltm_vit_small_patch16_224, against ViT-S) and ReViT at 10x10 on ViT-S
(against ViT-S), and the same-shape oracles of ToMe and LTM (measure.TokenCutOracle: the plain blocks at the
method's token counts, tokens cut): overhead share = 1 - oracle time / method time. Efficiency = speed-up x
MACs ratio (1.0: every MAC saved became time saved).
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch

import tokenthrift as tt
from tokenthrift.hosts import host_of
from tokenthrift.measure import FixedForward, paired_throughput

from suite import write_result

SIZE = (3, 224, 224)
ROUNDS = {1: 20, 32: 5}


def models() -> dict[str, tuple[torch.nn.Module, str]]:
    """name -> (model in eval mode, the name of its plain counterpart)."""
    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224").eval()
    tome = tt.tome.merging_copy(deit, 13, prop_kernel="mask")
    tome_fold = tt.tome.merging_copy(deit, 13, prop_kernel="fold")
    vit = timm.create_model("vit_small_patch16_224").eval()
    ltm = timm.create_model("ltm_vit_small_patch16_224").eval()
    ltm.load_state_dict(vit.state_dict())  # the same weights (LTM adds no parameters)
    revit = FixedForward(tt.revit.convert(copy.deepcopy(vit), grids=(14, 10, 7)), grid=10).eval()

    def oracle(plain, merged, size):
        return tt.measure.TokenCutOracle.of(plain, merged, size, host_of(plain))

    return {"DeiT-S": (deit, "DeiT-S"), "ToMe r=13 on DeiT-S": (tome, "DeiT-S"),
            "ToMe r=13, prop. attention folded": (tome_fold, "DeiT-S"),
            "oracle of ToMe r=13": (oracle(deit, tome, SIZE), "DeiT-S"), "ViT-S": (vit, "ViT-S"),
            "LTM ViT-S": (ltm, "ViT-S"), "oracle of LTM ViT-S": (oracle(vit, ltm, SIZE), "ViT-S"),
            "ReViT 10x10 on ViT-S": (revit, "ViT-S")}


ORACLES = {"ToMe r=13 on DeiT-S": "oracle of ToMe r=13", "ToMe r=13, prop. attention folded": "oracle of ToMe r=13",
           "LTM ViT-S": "oracle of LTM ViT-S"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = models()
    macs = {name: tt.measure.macs(m, SIZE) for name, (m, _) in table.items()}
    names = list(table)
    rows = []
    with torch.no_grad():
        for mode in ("eager", "compiled"):
            nets = [m if mode == "eager" else torch.compile(m) for m, _ in table.values()]
            for batch in args.batches:
                speeds = paired_throughput(nets, SIZE, batch, warmup=3, repeats=ROUNDS.get(batch, 5))
                by_name = dict(zip(names, speeds))
                for name in names:
                    base = table[name][1]
                    speedup, ratio = by_name[name] / by_name[base], macs[name] / macs[base]
                    rows.append({"model": name, "mode": mode, "batch": batch, "img_s": by_name[name],
                                 "against": base, "speedup": speedup, "MACs_ratio": ratio,
                                 "efficiency": speedup * ratio})
                    if name in ORACLES:
                        rows[-1]["overhead_share"] = 1 - by_name[name] / by_name[ORACLES[name]]
                    print(rows[-1], flush=True)
    meta = tt.measure.run_metadata(device="cpu", dtype="float32", input=list(SIZE), rounds=ROUNDS)
    write_result("benchmarks/results/deploy_cpu", meta, {"rows": rows})
    print("\n| model | mode | batch | images/s | speed-up | MACs ratio | efficiency | overhead share |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["model"] in ("DeiT-S", "ViT-S"):
            continue
        share = f"{r['overhead_share']:.1%}" if "overhead_share" in r else "-"
        print(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['img_s']:.1f} | {r['speedup']:.2f}x | "
              f"{r['MACs_ratio']:.3f} | {r['efficiency']:.2f} | {share} |")


if __name__ == "__main__":
    main()
