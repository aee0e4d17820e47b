"""Pretrained models shipped inside the package, loadable the timm way (``pretrained=True``, no download).

``vit_fmnist_tiny_patch2_28``: the Fashion-MNIST tiny ViT of the ``fmnist_vit_tiny`` recipe (28 px grey
images, patch 2 = the 14×14 token grid of a 224 px ViT, width 48, depth 6, 3 heads, 0.18 M parameters),
trained with full tokens for 30 epochs on the 60 000 training images. It is the converged starting
point the demo fine-tunes ReViT + TLA and LTM from, as practitioners apply these methods. Reproduce it
with the command in :data:`TRAIN_COMMAND`; its training log ships beside the weights
(``weights/vit_fmnist_tiny_patch2_28.jsonl``)::

    model = timm.create_model("vit_fmnist_tiny_patch2_28", pretrained=True)   # 10 classes, (1, 28, 28) input

timm's pretrained config points at the packaged ``.safetensors`` file (``file=``), so timm's handling of
pretrained weights applies: another ``num_classes`` gets a fresh head, another ``img_size`` resamples the
position table, and ``in_chans=3`` spreads the grey patch embedding over the colour channels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

__all__ = ["FMNIST_CLASSES", "FMNIST_VIT", "TRAIN_COMMAND", "WEIGHTS_DIR", "weights_path"]

WEIGHTS_DIR = Path(__file__).with_name("weights")
FMNIST_VIT = "vit_fmnist_tiny_patch2_28"
TRAIN_COMMAND = "python benchmarks/pretrain_fmnist.py"  # trains (resumably) and exports the weights
# Fashion-MNIST's classes in label order: the shipped models' outputs (their cfgs' label_names, timm's field)
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")


def weights_path(name: str = FMNIST_VIT) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


default_cfgs = generate_default_cfgs({
    f"{FMNIST_VIT}.tokenthrift": {
        "file": str(weights_path()),
        "num_classes": 10,
        "label_names": FMNIST_CLASSES,
        "input_size": (1, 28, 28),
        "mean": (0.2860,),
        "std": (0.3530,),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
    },
})


def _adapt(state_dict: dict, model: VisionTransformer) -> dict:
    """The stored grey patch embedding spread over the model's channels (each channel 1/C of it, so an image
    with equal channels gives the grey response), then timm's ViT filter (position table resampling). Done
    here because timm before 1.0.30 only adapts stems it assumes were trained on 3 channels."""
    weight = state_dict["patch_embed.proj.weight"]
    channels = model.patch_embed.proj.in_channels
    if weight.shape[1] == 1 and channels != 1:
        state_dict = {**state_dict, "patch_embed.proj.weight": weight.repeat(1, channels, 1, 1) / channels}
    return checkpoint_filter_fn(state_dict, model)


@register_model
def vit_fmnist_tiny_patch2_28(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Fashion-MNIST tiny ViT (28 px, patch 2, width 48, depth 6); ``pretrained=True`` loads the weights
    shipped with tokenthrift."""
    args = {**dict(img_size=28, patch_size=2, in_chans=1, embed_dim=48, depth=6, num_heads=3, num_classes=10),
            **kwargs}
    out_indices = args.pop("out_indices", 3)
    return build_model_with_cfg(VisionTransformer, FMNIST_VIT, pretrained, pretrained_filter_fn=_adapt,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)
