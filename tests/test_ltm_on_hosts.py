"""LTM's ViT family on the host layer: bit for bit the LTM of before the hosts on timm ViTs (a frozen copy of its
blocks, tests/reference), the encoders it newly takes (Eva: EVA-02, DINOv3, PE, RoPE ViTs) with merged tokens'
rotary angles at their patches' mean position against a slow per-token reference, one graph under torch.compile,
export, and the refusals."""
import copy

import pytest
import timm
import torch
from reference import ltm_vit_before_hosts as frozen
from test_hosts import FAMILIES, captured_ropes, images, recent_timm, slow_rope, small

import tokenthrift as tt
from tokenthrift.errors import UnsupportedModelError
from tokenthrift.ltm.mask import TokenMerger

VIT_CONFIGS = {  # timm VisionTransformer variants the old LTM took (the plain ViT is inside the first)
    "registers_layerscale_qknorm": ("vit_tiny_patch16_224", dict(reg_tokens=4, init_values=0.5, qk_norm=True)),
    "avg_pool": ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False, fc_norm=True)),
    "map_head": ("vit_base_patch16_siglip_224", dict(embed_dim=64, num_heads=2)),
}


def frozen_convert(model: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """The LTM of before the hosts, swapped in by hand (what its family record did)."""
    for blk in model.blocks:
        blk.__class__ = frozen.LTMBlock
        blk.ltm = TokenMerger(ratio)
    model.__class__ = frozen.LTMVisionTransformer
    return model


@pytest.mark.parametrize("name", VIT_CONFIGS)
def test_ltm_on_timm_vits_is_bit_for_bit_the_ltm_before_the_hosts(name):
    """Logits in eval and training mode (Gumbel noise from the same seed), the gradients of a step, the
    intermediates and the merge maps, at ratio 0.7, with gradient checkpointing in the second round (ratio 1 is
    the plain model: tests/test_hosts.py's table)."""
    model_name, kw = VIT_CONFIGS[name]
    torch.manual_seed(0)
    base = timm.create_model(model_name, img_size=64, patch_size=8, depth=3, num_classes=5, **kw)
    x = torch.randn(3, 3, 64, 64)
    for ratio, checkpointing in ((0.7, False), (0.7, True)):
        old, new = frozen_convert(copy.deepcopy(base), ratio), tt.ltm.convert(copy.deepcopy(base), ratio)
        old.set_grad_checkpointing(checkpointing), new.set_grad_checkpointing(checkpointing)
        for train in (False, True):
            old.train(train), new.train(train)
            torch.manual_seed(1)
            a = old(x)
            torch.manual_seed(1)
            b = new(x)
            assert torch.equal(a, b), f"{name} ratio {ratio} train={train}"
            a.square().sum().backward(), b.square().sum().backward()
            for (pname, p), q in zip(old.named_parameters(), new.parameters()):
                assert torch.equal(p.grad, q.grad), pname
        old.eval(), new.eval()
        with torch.no_grad():
            fa, fb = old.forward_intermediates(x, indices=2), new.forward_intermediates(x, indices=2)
            assert torch.equal(fa[0], fb[0]) and all(torch.equal(u, v) for u, v in zip(fa[1], fb[1]))
        for ma, mb in zip(tt.ltm.merge_maps(old, x), tt.ltm.merge_maps(new, x)):
            assert ma.site == mb.site and torch.equal(ma.patch_target, mb.patch_target)
    assert type(new).__name__ == f"LTM{type(base).__name__}" and type(tt.ltm.remove(new)) is type(base)


@pytest.mark.parametrize("family", ["EVA-02", "DINOv3", "RoPE ViT, mixed"])  # bands, periods, learned frequencies
def test_merged_tokens_get_the_rotary_angles_of_their_mean_position(family, monkeypatch):
    """The rotary embedding every block applies, captured, against the slow reference at each merged token's
    mean position computed from the merge maps (which patches each token holds), one token at a time."""
    name, kw = FAMILIES[family]
    model = small(name, depth=3, **kw)
    recent_timm(tt.ltm.convert, model, 0.6)
    host = model._tokenthrift_ltm_host
    seen = captured_ropes(host, monkeypatch)
    x = images(model, batch=2)
    maps = tt.ltm.merge_maps(model, x)  # one eval forward: the ropes captured are that forward's
    assert [m.site for m in maps][:2] == ["blocks.0.ltm", "blocks.1.ltm"] and len(seen) == 3
    grid = host.grid_size
    for block, rope in seen[1:]:  # block k sees the tokens of merge k - 1
        holder = maps[block - 1].patch_target  # (B, N0): the token every original patch is in
        h, w = maps[block - 1].target
        assert rope.shape[-2] == h * w
        for b in range(2):
            for t in range(0, h * w, 3):
                patches = (holder[b] == t).nonzero()[:, 0]
                row, col = float((patches // grid[1]).float().mean()), float((patches % grid[1]).float().mean())
                expected = slow_rope(model, grid, row, col, block)
                got = rope[b, :, t]
                torch.testing.assert_close(got, expected.expand_as(got), rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", ["SigLIP (MAP)"])  # (a rotary encoder: tests/test_hosts.py, every method)
def test_ltm_on_the_hosts_compiles_in_one_graph_and_exports(family):
    import torch._dynamo as dynamo

    name, kw = FAMILIES[family]
    model = small(name, **kw)
    recent_timm(tt.ltm.convert, model, 0.7)
    dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # a graph break raises
    x = images(model, batch=2)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)


def test_ltm_refuses_what_it_cannot_run_and_leaves_the_model_as_it_was():
    postnorm = small("eva02_small_patch14_224", img_size=56, use_post_norm=True)
    with pytest.raises(UnsupportedModelError, match="LTM supports Eva's pre-norm EvaBlock"):
        tt.ltm.convert(postnorm, 0.8)
    assert not tt.ltm.is_ltm(postnorm) and type(postnorm).__name__ == "Eva"
    merged = small("vit_tiny_patch16_224")
    tt.tome.apply(merged, 1)
    with pytest.raises(UnsupportedModelError, match=r"already patched \(ToMeVisionTransformer\)"):
        tt.ltm.convert(merged, 0.8)
    with pytest.raises(UnsupportedModelError, match="LTM supports timm VisionTransformer .*, Eva"):
        tt.ltm.convert(timm.create_model("resnet10t"), 0.8)
