"""Registered ltm_* models: MACs ratios within 0.005 of the paper's table (docs/python.md's claim), no attention over
fewer than 4 tokens, base parameter counts, kwargs."""
import pytest
import timm
import torch

from tokenthrift import ltm, measure
from tokenthrift.ltm.calibration import calibrate_ratio
from tokenthrift.ltm.registry import DEFAULT_RATIOS, PAPER_RATIOS


@pytest.mark.parametrize("base_name", list(PAPER_RATIOS))
def test_registered_model_matches_the_paper_macs_ratio_with_base_parameters(base_name):
    torch.manual_seed(0)
    base = timm.create_model(base_name, pretrained=False).eval()
    model = timm.create_model(f"ltm_{base_name}", pretrained=False).eval()
    assert ltm.is_ltm(model) and ltm.family(model) == ltm.family(base)
    assert [m.ratio for m in ltm.mergers(model)] == list(DEFAULT_RATIOS[base_name])
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())
    assert model.state_dict().keys() == base.state_dict().keys()
    lengths = []  # the token count of every attention call (ViT/MobileViT Attention, Swin WindowAttention, LiteMLA)
    # (a ViT's host runs Attention's parts, not its forward: its qkv layer sees the tokens)
    hooks = [(m.qkv if type(m).__name__ == "Attention" else m).register_forward_pre_hook(
             lambda mod, args: lengths.append(_sequence_length(mod, args[0])))
             for m in model.modules() if type(m).__name__ in ("Attention", "WindowAttention", "LiteMLA")]
    ratio = measure.macs(model, (3, 224, 224)) / measure.macs(base, (3, 224, 224))
    assert lengths and min(lengths) >= 4, lengths  # docs/methods.md §8 floor
    for h in hooks:
        h.remove()
    assert abs(ratio - PAPER_RATIOS[base_name]) <= 0.005, ratio


def _sequence_length(module, x):
    """Tokens one attention call attends over: (B, N, C) token input, or (B, C, H, W) maps for LiteMLA."""
    return x.shape[-2] * x.shape[-1] if type(module).__name__ == "LiteMLA" else x.shape[1]


def test_convert_never_merges_below_the_floor():
    model = ltm.convert(timm.create_model("mobilevit_xxs", pretrained=False, num_classes=3), 0.05).eval()
    lengths = []
    for m in model.modules():
        if type(m).__name__ == "Attention":
            m.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    model(torch.randn(1, 3, 128, 128))
    assert min(lengths) == 4 and lengths.count(4) >= 3


def test_registered_model_kwargs():
    small = dict(img_size=32, patch_size=4, num_classes=3)
    model = timm.create_model("ltm_vit_small_patch16_224", pretrained=False, ltm_site_ratio=0.5, ltm_tau_s=0.2,
                              ltm_learn_tau=True, **small)
    assert {m.ratio for m in ltm.mergers(model)} == {0.5}
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert sum(p.numel() for p in model.parameters()) == 12 + sum(
        p.numel() for p in timm.create_model("vit_small_patch16_224", pretrained=False, **small).parameters())
    feats = timm.create_model("ltm_vit_small_patch16_224", pretrained=False, features_only=True, out_indices=(2,),
                              **small)
    assert [f.shape for f in feats(torch.randn(1, 3, 32, 32))] == [(1, 384, 8, 8)]  # pruned to 3 blocks
    with pytest.raises(ValueError, match="default architecture"):
        timm.create_model("ltm_vit_small_patch16_224", pretrained=False, depth=4, **small)


@pytest.mark.slow  # make test-slow (CI): minutes on two cores
def test_calibration_hits_a_target_on_a_small_model():
    ratios, got = calibrate_ratio("vit_tiny_patch16_224", 0.8, img_size=64, patch_size=8, depth=4,
                                  input_size=(3, 64, 64))
    assert len(ratios) == 4 and abs(got - 0.8) < 0.02
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=4).eval()
    model = ltm.convert(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8,
                                          depth=4), ratios).eval()
    assert measure.macs(model, (3, 64, 64)) / measure.macs(base, (3, 64, 64)) == pytest.approx(got)


@pytest.mark.parametrize("base", ["vit_small_patch16_224", "swin_tiny_patch4_window7_224"])
def test_registered_models_carry_their_cfg_and_load_the_base_weights(tmp_path, base):
    """Every ltm_* name has a pretrained cfg (the base's, LTM adds no parameters), the instance carries it under
    its own name, and pretrained=True loads the base model's timm weights (here from a local file)."""
    name = f"ltm_{base}"
    cfg = timm.get_pretrained_cfg(name)
    assert cfg is not None and cfg.mean == timm.get_pretrained_cfg(base).mean
    small = dict(img_size=64, num_classes=3) if "vit" in base else dict(img_size=64, window_size=4, num_classes=3)
    plain = timm.create_model(base, **small)
    file = tmp_path / "base.pth"
    torch.save(plain.state_dict(), file)
    overlay = dict(file=str(file), num_classes=3, custom_load=False)  # a .pth, not the augreg .npz (timm < 1.0.30)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay,
                              **small)
    assert model.pretrained_cfg["architecture"] == name and model.pretrained_cfg["num_classes"] == 3
    want, got = plain.state_dict(), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert timm.data.resolve_data_config(model=model)["mean"] == cfg.mean
    assert all(timm.get_pretrained_cfg(n) is not None for n in timm.list_models("ltm_*"))


def test_the_shipped_fmnist_ltm_model_loads_its_own_weights(tmp_path):
    """ltm_vit_fmnist_tiny_patch2_28 is the shipped tiny ViT's architecture with the LTM recipe's ratios (0.851 of
    its MACs) and a cfg of its own: pretrained=True loads the LTM model's weights (here a stand-in file given as
    timm's overlay), not the full-token model's; without the packaged file the error names the command that
    writes it."""
    from safetensors.torch import save_file

    from tokenthrift.errors import MissingFileError
    from tokenthrift.ltm.registry import FMNIST_LTM
    from tokenthrift.pretrained import FMNIST_VIT, weights_path

    torch.manual_seed(0)
    trained = ltm.convert(timm.create_model(FMNIST_VIT), list(DEFAULT_RATIOS[FMNIST_VIT])).eval()
    file = tmp_path / "ltm.safetensors"
    save_file(trained.state_dict(), str(file))
    model = timm.create_model(FMNIST_LTM, pretrained=True, pretrained_cfg_overlay=dict(file=str(file))).eval()
    assert [m.ratio for m in ltm.mergers(model)] == list(DEFAULT_RATIOS[FMNIST_VIT])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)
    plain = timm.create_model(FMNIST_VIT)
    assert measure.macs(model, (1, 28, 28)) / measure.macs(plain, (1, 28, 28)) == pytest.approx(0.851, abs=0.001)
    cfg = timm.get_pretrained_cfg(FMNIST_LTM)
    assert cfg.file == str(weights_path(FMNIST_LTM)) != timm.get_pretrained_cfg(FMNIST_VIT).file
    assert cfg.mean == timm.get_pretrained_cfg(FMNIST_VIT).mean and cfg.input_size == (1, 28, 28)
    missing = tmp_path / "absent.safetensors"  # a checkout without the packaged file
    with pytest.raises(MissingFileError, match="converge_fmnist.py --runs ltm_ib --ship"):
        timm.create_model(FMNIST_LTM, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))


def test_torchscript_refuses_with_the_supported_paths():
    model = timm.create_model("ltm_vit_small_patch16_224", img_size=32, patch_size=4, num_classes=3)
    with pytest.raises(TypeError, match="TorchScript.*torch.compile.*torch.export"):
        torch.jit.script(model)


def test_fx_tracing_and_fx_features():
    """torch.fx: the LTM ViT traces as it is (eval and train); every family gives timm's FX feature extractor
    (features_only, feature_cls="fx") the same features as its default feature extractor."""
    x = torch.randn(2, 3, 64, 64)
    vit = timm.create_model("ltm_vit_small_patch16_224", img_size=64, depth=4, ltm_site_ratio=0.8, num_classes=3).eval()
    assert torch.allclose(torch.fx.symbolic_trace(vit)(x), vit(x), atol=1e-5)
    traced = torch.fx.symbolic_trace(vit.train())
    traced(x).sum().backward()  # the straight-through Gumbel path traces too
    for name, kw in [("ltm_swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4)),
                     ("ltm_efficientvit_b1", {}), ("ltm_mobilevit_xs", {})]:
        torch.manual_seed(0)
        fx = timm.create_model(name, features_only=True, feature_cls="fx", **kw).eval()
        torch.manual_seed(0)  # the same initial weights (their state-dict names differ between the wrappers)
        plain = timm.create_model(name, features_only=True, **kw).eval()
        got, want = fx(x), plain(x)
        assert len(got) == len(want) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want)), name
