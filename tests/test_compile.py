"""torch.compile(fullgraph=True) captures every method's forward in one graph (a graph break raises under
fullgraph) and recompiles at most once per new input shape; outputs equal eager. Dynamo's capture is what
breaks and recompiles are about, so the tests compile with the ``eager`` backend (no code generation: fast on
a CPU); BENCHMARKS.md times the inductor backend."""
import pytest
import timm
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import tokenthrift as tt

SMALL_VIT = dict(img_size=64, depth=4, num_classes=3)


def graphs_after(model, inputs, **forward_kwargs) -> list[int]:
    """Unique graphs compiled after each call of ``torch.compile(model, fullgraph=True)`` on ``inputs``; every
    output checked against eager."""
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    seen = []
    for x in inputs:
        out = compiled(x, **forward_kwargs)
        torch.testing.assert_close(out, model(x, **forward_kwargs), rtol=1e-4, atol=1e-5)
        seen.append(counters["stats"]["unique_graphs"])
    return seen


def two_shapes(shape):
    a, b = torch.randn(2, *shape), torch.randn(3, *shape)
    return [a, a, b, b]  # the same shape twice, then a new one twice


@pytest.mark.parametrize("name,kw", [
    ("ltm_vit_small_patch16_224", dict(SMALL_VIT, ltm_site_ratio=0.8)),
    ("ltm_swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4, num_classes=3)),
    ("ltm_efficientvit_b1", dict(num_classes=3)),
    ("ltm_mobilevit_xs", dict(num_classes=3)),
])
def test_ltm_compiles_in_one_graph_and_once_per_shape(name, kw):
    model = timm.create_model(name, **kw).eval()
    assert graphs_after(model, two_shapes((3, 64, 64))) == [1, 1, 2, 2]


def test_converted_ltm_tome_and_revit_compile():
    shape = (3, 64, 64)
    converted = tt.ltm.convert(timm.create_model("deit_tiny_patch16_224", **SMALL_VIT), 0.8).eval()
    assert graphs_after(converted, two_shapes(shape)) == [1, 1, 2, 2]
    merged = timm.create_model("deit_tiny_patch16_224", **SMALL_VIT).eval()
    tt.tome.apply(merged, 3)  # the largest r of 16 patch tokens over 4 blocks
    assert graphs_after(merged, two_shapes(shape)) == [1, 1, 2, 2]
    revit = tt.revit.convert(timm.create_model("deit_tiny_patch16_224", **SMALL_VIT), grids=(4, 3, 2)).eval()
    for grid in revit.grids:  # each grid (what the adaptive path runs per group) is its own graph
        assert graphs_after(revit, two_shapes(shape), grid=grid) == [1, 1, 2, 2]


def test_timesformer_and_the_toe_training_forward_compile():
    video = timm.create_model("timesformer_tiny_patch16_224", img_size=32, patch_size=8, num_frames=4, depth=2,
                              num_classes=3).eval()
    assert graphs_after(video, two_shapes((3, 4, 32, 32))) == [1, 1, 2, 2]
    model = timm.create_model("deit_tiny_patch16_224", **SMALL_VIT)
    tt.toe.apply(model, r0=0.25, keep_rates=(0.5, 1.0), milestones=(0, 10), k=2)
    model.train()
    torch.manual_seed(0)  # no dropout in DeiT-Ti: the training forward is deterministic
    assert graphs_after(model, two_shapes((3, 64, 64))) == [1, 1, 2, 2]
