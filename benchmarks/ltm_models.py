"""The paper's table for the registered LTM models: base and LTM GMACs and parameters at 224 px (our
counter, mask module included) with our MACs ratio next to the paper's, and (--speed) measured
inference throughput, base against LTM in the same run, with the time saving next to the MACs saving.
Writes benchmarks/results/ltm_models.{json,md}; models already measured are kept (resumable).

    python benchmarks/ltm_models.py                      # MACs / parameters table
    python benchmarks/ltm_models.py --speed --batch-size 64 --repeats 5
"""
import argparse
import json
from pathlib import Path

import timm
import torch

import tokenthrift  # noqa: F401  (registers the ltm_* models)
from tokenthrift.ltm.registry import PAPER_RATIOS
from tokenthrift import measure
from tokenthrift.measure import merging_speed_rows, run_metadata

from suite import write_result

OUT = Path(__file__).parent / "results"
PAPER_GMACS = {"mobilevit_xs": (0.70, 0.52), "mobilevit_s": (1.40, 1.17), "efficientvit_b1": (0.52, 0.44),
               "vit_small_patch16_224": (4.3, 3.7), "vit_base_patch16_224": (17.6, 12.9),
               "swin_tiny_patch4_window7_224": (4.5, 3.8), "swin_base_patch4_window7_224": (15.4, 12.0)}
SIZE = (3, 224, 224)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(PAPER_RATIOS), choices=list(PAPER_RATIOS))
    ap.add_argument("--speed", action="store_true", help="also measure inference throughput")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--channels-last", action="store_true", help="both models in channels_last memory format")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()
    stem = OUT / f"ltm_models{args.tag}"
    saved = OUT / f"ltm_models{args.tag}.json"
    cache = json.loads(saved.read_text()) if saved.exists() else {}
    rows = cache.get("rows", {})
    for name in args.models:
        if name in rows and ("img_s_ltm" in rows[name] or not args.speed):
            continue
        torch.manual_seed(0)
        base = timm.create_model(name, pretrained=False).eval()
        merged = timm.create_model(f"ltm_{name}", pretrained=False).eval()
        if args.channels_last:
            base, merged = base.to(memory_format=torch.channels_last), merged.to(memory_format=torch.channels_last)
        b, m = ({"GMACs": measure.macs(x, SIZE) / 1e9, "params_M": sum(p.numel() for p in x.parameters()) / 1e6}
                for x in (base, merged))
        m["MACs_ratio"] = m["GMACs"] / b["GMACs"]
        if args.speed:
            b_speed, m_speed = merging_speed_rows(base, merged, SIZE, args.batch_size, args.warmup, args.repeats)
            b, m = {**b, **b_speed, "GMACs": b["GMACs"]}, {**m, **m_speed, "GMACs": m["GMACs"]}
        paper_base, paper_ltm = PAPER_GMACS[name]
        row = {"model": name, "GMACs_base": b["GMACs"], "GMACs_ltm": m["GMACs"], "params_M_base": b["params_M"],
               "params_M_ltm": m["params_M"], "ratio_ours": m["MACs_ratio"], "ratio_paper": PAPER_RATIOS[name],
               "paper_GMACs": f"{paper_base} -> {paper_ltm}"}
        if args.speed:
            row.update(img_s_base=b["img_s"], img_s_ltm=m["img_s"], speedup=m["speedup"],
                       MACs_saving=1 - m["MACs_ratio"], time_saving=1 - b["img_s"] / m["img_s"],
                       saving_share=m["saving_share"])
        rows[name] = row
        print(row, flush=True)
        meta = {**run_metadata(), "dtype": "fp32", "input": SIZE, "batch_size": args.batch_size, "repeats": args.repeats,
                "channels_last": args.channels_last}
        write_result(stem, meta, {"rows": rows})  # after every model: a long run keeps what it has
    ordered = [rows[n] for n in PAPER_RATIOS if n in rows]
    meta = json.loads(saved.read_text())["meta"] if ordered else {}
    print(write_result(stem, meta, None, ordered))


if __name__ == "__main__":
    main()
