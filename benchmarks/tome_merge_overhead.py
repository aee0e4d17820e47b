"""ToMe's merge at batch 1, eager, on the CPU: the merge of this release against an earlier tome.py (``--old``),
DeiT-S r=13, against the plain model and the same-shape oracle (measure.TokenCutOracle), alternating rounds,
medians of paired runs.

The release of 2026-12-02 (evening) writes every token into its output slot with one scatter-add (the slots from
one top-k, a cumulative sum and the partners), normalising the keys once; before it, the one-pass merge
(argsort, sort, two gathers, a segment sum and a concatenation; ``git show e92116b:src/tokenthrift/tome.py``),
and before that the two-pass merge (``git show 547abc4:src/tokenthrift/tome.py``).

    python benchmarks/tome_merge_overhead.py --old OLD_TOME_PY --trials 5
"""
import argparse
import importlib.util
import sys
import time
from pathlib import Path
from statistics import median

import timm
import torch

import tokenthrift as tt
from tokenthrift import measure, tome
from tokenthrift.apps import report
from tokenthrift.hosts import host_of

from suite import write_result


def load_old(path: str):
    """The previous tome.py as a module of the package (its relative imports resolve against tokenthrift)."""
    spec = importlib.util.spec_from_file_location("tokenthrift._tome_before", path, submodule_search_locations=None)
    old = importlib.util.module_from_spec(spec)
    old.__package__ = "tokenthrift"
    sys.modules[spec.name] = old  # its dataclasses look their module up
    spec.loader.exec_module(old)
    return old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="the previous tome.py, whose bipartite_merge is timed as 'before'")
    ap.add_argument("--old-label", default="before", help="the old merge's row name")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3, help="paired runs; the table gives their medians")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    old = load_old(args.old)
    new_merge = tome.bipartite_merge

    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224").eval()
    merged = tt.tome.merging_copy(deit, 13, prop_kernel="mask")
    oracle = measure.TokenCutOracle.of(deit, merged, (3, 224, 224), host_of(deit))
    x = torch.randn(1, 3, 224, 224)

    def with_merge(fn):
        def run(images):
            tome.bipartite_merge = fn  # the block calls the module's function: swap it for this round
            try:
                return merged(images)
            finally:
                tome.bipartite_merge = new_merge
        return run

    with torch.no_grad():
        torch.testing.assert_close(with_merge(old.bipartite_merge)(x), merged(x), rtol=1e-4, atol=1e-4)
    r0 = tt.tome.merging_copy(deit, 0)  # ToMe's block path, nothing merged
    nets = [deit, with_merge(new_merge), with_merge(old.bipartite_merge), oracle, r0]
    names = ["DeiT-S", "ToMe r=13, this release", f"ToMe r=13, {args.old_label}",
             "oracle of ToMe r=13", "ToMe r=0 (block path only)"]
    trials = [measure.paired_throughput([measure.OnImages(n, x) for n in nets], (3, 224, 224), 1,
                                        repeats=args.rounds, warmup=3)
              for _ in range(args.trials)]  # this VM drifts by ~10 % between runs
    rows = []
    for k, name in enumerate(names):
        row = {"model": name, "img_s": median([t[k] for t in trials]),
               "speedup": median([t[k] / t[0] for t in trials])}
        if k in (1, 2):
            shares = [1 - t[k] / t[3] for t in trials]
            row.update(overhead_share=median(shares), overhead_trials="/".join(f"{v:.3f}" for v in shares))
        rows.append(row)
    # the attention kernel alone at a merged block's shape: with the size mask (proportional attention) and without
    q, k, v = (torch.randn(1, 6, 150, 64) for _ in range(3))
    bias = torch.rand(1, 1, 1, 150).log()
    kernel_us = {}
    with torch.no_grad():
        for label, mask in (("sdpa_with_size_mask_us", bias), ("sdpa_without_mask_us", None)):
            times = []
            for _ in range(220):
                t0 = time.perf_counter()
                torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                times.append(time.perf_counter() - t0)
            kernel_us[label] = median(times[20:]) * 1e6
    print(kernel_us)
    meta = measure.run_metadata(device="cpu", dtype="fp32", batch=1, rounds=args.rounds)
    write_result(Path(__file__).parent / "results" / "tome_merge_overhead", meta,
                 {"trials": trials, "rows": rows, "kernel": kernel_us})
    print(report.table(rows))


if __name__ == "__main__":
    main()
