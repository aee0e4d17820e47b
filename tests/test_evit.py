"""EViT-style attentive-token pruning: the pruning step and the whole patched forward against slow per-image
references written here, keep rate 1 as the plain model on every host, MACs against the analytic count, and the
method through every entry point (train, eval, compare, bench, macs, visualize, export at batch 1 and 17)."""
import copy
import math

import pytest
import timm
import torch
from test_cli import RUN, TINY, parse_table

import tokenthrift as tt
from tokenthrift import evit
from tokenthrift.apps.cli import main
from tokenthrift.errors import InvalidArgumentError, StateError, UnsupportedModelError


def tiny_vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=4,
                             num_heads=2, num_classes=5, **kw).eval()


def slow_prune(x, attention, keep, P, fuse=True, fusion="sum"):
    """The authors' pruning step (youweiliang/evit), image by image, token by token: the prefix, the ``keep`` most
    attended patch tokens in rank order (their top-k, sorted), and the others' sum weighted by their attention
    (``fusion="mean"``: divided by that attention, our option). Also returns the kept patch indices, in rank order."""
    out, order = [], []
    for b in range(x.shape[0]):
        scores = attention[b, P:].tolist()
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[:keep]
        rest = [i for i in range(len(scores)) if i not in ranked]
        tokens = [x[b, i] for i in range(P)] + [x[b, P + i] for i in ranked]
        if fuse and rest:
            fused = sum(scores[i] * x[b, P + i] for i in rest)
            tokens.append(fused if fusion == "sum" else fused / sum(scores[i] for i in rest))
        out.append(torch.stack(tokens))
        order.append(ranked)
    return torch.stack(out), order


def in_grid_order(x, order, P):
    """The reference's tokens with the kept ones put back in their grid order (ours keeps that order; the model's
    output does not depend on it)."""
    rows = []
    for b, ranked in enumerate(order):
        perm = [i for i in range(P)] + [P + j for j in sorted(range(len(ranked)), key=lambda j: ranked[j])]
        perm += list(range(P + len(ranked), x.shape[1]))
        rows.append(x[b, perm])
    return torch.stack(rows)


def test_attentive_prune_matches_the_authors_step():
    torch.manual_seed(1)
    x, attention = torch.randn(3, 2 + 20, 8), torch.rand(3, 22).softmax(-1)
    size = torch.ones(3, 22, 1)
    for fuse, fusion in ((True, "sum"), (True, "mean"), (False, "sum")):
        out, s, _, ids = evit.attentive_prune(x, attention, 7, 2, size, ids=torch.arange(20).expand(3, 20), fuse=fuse,
                                              fusion=fusion)
        expected, order = slow_prune(x, attention, 7, 2, fuse, fusion)
        torch.testing.assert_close(out, in_grid_order(expected, order, 2))
        assert ids[:, :7].tolist() == [sorted(o) for o in order]  # the same kept patches
        assert out.shape[1] == 2 + 7 + int(fuse) and (ids[:, :7] >= 0).all()
        if fuse:  # the fused token holds every pruned patch, and says so in the ids
            assert s.sum(1).flatten().tolist() == [22.0] * 3 and (ids[:, 7] == -1).all()
    same, *_ = evit.attentive_prune(x, attention, 20, 2, size)
    assert same is x  # keeping every token keeps the tensor


def test_the_kept_count_rounds_as_the_authors_code():
    assert evit.kept_count(100, 0.55) == math.ceil(0.55 * 100) == 56  # 55.00000000000001 rounds up, as theirs does
    assert [evit.kept_count(196, r) for r in (0.9, 0.5, 1.0)] == [177, 98, 196]


def slow_forward(model, images, keep_rate, locations, fusion="sum"):
    """The authors' EViT forward (youweiliang/evit: explicit attention, the class row of the softmax averaged over
    heads, ``left_tokens = ceil(keep_rate · (N - 1))`` with N counting the class token, top-k in rank order, the
    complement fused by attention-weighted sum after the attention residual, then the MLP), one image at a time."""
    outs = []
    for image in images:
        x = model.patch_embed(image[None])
        x = model.norm_pre(model._pos_embed(x))
        for i, blk in enumerate(model.blocks):
            a = blk.attn
            y = blk.norm1(x)
            T = y.shape[1]
            q, k, v = a.qkv(y).reshape(1, T, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            weights = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
            x = x + blk.ls1(a.proj((weights @ v).transpose(1, 2).reshape(1, T, -1)))
            if i in locations and keep_rate < 1:
                left = math.ceil(keep_rate * (T - 1))
                if left < T - 1:
                    x, _ = slow_prune(x, weights[:, :, 0].mean(1), left, 1, fusion=fusion)
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        outs.append(model.forward_head(model.norm(x)))
    return torch.cat(outs)


@pytest.mark.parametrize("fusion", ["sum", "mean"])
def test_the_patched_forward_matches_the_authors_forward(fusion):
    model = tiny_vit()
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = slow_forward(model, images, 0.6, (1, 2), fusion)
        evit.apply(model, 0.6, locations=(1, 2), fusion=fusion)
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)
        assert evit.get_handle(model).counts() == [(49, 49), (49, 31), (31, 20), (20, 20)]
        if fusion == "sum":  # the two fusions are different models
            evit.get_handle(model).fusion = "mean"
            assert not torch.allclose(model(images), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,kw", [("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, reg_tokens=2)),
                                     ("eva02_small_patch14_224", dict(img_size=56)),
                                     ("vit_small_patch16_rope_224", dict(img_size=64)),
                                     ("vit_small_patch16_dinov3", dict(img_size=64))])
def test_keep_rate_one_is_the_plain_model_and_pruning_runs_on_every_host(name, kw):
    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    torch.manual_seed(0)
    model = timm.create_model(name, depth=4, num_classes=5, **kw).eval()
    with torch.no_grad():  # off the initial values (timm zero-initialises some): the blocks and the head matter
        for pname, p in model.named_parameters():
            p.copy_(torch.full_like(p, 0.7) if "gamma" in pname or ".ls" in pname else p + 0.02 * torch.randn_like(p))
    images = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        plain = model(images)
        try:
            handle = evit.apply(model, 1.0)
        except UnsupportedModelError as err:  # make test-compat: the oldest timm's rotary tables cannot move
            if "1.0.31" in str(err) and timm.__version__ != "1.0.31":
                pytest.skip(f"timm {timm.__version__}: {err}")
            raise
        assert torch.equal(model(images), plain)
        handle.keep_rate = 0.5
        pruned = model(images)
        assert pruned.shape == plain.shape and not torch.allclose(pruned, plain)
        evit.remove(model)
        assert torch.equal(model(images), plain)


def test_macs_follow_the_analytic_count():
    model = tiny_vit()
    pruned = evit.pruning_copy(model, 0.5)
    D, P, blocks = 32, 1, evit.get_handle(pruned).counts()
    plain = tt.measure.macs(model, (1, 28, 28))
    full_block = 12 * (49 + P) * D * D + 2 * (49 + P) ** 2 * D
    analytic = plain - len(blocks) * full_block
    for attn, mlp in blocks:  # attention on the tokens before, the MLP on those after
        analytic += 4 * (attn + P) * D * D + 2 * (attn + P) ** 2 * D + 8 * (mlp + P) * D * D
    counted = tt.measure.macs(pruned, (1, 28, 28))
    pruning_blocks = sum(a != m for a, m in blocks)
    # the class row (T·D per pruning block) is the only work beyond the analytic blocks
    assert analytic <= counted <= analytic + pruning_blocks * 2 * (49 + P) * D


def test_errors_say_what_is_wrong():
    model = tiny_vit()
    with pytest.raises(InvalidArgumentError, match=r"keep_rate=0.0.*\(0, 1\]"):
        evit.apply(model, 0.0)
    with pytest.raises(InvalidArgumentError, match="indices 0..3"):
        evit.apply(model, 0.5, locations=(7,))
    with pytest.raises(InvalidArgumentError, match="fusion='avg': one of sum, mean"):
        evit.apply(model, 0.5, fusion="avg")
    with pytest.raises(UnsupportedModelError, match="no class token"):
        evit.apply(tiny_vit(class_token=False, global_pool="avg"), 0.5)
    evit.apply(model, 0.5)
    with pytest.raises(StateError, match="already applied"):
        evit.apply(model, 0.5)
    other = tiny_vit()
    tt.tome.apply(other, 2)
    with pytest.raises(StateError, match=r"another tokenthrift method \(ToMeVisionTransformer\)"):
        evit.apply(other, 0.5)
    toe_trained = tiny_vit()
    tt.toe.apply(toe_trained, r0=0.25, keep_rates=(0.5, 1.0), milestones=(0, 1))  # a hook, in training only
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(evit.pruning_copy(toe_trained, 0.5)(x), evit.pruning_copy(tiny_vit(), 0.5)(x))


def test_gradients_reach_the_attention_through_the_fusion_and_it_compiles():
    model = tiny_vit()
    evit.apply(model, 0.5, locations=(1,))
    model.train()
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0  # the class row weighs the fused token
    model.eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_the_method_through_every_entry_point(tmp_path, capsys):
    out = str(tmp_path)
    main(["train", *TINY, *RUN, "--method", "evit", "--evit-keep-rate", "0.5", "--output", out, "--name", "evit"])
    assert "x a training forward of the same model unpruned" in capsys.readouterr().out
    ckpt = str(tmp_path / "evit" / "last.pth")
    main(["eval", "--checkpoint", ckpt])
    (row,) = parse_table(capsys.readouterr().out)
    assert row["keep_rate"] == 0.5 and row["MACs_ratio"] < 0.75 and row["GMACs"] < row["baseline_GMACs"]
    main(["macs", *TINY, "--method", "evit", "--evit-keep-rate", "0.7"])
    plain, pruned = parse_table(capsys.readouterr().out)
    assert plain["MACs_ratio"] == 1 and 0.5 < pruned["MACs_ratio"] < 1
    main(["bench", "--checkpoint", ckpt, "--batch-size", "4", "--repeats", "1", "--warmup", "0"])
    plain, pruned, oracle = parse_table(capsys.readouterr().out)  # the plain model it is measured against shown too
    assert plain["model"] == "without the method" and pruned["MACs_ratio"] < 0.75 and "oracle" in oracle["model"]
    for batch in ("1", "17"):  # the file takes any batch: checked at 1, 3 and 17 whatever was asked
        main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / f"evit{batch}.pt2")])
        assert "max_abs_diff" in capsys.readouterr().out
    main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "evit.onnx")])
    assert "dynamic" in capsys.readouterr().out
    png = tmp_path / "kept.png"
    main(["visualize", "--checkpoint", ckpt, "--images", "3", "--out", str(png)])
    assert png.stat().st_size > 1000
    main(["compare", "--full", "vit_fmnist_tiny_patch2_28", "--data", "fashion-mnist", "--eval-subset", "64", "--runs",
          ckpt, "--tome-r", "2", "--evit-keep-rate", "0.7", "--batch-size", "4", "--repeats", "1", "--output",
          str(tmp_path / "cmp")])
    result = (tmp_path / "cmp" / "compare.md").read_text()
    assert "EViT keep 0.7 (off the shelf)" in result and "EViT keep 0.5 (trained with it)" in result


def test_a_checkpoint_resumes_only_with_its_settings(tmp_path, capsys):
    main(["train", *TINY, *RUN, "--method", "evit", "--output", str(tmp_path), "--name", "a"])
    main(["train", *TINY, *RUN, "--epochs", "2", "--method", "evit", "--evit-locations", "1", "2", "--resume",
          str(tmp_path / "a" / "last.pth"), "--output", str(tmp_path), "--name", "a"])  # the default (3 blocks), spelled
    assert "top1" in capsys.readouterr().out
    main(["train", *TINY, *RUN, "--method", "evit", "--output", str(tmp_path), "--name", "a", "--overwrite"])
    capsys.readouterr()
    for changed in (["--evit-keep-rate", "0.5"], ["--evit-locations", "2"]):
        with pytest.raises(SystemExit):
            main(["train", *TINY, *RUN, "--epochs", "2", "--method", "evit", *changed, "--resume",
                  str(tmp_path / "a" / "last.pth"), "--output", str(tmp_path), "--name", "a"])
        assert "resume with the same --evit-* options" in capsys.readouterr().err


def test_pruning_copy_leaves_the_model_plain():
    model = tiny_vit()
    before = copy.deepcopy(model.state_dict())
    pruned = evit.pruning_copy(model, 0.5)
    assert evit.get_handle(model) is None and evit.get_handle(pruned) is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pruned.state_dict().keys() == model.state_dict().keys()


def test_a_run_saved_before_the_fusion_option_keeps_the_fusion_it_trained_with():
    from tokenthrift.train import TrainConfig

    old = TrainConfig.from_saved({"method": "evit", "evit_keep_rate": 0.5, "evit_fuse": True})
    assert old.options.fusion == "mean"  # releases before the option fused by the normalised average
    assert TrainConfig.from_saved({"method": "evit", "evit_fusion": "sum"}).options.fusion == "sum"
    assert TrainConfig(method="evit").options.fusion == "sum"  # new runs: the authors' fusion
