"""Every method leaves the model in the mode it was in: after ``apply``/``convert`` on a model in eval (or train)
mode, each module the call created runs in that mode and each module that was there keeps its own flag. An eval
model converted to LTM merges without Gumbel noise (the same input twice gives the same logits), so
``torch.compile``, ``torch.export`` and ONNX copies equal eager with no ``.eval()`` after the conversion."""
import pytest
import timm
import torch
from torch import nn

import tokenthrift as tt
from tokenthrift.apps.export import TOLERANCE, _loaded, _write

VIT = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)
# tiny timm models of the four LTM families: (timm name, overrides, input side)
LTM_FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(VIT, depth=2), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=16, depths=(1, 1, 2, 1),
                                                  num_heads=(1, 1, 2, 2), window_size=7, num_classes=5), 56),
    "mobilevit": ("mobilevit_xxs", dict(num_classes=5), 64),
    "efficientvit": ("efficientvit_b0", dict(num_classes=5), 64),
}


def build(family: str = "vit") -> tuple[nn.Module, torch.Tensor]:
    name, cfg, side = LTM_FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **cfg), torch.randn(2, 3, side, side)


def toe(model):
    tt.toe.apply(model, r0=0.5, keep_rates=(0.75, 1.0), milestones=(0, 10))
    return model


def tome(model):
    tt.tome.apply(model, 2)
    return model


def evit(model):
    tt.evit.apply(model, 0.7)
    return model


def revit(model):
    return tt.revit.convert(model, grids=(8, 6))  # the wrapper is what the user runs


def ltm(model):
    return tt.ltm.convert(model, 0.6)


# method -> (the call, the family of the model it gets); returns the model the user runs afterwards
METHODS = {"toe": (toe, "vit"), "tome": (tome, "vit"), "evit": (evit, "vit"), "revit": (revit, "vit"),
           **{f"ltm_{f}": (ltm, f) for f in LTM_FAMILIES}}


def wrong_flags(root: nn.Module, before: dict[nn.Module, bool], train: bool) -> list[str]:
    """Modules of ``root`` whose flag is not what it should be: its own for a module that was there before the
    call, ``train`` for a module the call created."""
    return [f"{name or '<root>'} ({type(m).__name__}): {m.training}" for name, m in root.named_modules()
            if m.training != before.get(m, train)]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_leaves_the_model_in_its_mode(method, train):
    call, family = METHODS[method]
    model, _ = build(family)
    model.train(train)
    before = {m: m.training for m in model.modules()}
    root = call(model)
    assert root.training == train
    assert not wrong_flags(root, before, train), f"{method} on a model in {'train' if train else 'eval'} mode"
    assert all(m.training == train for m in root.modules())


def test_a_users_own_modes_are_kept_and_new_modules_follow_their_surroundings():
    """Mixed modes on purpose: converting flips none of the user's flags; a new module takes the mode of the
    nearest module above it that was there before (the model's own mode when there is none)."""
    # an eval Swin with Monte-Carlo dropout on: the new merge sites run in eval mode (no Gumbel noise)
    model, _ = build("swin")
    model.eval()
    model.head.drop.train()
    before = {m: m.training for m in model.modules()}
    tt.ltm.convert(model, 0.6)
    assert not wrong_flags(model, before, False)
    assert model.head.drop.training
    # a training Swin whose first stage is frozen in eval mode (and BatchNorm-style freezing of one LayerNorm):
    # that stage's merge sites merge deterministically, the others with Gumbel noise
    model, _ = build("swin")
    model.train()
    model.layers[0].eval()
    model.layers[1].blocks[0].norm2.eval()
    tt.ltm.convert(model, 0.6)
    assert not model.layers[0].training and not model.layers[1].blocks[0].norm2.training
    assert [m.training for m in tt.ltm.mergers(model)] == [False, True, True, True, True]
    # a training ViT with one block and the final norm in eval mode: a TAL-LN bank runs in the mode of the norm it
    # replaces (eval in block 1 and at the end), the other banks and the wrapper in training mode
    model, _ = build("vit")
    model.train()
    model.blocks[1].eval()
    model.norm.eval()
    wrapped = tt.revit.convert(model, grids=(8, 6))
    assert wrapped.training and model.training and not model.blocks[1].training
    banks = {name: m.training for name, m in wrapped.named_modules() if isinstance(m, tt.revit.TALayerNorm)}
    frozen = {"vit.blocks.1.norm1", "vit.blocks.1.norm2", "vit.norm"}
    assert banks == {name: name not in frozen for name in banks} and frozen <= banks.keys(), banks
    assert all(m.training == bank.training for bank in wrapped.banks() for m in bank.modules())


@pytest.mark.parametrize("family", LTM_FAMILIES)
def test_ltm_converted_in_eval_mode_is_deterministic(family):
    model, x = build(family)
    model.eval()
    tt.ltm.convert(model, 0.6)  # no .eval() afterwards: the model was in eval mode
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_ltm_swin_converted_in_eval_mode_compiles_and_exports_equal_to_eager(tmp_path):
    """The compiled, torch.export-ed and ONNX copies of an LTM Swin converted in eval mode equal eager (they
    'differed' by the Gumbel noise of merge sites left in training mode). ``apps.export.export`` puts the model in
    eval mode itself, so the files are written here by its helpers on the model as the conversion left it."""
    model, x = build("swin")
    model.eval()
    tt.ltm.convert(model, 0.6)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")  # dynamo's capture; no code generation
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=TOLERANCE)
        program = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(program(x), eager, rtol=0, atol=TOLERANCE)
        _write(model, x, tmp_path / "ltm_swin.onnx", legacy=False, dynamic=False, metadata={})
        torch.testing.assert_close(_loaded(tmp_path / "ltm_swin.onnx")(x), eager, rtol=0, atol=TOLERANCE)
