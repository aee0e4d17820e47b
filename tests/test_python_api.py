"""The Python API's answers where a model's own record decides them: the input size a model takes (read from the model
itself: a transformers encoder's config, a NaFlexViT's built size), the r ToMe reports being the r it runs on a
model of any input size, and ``dataset_for_model`` labelling the data by the class names the model carries. Tiny
models, no hub."""
import warnings

import pytest
import timm
import torch
from PIL import Image

import tokenthrift as tt
from tokenthrift.data import dataset_for_model
from tokenthrift.errors import InvalidArgumentError
from tokenthrift.ltm.conversion import MACS_TOLERANCE

transformers = pytest.importorskip("transformers")

SIZE = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=64,
            patch_size=8)  # 64 px: an 8 x 8 grid, where every family defaults to 224 px


def _hf(name: str, **kw) -> torch.nn.Module:
    """A 64-px transformers encoder or classifier, random weights, as tests/test_transformers.py builds them."""
    t = transformers
    torch.manual_seed(0)
    models = {
        "dinov2": lambda: t.Dinov2Model(t.Dinov2Config(**{**SIZE, "intermediate_size": None}, mlp_ratio=2, **kw)),
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(**SIZE, num_labels=3, **kw)),
        "clip": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**SIZE, **kw)),
        "siglip": lambda: t.SiglipVisionModel(t.SiglipVisionConfig(**SIZE, **kw)),
        "clip-classifier": lambda: t.CLIPForImageClassification(t.CLIPConfig(
            vision_config={**SIZE, **kw}, text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=4, intermediate_size=64),
            num_labels=3)),
    }
    return models[name]().eval()


def _macs_ratio(model, size) -> float:
    return tt.measure.macs(model, size) / tt.measure.macs(tt.ltm.plain_copy(model), size)


# ---------------------------------------------------------------------------------------------- the input size
@pytest.mark.parametrize("name", ["dinov2", "vit", "clip", "siglip", "clip-classifier"])
def test_a_transformers_model_takes_the_size_of_its_config(name):
    """Not timm's 224-px default: the config's image size and channels (CLIP's classifier: its vision config's)."""
    assert tt.measure.model_input_shape(_hf(name)) == (3, 64, None)


def test_a_transformers_model_takes_its_channels_also_under_tokenthrifts_classifier():
    from tokenthrift.hosts.transformers import TransformersClassifier

    assert tt.measure.model_input_shape(_hf("vit", num_channels=1)) == (1, 64, None)
    assert tt.measure.model_input_shape(TransformersClassifier(_hf("clip-classifier", num_channels=1))) == (1, 64, None)


def test_ltm_macs_on_a_64px_transformers_dinov2_is_the_share_asked():
    """Calibrated at 224 px (as it was), the 64-px DINOv2 missed the 0.8 asked (0.735 in the issue's model)."""
    model = _hf("dinov2")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="LTM")  # no "closest this model reaches" warning either
        tt.ltm.convert(model, macs=0.8)
    assert _macs_ratio(model.eval(), (3, 64, 64)) == pytest.approx(0.8, abs=MACS_TOLERANCE)


@pytest.mark.parametrize("name", ["vit", "clip", "siglip"])
@pytest.mark.filterwarnings("ignore:LTM. asked for 0.8 of the MACs")  # one-layer SigLIP: 0.82 at the closest
def test_ltm_macs_on_a_64px_transformers_encoder_runs(name):
    """These crashed inside transformers ('Input image size (224*224) doesn't match model (64*64)')."""
    model = tt.ltm.convert(_hf(name), macs=0.8).eval()
    assert _macs_ratio(model, (3, 64, 64)) == pytest.approx(0.8, abs=0.05)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))


def test_a_naflexvit_takes_the_size_it_was_built_for():
    """A NaFlexViT takes any size: the one it was built with (``img_size``), else its cfg's (timm's nominal size)."""
    if not timm.is_model("naflexvit_base_patch16_gap"):
        pytest.skip(f"timm {timm.__version__} has no NaFlexViT")
    small = dict(depth=1, embed_dim=32, num_heads=2, num_classes=3)
    assert tt.measure.model_input_shape(timm.create_model("naflexvit_base_patch16_gap", img_size=64, **small)) == (
        3, 64, None)
    built = timm.create_model("naflexvit_base_patch16_gap", **small)
    assert tt.measure.model_input_shape(built)[1] == built.pretrained_cfg["input_size"][-1]


def _folder(root, train_classes=("ant", "bee", "cat"), val_classes=None, side=20):
    """An ImageFolder tree, train/ and val/, each class drawn in its own grey level (two images each)."""
    for split, classes in (("train", train_classes), ("val", val_classes or train_classes)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            level = 40 + 60 * sorted(set(train_classes) | set(val_classes or ())).index(name)
            for i in range(2):
                Image.new("RGB", (side, side), (level, level, level)).save(folder / f"{i}.png")
    return root


def test_dataset_for_a_64px_transformers_vit_serves_64px_images(tmp_path):
    data = f"imagefolder:{_folder(tmp_path)}"
    ds, _ = dataset_for_model(data, _hf("vit"), train=False)
    assert ds[0][0].shape == (3, 64, 64)
    grey, _ = dataset_for_model(data, _hf("vit", num_channels=1), train=False, pretrained=False)
    assert grey[0][0].shape == (1, 64, 64)


# ---------------------------------------------------------------------------------------------- ToMe's r
def _dinov3() -> torch.nn.Module:
    if not timm.is_model("vit_small_patch16_dinov3"):
        pytest.skip(f"timm {timm.__version__} has no DINOv3")
    torch.manual_seed(0)  # dynamic_img_size (DINOv3's default): at 64 px, 16 patch tokens and 5 prefix tokens
    return timm.create_model("vit_small_patch16_dinov3", img_size=64, depth=2, num_classes=5,
                             dynamic_img_size=True).eval()


def test_tome_on_a_dynamic_size_eva_refuses_an_r_it_cannot_run():
    """r = 50 was merged as far as the tokens went and reported as 50; a fixed grid refuses it at apply, a model of
    any size at the forward, where its grid is known, naming the largest r at that size."""
    model = _dinov3()
    handle = tt.tome.apply(model, 50)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with pytest.raises(InvalidArgumentError, match=r"ToMe r=50 .*block 0.* 16 patch tokens over 2 blocks the "
                                                       r"largest r is 5"):
            model(x)
        handle.r = 5  # what fits runs, and merges 5 tokens in each block
        assert model(x).shape == (1, 5) and handle.last_size.shape[1] == 21 - 2 * 5
        handle.r = [5, 6]  # per block: 16 patches, then 11, of which block 1 can merge 5
        with pytest.raises(InvalidArgumentError, match=r"r=\[5, 6\] .*block 1"):
            model(x)
    timm_fixed = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=5)
    with pytest.raises(InvalidArgumentError, match=r"ToMe r=50 .* largest r is"):
        tt.tome.apply(timm_fixed, 50)


def test_tome_refuses_at_the_forward_an_r_too_large_for_the_images_given():
    """An r that fits the model's own size but not smaller images given to it."""
    model = _dinov3()
    handle = tt.tome.apply(model, 5)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        with pytest.raises(InvalidArgumentError, match=r"ToMe r=5 .* 4 patch tokens over 2 blocks the largest r is 1"):
            model(torch.randn(1, 3, 32, 32))
    handle.r = 1
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_tokenthrift_macs_refuses_a_tome_r_a_dynamic_model_cannot_run(capsys):
    """It printed a 'ToMe r=50' row for what ran as r = 5 (and less)."""
    from tokenthrift.apps.cli import main

    if not timm.is_model("vit_small_patch16_dinov3"):
        pytest.skip(f"timm {timm.__version__} has no DINOv3")
    with pytest.raises(SystemExit):
        main(["macs", "--model", "vit_small_patch16_dinov3", "--img-size", "64", "--depth", "2", "--num-classes", "5",
              "--method", "tome", "--tome-r", "50"])
    err = capsys.readouterr().err
    assert "ToMe r=50" in err and "the largest r is 5" in err


# ---------------------------------------------------------------------------------------------- class names
def test_dataset_for_model_labels_by_the_class_names_the_model_carries(tmp_path):
    """A val folder without 'bee' was labelled ant 0, cat 1 against a model whose outputs are ant, bee, cat."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    tt.data.set_model_classes(model, ("ant", "bee", "cat"))
    root = _folder(tmp_path / "a", val_classes=("ant", "cat"))
    with pytest.warns(UserWarning, match="no images of 1 of the 3 classes \\(bee\\)"):
        ds, info = dataset_for_model(f"imagefolder:{root}", model, train=False)
    assert info.classes == ("ant", "cat") and sorted({y for _, y in ds}) == [0, 2]  # the model's indices
    root = _folder(tmp_path / "b", val_classes=("ant", "bee", "cat", "eel"))
    with pytest.raises(InvalidArgumentError, match="classes that the model does not: eel"):
        dataset_for_model(f"imagefolder:{root}", model, train=False)
    ds, _ = dataset_for_model(f"imagefolder:{root}", model, train=False, classes=None)  # the data's own labels
    assert sorted({y for _, y in ds}) == [0, 1, 2, 3]


def test_dataset_for_model_labels_by_a_transformers_models_id2label(tmp_path):
    """A transformers classifier's names are its config's id2label, unless they are transformers' LABEL_0, ..."""
    model = _hf("vit")
    root = _folder(tmp_path, val_classes=("ant", "cat"))
    ds, _ = dataset_for_model(f"imagefolder:{root}", model, train=False)
    assert sorted({y for _, y in ds}) == [0, 1]  # LABEL_0, LABEL_1, LABEL_2: no names, the folder's order
    model.config.id2label = {0: "ant", 1: "bee", 2: "cat"}
    assert tt.data.model_classes(model) == ("ant", "bee", "cat")
    with pytest.warns(UserWarning, match="no images of 1 of the 3 classes"):
        ds, _ = dataset_for_model(f"imagefolder:{root}", model, train=False)
    assert sorted({y for _, y in ds}) == [0, 2]
