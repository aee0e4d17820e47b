"""torchvision's Mask R-CNN and Faster R-CNN around timm backbones, LTM backbones included (docs/methods.md §7).

:class:`TimmBackbone` adapts a timm ``features_only`` model to torchvision's detection contract: an
``OrderedDict`` of NCHW maps with one ``out_channels``, through torchvision's ``FeaturePyramidNetwork``
with the extra pooled level (``LastLevelMaxPool``: five maps for the five anchor sizes). Hierarchical
backbones (``swin_*``, ``ltm_swin_*``, and any timm CNN) feed their last four stages to the FPN; plain ViTs
(``vit_*``, ``deit_*``, ``ltm_vit_*``) have one map at stride p, from which a simple feature pyramid
(ViTDet: two and one stride-2 transposed convolutions, the map itself, a stride-2 max pool) makes the
strides p/4, p/2, p and 2p. Every backbone runs at any input size (Swin with ``strict_img_size=False``, ViT
with ``dynamic_img_size=True``).

LTM backbones merge inside and **unmerge at every stage output** (Swin blocks unmerge within themselves;
an LTM ViT's ``forward_intermediates`` broadcasts its merged tokens back to the patch grid), so the FPN gets
the plain backbone's strides, and an LTM backbone with ratio 1.0 gives exactly the plain detector.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..errors import InvalidArgumentError, UnsupportedModelError

__all__ = ["DETECTORS", "DetectionBatch", "SimpleFeaturePyramid", "TimmBackbone", "TimmFasterRCNN", "TimmMaskRCNN",
           "fasterrcnn", "load_backbone_weights", "maskrcnn"]

_PLAIN_VIT = ("vit_", "deit_", "ltm_vit_")


class SimpleFeaturePyramid(nn.Module):
    """One (B, C, H, W) map at stride s -> four maps at strides s/4, s/2, s, 2s (ViTDet's simple pyramid)."""

    def __init__(self, channels: int):
        super().__init__()
        half, quarter = channels // 2, channels // 4
        self.up4 = nn.Sequential(nn.ConvTranspose2d(channels, half, 2, 2), nn.GroupNorm(1, half), nn.GELU(),
                                 nn.ConvTranspose2d(half, quarter, 2, 2))
        self.up2 = nn.ConvTranspose2d(channels, half, 2, 2)
        self.down2 = nn.MaxPool2d(2)
        self.channels = [quarter, half, channels, channels]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.up4(x), self.up2(x), x, self.down2(x)]


class TimmBackbone(nn.Module):
    """A timm model as a torchvision detection backbone: ``forward(images (B, 3, H, W))`` -> ``OrderedDict``
    of five NCHW maps (keys "0".."3" at the backbone's four strides, "pool" at twice the last), each with
    ``out_channels`` channels. ``body`` is the timm ``features_only`` model; ``kwargs`` go to
    ``timm.create_model`` (e.g. ``ltm_site_ratio``, ``embed_dim``)."""

    def __init__(self, name: str, out_channels: int = 256, pretrained: bool = False, **kwargs: Any):
        super().__init__()
        if not timm.is_model(name):
            raise InvalidArgumentError(f"unknown timm backbone {name!r} (timm.list_models() lists all; ltm_* names "
                                       "exist after import tokenthrift)")
        plain_vit = name.startswith(_PLAIN_VIT)
        size_kw = {"dynamic_img_size": True, "out_indices": (-1,)} if plain_vit else {}
        if name.startswith(("swin_", "ltm_swin_")):
            size_kw = {"strict_img_size": False}
        try:
            self.body = timm.create_model(name, pretrained=pretrained, features_only=True, **{**size_kw, **kwargs})
        except (TypeError, RuntimeError) as err:
            raise UnsupportedModelError(f"timm model {name!r} cannot serve as a detection backbone (features_only "
                                        f"failed: {err})") from err
        channels = list(self.body.feature_info.channels())
        strides = list(self.body.feature_info.reduction())
        self.nhwc = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        self.pyramid, self.take = None, max(0, len(channels) - 4)  # at most the last four stages
        if len(channels) == 1:  # a plain ViT: one map, the simple pyramid makes four
            self.pyramid = SimpleFeaturePyramid(channels[0])
            channels, strides = self.pyramid.channels, [strides[0] // 4, strides[0] // 2, strides[0], 2 * strides[0]]
        self.strides = strides[self.take:]
        self.fpn = FeaturePyramidNetwork(channels[self.take:], out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's maps as NCHW, before the FPN (the plain ViT's through the simple pyramid)."""
        maps = self.body(x)
        maps = [m.permute(0, 3, 1, 2).contiguous() for m in maps] if self.nhwc else list(maps)
        if self.pyramid is not None:
            return self.pyramid(maps[-1])
        return maps[self.take:]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.features(x))))


@dataclass
class DetectionBatch:
    """Images (a list of (3, H, W), any sizes) with their targets (training), as one input: what a training
    engine that calls ``model(inputs)`` hands a detector."""

    images: list[torch.Tensor]
    targets: list[dict] | None = None

    def to(self, device: torch.device) -> DetectionBatch:
        targets = None if self.targets is None else [
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in self.targets]
        return DetectionBatch([image.to(device) for image in self.images], targets)

    def __len__(self) -> int:
        return len(self.images)


class _BatchInput:
    """``forward`` also takes a :class:`DetectionBatch` (images and targets together)."""

    def forward(self, images, targets=None):
        if isinstance(images, DetectionBatch):
            images, targets = images.images, images.targets
        return super().forward(images, targets)


class TimmMaskRCNN(_BatchInput, MaskRCNN):
    """torchvision's ``MaskRCNN`` (it is one) whose ``forward`` also takes a :class:`DetectionBatch`."""


class TimmFasterRCNN(_BatchInput, FasterRCNN):
    """torchvision's ``FasterRCNN`` whose ``forward`` also takes a :class:`DetectionBatch`."""


def _build(cls: type, backbone: str, num_classes: int, backbone_kwargs: dict | None, head_width: int | None,
           kwargs: dict) -> nn.Module:
    if num_classes < 2:
        raise InvalidArgumentError(f"num_classes={num_classes} counts the background too: a one-class detector has 2")
    body = TimmBackbone(backbone, out_channels=head_width or 256, **(backbone_kwargs or {}))
    kwargs.setdefault("image_mean", list(body.mean))
    kwargs.setdefault("image_std", list(body.std))
    if head_width:  # lighter heads for small inputs: FPN and heads head_width wide
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

        kwargs.setdefault("box_head", TwoMLPHead(head_width * 7 * 7, 4 * head_width))
        kwargs.setdefault("box_predictor", FastRCNNPredictor(4 * head_width, num_classes))
        if issubclass(cls, MaskRCNN):
            kwargs.setdefault("mask_head", MaskRCNNHeads(head_width, [head_width] * 2, 1))
            kwargs.setdefault("mask_predictor", MaskRCNNPredictor(head_width, head_width, num_classes))
        num_classes = None  # the predictors carry it
    model = cls(body, num_classes=num_classes, **kwargs)
    model.backbone_name = backbone
    return model


def maskrcnn(backbone: str, num_classes: int, backbone_kwargs: dict | None = None, head_width: int | None = None,
             **kwargs: Any) -> MaskRCNN:
    """torchvision ``MaskRCNN`` whose backbone is the timm model ``backbone`` (:class:`TimmBackbone` + FPN).

    ``num_classes`` includes the background (COCO: 91 ids, the collage set: 11). ``backbone_kwargs`` go to
    ``timm.create_model`` (e.g. ``{"ltm_site_ratio": 0.6}``), ``kwargs`` to ``MaskRCNN`` (e.g. ``min_size``,
    ``max_size``; ``image_mean``/``image_std`` default to the backbone's). ``head_width``: None keeps
    torchvision's FPN and heads (256 wide, box head 1024, four mask convolutions); an int makes them that
    wide (box head 4x, two mask convolutions), for small inputs on small machines.
    """
    return _build(TimmMaskRCNN, backbone, num_classes, backbone_kwargs, head_width, kwargs)


def fasterrcnn(backbone: str, num_classes: int, backbone_kwargs: dict | None = None, head_width: int | None = None,
               **kwargs: Any) -> FasterRCNN:
    """torchvision ``FasterRCNN`` (boxes only) with the timm ``backbone``; as :func:`maskrcnn`."""
    return _build(TimmFasterRCNN, backbone, num_classes, backbone_kwargs, head_width, kwargs)


def load_backbone_weights(detector: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Copy a classifier's state dict (plain timm names: a classification run of the same backbone, LTM or
    not: LTM adds no weights) into ``detector.backbone.body``, timm's ``features_only`` view of that model,
    which renames some keys (``model.`` in front, or ``layers.0`` -> ``layers_0``). Every backbone tensor
    must be found with its shape (a ViT's position table is resampled to the backbone's grid, as ViTDet does
    when it moves from 224 px classification to detection sizes). Returns the classifier keys the detector
    has no use for (its head and final norm)."""
    body = detector.backbone.body if hasattr(detector, "backbone") else detector
    target = body.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unused = []
    for key, value in weights.items():
        name = next((c for c in (key, f"model.{key}", key.replace(".", "_", 1)) if c in target), None)
        if name is None:
            unused.append(key)
            continue
        if target[name].shape != value.shape and name.endswith("pos_embed"):  # trained at another image size
            value = _resample_pos_embed(body, value)
        if target[name].shape != value.shape:
            raise InvalidArgumentError(f"backbone weight {key} has shape {tuple(value.shape)}, the detector's backbone "
                                       f"{tuple(target[name].shape)}: the classifier was built with other keywords "
                                       "(in_chans, embed_dim, depths...); give the backbone the same --model-kwargs")
        mapped[name] = value
    missing = sorted(set(target) - set(mapped))
    if missing:
        raise InvalidArgumentError(f"the classifier's weights lack {len(missing)} of the backbone's {len(target)} "
                                   f"tensors (first: {', '.join(missing[:3])}): they come from another model than "
                                   f"{getattr(detector, 'backbone_name', 'this backbone')}")
    body.load_state_dict(mapped)
    return unused


def _resample_pos_embed(body: nn.Module, table: torch.Tensor) -> torch.Tensor:
    vit = getattr(body, "model", body)
    prefix = 0 if getattr(vit, "no_embed_class", False) else getattr(vit, "num_prefix_tokens", 0)
    side = math.isqrt(table.shape[1] - prefix)
    if not hasattr(vit, "patch_embed") or side * side != table.shape[1] - prefix:
        return table  # not a square grid of a ViT: the shape check reports it
    return resample_abs_pos_embed(table, list(vit.patch_embed.grid_size), (side, side), num_prefix_tokens=prefix)


DETECTORS = {"maskrcnn": maskrcnn, "fasterrcnn": fasterrcnn}
