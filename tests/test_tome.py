"""ToMe on timm ViTs: r=0 is the plain model, the patched forward equals a slow direct implementation of the
paper's equations, every supported block kind, MACs of the shrinking forward, training under DDP."""
import copy
import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenthrift as tt
from tokenthrift import measure
from tokenthrift.hosts import host_of

VARIANTS = {
    "vit": dict(),
    "deit_distilled": dict(name="deit_tiny_distilled_patch16_224"),
    "registers": dict(reg_tokens=3),
    "layerscale_qknorm": dict(init_values=0.5, qk_norm=True),
    "avgpool": dict(class_token=False, global_pool="avg"),
}


def tiny(variant="vit", **kw):
    spec = dict(VARIANTS[variant])
    name = spec.pop("name", "vit_tiny_patch16_224")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                              num_classes=5, **{**spec, **kw}).eval()
    with torch.no_grad():  # off the initial values (LayerScale and zero heads would hide differences)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_r_zero_is_exactly_the_plain_model_and_remove_restores_it(variant):
    model = tiny(variant)
    x = torch.randn(2, 3, 32, 32)
    plain_class = type(model)
    with torch.no_grad():
        expected = model(x)
        tt.tome.apply(model, 0)
        assert torch.equal(model(x), expected)
        tt.tome.remove(model)
        assert type(model) is plain_class and torch.equal(model(x), expected)


def reference(model, x, r):
    """The paper's equations, image by image, with explicit loops and an explicit softmax."""
    P = model.num_prefix_tokens
    outs = []
    for image in x:
        t = model._pos_embed(model.patch_embed(image[None]))[0]  # (N, D)
        t = model.norm_pre(t)
        size = torch.ones(t.shape[0])
        for blk in model.blocks:
            n = t.shape[0]
            h = blk.norm1(t)
            attn = blk.attn
            qkv = attn.qkv(h).reshape(n, 3, attn.num_heads, attn.head_dim)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
            q, k = attn.q_norm(q.transpose(0, 1)).transpose(0, 1), attn.k_norm(k.transpose(0, 1)).transpose(0, 1)
            heads = []
            for hd in range(attn.num_heads):
                logits = q[:, hd] @ k[:, hd].T * attn.scale + torch.log(size)[None, :]  # proportional attention
                heads.append(torch.softmax(logits, -1) @ v[:, hd])
            out = torch.cat(heads, -1)
            t = t + blk.ls1(attn.proj(attn.norm(out) if hasattr(attn, "norm") else out))
            metric = k.mean(1)
            a = [i for i in range(P, n) if i % 2 == 0]
            b = [i for i in range(P, n) if i % 2 == 1]
            rr = min(r, (n - P) // 2)
            if rr > 0:
                best = []
                for i in a:  # each A token's most similar B token (cosine)
                    sims = [F.cosine_similarity(metric[i], metric[j], dim=0) for j in b]
                    j = int(torch.stack(sims).argmax())
                    best.append((float(sims[j]), i, b[j]))
                best.sort(key=lambda e: -e[0])
                merged = {i: j for _, i, j in best[:rr]}
                values = {i: (t[i] * size[i], size[i]) for i in range(n)}
                for i, j in merged.items():
                    vj, sj = values[j]
                    values[j] = (vj + t[i] * size[i], sj + size[i])
                keep = list(range(P)) + [i for i in a if i not in merged] + b
                t = torch.stack([values[i][0] / values[i][1] for i in keep])
                size = torch.stack([values[i][1] for i in keep])
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        t = model.norm(t)
        if model.global_pool == "avg":
            pooled = (t[P:] * size[P:, None]).sum(0) / size[P:].sum()
        else:
            pooled = t[0]
        outs.append(model.head(model.fc_norm(pooled)))
    return torch.stack(outs)


@pytest.mark.parametrize("kernel", ["fold", "mask"])
@pytest.mark.parametrize("variant", ["vit", "registers", "layerscale_qknorm", "avgpool"])
def test_patched_forward_equals_the_direct_implementation(variant, kernel):
    model = tiny(variant)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(model, x, 5)
        tt.tome.apply(model, 5, prop_kernel=kernel)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head_dim", [7, 8, 64])
def test_size_biased_attention_equals_the_math_kernel(head_dim):
    """log size folded into a q/k channel (padded to a multiple of 8) = softmax(scale q kT + log size) v, also
    with the flash kernel alone allowed (CUDA's flash kernels take no float mask; the CPU's does)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tokenthrift.tokens import size_biased_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, head_dim, generator=g) for _ in range(3))
    size = torch.randint(1, 20, (2, 11), generator=g).float()
    scale = head_dim ** -0.5
    expected = ((q @ k.transpose(-2, -1)) * scale + size.log()[:, None, None, :]).softmax(-1) @ v
    torch.testing.assert_close(size_biased_attention(q, k, v, size.log(), scale), expected, rtol=1e-5, atol=1e-5)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        torch.testing.assert_close(size_biased_attention(q, k, v, size.log(), scale), expected, rtol=1e-5, atol=1e-5)


def test_prop_kernel_is_checked():
    with pytest.raises(ValueError, match="prop_kernel='flash'"):
        tt.tome.apply(tiny("vit"), 2, prop_kernel="flash")


def test_distilled_deit_protects_both_prefix_tokens():
    model = tiny("deit_distilled")
    handle = tt.tome.apply(model, 6, trace_source=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    source = handle.last_source  # (B, N_final, N0): which original tokens each final token holds
    assert source.shape[1] == 2 + 64 - 3 * 6
    for p in range(2):  # the CLS and distillation tokens stay themselves, in front
        assert torch.equal(source[:, p], F.one_hot(torch.tensor(p), 66).float().expand(2, -1))
    assert torch.equal(source.sum(1), torch.ones(2, 66)) and torch.equal(handle.last_size[..., 0], source.sum(-1))


def test_schedules_and_caps():
    assert tt.tome.block_schedule(8, 3) == [8, 8, 8]
    assert tt.tome.block_schedule([4, 2], 3) == [4, 2, 0]
    assert tt.tome.block_schedule((8, 0.5), 3) == [4, 8, 12]
    model = tiny()
    # 64 patch tokens, 3 blocks: r=16 merges 16 in each (64 -> 48 -> 32 -> 16); r=17 would ask block 2 for 17 of
    # 31 tokens (at most 15): an error that names 16, never a table that says r=100 of a model that ran less
    for r in (17, 100, 500):
        with pytest.raises(ValueError, match=rf"ToMe r={r} .*block \d.*the largest r is 16"):
            tt.tome.apply(model, r)
    with pytest.raises(ValueError, match="asks block 2 .*the largest r is 16"):
        tt.tome.apply(model, [10, 10, 30])  # block 2 holds 44 patch tokens: at most 22
    assert not hasattr(model, "_tokenthrift_tome")  # a refused r leaves the model plain
    assert tt.tome.largest_r(65, 1, 3) == 16 and tt.tome.capped_blocks([16] * 3, 65, 1) == []
    handle = tt.tome.apply(model, 16, trace_source=True)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert handle.last_source.shape[1] == 1 + 64 - 3 * 16
    handle.r = 100  # a knob read at run time is checked at every forward, against the tokens of that input's size
    with torch.no_grad(), pytest.raises(ValueError, match=r"ToMe r=100 .*the largest r is 16 at this input size"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="VisionTransformer"):
        tt.tome.apply(timm.create_model("resnet10t"), 4)
    with pytest.raises(RuntimeError, match="already applied"):
        tt.tome.apply(model, 4)
    with pytest.raises(ValueError, match=">= 0"):
        tt.tome.block_schedule(-1, 3)



def paper_schedule(r, inflection, depth):
    """The paper's linear schedule written out (ToMe's parse_r): from r(1 - inflection) rounded down at the first
    block to 2r minus that at the last, evenly stepped, each value rounded down."""
    first = math.floor(r * (1 - inflection))
    last = 2 * r - first
    step = (last - first) / (depth - 1)
    return [math.floor(first + step * i) for i in range(depth)]


@pytest.mark.parametrize("r,inflection,depth", [(8, 0.5, 12), (8, -0.5, 12), (13, 1.0, 12), (13, -1, 12),
                                                 (16, 0.3, 7), (5, 0.0, 4), (0, 1.0, 12)])
def test_tuple_schedule_is_the_papers_linear_schedule(r, inflection, depth):
    schedule = tt.tome.block_schedule((r, inflection), depth)
    assert schedule == paper_schedule(r, inflection, depth)
    assert min(schedule) >= 0 and len(schedule) == depth
    assert sum(schedule) / depth == pytest.approx(r, abs=1)  # rounded down per block: the mean stays about r
    assert schedule == (sorted(schedule) if inflection >= 0 else sorted(schedule, reverse=True))


@pytest.mark.parametrize("inflection", [4, 1.5, -2, float("nan")])
def test_tuple_schedule_refuses_an_inflection_outside_minus_one_to_one(inflection):
    # (8, 4) reads as r=8 with inflection 4, not as per-block values: it gave [-24, -18, ..., 40] (negative r)
    with pytest.raises(tt.errors.InvalidArgumentError) as err:
        tt.tome.block_schedule((8, inflection), 12)
    message = str(err.value)
    assert "(r, inflection)" in message and "[-1, 1]" in message and f"got inflection {inflection}" in message
    assert "list (e.g. [8, 4]" in message  # per-block values: how to say what (8, 4) may have meant
    with pytest.raises(ValueError, match=r"r must be >= 0, got -2"):
        tt.tome.block_schedule((-2, 0.5), 12)
    with pytest.raises(ValueError, match=r"\(r, inflection\).*got \(8, 0.5, 1\)"):
        tt.tome.block_schedule((8, 0.5, 1), 12)

def test_macs_count_the_shrinking_forward_and_the_matching():
    model = tiny()
    plain = measure.macs(model, (3, 32, 32))
    tt.tome.apply(model, 8)
    D, heads, hidden = 32, 2, 128
    n, total = 65, 64 * 3 * 16 * D + D * 5  # patch embedding (3·4·4 per patch) and head
    for _ in range(3):
        total += 4 * n * D * D + 2 * n * n * D  # qkv, proj and attention on n tokens
        a = b = (n - 1) // 2
        total += a * b * (D // heads)  # the matching: A keys against B keys (head-averaged)
        n -= min(8, (n - 1) // 2)
        total += 2 * n * D * hidden  # the MLP on the merged tokens
    assert measure.macs(model, (3, 32, 32)) == pytest.approx(total, rel=1e-9) and total < plain


def test_trains_under_ddp_and_gradients_reach_every_parameter(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = tiny("layerscale_qknorm").train()
    tt.tome.apply(model, 6)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        net = DistributedDataParallel(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):  # a second step fails if a parameter missed the first backward
                loss = F.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
                loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        dist.destroy_process_group()
    assert math.isfinite(loss.item())
    twin = copy.deepcopy(model)  # EMA copies: their own handle, whose host describes the copy
    assert tt.tome.get_handle(twin) is not tt.tome.get_handle(model) and tt.tome.get_handle(twin).host.model is twin


def test_block_token_counts_and_the_oracle_follow_the_schedule():
    """The oracle runs the plain blocks at ToMe's shapes: attention on the tokens entering each block, the MLP on
    the r fewer after the merge; its MACs are ToMe's minus the matching."""
    plain = tiny("vit")
    merged = tt.tome.merging_copy(plain, 8)
    counts = measure.block_token_counts(merged, torch.randn(1, 3, 32, 32))
    assert counts == [(65, 57), (57, 49), (49, 41)]
    oracle = measure.TokenCutOracle(plain, counts, host_of(plain))
    assert measure.macs(oracle, (3, 32, 32)) < measure.macs(merged, (3, 32, 32)) < measure.macs(plain, (3, 32, 32))
    expected = measure.vit_macs(plain, [65, 57, 49])  # attention at the entering counts ...
    assert measure.macs(oracle, (3, 32, 32)) < expected  # ... and the MLP at the smaller ones
    with pytest.raises(ValueError, match="2 token counts for 3 blocks"):
        measure.TokenCutOracle(plain, counts[:2], host_of(plain))


TINY_RUN = ["--model", "vit_tiny_patch16_224", "--img-size", "28", "--patch-size", "4", "--in-chans", "1",
            "--embed-dim", "32", "--depth", "3", "--num-heads", "2"]


def test_method_tome_trains_evaluates_and_benches(tmp_path, capsys):
    """--method tome fine-tunes with ToMe applied; its weights are a plain ViT's (ToMe adds no parameters), and
    its eval and bench rows come from the adapter (bench: against the plain model and the oracle)."""
    from tokenthrift.apps.cli import main
    from tokenthrift.apps.evaluation import evaluate_checkpoint
    from tokenthrift.train import build_model, load_trained

    main(["train", *TINY_RUN, "--method", "tome", "--tome-r", "8", "--epochs", "1", "--train-subset", "128",
          "--eval-subset", "64", "--batch-size", "64", "--warmup-epochs", "0", "--no-progress", "--output",
          str(tmp_path), "--name", "tome"])
    model, cfg = load_trained(tmp_path / "tome" / "last.pth")
    assert tt.tome.get_handle(model).r == 8
    plain = build_model(cfg)
    plain.load_state_dict(torch.load(tmp_path / "tome" / "last.pth", weights_only=False)["model"])
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(tt.tome.merging_copy(plain.eval(), 8)(x), model.eval()(x))
    (row,) = evaluate_checkpoint(tmp_path / "tome" / "last.pth")
    assert row["method"] == "tome" and row["r"] == 8 and 0.5 < row["MACs_ratio"] < 1 and row["images"] == 64
    capsys.readouterr()
    main(["bench", *TINY_RUN, "--method", "tome", "--tome-r", "8", "--batch-size", "1", "4", "--repeats", "1",
          "--warmup", "0"])
    out = capsys.readouterr().out
    assert out.count("oracle (tokens cut)") == 2 and "overhead_share" in out and "ToMe r=8" in out


def test_patch_groups_follow_the_source_map_and_the_picture_reads_them(tmp_path, capsys):
    """After each block every patch sits in one token; the partition is what the source map says, with as many
    tokens as the schedule leaves; before any merge every patch is its own token. The picture command draws
    them (``--sites blocks.K``) and names a wrong site."""
    from tokenthrift.apps.cli import main

    model = tiny()
    handle = tt.tome.apply(model, 3, trace_source=True)
    x = torch.randn(4, 3, 32, 32)
    groups = tt.tome.patch_groups(model, x, [0, 2])
    assert handle.trace_source and not model.training  # left as it was
    with torch.no_grad():
        model(x)
    (k0, ids0, n0), (k2, ids2, n2) = groups
    assert (k0, n0, k2, n2) == (0, 64 - 3, 2, 64 - 9) and ids2.shape == (4, 8, 8)
    source = handle.last_source[:, 1:, 1:]  # the final map: patch tokens by original patches
    assert torch.equal(ids2.flatten(1), source.argmax(dim=1))
    assert (source.sum(dim=1) == 1).all()  # every patch in exactly one token
    assert all(len(torch.unique(ids0[b])) == n0 for b in range(4))
    tt.tome.remove(model)
    tt.tome.apply(model, [0, 2, 2])
    (_, first, n), = tt.tome.patch_groups(model, x, [0])
    assert n == 64 and torch.equal(first, torch.arange(64).view(1, 8, 8).expand(4, -1, -1))
    with pytest.raises(tt.errors.InvalidArgumentError, match="blocks 0..2"):
        tt.tome.patch_groups(model, x, [3])

    png = tmp_path / "tome.png"
    main(["visualize", *TINY_RUN, "--method", "tome", "--tome-r", "8", "--images", "3", "--sites", "blocks.0",
          "blocks.2", "--out", str(png)])
    assert png.stat().st_size > 5000
    with pytest.raises(SystemExit):
        main(["visualize", *TINY_RUN, "--method", "tome", "--sites", "blocks.9", "--out", str(png)])
    assert "a ToMe site is a block, blocks.0 to blocks." in capsys.readouterr().err
