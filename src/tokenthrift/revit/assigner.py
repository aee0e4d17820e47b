"""The Token-Length Assigner (TLA): a small timm CNN on a low-resolution copy of the image that predicts its
token-length label, and its MACs budget (at most 2 % of the backbone at the largest grid).

Zhou & Zhu, "Make A Long Image Short: Adaptive Token Length for Vision Transformers", ECML-PKDD 2023
(arXiv 2307.02092), docs/methods.md §3.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import measure
from ..errors import InvalidArgumentError, TokenthriftWarning

__all__ = ["DEFAULT_ASSIGNER", "MAX_MACS_FRACTION", "TokenLengthAssigner", "assigner_macs_fraction",
           "check_assigner_budget"]

# mobilenetv3_small_050 fits every backbone we ship (measured with tokenthrift.measure.macs, 3 grids):
# 6.46 MMACs at 112 px (DeiT-S at 224: 0.14 %, DeiT-T: 0.52 %) and 0.59 MMACs at 14 px, one channel
# (the 28 px Fashion-MNIST ViT, patch 2, width 48, depth 6, 55.1 MMACs: 1.07 %).
DEFAULT_ASSIGNER = "mobilenetv3_small_050"
MAX_MACS_FRACTION = 0.02  # docs/methods.md §3: the assigner costs at most 2 % of the backbone at the largest grid


class TokenLengthAssigner(nn.Module):
    """The TLA: a small timm CNN that maps a full-size image to K grid logits (docs/methods.md §3).

    The image (B, C, H, W) at the backbone's native size is downsampled inside (bilinear, antialias) by
    ``scale`` (default 0.5: half resolution) and classified into K grid indices (0 = largest grid). For
    video (``input_size`` (C, T, H, W)) it decides once per clip (B, C, T, H, W) from a cheap view, *decision*
    (docs/methods.md §6): the middle frame (index T // 2) at the same reduced resolution, and with ``motion`` also
    the clip's mean absolute frame difference as C more channels (a still middle frame cannot tell a fast clip from
    a slow one).

    Args:
        num_grids: K, the number of ReViT grids.
        input_size: (C, H, W) of the backbone's images, or (C, T, H, W) of its clips.
        model_name: any timm classification model (default :data:`DEFAULT_ASSIGNER`); check its cost with
            :func:`check_assigner_budget`.
        scale: side of the assigner's input as a fraction of the full image (0 < scale <= 1).
        pretrained: load timm's pretrained weights (needs them locally or network access).
        motion: clips only: feed the mean absolute difference of consecutive frames beside the middle frame.
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``); ``num_classes`` and
            ``in_chans`` are set from ``num_grids`` and ``input_size``.

    forward: (B, C, H, W) or (B, C, T, H, W) -> logits (B, K).
    """

    def __init__(self, num_grids: int, input_size: Sequence[int] = (3, 224, 224), model_name: str = DEFAULT_ASSIGNER,
                 scale: float = 0.5, pretrained: bool = False, motion: bool = False, **model_kwargs):
        super().__init__()
        import timm

        if num_grids < 1:
            raise InvalidArgumentError(f"the assigner needs at least one grid; got num_grids={num_grids}")
        if len(input_size) not in (3, 4):
            raise InvalidArgumentError("input_size must be (channels, height, width), or (channels, frames, height, "
                                       f"width) for clips; got {tuple(input_size)}")
        if not 0.0 < scale <= 1.0:
            raise InvalidArgumentError(f"assigner scale={scale} must lie in (0, 1]: it is the fraction of the image "
                                       "side")
        if not timm.is_model(model_name):
            raise InvalidArgumentError(f"unknown timm model {model_name!r} for the assigner; e.g. {DEFAULT_ASSIGNER}, "
                                       "lcnet_035, resnet10t (timm.list_models() lists all)")
        if motion and len(input_size) != 4:
            raise InvalidArgumentError("motion=True gives the assigner frame differences: it needs clips, input_size "
                                       f"(channels, frames, height, width); got {tuple(input_size)}")
        for key in ("num_classes", "in_chans"):
            if key in model_kwargs:
                raise InvalidArgumentError(f"{key} is set by the assigner itself (from num_grids / input_size)")
        self.input_size = tuple(int(v) for v in input_size)
        c, h, w = self.input_size[0], self.input_size[-2], self.input_size[-1]
        self.scale = float(scale)
        self.low_res = (max(1, round(h * scale)), max(1, round(w * scale)))
        self.num_classes = int(num_grids)
        self.grids: tuple[int, ...] | None = None  # the grid sizes behind the K outputs, when known (TLA runs)
        self.model_name = model_name
        self.motion = bool(motion)
        self.net = timm.create_model(model_name, pretrained=pretrained, num_classes=num_grids, in_chans=c * (1 + motion),
                                     **model_kwargs)
        # timm.data.resolve_model_data_config (and so the training engine) reads the input size from here:
        # the assigner takes full-size images, not its CNN's default size
        self.pretrained_cfg = {**getattr(self.net, "pretrained_cfg", {}), "input_size": self.input_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_size:
            kind = "clips" if len(self.input_size) == 4 else "images"
            raise InvalidArgumentError(f"TokenLengthAssigner takes full-size {kind} (B, "
                                       f"{', '.join(map(str, self.input_size))}); got {tuple(x.shape)}")
        if x.dim() == 5:  # one decision per clip, from its middle frame (and how much the clip moves)
            middle = x[:, :, x.shape[2] // 2]
            x = torch.cat([middle, (x[:, :, 1:] - x[:, :, :-1]).abs().mean(2)], 1) if self.motion else middle
        if self.low_res != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=self.low_res, mode="bilinear", antialias=True, align_corners=False)
        return self.net(x)

    def extra_repr(self) -> str:
        return f"model={self.model_name}, num_grids={self.num_classes}, input_size={self.input_size}, " \
               f"low_res={self.low_res}" + (", motion" if self.motion else "")


def _backbone_macs(backbone: nn.Module | float) -> float:
    if isinstance(backbone, (int, float)):
        return float(backbone)
    return measure.macs(backbone, backbone.input_size, grid=backbone.grids[0])


def assigner_macs_fraction(assigner: TokenLengthAssigner, backbone: nn.Module | float) -> float:
    """MACs of the assigner / MACs of the backbone at its largest grid (both per image, measured with
    :func:`tokenthrift.measure.macs`). ``backbone``: a ResizableViT, or its MACs as a number."""
    return measure.macs(assigner, assigner.input_size) / _backbone_macs(backbone)


def check_assigner_budget(assigner: TokenLengthAssigner, backbone: nn.Module | float,
                          max_fraction: float = MAX_MACS_FRACTION, on_exceed: str = "raise") -> float:
    """Check the docs/methods.md §3 budget: assigner MACs <= ``max_fraction`` (2 %) of the backbone at the largest grid.

    Returns the measured fraction. Over budget: ``on_exceed="raise"`` raises ValueError, ``"warn"``
    warns (UserWarning).
    """
    if on_exceed not in ("raise", "warn"):
        raise InvalidArgumentError(f"on_exceed={on_exceed!r}: choose raise or warn")
    fraction = assigner_macs_fraction(assigner, backbone)
    if fraction > max_fraction:
        message = (f"the token-length assigner ({assigner.model_name}, input {assigner.low_res}) costs "
                   f"{100 * fraction:.2f} % of the backbone's MACs at the largest grid, over the "
                   f"{100 * max_fraction:.1f} % budget; pick a smaller timm model or a lower scale")
        if on_exceed == "raise":
            raise InvalidArgumentError(message)
        warnings.warn(message, TokenthriftWarning, stacklevel=2)
    return fraction
