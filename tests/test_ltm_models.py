"""LTM on the four timm families: exactness at ratio 1.0, parameters, determinism, gradients, dense outputs."""
import copy
import math

import pytest
import timm
import torch
from torch import nn

from tokenthrift import ltm
from tokenthrift.ltm.mask import TokenMerger

# tiny timm models of every family: (timm name, overrides, input side)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=16, depths=(1, 1, 2, 1),
                                                  num_heads=(1, 1, 2, 2), window_size=7), 56),
    "mobilevit": ("mobilevit_xxs", dict(), 64),
    "efficientvit": ("efficientvit_b0", dict(), 64),
}
# nominal strides of the dense outputs, per family
STRIDES = {"swin": [4, 8, 16, 32], "mobilevit": [2, 4, 8, 16, 32], "efficientvit": [4, 8, 16, 32]}


def build(family, **kw):
    name, cfg, side = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **{**cfg, **kw})
    for m in model.modules():  # timm zero-inits some last BN gammas, which would hide gradient paths
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    return model, torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_is_exactly_the_plain_model(family):
    model, x = build(family)
    model.eval()
    merged = ltm.convert(copy.deepcopy(model), 1.0)
    assert ltm.family(merged) == family and ltm.is_ltm(merged)
    assert torch.equal(merged(x), model(x))
    assert torch.equal(merged.forward_features(x), model.forward_features(x))
    merged.train(), model.train()
    torch.manual_seed(3)
    a = merged(x)
    torch.manual_seed(3)
    assert torch.equal(a, model(x))  # training mode (BatchNorm batch statistics) too


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_changes_the_output_keeps_parameters_and_state_dict(family):
    model, x = build(family)
    model.eval()
    merged = ltm.convert(copy.deepcopy(model), 0.6)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in model.parameters())
    assert merged.state_dict().keys() == model.state_dict().keys()
    merged.load_state_dict(model.state_dict())  # base checkpoints load as they are
    assert not torch.allclose(merged(x), model(x), atol=1e-4)
    maps = ltm.merge_maps(merged, x)
    assert maps and all(m.target[0] * m.target[1] < m.grid[0] * m.grid[1] for m in maps)
    learned = ltm.convert(copy.deepcopy(model), 0.6, learn_tau=True)
    extra = sum(p.numel() for p in learned.parameters()) - sum(p.numel() for p in model.parameters())
    assert extra == ltm.merge_sites(model)  # one scalar temperature per merge site


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_is_deterministic_training_is_stochastic(family):
    model, x = build(family)
    merged = ltm.convert(model, 0.6).eval()
    assert torch.equal(merged(x), merged(x))
    merged.train()
    for m in merged.modules():  # BatchNorm batch statistics are deterministic; Gumbel noise is not
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    torch.manual_seed(0)
    a = merged(x)
    torch.manual_seed(0)
    assert torch.equal(a, merged(x))  # reproducible from the seed
    outs = [merged(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_parameter(family):
    model, x = build(family, **({} if family == "efficientvit" else dict(drop_path_rate=0.1)))
    if family == "mobilevit":  # a larger map, so that every transformer layer still has tokens to merge
        x = torch.randn(2, 3, 128, 128)
    plain = copy.deepcopy(model).train()
    merged = ltm.convert(model, 0.7, learn_tau=True).train()

    def no_gradient(net):
        # dense features too: with CLS pooling the last ViT block's patch tokens never reach the logits
        torch.manual_seed(0)
        (net(x).pow(2).sum() + net.forward_features(x).pow(2).mean()).backward()
        return {n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}

    missing = no_gradient(merged)
    # the temperature of a site learns (through the soft and the straight-through hard mask) when it merges
    merged_sites = {m.site + ".log_tau" for m in ltm.merge_maps(merged, x) if m.target[0] * m.target[1] > 1}
    assert merged_sites and not missing & merged_sites
    # merging cuts no gradient path: what gets none in LTM gets none in the plain model either (timm 1.0.15's
    # Swin windows a 1x1 map so that its relative position bias learns nothing), apart from idle temperatures
    assert all(n.endswith("log_tau") for n in missing - no_gradient(plain))


@pytest.mark.parametrize("family", ["swin", "mobilevit", "efficientvit"])
def test_dense_outputs_keep_the_nominal_strides(family):
    model, x = build(family)
    side = x.shape[-1]
    merged = ltm.convert(copy.deepcopy(model), 0.5).eval()
    if hasattr(model, "forward_intermediates"):  # timm's EfficientViT has it from 1.0.16 on
        plain = model.eval().forward_intermediates(x, intermediates_only=True)
        feats = merged.forward_intermediates(x, intermediates_only=True)
        assert [f.shape for f in feats] == [f.shape for f in plain]
    assert merged.forward_features(x).shape == model.eval().forward_features(x).shape
    # features_only wrappers of timm convert as well
    name, cfg, _ = FAMILIES[family]
    net = timm.create_model(name, pretrained=False, features_only=True, **cfg)
    base_shapes = [f.shape for f in net.eval()(x)]
    ltm.convert(net, 0.5)
    shapes = [f.shape for f in net(x)]
    assert shapes == base_shapes
    h = 1 if family == "swin" else 2  # timm's Swin features are NHWC
    assert [s[h] for s in shapes] == [math.ceil(side / st) for st in STRIDES[family][-len(shapes):]]


def test_remove_restores_the_plain_model():
    for family in FAMILIES:
        model, x = build(family)
        model.eval()
        ref = model(x)
        merged = ltm.convert(model, 0.5)
        assert not torch.equal(merged(x), ref)
        plain = ltm.remove(merged)
        assert not ltm.is_ltm(plain) and not any(isinstance(m, TokenMerger) for m in plain.modules())
        assert torch.equal(plain(x), ref)


@pytest.mark.parametrize("family", ["swin", "efficientvit"])
def test_unmerge_modes(family):
    model, x = build(family)
    model.eval()
    residual = ltm.convert(copy.deepcopy(model), 0.5).eval()
    broadcast = ltm.convert(copy.deepcopy(model), 0.5, unmerge="broadcast").eval()
    assert residual(x).shape == broadcast(x).shape and not torch.allclose(residual(x), broadcast(x))
    with pytest.raises(ValueError, match="unmerge mode"):
        ltm.convert(copy.deepcopy(model), 0.5, unmerge="scatter")


def test_swin_windows_on_a_map_that_needs_padding():
    # 40 px / patch 4 = 10x10 map with 4x4 windows: the last window row/column overhangs by 2
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, img_size=40,
                              embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4).eval()
    x = torch.randn(2, 3, 40, 40)
    merged = ltm.convert(copy.deepcopy(model), 0.5).eval()
    assert merged(x).shape == (2, 5)
    # padding tokens carry size 0, and merging conserves the sizes of the real tokens
    blk = next(m for m in merged.modules() if isinstance(m, ltm.swin.LTMSwinTransformerBlock))
    blk.ltm.record = True
    merged(x)
    mask = blk.ltm.last
    assert mask.source_sizes is not None and (mask.source_sizes == 0).any()
    assert torch.equal(mask.sizes.sum(-1), mask.source_sizes.sum(-1))


# ---------------------------------------------------------------- ViT specifics
VIT_VARIANTS = {
    "vit": dict(),
    "layerscale_qknorm": dict(init_values=1e-2, qk_norm=True),
    "registers": dict(reg_tokens=4),
    "avgpool_no_cls": dict(class_token=False, global_pool="avg"),
    "map_head": dict(global_pool="map"),
}


@pytest.mark.parametrize("variant", VIT_VARIANTS)
def test_vit_variants(variant):
    model, x = build("vit", depth=3, **VIT_VARIANTS[variant])
    model.eval()
    assert torch.equal(ltm.convert(copy.deepcopy(model), 1.0)(x), model(x))
    merged = ltm.convert(copy.deepcopy(model), 0.8).eval()
    P = model.num_prefix_tokens
    feats = merged.forward_features(x)
    assert feats.shape == model.forward_features(x).shape
    tokens, state, _ = merged.forward_merged(x)
    assert tokens.shape[1] == P + state.grid[0] * state.grid[1] < P + 64
    # dense features are the merged tokens broadcast: one distinct feature per merged token
    patches = feats[:, P:]
    assert torch.equal(patches, merged.norm(tokens)[:, P:].gather(
        1, state.patch_map.unsqueeze(-1).expand(-1, -1, patches.shape[-1])))
    torch.testing.assert_close(state.sizes.sum(-1), torch.full((2,), 64.0))
    # the prefix tokens are never merged
    assert torch.equal(feats[:, :P], merged.norm(tokens)[:, :P])
    merged.train()
    merged(x).sum().backward()
    assert all(p.grad is not None for p in merged.parameters())


def test_vit_token_schedule_follows_the_nominal_count():
    model, x = build("vit", depth=4)
    merged = ltm.convert(model, [0.9, 0.9, 1.0, 0.5]).eval()
    maps = ltm.merge_maps(merged, x)
    counts = [m.target[0] * m.target[1] for m in maps]
    assert counts == [56, 49, 25]  # grids closest to 64·0.9, 64·0.81, then (block 2 keeps) 64·0.405
    assert [m.site for m in maps] == ["blocks.0.ltm", "blocks.1.ltm", "blocks.3.ltm"]
    # the patch maps compose: every original patch lands where forward_merged's source map says
    _, state, _ = merged.forward_merged(x)
    assert torch.equal(maps[-1].patch_target, state.patch_map)
    # each final token is a weighted average of its patches: the composed weights sum to one
    last = maps[-1]
    sums = torch.zeros(2, 25).scatter_add_(1, last.patch_target, last.patch_weight)
    torch.testing.assert_close(sums, torch.ones(2, 25))


def test_vit_forward_intermediates_and_features_only():
    model, x = build("vit", depth=3)
    model.eval()
    merged = ltm.convert(copy.deepcopy(model), 0.7).eval()
    final, inter = merged.forward_intermediates(x, indices=[0, 2])
    assert final.shape == (2, 65, 32) and [t.shape for t in inter] == [(2, 32, 8, 8)] * 2
    nlc = merged.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True,
                                       return_prefix_tokens=True)
    assert nlc[0][0].shape == (2, 64, 32) and nlc[0][1].shape == (2, 1, 32)
    out = merged.forward_intermediates(x, indices=[1], output_dict=True)
    assert out["image_features"].shape == (2, 65, 32)
    # block 0's intermediate is the merged tokens of block 0, broadcast
    first = merged.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
    assert first.flatten(2).transpose(1, 2).unique(dim=1).shape[1] < 64
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, features_only=True, out_indices=(0, 2),
                            **{**FAMILIES["vit"][1], "depth": 3})
    ltm.convert(net, 0.7)
    assert [f.shape for f in net.eval()(x)] == [(2, 32, 8, 8)] * 2


def test_vit_grad_checkpointing_matches():
    model, x = build("vit", depth=3)
    merged = ltm.convert(model, 0.7).train()
    torch.manual_seed(5)
    a = merged(x)
    a.sum().backward()
    grads = [p.grad.clone() for p in merged.parameters()]
    merged.zero_grad()
    merged.set_grad_checkpointing(True)
    torch.manual_seed(5)
    b = merged(x)
    b.sum().backward()
    assert torch.equal(a, b)
    for g, p in zip(grads, merged.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="LTM supports timm VisionTransformer"):
        ltm.convert(timm.create_model("resnet10t", pretrained=False), 0.9)
    with pytest.raises(TypeError, match="MobileViT v1"):
        ltm.convert(timm.create_model("mobilevitv2_050", pretrained=False), 0.9)
    model, x = build("vit")
    with pytest.raises(ValueError, match="2 merge sites"):
        ltm.convert(copy.deepcopy(model), [0.9, 0.9, 0.9])
    with pytest.raises(ValueError, match="must lie in"):
        ltm.convert(copy.deepcopy(model), 0.0)
    merged = ltm.convert(model, 0.9)
    with pytest.raises(RuntimeError, match="already applied"):
        ltm.convert(merged, 0.9)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        merged(x, attn_mask=torch.zeros(65, 65))
    with pytest.raises(RuntimeError, match="not applied"):
        ltm.remove(timm.create_model("resnet10t", pretrained=False))
    dropping, _ = build("vit", patch_drop_rate=0.5)
    with pytest.raises(ValueError, match="patch_drop_rate"):
        ltm.convert(dropping, 0.9)
    with pytest.raises(ValueError, match="tau_g"):
        ltm.set_temperature(merged, tau_g=-1.0)


def test_temperature_knobs_reach_every_site():
    model, _ = build("swin")
    merged = ltm.convert(model, 0.6, tau_s=0.3)
    ltm.set_temperature(merged, tau_g=0.5)
    assert {(m.tau_g, m.tau_s) for m in ltm.mergers(merged)} == {(0.5, 0.3)}


def test_merge_maps_lay_out_every_family_on_its_token_map():
    torch.manual_seed(0)
    swin = ltm.convert(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(28, 42),
                                         patch_size=2, embed_dim=16, depths=(2,), num_heads=(2,), window_size=7,
                                         num_classes=3), 0.5)
    x = torch.randn(2, 3, 28, 42)
    maps = ltm.merge_maps(swin, x)
    assert [m.site for m in maps] == ["layers.0.blocks.0.ltm", "layers.0.blocks.1.ltm"]
    m = maps[0]
    assert (m.windows, m.size, m.origin) == ((2, 3), (14, 21), (7, 7))
    ids, weight = m.spatial()
    assert ids.shape == weight.shape == (2, 14, 21)
    M = m.target[0] * m.target[1]
    # the token at row 9, column 15 lies in window (1, 2) = window 5, at (2, 1) inside it
    assert ids[1, 9, 15] == 5 * M + m.patch_target[1 * 6 + 5, 2 * 7 + 1]
    assert weight[1, 9, 15] == m.patch_weight[1 * 6 + 5, 2 * 7 + 1]
    # a merged token's weights over its sources sum to one, and every id lies in its own window
    sums = torch.zeros(2, 6 * M).scatter_add_(1, ids.flatten(1), weight.flatten(1))
    assert torch.allclose(sums[sums > 0], torch.ones(()))
    window_of = torch.arange(6).view(2, 3).repeat_interleave(7, 0).repeat_interleave(7, 1)
    assert torch.equal(ids // M, window_of.expand(2, -1, -1))

    vit = ltm.convert(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                                        embed_dim=32, depth=3, num_heads=2, num_classes=3), 0.6)
    first, *_, last = ltm.merge_maps(vit, torch.randn(2, 3, 32, 32))
    assert first.origin == last.origin == (8, 8) and last.windows == (1, 1)
    ids, weight = last.spatial()
    assert torch.equal(ids.flatten(1), last.patch_target)  # persistent chain: composed back to every patch


@pytest.mark.parametrize("mode", ["residual", "broadcast"])
@pytest.mark.parametrize("img_size", [32, 40])  # 40 px: 10x10 map, 4x4 windows that overhang it
def test_swin_block_matches_a_window_by_window_reference(mode, img_size):
    from timm.models.swin_transformer import window_partition, window_reverse

    from tokenthrift.ltm.mask import merge, merge_mask, target_grid

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, img_size=img_size,
                              embed_dim=16, depths=(2,), num_heads=(2,), window_size=4).eval()
    ltm.convert(model, 0.5, unmerge=mode).eval()
    for blk in model.layers[0].blocks:
        x = torch.randn(2, img_size // 4, img_size // 4, 16)
        B, H, W, C = x.shape
        (wh, ww), target = blk.window_size, target_grid(blk.window_size, 0.5 * 16)
        z = x + blk._attn(blk.norm1(x))
        ph, pw = -H % wh, -W % ww
        zp = torch.nn.functional.pad(z, (0, 0, 0, pw, 0, ph))
        real = torch.nn.functional.pad(torch.ones(1, H, W, 1), (0, 0, 0, pw, 0, ph))
        sizes = window_partition(real, (wh, ww)).view(-1, wh * ww).repeat(B, 1) if ph or pw else None
        windows = window_partition(zp, (wh, ww)).view(-1, wh * ww, C)
        mask = merge_mask(windows, sizes, (wh, ww), target, tau_s=blk.ltm.tau_s)
        merged = merge(windows, mask, own_seeds=True)
        update = blk.mlp(blk.norm2(merged))
        back = update if mode == "residual" else merged + update
        unmerged = back.gather(1, mask.assign.unsqueeze(-1).expand(-1, -1, C))  # each token's merged row
        out = windows + unmerged if mode == "residual" else unmerged
        ref = window_reverse(out.view(-1, wh, ww, C), (wh, ww), H + ph, W + pw)[:, :H, :W]
        torch.testing.assert_close(blk(x), ref)


def test_merge_picture_fills_each_token_with_its_pixels_mean_and_outlines_it():
    from tokenthrift.viz import OUTLINE, merge_picture

    image = torch.arange(16.0).view(1, 4, 4)  # a grey ramp, 0..15: stretched to 0..1 by /15
    ids = torch.tensor([[7, 7], [3, 9]])  # 2x2 patches of 2x2 pixels: the top two patches merged
    pic = merge_picture(image, ids, width=4)  # drawn at the image's own size
    assert pic.shape == (4, 4, 3)
    top = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7.0]).mean() / 15
    edge = torch.zeros(4, 4, dtype=torch.bool)
    edge[2, :] = True  # the top token against the bottom ones
    edge[2:, 2] = True  # bottom left against bottom right
    torch.testing.assert_close(pic[edge], torch.tensor(OUTLINE).expand(int(edge.sum()), 3))
    assert torch.allclose(pic[:2], top) and torch.allclose(pic[3, :2], torch.tensor([8, 9, 12, 13.0]).mean() / 15)
    assert torch.allclose(pic[3, 3], torch.tensor([10, 11, 14, 15.0]).mean() / 15)
    big = merge_picture(image, ids)  # about 224 px: outlines of one pixel, thinner than a patch
    assert big.shape == (224, 224, 3) and (big == torch.tensor(OUTLINE)).all(-1).float().mean() < 0.02
