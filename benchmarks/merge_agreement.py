"""Is the merging content-aware? For every merge site, the mean pairwise adjusted Rand index of the
patch-to-token partitions across test images (measure.merge_agreement: 1 = the same merge for every image, a
fixed positional shrink; about 0 = as unlike as random partitions): LTM checkpoints (``--ltm``, every site)
against training-free ToMe on the shipped vit_fmnist_tiny_patch2_28, at r=8 and at the r whose MACs match the
first LTM checkpoint's. Writes benchmarks/results/merge_agreement.{json,md} and a picture per model.

    python benchmarks/merge_agreement.py --ltm CKPT [CKPT ...] [--images 64]
"""
import argparse
from pathlib import Path

import timm
import torch

import tokenthrift as tt
from tokenthrift import ltm, measure, tome, viz
from tokenthrift.apps import report
from tokenthrift.train.methods.tome import r_for_macs
from tokenthrift.data import build_dataset, dataset_for_model
from tokenthrift.train import data_shape, load_trained, model_input_size, run_preprocess

from suite import write_result

OUT = Path(__file__).parent / "results"
SHIPPED = "vit_fmnist_tiny_patch2_28"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ltm", nargs="+", default=[],
                    help="LTM checkpoints (tokenthrift train --method ltm, or ltm_* runs)")
    ap.add_argument("--images", type=int, default=64, help="test images compared (pairs: n(n-1)/2)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, pictures = [], {}

    def first_test_images(ds) -> torch.Tensor:
        return torch.stack([ds[i][0] for i in range(args.images)])

    ltm_macs = None
    for path in args.ltm:
        model, cfg = load_trained(path)
        c, side, _ = data_shape(model_input_size(model, cfg))
        ds, _ = build_dataset(cfg.data, False, side, c, cfg.data_dir, preprocess=run_preprocess(cfg))
        images = first_test_images(ds)
        merged = model if ltm.is_ltm(model) else ltm.convert(model, cfg.options.site_ratio)
        size = (c, side, side)
        ratio = measure.macs(merged, size) / measure.macs(ltm.plain_copy(merged), size)
        ltm_macs = ltm_macs or ratio
        maps = ltm.merge_maps(merged, images)
        name = f"LTM {Path(path).parent.name}/{Path(path).name}"
        for m in maps:
            ids = m.spatial()[0]
            rows.append({"model": name, "site": m.site, "tokens": int(m.target[0] * m.target[1]),
                         "MACs_ratio": ratio, "agreement": measure.merge_agreement(ids.flatten(1))})
        agreement = {r["site"]: r["agreement"] for r in rows if r["model"] == name}
        shown = ltm.merge_maps(merged, images[:6], sites=None)
        pictures[name] = (images[:6],
                          [(f"{m.site}\n{m.target[0] * m.target[1]} tokens", m.spatial()[0][:6]) for m in shown],
                          [agreement[m.site] for m in shown])

    base = timm.create_model(SHIPPED, pretrained=True).eval()
    ds, _ = dataset_for_model("fashion-mnist", base, train=False)
    images = first_test_images(ds)
    base_macs = measure.macs(base, (1, 28, 28))
    choices = [8]
    if ltm_macs is not None:
        choices.append(r_for_macs(base, (1, 28, 28), ltm_macs * base_macs, max_r=48)[0])
    for r in dict.fromkeys(choices):
        merged = tome.merging_copy(base, r)
        ratio = measure.macs(merged, (1, 28, 28)) / base_macs
        groups = tome.patch_groups(merged, images, range(len(merged.blocks)))
        name = f"ToMe r={r} on {SHIPPED}"
        for k, ids, tokens in groups:
            rows.append({"model": name, "site": f"blocks.{k}", "tokens": tokens, "MACs_ratio": ratio,
                         "agreement": measure.merge_agreement(ids.flatten(1))})
        shown = tt.tokens.picture_sites(groups)
        pictures[name] = (images[:6], [(f"after blocks.{k}\n{t} tokens", ids[:6]) for k, ids, t in shown],
                          [rows[-len(groups) + k]["agreement"] for k, _, _ in shown])

    meta = measure.run_metadata(device="cpu", images=args.images, pairs=args.images * (args.images - 1) // 2)
    write_result(OUT / "merge_agreement", meta, {"rows": rows}, rows)
    print(report.table(rows))
    for k, (name, (imgs, maps, agreement)) in enumerate(pictures.items()):  # agreement over all the images compared
        print(viz.plot_merge_maps(imgs, maps, OUT / f"merge_agreement_{k}.png",
                                  f"{name}: each token's patches, mean-filled; agreement over {args.images} images",
                                  agreement))


if __name__ == "__main__":
    main()
