"""The TimeSformer: equal to the transformers implementation at its own grid and frame count, grid and frames
from the input, checkpoint names, pinned MACs."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import tokenthrift  # noqa: F401  (registers the timesformer_* models)
from tokenthrift import measure
from tokenthrift.video import TimeSformer, convert_checkpoint

SMALL = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def perturbed(model, seed=0):
    """Every parameter moved off its initial value (zero-initialised temporal_fc included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_logits_equal_the_transformers_implementation():
    import transformers  # test extra
    config = transformers.TimesformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32,
                                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                            num_labels=5, layer_norm_eps=1e-6, qkv_bias=True)
    torch.manual_seed(0)
    theirs = perturbed(transformers.TimesformerForVideoClassification(config))
    ours = TimeSformer(**SMALL).eval()
    ours.load_state_dict(convert_checkpoint(theirs.state_dict()))
    clips = torch.randn(3, 3, 4, 32, 32)  # (B, C, T, H, W); transformers takes (B, T, C, H, W)
    with torch.no_grad():
        expected = theirs(pixel_values=clips.transpose(1, 2)).logits
        torch.testing.assert_close(ours(clips), expected, rtol=1e-4, atol=1e-5)


def test_official_names_load_as_they_are():
    model = perturbed(TimeSformer(**SMALL))
    official = {f"model.{k}": v for k, v in model.state_dict().items()}  # the official checkpoints' prefix
    converted = convert_checkpoint(official)
    assert converted.keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="neither official TimeSformer nor transformers"):
        convert_checkpoint({"backbone.layer1.weight": torch.zeros(1)})


def test_grid_and_frame_count_come_from_the_input():
    """At 24 px and 6 frames the model equals one built for that size whose tables were resampled: the
    spatial table bicubically (timm's resample_abs_pos_embed), the time table linearly."""
    model = perturbed(TimeSformer(**SMALL))
    other = TimeSformer(**{**SMALL, "img_size": 24, "num_frames": 6}).eval()
    state = dict(model.state_dict())
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=(3, 3), old_size=(4, 4),
                                                num_prefix_tokens=1)
    state["time_embed"] = F.interpolate(state["time_embed"].transpose(1, 2), size=6, mode="linear",
                                        align_corners=False).transpose(1, 2)
    other.load_state_dict(state)
    clips = torch.randn(2, 3, 6, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(clips), other(clips))
        assert model(torch.randn(2, 3, 4, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match=r"clips \(B, C, T, H, W\)"):
        model(torch.randn(2, 3, 32, 32))


def test_registered_models_and_timm_keywords():
    base = timm.create_model("timesformer_base_patch16_224")
    assert sum(p.numel() for p in base.parameters()) == pytest.approx(121.57e6, rel=1e-3)
    small = timm.create_model("timesformer_tiny_patch16_224", num_classes=7, img_size=64, patch_size=8,
                              num_frames=4, depth=2, drop_path_rate=0.1)
    assert small.embed_dim == 192 and len(small.blocks) == 2 and small.num_frames == 4
    assert small(torch.randn(1, 3, 4, 64, 64)).shape == (1, 7)
    with pytest.raises(RuntimeError, match="No pretrained weights exist"):  # timm's own answer, as for its models
        timm.create_model("timesformer_base_patch16_224", pretrained=True)


def test_timm_model_api(tmp_path):
    """Built the timm way: its cfg on the instance (so resolve_data_config gives Kinetics statistics, not
    ImageNet's), device / dtype, local pretrained files, intermediate features, features_only, layer groups,
    set_input_size, unpooled output, and a TorchScript refusal that names the supported paths."""
    tiny = dict(SMALL, depth=3)
    model = timm.create_model("timesformer_tiny_patch16_224", **tiny)
    assert model.pretrained_cfg["architecture"] == "timesformer_tiny_patch16_224"
    assert timm.data.resolve_data_config(model=model)["mean"] == (0.45, 0.45, 0.45)
    double = timm.create_model("timesformer_tiny_patch16_224", device="cpu", dtype=torch.float64, **tiny)
    assert next(double.parameters()).dtype == torch.float64
    perturbed(model)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded = timm.create_model("timesformer_tiny_patch16_224", pretrained=True, **tiny,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth"), num_classes=5)).eval()
    clip = torch.randn(2, 3, 4, 32, 32)
    assert torch.equal(loaded(clip), model(clip))
    final, inter = model.forward_intermediates(clip, indices=2)
    assert final.shape == (2, 1 + 16 * 4, 32) and [i.shape for i in inter] == [(2, 32, 4, 4, 4)] * 2
    assert torch.allclose(final, model.forward_features(clip))
    tokens = model.forward_intermediates(clip, indices=[0], output_fmt="NLC", intermediates_only=True)[0]
    grid = model.forward_intermediates(clip, indices=[0], intermediates_only=True)[0]
    assert torch.equal(tokens.reshape(2, 4, 4, 4, 32).permute(0, 4, 3, 1, 2), grid)  # patch-major, time-minor
    feats = timm.create_model("timesformer_tiny_patch16_224", features_only=True, out_indices=(0, 1), **tiny)
    assert feats.feature_info.channels() == [32, 32] and len(feats.model.blocks) == 2  # pruned after block 1
    assert [f.shape for f in feats(clip)] == [(2, 32, 4, 4, 4)] * 2
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) == 3 + 2  # stem, three blocks, the final norm
    unpooled = timm.create_model("timesformer_tiny_patch16_224", global_pool="", **{**tiny, "num_classes": 0})
    model.reset_classifier(0, "")
    assert model(clip).shape == unpooled(clip).shape == (2, 1 + 16 * 4, 32)
    with pytest.raises(ValueError, match="global_pool='max'"):
        model.reset_classifier(0, "max")
    model.set_input_size(img_size=48, num_frames=6)
    assert model.pos_embed.shape[1] == 1 + 36 and model.time_embed.shape[1] == 6 and model.grid_size == (6, 6)
    with pytest.raises(TypeError, match="TorchScript.*torch.compile"):
        torch.jit.script(model)


def analytic_gmacs(grid, frames=8, dim=768, depth=12, patch=16, classes=400):
    """docs/methods.md §6: per block, temporal qkv+proj+temporal_fc and attention, spatial qkv+proj and attention
    (with a CLS copy per frame), MLP; plus the patch embedding and the head."""
    n, t, d = grid * grid, frames, dim
    block = (3 * d * d * t * n + 2 * n * t * t * d + d * d * t * n + d * d * t * n
             + 3 * d * d * t * (n + 1) + 2 * t * (n + 1) ** 2 * d + d * d * t * (n + 1) + 8 * d * d * (t * n + 1))
    return (depth * block + 3 * patch * patch * d * t * n + d * classes) / 1e9


@pytest.mark.parametrize("grid,pinned", [(14, 195.8), (10, 98.6), (7, 48.1)])
def test_timesformer_base_macs_per_view(grid, pinned):
    model = timm.create_model("timesformer_base_patch16_224").eval()
    got = measure.macs(model, (3, 8, grid * 16, grid * 16)) / 1e9
    assert got == pytest.approx(analytic_gmacs(grid), rel=1e-4) and round(got, 1) == pinned


# ---------------------------------------------------------------- ReViT + TLA on the TimeSformer
TINY_VIDEO = dict(img_size=28, patch_size=2, num_frames=4, embed_dim=24, depth=2, num_heads=2, num_classes=6)


def test_revit_on_the_timesformer_equals_the_plain_model_at_every_grid():
    from tokenthrift import revit as rv

    plain = perturbed(TimeSformer(**TINY_VIDEO))
    clips = torch.randn(3, 3, 4, 28, 28)
    one = rv.convert(copy.deepcopy(plain), grids=(14,)).eval()
    shared = rv.convert(copy.deepcopy(plain), grids=(14, 10, 7), tal_ln=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(one(clips), plain(clips))  # K = 1: exactly the plain model
        for g in (14, 10, 7):  # frames resized inside, the frame count kept
            frames = F.interpolate(clips.transpose(1, 2).reshape(12, 3, 28, 28), size=(2 * g, 2 * g), mode="bilinear",
                                   antialias=True, align_corners=False)
            resized = frames.reshape(3, 4, 3, 2 * g, 2 * g).transpose(1, 2)
            torch.testing.assert_close(shared(clips, grid=g), plain(resized))
            assert measure.macs(shared, (3, 4, 28, 28), grid=g) == measure.macs(plain, (3, 4, 2 * g, 2 * g))
    with pytest.raises(ValueError, match=r"full-size clips \(B, C, T, 28, 28\)"):
        shared(torch.randn(2, 3, 28, 28))


def test_tal_ln_banks_every_norm_of_the_timesformer():
    from tokenthrift import revit as rv

    base = timm.create_model("timesformer_base_patch16_224")
    before = sum(p.numel() for p in base.parameters())
    model = rv.convert(base, grids=(14, 10, 7))
    assert len(model.banks()) == 37 and len(rv.norm_positions(base)) == 37  # 12 x (temporal, spatial, MLP) + final
    assert sum(p.numel() for p in model.parameters()) - before == 2 * 37 * 2 * 768 == 113_664
    assert model.input_size == (3, 8, 224, 224) and model.input_size_for(10) == (3, 8, 160, 160)


def test_assigner_decides_per_clip_from_the_middle_frame_and_adaptive_grouping_is_per_clip():
    from tokenthrift import revit as rv

    torch.manual_seed(0)
    revit = rv.convert(perturbed(TimeSformer(**TINY_VIDEO)), grids=(14, 10, 7)).eval()
    assigner = rv.TokenLengthAssigner(3, revit.input_size, "test_byobnet").eval()
    clips = torch.randn(5, 3, 4, 28, 28)
    with torch.no_grad():
        middle = F.interpolate(clips[:, :, 2], size=(14, 14), mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(assigner(clips), assigner.net(middle))
        adaptive = rv.AdaptiveViT(revit, assigner)
        index = torch.tensor([0, 2, 1, 2, 0])
        grouped = adaptive(clips, grid_index=index)
        alone = torch.cat([revit(clips[i:i + 1], grid=revit.grids[int(k)]) for i, k in enumerate(index)])
        torch.testing.assert_close(grouped, alone)
    # one decision per clip costs far less than the backbone
    assert rv.assigner_macs_fraction(assigner, revit) < 0.02


def test_the_confidence_cascade_decides_per_clip_on_the_timesformer():
    """Smallest grid first, a clip escalates while its confidence is below the grid's threshold: each clip's
    logits are those of the grid it stopped at, run alone; MACs per clip as executed."""
    from tokenthrift import measure
    from tokenthrift import revit as rv

    torch.manual_seed(0)
    revit = rv.convert(perturbed(TimeSformer(**TINY_VIDEO)), grids=(14, 10, 7)).eval()
    clips = torch.randn(9, 3, 4, 28, 28)
    with torch.no_grad():
        every = {g: revit(clips, grid=g) for g in revit.grids}
        conf = torch.stack([rv.confidence(every[g], "margin") for g in revit.grids], 1)
        thresholds = tuple(conf[:, 1:].median(0).values.tolist())
        cascade = rv.CascadeViT(revit, thresholds, "margin").eval()
        out = cascade(clips)
    exits = cascade.last_grid_index
    assert torch.equal(exits, rv.cascade_exits(conf, thresholds)) and len(set(exits.tolist())) > 1
    for i, k in enumerate(exits.tolist()):
        with torch.no_grad():
            alone = revit(clips[i:i + 1], grid=revit.grids[k])
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-4, atol=1e-5)
    grid_macs = [measure.macs(revit, (3, 4, 28, 28), grid=g) for g in revit.grids]
    assert cascade.last_macs().tolist() == pytest.approx(rv.executed_macs(exits, grid_macs).tolist())
