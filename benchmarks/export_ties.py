"""Exports and near-ties: how often an exported or compiled merging model differs from eager, and by how much.

A hard merge decision (LTM's argmax over its nine candidate targets, ToMe's bipartite matching) compares floats;
a kernel with other rounding (onnxruntime, inductor's generated code) can flip a decision that sits on a
near-tie, and the logits of that image then move by far more than float noise. A ``.pt2`` program runs the eager
kernels and is exact. Per model: the ONNX file (dynamic batch, the dynamo exporter) on random batches of 17 and
on real test images, and inductor (``torch.compile``, dynamic shapes) on random batches of 64 and on real test
images; an image counts as off when its largest logit difference exceeds 1e-4 (the export check's tolerance).

    python benchmarks/export_ties.py --threads 2     # -> benchmarks/results/export_ties.{json,md}
"""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

import tokenthrift as tt
from tokenthrift.apps.export import TOLERANCE, export
from tokenthrift.apps.report import table
from tokenthrift.data import build_dataset, model_preprocess

from suite import write_result

OUT = Path("benchmarks/results/export_ties")


def models() -> dict[str, tuple[torch.nn.Module, tuple[int, ...], bool]]:
    """name -> (model in eval mode, input size, whether Fashion-MNIST test images fit it)."""
    torch.manual_seed(0)
    small = dict(img_size=64, depth=4, num_classes=3)
    tome = timm.create_model("vit_fmnist_tiny_patch2_28", pretrained=True)
    tt.tome.apply(tome, 9)
    return {
        "LTM ViT-S, 4 blocks, random weights (site ratio 0.8)":
            (timm.create_model("ltm_vit_small_patch16_224", ltm_site_ratio=0.8, **small), (3, 64, 64), False),
        "LTM Swin, tiny, random weights (site ratio 0.8)":
            (timm.create_model("ltm_swin_tiny_patch4_window7_224", img_size=64, window_size=4, num_classes=3,
                               depths=(1, 1, 2, 1), embed_dim=32, num_heads=(1, 2, 4, 8), ltm_site_ratio=0.8),
             (3, 64, 64), False),
        "shipped LTM ViT (ltm_vit_fmnist_tiny_patch2_28)":
            (timm.create_model("ltm_vit_fmnist_tiny_patch2_28", pretrained=True), (1, 28, 28), True),
        "ToMe r=9 on the shipped ViT": (tome, (1, 28, 28), True),
    }


def off(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """(images whose logits differ by more than the tolerance, the largest difference)."""
    d = (a - b).abs().amax(-1)
    return int((d > TOLERANCE).sum()), float(d.max())


def shown(diff: float) -> str:
    return f"{diff:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnx-batches", type=int, default=20, help="random batches of 17 through onnxruntime")
    ap.add_argument("--compiled-batches", type=int, default=6, help="random batches of 64 through inductor")
    ap.add_argument("--real", type=int, default=512, help="Fashion-MNIST test images, where the model takes them")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    rows = []
    for name, (model, size, real) in models().items():
        model.eval()
        path = OUT.with_name(f"export_ties_{len(rows)}.onnx")
        export(model, size, path)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        onnx = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])  # noqa: E731
        compiled = torch.compile(model, dynamic=True)
        gen = torch.Generator().manual_seed(0)
        row = {"model": name}
        with torch.no_grad():
            for label, run, batches, batch in (("onnx", onnx, args.onnx_batches, 17),
                                               ("inductor", compiled, args.compiled_batches, 64)):
                counts = [off(run(x), model(x)) for x in (torch.randn(batch, *size, generator=gen)
                                                          for _ in range(batches))]
                row[f"{label}_random_off"] = f"{sum(c for c, _ in counts)} / {batches * batch}"
                row[f"{label}_random_max"] = shown(max(m for _, m in counts))
            if real:
                ds, _ = build_dataset("fashion-mnist", False, 28, 1, preprocess=model_preprocess(model))
                x = torch.stack([ds[i][0] for i in range(args.real)])
                for label, run in (("onnx", onnx), ("inductor", compiled)):
                    count, worst = off(run(x), model(x))
                    row[f"{label}_real_off"], row[f"{label}_real_max"] = f"{count} / {len(x)}", shown(worst)
        path.unlink()
        rows.append(row)
        print(table([row]), flush=True)
    meta = tt.measure.run_metadata(device="cpu", dtype="fp32", tolerance=TOLERANCE,
                                   command="python benchmarks/export_ties.py --threads 2")
    write_result(OUT, meta, {"rows": rows}, rows)
    print(table(rows, markdown=True))


if __name__ == "__main__":
    main()
