"""Deterministic inference: an eval-mode forward of every method gives bit-identical outputs for the same input,
call after call, with two threads (random weights: merges near ties are where float noise would flip a hard
assignment); exported (.pt2, which runs the same kernels) and compiled (inductor, other kernels) models equal
eager on inputs they were not traced with."""
import pytest
import timm
import torch

import tokenthrift as tt

SMALL_VIT = dict(img_size=64, depth=4, num_classes=3)


def ltm_models():
    yield "vit", timm.create_model("ltm_vit_small_patch16_224", ltm_site_ratio=0.7, **SMALL_VIT)
    yield "swin", timm.create_model("ltm_swin_tiny_patch4_window7_224", img_size=64, window_size=4, num_classes=3,
                                    depths=(1, 1, 2, 1), embed_dim=32, num_heads=(1, 2, 4, 8), ltm_site_ratio=0.6)
    yield "mobilevit", timm.create_model("ltm_mobilevit_xs", num_classes=3)
    yield "efficientvit", timm.create_model("ltm_efficientvit_b1", num_classes=3)


def other_methods():
    merged = timm.create_model("deit_tiny_patch16_224", **SMALL_VIT)
    tt.tome.apply(merged, 3)
    yield "tome", merged, {}
    revit = tt.revit.convert(timm.create_model("deit_tiny_patch16_224", **SMALL_VIT), grids=(4, 3, 2))
    yield "revit", revit, {"grid": 3}
    toe = timm.create_model("deit_tiny_patch16_224", **SMALL_VIT)
    tt.toe.apply(toe, r0=0.25, keep_rates=(0.5, 1.0), milestones=(0, 10), k=2)
    yield "toe", toe, {}  # eval mode: every token, exactly the plain model


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def repeated(model, x, calls=4, **kwargs):
    with torch.no_grad():
        return [model(x, **kwargs) for _ in range(calls)]


def test_every_ltm_family_is_bit_identical_call_after_call(two_threads):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    for name, model in ltm_models():
        model.eval()
        outs = repeated(model, x)
        assert all(torch.equal(o, outs[0]) for o in outs), name
        # the same images inside another batch (other shapes, another split over threads) give the same logits
        with torch.no_grad():
            inside = model(torch.cat([x, torch.randn(3, 3, 64, 64)]))[:4]
        torch.testing.assert_close(inside, outs[0], rtol=0, atol=1e-5, msg=name)


def test_tome_revit_and_toe_are_bit_identical_call_after_call(two_threads):
    torch.manual_seed(1)
    x = torch.randn(8, 3, 64, 64)
    for name, model, kwargs in other_methods():
        outs = repeated(model.eval(), x, **kwargs)
        assert all(torch.equal(o, outs[0]) for o in outs), name


def test_an_exported_program_runs_the_eager_kernels_bit_for_bit(two_threads):
    """A torch.export program (.pt2) runs the same ATen kernels as eager: on inputs of other batch sizes than the
    traced one its logits are the eager ones exactly (the persistent and the windowed LTM families)."""
    from torch.export import Dim

    for name, model in list(ltm_models())[:2]:
        model.eval()
        program = torch.export.export(model, (torch.randn(2, 3, 64, 64),),
                                      dynamic_shapes=({0: Dim("batch", min=1, max=64)},)).module()
        for batch in (1, 3, 17):
            x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                assert torch.equal(program(x), model(x)), (name, batch)


def test_an_inductor_compiled_ltm_model_equals_eager_on_fresh_inputs(two_threads):
    """Compiled with code generation (other kernels, other float rounding), at batch sizes it was not compiled for."""
    model = timm.create_model("ltm_vit_small_patch16_224", ltm_site_ratio=0.7, **{**SMALL_VIT, "depth": 2}).eval()
    compiled = torch.compile(model, dynamic=True)  # one graph for every batch size
    with torch.no_grad():
        compiled(torch.randn(2, 3, 64, 64))
        for batch in (3, 17):
            x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(10 + batch))
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-4)
