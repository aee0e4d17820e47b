"""Training-step speed of each ToE stage against full tokens (same run), synthetic input, CPU fp32:
DeiT-Tiny and DeiT-Small at 224 and the Fashion-MNIST tiny ViT. Writes benchmarks/results/toe_step_speed.md.

    python benchmarks/toe_step_speed.py --batch-size 32 --repeats 5
"""
import argparse
from pathlib import Path

import timm
import torch

from tokenthrift.apps import report
from tokenthrift.measure import run_metadata
from tokenthrift.train.methods.toe import stage_speed_rows

from suite import write_result

OUT = Path(__file__).parent / "results"
MODELS = {
    "deit_tiny_patch16_224": dict(),
    "deit_small_patch16_224": dict(),
    "fmnist tiny ViT (28 px, patch 2)": dict(name="vit_tiny_patch16_224", img_size=28, patch_size=2, in_chans=1,
                                             embed_dim=48, depth=6, num_heads=3, num_classes=10),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tiny-batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    sections = []
    for label, kw in MODELS.items():
        kw = dict(kw)
        name = kw.pop("name", label)
        model = timm.create_model(name, pretrained=False, **kw)
        size = tuple(timm.data.resolve_model_data_config(model)["input_size"])
        if "img_size" in kw:
            size = (kw["in_chans"], kw["img_size"], kw["img_size"])
        batch = args.tiny_batch_size if "img_size" in kw else args.batch_size
        # ToE is training-only (eval is full-token by construction), so only the training step is timed
        rows = stage_speed_rows(model, size, batch, {"milestones": (0, 1, 2)}, warmup=args.warmup,
                                repeats=args.repeats)
        head = f"{label}, training step (fwd+bwd+AdamW), batch {batch}, input {size}"
        print(head, "\n", report.table(rows), flush=True)
        sections += [f"**{head}**", rows]
    meta = {**run_metadata(), "dtype": "fp32",
            "median_of": args.repeats}
    write_result(OUT / "toe_step_speed", meta, None, *sections)  # the markdown only


if __name__ == "__main__":
    main()
