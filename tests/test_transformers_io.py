"""Saving and loading transformers models that a method changed (docs/methods.md §10): ToMe, EViT and LTM each have a
``save_pretrained`` / ``from_pretrained`` pair whose round trip gives the same outputs bit for bit; a plain
``model.save_pretrained`` of a ToMe or EViT model writes the plain class (its own ``from_pretrained`` gives the
plain model), and an LTM folder cannot be loaded as a plain model by mistake. Tiny random configs, no hub."""
import json

import pytest
import timm
import torch

import tokenthrift as tt
from tokenthrift.errors import InvalidArgumentError, StateError, UnsupportedModelError
from tokenthrift.hosts.transformers import load_model

transformers = pytest.importorskip("transformers")

SIZE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8)
PLAIN = {"vit": "ViTForImageClassification", "dinov2": "Dinov2ForImageClassification", "clip": "CLIPVisionModel"}


def _build(name: str):
    t = transformers
    torch.manual_seed(0)
    if name == "vit":
        return t.ViTForImageClassification(t.ViTConfig(**SIZE, num_labels=5)).eval()
    if name == "dinov2":
        return t.Dinov2ForImageClassification(t.Dinov2Config(**{**SIZE, "intermediate_size": None}, mlp_ratio=2,
                                                             layerscale_value=0.5, num_labels=5)).eval()
    return t.CLIPVisionModel(t.CLIPVisionConfig(**SIZE)).eval()


def _out(model, images) -> torch.Tensor:
    """What the model computes: a classifier's logits, an encoder's pooled output."""
    with torch.no_grad():
        out = model(images)
    return out.logits if "logits" in out else out.pooler_output


def _apply(method: str, model):
    if method == "tome":
        tt.tome.apply(model, (2, 0.5))  # (r, inflection): saved as the blocks' r, which a JSON list cannot tell apart
    elif method == "evit":
        tt.evit.apply(model, keep_rate=0.6, locations=(0, 2))
    else:
        tt.ltm.convert(model, [0.8, 0.7, 0.9], learn_tau=True)
        for i, merger in enumerate(tt.ltm.mergers(model)):  # every site's own temperatures, a learned value
            merger.tau_s = 0.05 + 0.1 * i
            merger.tau_g = 0.5 * (i + 1)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


LIBRARIES = {"tome": tt.tome, "evit": tt.evit, "ltm": tt.ltm}


@pytest.mark.parametrize("name", ["vit", "dinov2", "clip"])
@pytest.mark.parametrize("method", ["tome", "evit", "ltm"])
def test_round_trip_gives_the_same_outputs(method, name, images, tmp_path):
    model = _apply(method, _build(name))
    plain = _out(_build(name), images)
    expected = _out(model, images)
    assert not torch.allclose(expected, plain, atol=1e-4)  # the method changes what the model computes
    LIBRARIES[method].save_pretrained(model, tmp_path)
    assert not any(k.startswith("tokenthrift_") for k in model.config.to_dict())  # the user's config as it was
    assert type(model).__name__ != PLAIN[name]  # still the method's model
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [PLAIN[name]] and f"tokenthrift_{method}" in saved
    loaded = LIBRARIES[method].from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(_out(loaded, images), expected)
    if method == "ltm":
        for a, b in zip(tt.ltm.mergers(model), tt.ltm.mergers(loaded)):
            assert (a.ratio, a.log_tau.item(), a.tau_g, a.affinity, a.unmerge) == (
                b.ratio, b.log_tau.item(), b.tau_g, b.affinity, b.unmerge)
            assert b.log_tau.requires_grad  # still learned
    else:  # its weights are the plain model's: the plain from_pretrained gives the plain model
        again = getattr(transformers, PLAIN[name]).from_pretrained(tmp_path)
        assert type(again).__name__ == PLAIN[name]
        assert torch.equal(_out(again, images), plain)


@pytest.mark.parametrize("name", ["vit", "clip"])
@pytest.mark.parametrize("method", ["tome", "evit"])
def test_plain_save_writes_the_plain_class(method, name, images, tmp_path):
    model = _apply(method, _build(name))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [PLAIN[name]]
    assert model.config.architectures == [PLAIN[name]]
    assert type(model).__name__ != PLAIN[name]  # the model keeps its method
    plain = _out(_build(name), images)
    for loaded in (transformers.AutoModel.from_pretrained(tmp_path) if name == "clip" else
                   transformers.AutoModelForImageClassification.from_pretrained(tmp_path), load_model(str(tmp_path))):
        assert type(loaded).__name__ == PLAIN[name]
        assert torch.equal(_out(loaded, images), plain)
    with pytest.raises(InvalidArgumentError, match=f"(?i)no tokenthrift {method}"):  # nothing recorded to restore
        LIBRARIES[method].from_pretrained(tmp_path)


def test_an_ltm_folder_cannot_load_as_the_plain_model(images, tmp_path):
    model = tt.ltm.convert(_build("vit"), 0.8)  # no learned temperature: the weights are the plain model's keys
    with pytest.raises(UnsupportedModelError, match="tokenthrift.ltm.save_pretrained"):
        model.save_pretrained(tmp_path / "plain-save")
    tt.ltm.save_pretrained(model, tmp_path)
    for load in (transformers.ViTForImageClassification.from_pretrained,
                 transformers.AutoModelForImageClassification.from_pretrained):
        with pytest.raises(OSError, match="no file named model.safetensors"):
            load(tmp_path)
    with pytest.raises(UnsupportedModelError, match="tokenthrift.ltm.from_pretrained"):
        load_model(str(tmp_path))
    assert torch.equal(_out(tt.ltm.from_pretrained(tmp_path), images), _out(model, images))


def test_refusals_name_the_fix(tmp_path):
    plain = _build("vit")
    plain.save_pretrained(tmp_path)
    with pytest.raises(InvalidArgumentError, match="no tokenthrift LTM"):
        tt.ltm.from_pretrained(tmp_path)
    with pytest.raises(StateError, match="not applied"):
        tt.tome.save_pretrained(plain, tmp_path / "x")
    with pytest.raises(StateError, match="not applied"):
        tt.ltm.save_pretrained(plain, tmp_path / "x")
    timm_ltm = tt.ltm.convert(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
                                                num_classes=3), 0.8)
    with pytest.raises(UnsupportedModelError, match="transformers"):
        tt.ltm.save_pretrained(timm_ltm, tmp_path / "y")
    tt.revit.save_pretrained(tt.revit.convert(_build("vit"), (4, 2)), tmp_path / "revit")
    with pytest.raises(UnsupportedModelError, match="tokenthrift.revit.from_pretrained"):  # not its norms at random
        load_model(str(tmp_path / "revit"), num_classes=7)
