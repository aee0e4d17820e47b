"""The host layer (tokenthrift.hosts) and ToMe on it: bit for bit the ToMe of before the hosts on timm ViTs (a
frozen copy of it, tests/reference), the plain model at r = 0 on every family with non-trivial weights, rotary
positions of merged tokens against a slow per-token reference, size-weighted pooling (average and the attention-
pool head) against duplicated tokens, one graph under torch.compile, and clear refusals."""
import ast
import copy
import math
from pathlib import Path

import pytest
import timm
import torch
from reference import tome_before_hosts as frozen

import tokenthrift as tt
from tokenthrift.errors import UnsupportedModelError
from tokenthrift.hosts import EvaHost, ViTHost, grid_coords, host_of

VIT_CONFIGS = {  # timm VisionTransformer variants the old ToMe took
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers_layerscale_qknorm": ("vit_tiny_patch16_224", dict(reg_tokens=4, init_values=0.5, qk_norm=True)),
    "avg_pool": ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False, fc_norm=True)),
}

# (timm name, keywords): every family the hosts take, small; whether timm has it (older timm lacks some names)
FAMILIES = {
    "ViT": ("vit_tiny_patch16_224", {}),
    "DeiT-III": ("deit3_small_patch16_224", {}),
    "DINOv2": ("vit_small_patch14_dinov2", dict(img_size=56)),
    "DINOv2 + registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=56)),
    "CLIP": ("vit_base_patch16_clip_224", dict(embed_dim=64, num_heads=2)),
    "SigLIP (MAP)": ("vit_base_patch16_siglip_224", dict(embed_dim=64, num_heads=2)),
    "FlexiViT": ("flexivit_small", dict(img_size=64, patch_size=16)),
    "EVA-02": ("eva02_small_patch14_224", dict(img_size=56)),
    "DINOv3": ("vit_small_patch16_dinov3", {}),
    "PE-core (MAP)": ("vit_pe_core_small_patch16_384", {}),
    "RoPE ViT": ("vit_small_patch16_rope_224", {}),
    "RoPE ViT, mixed": ("vit_small_patch16_rope_mixed_224", {}),
    "RoPE ViT, registers, avg": ("vit_medium_patch16_rope_reg1_gap_256", {}),
}


def small(name: str, **kw) -> torch.nn.Module:
    """Two blocks at 64 px (or the size given), 5 classes, every weight moved off its initial value and LayerScale
    at 0.7, so that the blocks and the head matter (timm initialises some to zero)."""
    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    torch.manual_seed(0)
    model = timm.create_model(name, **{"img_size": 64, "depth": 2, "num_classes": 5, **kw}).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(torch.full_like(p, 0.7) if "gamma" in pname or ".ls" in pname else p + 0.02 * torch.randn_like(p))
    return model


def recent_timm(call, *args, **kwargs):
    """``call(*args, **kwargs)``, or a skip where the installed timm (the oldest the project declares, in
    make test-compat) lacks what a rotary encoder needs and the host refuses it, saying so."""
    try:
        return call(*args, **kwargs)
    except UnsupportedModelError as err:
        if "1.0.31" in str(err) and timm.__version__ != "1.0.31":
            pytest.skip(f"timm {timm.__version__}: {err}")
        raise


def images(model, batch=3, seed=1):
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", VIT_CONFIGS)
def test_tome_on_timm_vits_is_bit_for_bit_the_tome_before_the_hosts(name):
    """Logits in eval and training mode, the gradients of a step and the source maps, for r = 0, an int, a list
    and (r, inflection), proportional attention as a mask and folded into a q/k channel."""
    model_name, kw = VIT_CONFIGS[name]
    torch.manual_seed(0)
    base = timm.create_model(model_name, img_size=32, patch_size=4, depth=3, num_classes=5, **kw)
    x = torch.randn(3, 3, 32, 32)
    for r, kernel in ((0, "mask"), (4, "mask"), (4, "fold"), ([5, 3], "mask"), ((6, 0.5), "fold")):
        old, new = copy.deepcopy(base), copy.deepcopy(base)
        frozen.apply(old, r, prop_kernel=kernel, trace_source=True)
        tt.tome.apply(new, r, prop_kernel=kernel, trace_source=True)
        for train in (False, True):
            old.train(train), new.train(train)
            a, b = old(x), new(x)
            a, b = (torch.cat(a), torch.cat(b)) if isinstance(a, tuple) else (a, b)
            assert torch.equal(a, b), (r, kernel, train)
            assert torch.equal(frozen.get_handle(old).last_source, tt.tome.get_handle(new).last_source)
            if train:
                a.square().sum().backward()
                b.square().sum().backward()
                for p, q in zip(old.parameters(), new.parameters()):
                    assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))


@pytest.mark.parametrize("family", FAMILIES)
def test_tome_at_r_0_is_the_plain_model_and_remove_restores_it(family):
    name, kw = FAMILIES[family]
    model = small(name, **kw)
    x = images(model)
    with torch.no_grad():
        plain = model(x)
        merged = recent_timm(tt.tome.merging_copy, model, 0)
        torch.testing.assert_close(merged(x), plain, rtol=0, atol=1e-5)
        tt.tome.apply(model, 2)
        assert (model(x) - plain).abs().max() > 1e-4  # r = 2 merges: the logits move
        tt.tome.remove(model)
        assert torch.equal(model(x), plain) and type(model).__name__ in ("VisionTransformer", "Eva")


def slow_rope(model: torch.nn.Module, grid: tuple[int, int], row: float, col: float, block: int) -> torch.Tensor:
    """The rotary embedding (sin, cos) of one token at patch position (row, col), from timm's documented
    conventions written out one coordinate at a time: a coordinate per axis (index + offset, rescaled to a
    reference grid; pixel coordinates in [-1, 1]; DINOv3's centred ones in [-1, 1]), then angle = coordinate x
    frequency for every band, sin and cos in the rotary layout."""
    rope = model.rope
    h, w = grid
    index = {"row": row, "col": col}
    size = {"row": h, "col": w}
    order = ["col", "row"] if rope.grid_indexing == "xy" else ["row", "col"]
    if hasattr(rope, "freqs"):  # mixed: per-head learned frequencies of x and y, the index grid
        t = [index[a] for a in order]  # t_x, t_y as timm's grid channels
        f = rope.freqs[:, block].float()  # (2, heads, d/2)
        angles = t[0] * f[0] + t[1] * f[1]
        layout = angles.repeat_interleave(2, -1)
        return torch.cat([layout.sin(), layout.cos()], -1)
    coords = []
    for axis in order:
        i, s = index[axis], size[axis]
        if hasattr(rope, "periods"):
            denom = {"separate": s, "max": max(h, w), "min": min(h, w)}[rope.normalize_coords]
            coords.append(2.0 * ((i + 0.5 + rope.grid_offset) / denom) - 1.0)
        elif rope.grid_type == "pixel":
            coords.append(-1.0 + 2.0 * i / (s - 1))
        else:
            value = i + rope.grid_offset
            if rope.ref_feat_shape is not None:
                ref = dict(zip(["row", "col"], rope.ref_feat_shape))[axis]
                value = value / s * ref
            coords.append(value)
    if hasattr(rope, "periods"):
        angles = torch.cat([2 * math.pi * c / rope.periods.float() for c in coords])
    else:
        angles = torch.cat([c * rope.bands.float() for c in coords])
    layout = torch.cat([angles, angles]) if rope.rotate_half else angles.repeat_interleave(2)
    return torch.cat([layout.sin(), layout.cos()])


def captured_ropes(host, monkeypatch) -> list:
    """A list that collects (block, rotary embedding) of every ``host.rope`` call from now on."""
    seen = []
    real = type(host).rope

    def capture(self, embedded, coords, block):
        out = real(self, embedded, coords, block)
        seen.append((block, out))
        return out

    monkeypatch.setattr(type(host), "rope", capture)
    return seen


@pytest.mark.parametrize("family", ["EVA-02", "DINOv3", "PE-core (MAP)", "RoPE ViT", "RoPE ViT, mixed"])
def test_merged_tokens_get_the_rotary_angles_of_their_mean_position(family, monkeypatch):
    """The rotary embedding every block applies, captured, against the slow reference at each token's mean
    position computed from ToMe's source map (which patches each token holds), one token at a time."""
    name, kw = FAMILIES[family]
    model = small(name, **kw)
    handle = recent_timm(tt.tome.apply, model, 5, trace_source=True, positions="mean")
    host = handle.host
    seen = captured_ropes(host, monkeypatch)
    with torch.no_grad():
        model(images(model, batch=2))
    P = host.num_prefix_tokens
    grid = host.grid_size
    patches = grid_coords(grid, 2, "cpu")
    assert len(seen) == len(model.blocks) == 2
    sizes = handle.state.history[0][:, P:, P:].sum(-1)
    assert sizes.max() > 1  # block 1 sees merged tokens, at fractional mean positions
    for block, rope in seen[1:]:  # from block 1 on the tokens are merged
        source = handle.state.history[block - 1][:, P:, P:]  # the tokens entering this block
        mean = source @ patches / source.sum(-1, keepdim=True)  # (B, N, 2) mean (row, col) per token
        for b in range(2):
            for n in range(0, mean.shape[1], 7):  # every seventh token: slow on purpose
                expected = slow_rope(model, grid, float(mean[b, n, 0]), float(mean[b, n, 1]), block)
                got = rope[b, :, n]  # (1, 2d), heads broadcast; (heads, 2d) for mixed RoPE
                torch.testing.assert_close(got, expected.expand_as(got), rtol=0, atol=2e-5)


def test_pooling_counts_a_merged_token_as_the_patches_it_holds():
    """The size-weighted average and the attention-pool head (log size on its keys) give a token of size k what k
    identical tokens would give: pooling a sequence with duplicates equals pooling it merged."""
    for family in ("SigLIP (MAP)", "RoPE ViT, registers, avg", "PE-core (MAP)"):
        name, kw = FAMILIES[family]
        model = small(name, **kw)
        host = host_of(model)
        P = host.num_prefix_tokens
        torch.manual_seed(2)
        x = torch.randn(2, P + 5, model.embed_dim)
        repeats = torch.tensor([1] * P + [3, 1, 2, 1, 4])
        duplicated = x.repeat_interleave(repeats, dim=1)
        size = repeats.view(1, -1, 1).float().expand(2, -1, 1)
        include = host.pool_type() == "map" and isinstance(host, EvaHost)
        with torch.no_grad():
            torch.testing.assert_close(host.pool_by_size(x, size, include), host.pool_by_size(
                duplicated, torch.ones(2, duplicated.shape[1], 1), include), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["EVA-02", "RoPE ViT, mixed", "SigLIP (MAP)"])  # DINOv3: every method, below
def test_tome_on_the_hosts_compiles_in_one_graph(family):
    import torch._dynamo as dynamo

    name, kw = FAMILIES[family]
    model = small(name, **kw)
    recent_timm(tt.tome.apply, model, 3)
    dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # a graph break raises
    x = images(model, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_hosts_refuse_what_they_do_not_describe():
    assert isinstance(host_of(small("vit_tiny_patch16_224")), ViTHost)
    with pytest.raises(UnsupportedModelError, match="supports timm VisionTransformer, timm Eva .* got ResNet"):
        tt.tome.apply(timm.create_model("resnet10t"), 2)
    if timm.is_model("naflexvit_base_patch16_gap"):  # a NaFlexViT with rotary positions (none is registered)
        with pytest.raises(UnsupportedModelError, match="NaFlexViTs with an absolute position table"):
            tt.tome.apply(timm.create_model("naflexvit_base_patch16_gap", depth=1, embed_dim=32, num_heads=2,
                                            rope_type="axial"), 1)
    maxpool = small("vit_tiny_patch16_224", global_pool="max")
    with pytest.raises(UnsupportedModelError, match="pools with 'max'"):
        tt.tome.apply(maxpool, 2)
    postnorm = small("eva02_small_patch14_224", img_size=56, use_post_norm=True)
    with pytest.raises(UnsupportedModelError, match="pre-norm EvaBlock; block 0 is EvaBlockPostNorm"):
        tt.tome.apply(postnorm, 2)


def test_bench_and_macs_take_tome_on_an_eva_model_with_its_oracle(capsys):
    """The command line on a RoPE encoder: ToMe's MACs against the plain model's, and the speed rows with the
    same-shape oracle run through the host (the rotary table cut with the tokens)."""
    from test_cli import parse_table

    from tokenthrift.apps.cli import main

    if not timm.is_model("vit_small_patch16_dinov3"):
        pytest.skip(f"timm {timm.__version__} has no DINOv3")
    model = ["--model", "vit_small_patch16_dinov3", "--img-size", "64", "--depth", "2", "--num-classes", "5",
             "--method", "tome", "--tome-r", "3"]
    main(["macs", *model])
    plain, merged = parse_table(capsys.readouterr().out)
    assert plain["MACs_ratio"] == 1 and merged["r"] == 3 and 0.8 < merged["MACs_ratio"] < 0.9
    main(["bench", *model, "--batch-size", "2", "--repeats", "1", "--warmup", "1"])
    rows = parse_table(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["without the method", "ToMe r=3", "ToMe r=3: oracle (tokens cut)"]
    assert rows[2]["GMACs"] < rows[1]["GMACs"] < rows[0]["GMACs"]  # the oracle skips the matching


def test_merged_positions_are_the_size_weighted_mean_or_kept():
    """bipartite_merge moves a token's position with it: the position of the token it was merged into (the
    default), or the size-weighted mean of the pair."""
    # CLS, then B (odd positions) and A (even): A token 2 equals B token 1, A token 4 is far from B token 3
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    size = torch.tensor([[[1.0], [3.0], [1.0], [1.0], [1.0]]])
    coords = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]])
    _, out_size, _, mean = tt.tome.bipartite_merge(x, x, size, 1, 1, coords=coords, positions="mean")
    _, _, _, kept = tt.tome.bipartite_merge(x, x, size, 1, 1, coords=coords)
    # output order: CLS, the A token that stays (4), then the B tokens: 1 (with 2 merged in), 3
    assert out_size[0, :, 0].tolist() == [1.0, 1.0, 4.0, 1.0]
    assert torch.allclose(mean[0, 2], (3 * coords[0, 1] + coords[0, 2]) / 4)  # (0, 0.25)
    assert torch.equal(kept[0, 2], coords[0, 1]) and torch.equal(mean[0, 1], coords[0, 4])
    with pytest.raises(ValueError, match="positions='middle'"):
        tt.tome.apply(small("vit_tiny_patch16_224"), 1, positions="middle")
    assert tt.tome.apply(small("vit_tiny_patch16_224"), 1).positions == "kept"


ROTARY = ["EVA-02", "DINOv3", "PE-core (MAP)", "RoPE ViT", "RoPE ViT, mixed"]


@pytest.mark.parametrize("family", ROTARY)
def test_toe_keeps_every_kept_token_at_its_own_rotary_position(family):
    """ToE's training forward on a rotary encoder equals a hand-run reference: block 0 on every token, the ToE
    operator, then every later block with its rotary table's rows at the kept tokens' patch indices; eval() is
    the plain model."""
    name, kw = FAMILIES[family]
    model = small(name, depth=3, **kw)
    x = images(model, batch=2)
    with torch.no_grad():
        plain = model(x)
    handle = tt.toe.apply(model, r0=0.25, keep_rates=(0.5, 1.0), milestones=(0, 10), k=2)
    model.train()  # no dropout or drop path in these models: the training forward is deterministic
    with torch.no_grad():
        got = model(x)
        model.eval()  # the reference runs the blocks by hand, ToE's hooks idle
        host = handle.host
        embedded = host.embed(x)
        tokens = model.blocks[0](embedded.x, rope=host.rope(embedded, None, 0))
        tokens, kept = tt.toe.token_expansion(tokens, [0.5], 0.25, 2, host.num_prefix_tokens)
        for i, blk in enumerate(list(model.blocks)[1:], start=1):
            table = host.rope(embedded, None, i)
            rows = table[kept].unsqueeze(1) if table.dim() == 2 else table[:, kept].permute(1, 0, 2, 3)
            tokens = blk(tokens, rope=rows)
        expected = model.forward_head(model.norm(tokens))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.equal(handle.last_patch_index, kept) and kept.shape == (2, host.num_patches // 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)


@pytest.mark.parametrize("family", ROTARY + ["SigLIP (MAP)"])
def test_revit_grids_of_a_rotary_encoder_are_timms_own_at_that_size(family):
    """Each ReViT grid runs the model as timm runs it at that input size (dynamic_img_size: the absolute table
    resampled, the rotary angles of that grid); the largest grid is the plain model."""
    import torch.nn.functional as F

    name, kw = FAMILIES[family]
    model = small(name, **kw)
    patch = model.patch_embed.patch_size[0]
    side = model.patch_embed.img_size[0] // patch
    x = images(model, batch=2)
    with torch.no_grad():
        plain = model(x)
    reference = timm.create_model(name, **{"img_size": side * patch, "depth": 2, "num_classes": 5, **kw},
                                  dynamic_img_size=True).eval()
    reference.load_state_dict(model.state_dict())
    revit = recent_timm(tt.revit.convert, model, grids=(side, side - 1, side - 2)).eval()
    with torch.no_grad():
        torch.testing.assert_close(revit(x), plain, rtol=0, atol=1e-5)
        for grid in revit.grids[1:]:
            resized = F.interpolate(x, size=(grid * patch,) * 2, mode="bilinear", antialias=True, align_corners=False)
            torch.testing.assert_close(revit(x, grid=grid), reference(resized), rtol=1e-5, atol=1e-5)


TABLE_FAMILIES = {**FAMILIES, "NaFlexViT": ("naflexvit_base_patch16_gap", dict(embed_dim=64, num_heads=2))}
METHOD_CELLS = ("ToMe", "ToE", "ReViT", "LTM", "EViT")


def null_setting(method: str, model: torch.nn.Module) -> torch.nn.Module:
    """The method applied at its null setting (ToMe r = 0, ToE in eval, ReViT with the model's own grid only,
    LTM at ratio 1, EViT keeping every token), on a copy."""
    model = copy.deepcopy(model)
    if method == "ToMe":
        tt.tome.apply(model, 0)
    elif method == "ToE":
        tt.toe.apply(model, r0=0.25, keep_rates=(0.5, 1.0), milestones=(0, 10))
    elif method == "ReViT":
        grid = (model.patch_embed.grid_size[0] if hasattr(model, "patch_embed")
                else 64 // model.embeds.patch_size[0])  # NaFlexViT: any grid, here the 64 px test images'
        model = tt.revit.convert(model, grids=(grid,))
    elif method == "EViT":
        tt.evit.apply(model, 1.0)
    else:
        tt.ltm.convert(model, 1.0)
    return model.eval()


def removed(method: str, model: torch.nn.Module) -> torch.nn.Module:
    if method == "ToMe":
        return tt.tome.remove(model)
    if method == "ToE":
        return tt.toe.remove(model)
    if method == "LTM":
        return tt.ltm.remove(model)
    if method == "EViT":
        return tt.evit.remove(model)
    return model.vit  # ReViT wraps: the wrapped model, its norms banked (one copy each at one grid)


def family_method_table() -> str:
    """docs/encoders.md's table: for every family and method, 'yes' when the null setting equals the plain model within
    1e-5 with non-trivial weights and remove() restores it, else 'no' and a note with the method's refusal."""
    rows = ["| family (timm model tested) | " + " | ".join(METHOD_CELLS) + " |",
            "|---|" + "---|" * len(METHOD_CELLS)]
    notes: dict[str, str] = {}  # refusal -> its letter
    for family, (name, kw) in TABLE_FAMILIES.items():
        if not timm.is_model(name):
            continue
        size = kw.get("img_size", 64)
        torch.manual_seed(0)
        model = timm.create_model(name, **{"img_size": size, "depth": 2, "num_classes": 5, **kw}).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                p.copy_(torch.full_like(p, 0.7) if "gamma" in pname or ".ls" in pname
                        else p + 0.02 * torch.randn_like(p))
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            plain = model(x)
        cells = []
        for method in METHOD_CELLS:
            try:
                patched = null_setting(method, model)
            except UnsupportedModelError as err:
                reason = str(err).split("; got")[0]
                letter = notes.setdefault(reason, "abcdefghij"[len(notes)])
                cells.append(f"no ({letter})")
                continue
            with torch.no_grad():
                torch.testing.assert_close(patched(x), plain, rtol=0, atol=1e-5, msg=f"{family} {method}")
                torch.testing.assert_close(removed(method, patched)(x), plain, rtol=0, atol=1e-5)
            cells.append("yes")
        rows.append(f"| {family} (`{name}`) | " + " | ".join(cells) + " |")
    return "\n".join(rows + [""] + [f"({letter}) {reason}." for reason, letter in notes.items()])


def test_the_readme_table_of_families_and_methods_is_what_the_methods_do():
    from pathlib import Path

    table = family_method_table()
    readme = (Path(__file__).resolve().parents[1] / "docs" / "encoders.md").read_text()
    start, end = "<!-- families x methods: tests/test_hosts.py -->\n", "\n<!-- end of the table -->"
    assert start in readme and end in readme, "docs/encoders.md lost the table's markers"
    shown = readme[readme.index(start) + len(start):readme.index(end)]
    if timm.__version__ == "1.0.31":  # the table is written with the pinned timm; older ones lack some families
        assert shown == table, f"docs/encoders.md's table is not what the methods do; it should read:\n{table}"


@pytest.mark.parametrize("name,tokens", [("eva02_small_patch14_224", 1 + 256), ("vit_small_patch16_dinov3", 5 + 196),
                                         ("vit_base_patch16_siglip_224", 196)])
def test_macs_of_modern_blocks_match_their_analytic_count(name, tokens):
    """MACs at 224 px of EVA-02-S (SwiGLU, rotary), DINOv3-S (registers, LayerScale, rotary) and SigLIP-B (its
    attention-pool head) against the count written out: the patch embedding, every linear layer of a block on T
    tokens, attention's 2·T²·D, the head (rotary angles and gates are elementwise: no MACs)."""
    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    model = timm.create_model(name).eval()
    D, T = model.embed_dim, tokens
    linear = lambda module: sum(m.in_features * m.out_features for m in module.modules()  # noqa: E731
                                if isinstance(m, torch.nn.Linear))
    pe = model.patch_embed.proj
    total = (T - model.num_prefix_tokens) * pe.out_channels * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1]
    total += sum(T * linear(blk) + 2 * T * T * D for blk in model.blocks)
    if getattr(model, "attn_pool", None) is not None:  # MAP: keys/values of every token, one latent query
        pool = model.attn_pool
        total += T * linear(pool.kv) + linear(pool.q) + 2 * T * D + linear(pool.proj) + linear(pool.mlp)
    total += linear(model.head)
    assert tt.measure.macs(model, (3, 224, 224)) == pytest.approx(total, rel=1e-3)


@pytest.mark.parametrize("method", METHOD_CELLS)
def test_every_method_on_a_rotary_encoder_compiles_in_one_graph_and_exports(method):
    """DINOv3 (rotary, registers, LayerScale) with each method past its null setting: ToMe r = 3, ToE's training
    forward at half the tokens, ReViT at its smaller grid, LTM at 0.7. torch.compile(fullgraph=True) gives the eager
    outputs, and torch.export's program does too at a batch it was not traced with."""
    import torch._dynamo as dynamo

    model = small("vit_small_patch16_dinov3")
    x, x3 = images(model, batch=2), images(model, batch=3, seed=4)
    if method == "ToMe":
        tt.tome.apply(model, 3)
    elif method == "ToE":
        tt.toe.apply(model, r0=0.25, keep_rates=(0.5, 1.0), milestones=(0, 10))
        model.train()  # ToE's reduced forward (these models have no dropout: deterministic)
    elif method == "ReViT":
        model = tt.revit.convert(model, grids=(4, 3)).eval()
        model = tt.measure.FixedForward(model, grid=3)
    else:
        tt.ltm.convert(model, 0.7)
    dynamo.reset()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), expected,
                                   rtol=1e-5, atol=1e-5)
    if method == "ToE":
        return  # a training forward: nothing to deploy
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x3), model(x3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["ViT", "EVA-02", "RoPE ViT, mixed", "DINOv3"])
def test_the_class_row_is_the_attention_the_model_computes(family):
    """``attention(..., class_row=True)``: the first token's attention averaged over heads, computed beside the
    fused kernel, equals the weights timm's own unfused attention computes (captured at its dropout)."""
    name, kw = FAMILIES[family]
    model = small(name, **kw)
    host = host_of(model)
    if host.rotary:  # an older timm's rotary encoders are refused by every method that runs the host's steps
        recent_timm(host.check_positions, "the class row")
    embedded = host.embed(images(model, batch=2))
    block, rope = host.blocks[0], host.rope(embedded, None, 0)
    seen = []
    block.attn.attn_drop.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    block.attn.fused_attn = False
    with torch.no_grad():
        reference = host.run_block(block, embedded.x, rope)
        block.attn.fused_attn = True
        x, keys, row = host.attention(block, embedded.x, None, rope, class_row=True)
        same, _ = host.attention(block, embedded.x, None, rope)
    torch.testing.assert_close(row, seen[0][:, :, 0].mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x, same)  # the step itself is unchanged
    torch.testing.assert_close(host.mlp(block, x), reference, rtol=1e-5, atol=1e-5)
    assert row.shape == embedded.x.shape[:2] and torch.allclose(row.sum(-1), torch.ones(2))


# ---------------------------------------------------------------------------------------------- the one table
def one_model_per_row() -> dict:
    """{host row: a tiny model of its family} for every row of tokenthrift.hosts.HOSTS this timm can build."""
    transformers = pytest.importorskip("transformers")
    from tokenthrift import hosts

    torch.manual_seed(0)
    size = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8)
    clip = dict(text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    builders = {
        hosts.ViTHost: lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1),
        hosts.EvaHost: lambda: timm.create_model("eva02_small_patch14_224", img_size=28, depth=1),
        hosts.NaFlexHost: lambda: timm.create_model("naflexvit_base_patch16_gap", depth=1, embed_dim=32, num_heads=2),
        hosts.TransformersViTHost: lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**size)),
        hosts.TransformersDeiTHost: lambda: transformers.DeiTForImageClassificationWithTeacher(
            transformers.DeiTConfig(**size)),
        hosts.TransformersDinov2Host: lambda: transformers.Dinov2Model(transformers.Dinov2Config(**size)),
        hosts.TransformersDinov2RegistersHost: lambda: transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**size, num_register_tokens=2)),
        hosts.TransformersCLIPHost: lambda: transformers.CLIPForImageClassification(
            transformers.CLIPConfig(vision_config=size, **clip)),
        hosts.TransformersSiglipHost: lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**size)),
        hosts.TimeSformerHost: lambda: timm.create_model("timesformer_tiny_patch16_224", img_size=32, patch_size=8,
                                                         num_frames=2, depth=1),
    }
    assert set(builders) == set(hosts.HOSTS), "a row of the table without a model in this test (or the reverse)"
    models = {}
    for row, build in builders.items():
        try:
            models[row] = build().eval()
        except RuntimeError as err:  # an older timm lacks the name (naflexvit_*: timm >= 1.0.16)
            if "Unknown model" not in str(err):
                raise
    return models


def host_classes() -> set:
    """Every host class defined in tokenthrift.hosts that describes a family (its ``family`` set)."""
    import importlib
    import inspect
    import pkgutil

    from tokenthrift import hosts

    found = set()
    for info in pkgutil.walk_packages(hosts.__path__, hosts.__name__ + "."):
        module = importlib.import_module(info.name)
        found |= {obj for obj in vars(module).values() if inspect.isclass(obj) and issubclass(obj, hosts.Host)
                  and obj.__module__ == module.__name__ and obj.family}
    return found


def test_the_host_table_is_the_only_registry():
    """Every family's host is a row of tokenthrift.hosts.HOSTS, and a model of each family is found through the table
    by exactly its own row (find_host, host_of, and TransformersHost(model) for a transformers model)."""
    from tokenthrift import hosts

    assert host_classes() == set(hosts.HOSTS)
    assert len({row.family for row in hosts.HOSTS}) == len(hosts.HOSTS)
    for row, model in one_model_per_row().items():
        assert [r for r in hosts.HOSTS if r.accepts(model)] == [row], row
        assert type(hosts.find_host(model)) is row
        assert type(host_of(model, reduces=row.reducible)) is row
        if issubclass(row, hosts.TransformersHost):
            assert type(hosts.TransformersHost(model)) is row and hosts.TransformersHost.accepts(model)
        else:
            assert not hosts.TransformersHost.accepts(model)


def test_each_host_declares_what_its_family_can_do():
    """The capabilities a method asks for, as each family's model has them; a method that changes the tokens between
    blocks is refused on the TimeSformer, with ReViT named, and ReViT runs it."""
    from tokenthrift import hosts

    models = one_model_per_row()
    for row, model in models.items():
        host = hosts.find_host(model)
        assert host.reducible == (row is not hosts.TimeSformerHost)
        assert host.padded == (row is hosts.NaFlexHost) and host.sized == (row is not hosts.NaFlexHost)
        assert host.frame_dims == ((2,) if row is hosts.TimeSformerHost else ())
        assert host.has_class_token == (row not in (hosts.TransformersSiglipHost, hosts.NaFlexHost))  # (a GAP one)
        assert host.rotary == (row is hosts.EvaHost and model.rope is not None)
        try:  # every host says whether its positions can move (rotary ones: rebuilt)
            host.check_positions("a method")
        except UnsupportedModelError as err:  # make test-compat: the oldest timm's rotary tables cannot, said so
            if "1.0.31" not in str(err) or timm.__version__ == "1.0.31":
                raise
        if host.reducible:
            host.check_blocks("a method")
            host.check_tokens("a method")
    video = models[hosts.TimeSformerHost]
    for apply in (lambda m: tt.tome.apply(m, 1), tt.toe.apply, tt.evit.apply):
        with pytest.raises(UnsupportedModelError, match="changes the tokens between blocks.*ReViT"):
            apply(video)
    with pytest.raises(UnsupportedModelError, match="LTM supports timm VisionTransformer"):
        tt.ltm.convert(video, 0.8)
    assert tt.revit.convert(video, grids=(4, 3)).input_size == (3, 2, 32, 32)


SHARED = ("hosts/base.py", "hosts/__init__.py", "hosts/transformers/base.py")  # no family named in these
METHODS_ON_HOSTS = ("tome.py", "toe.py", "evit.py", "ltm/vit.py", "revit/model.py", "measure/oracle.py")
IDENTITY = {"name", "family", "task", "module", "__name__", "__qualname__", "encoder_class", "layer_class"}


def family_names(models: dict) -> set:
    """What names a family: its host's class and family, its model's and block's classes, a transformers family's
    modeling module, encoder, task and layer classes."""
    from tokenthrift import hosts

    names = set()
    for row, model in models.items():
        host = hosts.find_host(model)
        names |= {row.__name__, row.family, type(model).__name__, type(host.blocks[0]).__name__}
        if issubclass(row, hosts.TransformersHost):
            names |= {row.module, row.encoder_class, row.layer_class, *row.tasks}
    return names


def _strings(node) -> list:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _reads_identity(node) -> bool:
    """``node`` reads a class's, a family's or a task's name (``type(m).__name__``, ``self.info.name``, ``task``)."""
    return any((isinstance(n, ast.Attribute) and n.attr in IDENTITY) or (isinstance(n, ast.Name) and n.id in IDENTITY)
               for n in ast.walk(node))


def family_comparisons(source: str, names: set) -> list:
    """The lines of ``source`` that compare a family or class name: a comparison, ``startswith`` / ``endswith`` or
    ``in`` of a name read off a model, host or family against a string, and any string (docstrings and ``__all__``
    aside) that is a family's or one of its classes' name."""
    tree = ast.parse(source)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    exported = {id(c) for n in ast.walk(tree) if isinstance(n, ast.Assign)  # __all__: the names a module exports
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets) for c in ast.walk(n.value)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_strings(s) for s in sides) and any(_reads_identity(s) for s in sides):
                found.append(f"{node.lineno}: compares a name with a string")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith") and _reads_identity(node.func.value)):
            found.append(f"{node.lineno}: {node.func.attr} on a name")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
              and id(node) not in docstrings | exported):
            found.append(f"{node.lineno}: names {node.value!r}")
    return found


def test_the_check_below_sees_family_comparisons():
    code = ('if self.info.name == "SigLIP vision":\n    pass\nif task.endswith("WithTeacher"):\n    pass\n'
            'x = "ForImageClassification" in task\ny = self.info.module.startswith("dinov2")\n'
            'z = task in ("ViTForImageClassification",)\nok = pool == "avg" or kernel == "fold"\n')
    assert len(family_comparisons(code, {"ViTForImageClassification"})) == 6


def test_shared_host_code_and_the_methods_name_no_family():
    """The shared host modules compare no family or class name; the methods on the hosts (ToMe, ToE, EViT, LTM's ViT
    family, ReViT, the token-cut oracle) also name no family's host or model class and import no family's module:
    they ask the host for capabilities."""
    import tokenthrift
    from tokenthrift import hosts

    src = Path(tokenthrift.__file__).parent
    models = one_model_per_row()
    names = family_names(models)
    found = [f"{path}:{line}" for path in SHARED + METHODS_ON_HOSTS
             for line in family_comparisons((src / path).read_text(), names)]
    assert not found, "family names in shared host code or in a method:\n" + "\n".join(found)
    classes = {n for n in names if n.isidentifier()} | {"TransformersHost"}
    family_modules = {row.__module__ for row in hosts.HOSTS} | {"tokenthrift.video"}
    for path in METHODS_ON_HOSTS:
        tree = ast.parse((src / path).read_text())
        package = ".".join(("tokenthrift", *Path(path).parent.parts))
        for node in ast.walk(tree):
            named = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            assert named not in classes, f"{path}:{node.lineno} names {named}"
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(filter(None, (base, node.module)))
                assert not any(module == m or module.startswith(m + ".") for m in family_modules), \
                    f"{path}:{node.lineno} imports {module}"
