"""The NaFlexViT host: images of any size through every method, and the padded NaFlex batch (images of several grids
padded to one length) through ToMe, where a pad token is never merged into a real one, never attended to and never
pooled: every image of a padded batch gives what it gives alone. The methods that keep one grid per batch refuse a
padded batch and say what to pass instead."""
import copy

import pytest
import timm
import torch

import tokenthrift as tt
from tokenthrift.errors import UnsupportedModelError

NAFLEX = {"avg, 4 registers": "naflexvit_base_patch16_gap", "MAP head": "naflexvit_base_patch16_map",
          "SigLIP, no prefix": "naflexvit_base_patch16_siglip"}
PATCH = 16


def small(name: str) -> torch.nn.Module:
    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    torch.manual_seed(0)
    model = timm.create_model(name, depth=3, embed_dim=64, num_heads=2, num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def padded_batch(images: list[torch.Tensor], length: int) -> dict:
    """The NaFlex collator's batch written out: each image's patches (row-major, channels last within a patch),
    their (row, column) and validity, padded to ``length``."""
    patches = torch.zeros(len(images), length, PATCH * PATCH * 3)
    coord = torch.zeros(len(images), length, 2, dtype=torch.long)
    valid = torch.zeros(len(images), length, dtype=torch.bool)
    for i, img in enumerate(images):
        h, w = img.shape[-2] // PATCH, img.shape[-1] // PATCH
        patches[i, :h * w] = img.reshape(3, h, PATCH, w, PATCH).permute(1, 3, 2, 4, 0).reshape(h * w, -1)
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coord[i, :h * w] = torch.stack([rows, cols], -1).reshape(-1, 2)
        valid[i, :h * w] = True
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}


IMAGES = [torch.randn(3, 64, 80, generator=torch.Generator().manual_seed(1)),  # 4 x 5 patches
          torch.randn(3, 48, 48, generator=torch.Generator().manual_seed(2))]  # 3 x 3 patches


@pytest.mark.parametrize("kind", NAFLEX)
def test_every_image_of_a_padded_batch_gives_what_it_gives_alone(kind):
    model = small(NAFLEX[kind])
    batch = padded_batch(IMAGES, 24)
    with torch.no_grad():
        plain = model(batch)
        alone = torch.cat([model(img[None]) for img in IMAGES])
        torch.testing.assert_close(plain, alone, rtol=0, atol=1e-5)  # the plain model's own padding, for reference
        handle = tt.tome.apply(model, 0)
        torch.testing.assert_close(model(batch), plain, rtol=0, atol=1e-5)  # r = 0: the plain model, padded
        handle.r = 2  # merges in every block: 9 real tokens of the second image become 3
        merged = model(batch)
        size = handle.last_size[1, model.num_prefix_tokens:, 0]  # the second image's tokens, real ones first
        one_by_one = torch.cat([model(img[None]) for img in IMAGES])
    torch.testing.assert_close(merged, one_by_one, rtol=0, atol=1e-5)
    assert (merged - plain).abs().max() > 1e-4  # (and r = 2 did merge)
    assert size[:3].sum() == 9 and (size[3:] == 0).all()  # every real patch counted once, no pad counted


@pytest.mark.parametrize("kind", ["MAP head"])
def test_every_method_runs_a_naflexvit_on_images_of_any_size(kind):
    """Non-rectangular images (64 x 80 px: 4 x 5 patches): ToMe and LTM merge, ToE keeps half in training, ReViT's
    smaller grid is the model at that size; the patched models compile in one graph."""
    import torch._dynamo as dynamo
    import torch.nn.functional as F

    model = small(NAFLEX[kind])
    x = torch.stack(IMAGES[:1] * 2)
    with torch.no_grad():
        plain = model(x)
        tome = tt.tome.merging_copy(model, 3)
        ltm = tt.ltm.convert(copy.deepcopy(model), 0.7).eval()
        for patched in (tome, ltm):
            out = patched(x)
            assert out.shape == plain.shape and 1e-4 < (out - plain).abs().max() < 1
            dynamo.reset()
            torch.testing.assert_close(torch.compile(patched, fullgraph=True, backend="eager")(x), out,
                                       rtol=1e-5, atol=1e-5)
    revit = tt.revit.convert(copy.deepcopy(model), grids=(4, 3)).eval()
    square = x[..., :64]
    with torch.no_grad():
        resized = F.interpolate(square, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(revit(square, grid=3), model(resized), rtol=1e-5, atol=1e-5)
    toe = copy.deepcopy(model)
    handle = tt.toe.apply(toe, r0=0.25, keep_rates=(0.5, 1.0), milestones=(0, 10))
    toe.train()(x)
    assert handle.last_patch_index.shape == (2, 10)


def test_methods_that_keep_one_grid_refuse_a_padded_batch():
    model = small(NAFLEX["avg, 4 registers"])
    batch = padded_batch(IMAGES, 24)
    ltm = tt.ltm.convert(copy.deepcopy(model), 0.7)
    with pytest.raises(UnsupportedModelError, match=r"LTM .* this batch is padded .* pass images \(B, C, H, W\)"):
        ltm(batch)
    toe = copy.deepcopy(model)
    tt.toe.apply(toe, r0=0.25, keep_rates=(0.5, 1.0), milestones=(0, 10))
    with pytest.raises(UnsupportedModelError, match=r"ToE .* this batch is padded"):
        toe.train()(batch)
    tt.tome.apply(model, 1)
    with pytest.raises(UnsupportedModelError, match="a NaFlexViT takes images"):
        model(torch.randn(2, 5, 768))  # patches without their coordinates
