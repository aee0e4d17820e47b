"""timm against transformers on the CPU: the same encoder shape in both libraries, plain, ToMe (with its same-shape
oracle) and ReViT at 10x10, each library's attention run the explicit way ("eager": timm's fused_attn off,
transformers' eager implementation) and through scaled_dot_product_attention ("sdpa": timm's default, transformers'
sdpa), at batch 1 and 32, fp32, eval mode, 224 px, random weights (speed and MACs do not depend on them; the ViT-B
pair shares its weights through vit_from_timm). Every row is timed against its own library's plain model in the
same alternating rounds; efficiency = speed-up x MACs ratio; overhead share = 1 - oracle time / ToMe time.

    python benchmarks/transformers_encoders.py --threads 2   # -> benchmarks/results/transformers_encoders.{json,md}
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import timm
import torch

import tokenthrift as tt
from tokenthrift.apps.report import table
from tokenthrift.hosts import host_of
from tokenthrift.hosts.transformers import vit_from_timm
from tokenthrift.measure import FixedForward, merging_speed_rows

SIZE = (3, 224, 224)
OUT = Path("benchmarks/results/transformers_encoders")
R = 8  # ToMe r: about 0.6 of the MACs on a 14x14 grid over 12 blocks


def encoders(attn: str) -> dict[str, dict[str, torch.nn.Module]]:
    """{shape: {library: model}} with ``attn`` ("eager" or "sdpa") in both libraries."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224").eval()
    clip = timm.create_model("vit_base_patch16_clip_224").eval()
    for model in (vit, clip):
        for blk in model.blocks:
            blk.attn.fused_attn = attn == "sdpa"
    hf_clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                               num_attention_heads=12, image_size=224, patch_size=16,
                                               hidden_act="gelu", attn_implementation=attn)).eval()
    return {"ViT-B/16": {"timm": vit, "transformers": vit_from_timm(vit, attn).eval()},
            "CLIP ViT-B/16": {"timm": clip, "transformers": hf_clip}}


def rows_for(shape: str, library: str, model: torch.nn.Module, attn: str, batch: int, repeats: int) -> list[dict]:
    host = host_of(model)
    head = {"encoder": shape, "library": library, "attention": attn}
    rows = [{**head, **row} for row in merging_speed_rows(model, tt.tome.merging_copy(model, R), SIZE, batch,
                                                         repeats=repeats, label=f"ToMe r={R}", oracle=host)]
    grid = host.grid_size[0]  # 14 at 224 px
    small = round(grid * 10 / 14)
    revit = FixedForward(tt.revit.convert(copy.deepcopy(model), grids=(grid, small)), grid=small).eval()
    rows.append({**head, **merging_speed_rows(model, revit, SIZE, batch, repeats=repeats,
                                              label=f"ReViT {small}x{small}")[1]})
    return rows


def main() -> None:
    from suite import write_result

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--attention", nargs="+", default=["eager", "sdpa"], choices=["eager", "sdpa"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for attn in args.attention:
        for shape, pair in encoders(attn).items():
            for batch in args.batches:
                for library, model in pair.items():
                    new = rows_for(shape, library, model, attn, batch, args.repeats)
                    print(table(new), flush=True)
                    rows += new
    meta = tt.measure.run_metadata(device="cpu", dtype="fp32", size=list(SIZE), repeats=args.repeats,
                                   command="python benchmarks/transformers_encoders.py --threads 2")
    write_result(OUT, meta, {"rows": rows}, rows)


if __name__ == "__main__":
    main()
