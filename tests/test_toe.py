"""ToE: the operator against a slow reference loop, the schedule, and the timm patch."""
import copy
import math

import pytest
import timm
import torch

import tokenthrift as tt
from tokenthrift.toe import ToESchedule, expansion_sizes, token_expansion


# ---------------------------------------------------------------- slow, obviously-correct reference
def _closeness(a, b, distance):
    a, b = a.double(), b.double()
    if distance == "cosine":
        return float(a @ b / (a.norm() * b.norm()))
    if distance == "euclidean":
        return -float((a - b).norm())
    return -float((a - b).abs().sum())


def reference_toe(x, keep_rates, r0, k, num_prefix_tokens, distance):
    """docs/methods.md §2 written as plainly as possible: one image, one token at a time."""
    outs, indices = [], []
    for image in x:
        prefix, tokens = image[:num_prefix_tokens], image[num_prefix_tokens:]
        n = len(tokens)
        step = int(1 // r0)
        selected = list(range(0, n, step))[: int(n * r0)]
        rates = [r0, *keep_rates]
        for j in range(1, len(rates)):
            count = int(n * (rates[j] - rates[j - 1]))
            sizes = [count // k] * (k - 1) + [count - (count // k) * (k - 1)]
            for size in sizes:
                nearest_sel = {i: max(_closeness(tokens[i], tokens[s], distance) for s in selected)
                               for i in range(n) if i not in selected}
                selected += sorted(nearest_sel, key=lambda i: nearest_sel[i])[:size]
        kept = sorted(selected)
        groups = {s: [s] for s in kept}
        for i in range(n):
            if i not in groups:
                groups[max(kept, key=lambda s: _closeness(tokens[i], tokens[s], distance))].append(i)
        merged = torch.stack([tokens[groups[s]].mean(0) for s in kept])
        outs.append(torch.cat([prefix, merged]))
        indices.append(torch.tensor(kept))
    return torch.stack(outs), torch.stack(indices)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "manhattan"])
@pytest.mark.parametrize(
    "n,prefix,r0,keep_rates,k",
    [
        (36, 1, 0.25, [0.5], 2),
        (36, 1, 0.25, [0.5, 0.75], 2),
        (49, 2, 0.2, [0.4, 0.7], 3),  # distilled DeiT: two prefix tokens; LV-ViT rates
        (30, 0, 0.3, [0.6, 0.8], 1),  # no prefix token (avg-pool ViT); EfficientTrain rates
        (25, 5, 0.25, [], 2),  # stage 0: seeds only; four register tokens + CLS
    ],
)
def test_operator_matches_reference_loop(distance, n, prefix, r0, keep_rates, k):
    torch.manual_seed(n + prefix + k)
    x = torch.randn(3, prefix + n, 16)
    tokens, index = token_expansion(x, keep_rates, r0, k, prefix, distance)
    ref_tokens, ref_index = reference_toe(x, keep_rates, r0, k, prefix, distance)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-6)
    n0, chunks = expansion_sizes(n, r0, keep_rates, k)
    assert tokens.shape == (3, prefix + n0 + sum(chunks), 16)


def test_operator_picks_far_tokens_and_merges_near_ones():
    # 8 tokens, seeds 0 and 4 (r0 = 0.25, step 4). Token 6 points away from both seeds, so it is the one
    # token stage 1 adds; every other token is averaged into the seed it points along.
    t = torch.tensor([[1, 0, 0], [1, .1, 0], [.1, 1, 0], [1, -.1, 0],
                      [0, 1, 0], [0, 1, .1], [0, 0, 1], [1, 0, .2]])
    x = torch.cat([torch.full((1, 3), 9.0), t])[None]
    out, index = token_expansion(x, [0.375], r0=0.25, k=1, num_prefix_tokens=1)
    assert index.tolist() == [[0, 4, 6]]
    expected = torch.stack([t[[0, 1, 3, 7]].mean(0), t[[2, 4, 5]].mean(0), t[6]])
    torch.testing.assert_close(out[0], torch.cat([x[0, :1], expected]))


def test_operator_is_identity_with_all_tokens_kept():
    x = torch.randn(2, 1 + 16, 8)
    out, index = token_expansion(x, [0.5, 0.75, 1.0], r0=0.25, k=2)
    assert torch.equal(out, x) and torch.equal(index, torch.arange(16).expand(2, -1))


def test_every_token_gets_gradient_and_selection_has_none():
    x = torch.randn(2, 1 + 64, 12, requires_grad=True)
    out, _ = token_expansion(x, [0.5], r0=0.25)
    out.sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()


def test_operator_is_vectorised_over_the_batch():
    # each image is processed independently: batching must not change any image's result
    x = torch.randn(5, 1 + 49, 16)
    out, index = token_expansion(x, [0.5, 0.75], r0=0.25)
    for b in range(5):
        o, i = token_expansion(x[b:b + 1], [0.5, 0.75], r0=0.25)
        assert torch.equal(i[0], index[b]) and torch.allclose(o[0], out[b])


@pytest.mark.parametrize("kwargs,message", [
    (dict(r0=0.0, keep_rates=[0.5]), "r0"),
    (dict(r0=0.5, keep_rates=[0.25]), "non-decreasing"),
    (dict(r0=0.25, keep_rates=[0.5, 1.5]), "at most 1.0"),
    (dict(r0=0.25, keep_rates=[0.5], k=0), "positive integer"),
    (dict(r0=0.25, keep_rates=[0.5], distance="cheb"), "unknown ToE distance"),
    (dict(r0=0.01, keep_rates=[0.5]), "keeps no seed"),
])
def test_operator_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        token_expansion(torch.randn(1, 17, 4), **kwargs)


# ---------------------------------------------------------------- schedule
def test_schedule_stages_and_state():
    s = ToESchedule()  # DeiT recipe: r0 .25, keep .5/.75/1, milestones 0/100/200
    assert [s.stage(e) for e in (0, 99, 100, 199.5, 200, 299)] == [1, 1, 2, 2, 3, 3]
    assert s.rates(150) == (0.5, 0.75) and s.keep_rate(150) == 0.75 and s.is_full(250)
    late = ToESchedule(milestones=(10, 20, 30))
    assert late.rates(5) == () and late.keep_rate(5) == 0.25
    s.set_epoch(120)
    t = ToESchedule(r0=0.2, keep_rates=(0.4, 0.7, 1.0), milestones=(0, 1, 2))
    t.load_state_dict(s.state_dict())
    assert t == s and t.stage() == 2
    with pytest.raises(ValueError, match="one milestone per stage"):
        ToESchedule(milestones=(0, 100))
    with pytest.raises(ValueError, match="non-decreasing epochs"):
        ToESchedule(milestones=(0, 200, 100))


# ---------------------------------------------------------------- the timm patch
def tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg)


VARIANTS = {
    "vit": dict(),
    "layerscale_qknorm": dict(init_values=1e-2, qk_norm=True),
    "registers": dict(reg_tokens=4),
    "avgpool_no_cls": dict(class_token=False, global_pool="avg"),
}


def _block_inputs(model):
    shapes = []
    hooks = [b.register_forward_pre_hook(lambda m, a: shapes.append(a[0].shape[1])) for b in model.blocks]
    return shapes, hooks


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_apply_reduces_in_training_and_eval_equals_plain(variant):
    torch.manual_seed(0)
    plain = tiny_vit(**VARIANTS[variant])
    model = copy.deepcopy(plain)
    handle = tt.toe.apply(model, r0=0.25, keep_rates=(0.5, 0.75, 1.0), milestones=(0, 1, 2))
    x = torch.randn(4, 3, 32, 32)
    prefix = model.num_prefix_tokens
    shapes, hooks = _block_inputs(model)
    model.train()
    model(x)
    assert shapes == [prefix + 64, prefix + 32, prefix + 32]
    assert handle.last_patch_index.shape == (4, 32)
    model.eval(), plain.eval()
    assert torch.equal(model(x), plain(x))
    handle.set_epoch(2)  # last stage keeps every token: no reduction
    shapes.clear(), model.train(), model(x)
    assert shapes == [prefix + 64] * 3
    for h in hooks:
        h.remove()


def test_distilled_deit_keeps_both_prefix_tokens():
    torch.manual_seed(0)
    plain = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=4,
                              embed_dim=32, depth=2, num_heads=2, num_classes=5)
    model = copy.deepcopy(plain)
    tt.toe.apply(model, milestones=(0, 1, 2))
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0][:, :2].clone()))
    block0 = []
    model.blocks[0].register_forward_hook(lambda m, a, o: block0.append(o[:, :2].clone()))
    model.train()
    model.set_distilled_training(True)
    out, out_dist = model(torch.randn(2, 3, 32, 32))
    assert out.shape == out_dist.shape == (2, 5)
    assert torch.equal(seen[0], block0[0])  # CLS and distillation tokens pass through untouched
    model.eval(), plain.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), plain(x))


def test_remove_restores_plain_model_and_state_dict_keys():
    torch.manual_seed(0)
    plain = tiny_vit()
    model = copy.deepcopy(plain)
    tt.toe.apply(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    with pytest.raises(RuntimeError, match="already applied"):
        tt.toe.apply(model)
    tt.toe.remove(model)
    assert tt.toe.get_handle(model) is None
    x = torch.randn(2, 3, 32, 32)
    model.train(), plain.train()
    assert torch.equal(model(x), plain(x))
    with pytest.raises(RuntimeError, match="not applied"):
        tt.toe.remove(model)


def test_ema_copy_runs_full_tokens():
    from timm.utils import ModelEmaV3
    model = tiny_vit()
    tt.toe.apply(model)
    ema = ModelEmaV3(model, decay=0.9)
    shapes, _ = _block_inputs(ema.module)
    ema.module(torch.randn(2, 3, 32, 32))
    assert shapes == [65, 65, 65]


def test_gradient_checkpointing_keeps_toe_and_gradients():
    torch.manual_seed(0)
    model = tiny_vit(depth=4)
    tt.toe.apply(model)
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    shapes, _ = _block_inputs(ckpt)
    x = torch.randn(3, 3, 32, 32)
    model.train(), ckpt.train()
    model(x).sum().backward()
    ckpt(x).sum().backward()
    assert shapes[:4] == [65, 33, 33, 33]
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_unsupported_models_get_clear_errors():
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    with pytest.raises(TypeError, match="supports timm VisionTransformer"):
        tt.toe.apply(resnet)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        tt.toe.apply(tiny_vit(depth=1))


def test_training_macs_match_analytic_count_plus_operator_overhead():
    model = tiny_vit(depth=4)
    handle = tt.toe.apply(model, r0=0.25, keep_rates=(0.5, 0.75, 1.0), milestones=(0, 1, 2))
    n, d = 64, 32
    for epoch, m in [(0, 32), (1, 48)]:
        handle.set_epoch(epoch)
        expected = tt.measure.vit_macs(model, [1 + n] + [1 + m] * 3) + 2 * n * m * d  # + selection/merge
        assert tt.measure.macs(model, (3, 32, 32), train=True) == pytest.approx(expected, rel=1e-9)
    handle.set_epoch(2)
    assert tt.measure.macs(model, (3, 32, 32), train=True) == tt.measure.vit_macs(model)
    assert tt.measure.macs(model, (3, 32, 32), train=False) == tt.measure.vit_macs(model)
    assert math.isclose(tt.measure.macs(model, (3, 32, 32)), tt.measure.macs(tt.toe.remove(model), (3, 32, 32)))


def test_block0_output_is_what_the_operator_sees():
    import timm

    from tokenthrift.toe import block0_output

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                              reg_tokens=2).train()
    images = torch.randn(2, 3, 32, 32)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model.eval()(images)
    model.train()
    out = block0_output(model, images)
    assert torch.equal(out, seen[0]) and out.shape == (2, 3 + 16, 192)
    assert model.training and len(seen) == 2  # the forward stopped after block 0 and the mode is restored
