"""Host for timm's ``NaFlexVit`` (variable resolution and aspect ratio: the NaFlex SigLIP, RADIO and ``naflexvit_*``
models): the patch embedding, absolute table (learned or factorised, resampled to each input's grid) and prefix
tokens of its ``embeds`` module, then timm's pre-norm ``Block`` (every registered NaFlexViT), a CLS, average or
attention-pool (MAP) head.

Two kinds of input. Images (B, C, H, W) of any size that is a multiple of the patch: every token is a patch of the
image's grid, and every method runs as on a ViT. A padded NaFlex batch (``patches``, ``patch_coord``,
``patch_valid``: images of different grids padded to one length) is taken by ToMe, whose pad tokens start with
size 0: log(0) masks them out of every attention and of the pooling, they merge only into each other after every
real token has had its chance, and a real token never takes a pad's features (:func:`tokenthrift.tome.bipartite_merge`
with sizes). The methods that keep a 2-D grid per batch (ToE's selection, ReViT's grids, LTM's merge on a grid)
refuse a padded batch and say to pass images.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import Embedded
from .vit import ViTHost

__all__ = ["NaFlexHost", "padded_input"]


def padded_input(x, patch_coord: torch.Tensor | None = None, patch_valid: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(patches or images, patch_coord, patch_valid) from what ``NaFlexVit.forward`` takes: a tensor with optional
    coordinates and validity, or the NaFlex collator's dict."""
    if isinstance(x, dict):
        return x["patches"], x.get("patch_coord", patch_coord), x.get("patch_valid", patch_valid)
    return x, patch_coord, patch_valid


class NaFlexHost(ViTHost):
    family = "timm NaFlexVit"
    sized = False
    padded = True

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        try:
            from timm.models.naflexvit import NaFlexVit
        except ImportError:  # timm < 1.0.16 has no NaFlexViT
            return False
        return isinstance(model, NaFlexVit)

    def check_blocks(self, method: str) -> None:
        if self.model.rope is not None:
            raise UnsupportedModelError(f"{method} supports NaFlexViTs with an absolute position table and timm's "
                                        "Block (every registered one); this one has rotary positions (Eva blocks)")
        super().check_blocks(method)
        if self.model.patch_drop is not None:
            raise UnsupportedModelError(f"{method} works on the whole patch grid; build the model with "
                                        "patch_drop_rate=0")

    @property
    def dynamic(self) -> bool:
        return True  # every input's own grid

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.model.embeds.patch_size)

    @property
    def in_chans(self) -> int:
        return int(self.model.in_chans)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The grid of the model's default input size (its pretrained config's)."""
        _, h, w = self.model.pretrained_cfg.get("input_size", (3, 224, 224))
        ph, pw = self.patch_size
        return h // ph, w // pw

    def follow_input_size(self) -> None:
        """Nothing to switch: a NaFlexViT resamples its table to every input's grid."""

    def embed(self, images: torch.Tensor, patch_coord: torch.Tensor | None = None,
              patch_valid: torch.Tensor | None = None) -> Embedded:
        """Images (B, C, H, W), or a padded NaFlex batch (patches (B, N, P·P·C), ``patch_coord`` (B, N, 2),
        ``patch_valid`` (B, N)): then ``Embedded.valid`` holds the validity and ``grid`` is None."""
        m = self.model
        if patch_coord is None and (not torch.is_tensor(images) or images.dim() != 4):
            raise UnsupportedModelError("a NaFlexViT takes images (B, C, H, W), or patches with patch_coord and "
                                        "patch_valid (the NaFlex collator's batch)")
        x, grid = m.embeds(images, patch_coord=patch_coord, patch_valid=patch_valid)
        valid = None
        if patch_coord is not None:
            valid = patch_valid.bool() if patch_valid is not None else torch.ones(
                patch_coord.shape[:2], dtype=torch.bool, device=x.device)
        return Embedded(m.norm_pre(x), None if grid is None else (int(grid[0]), int(grid[1])), valid=valid)

    def embed_inputs(self, x, inputs: dict) -> Embedded:
        patches, coord, valid = padded_input(inputs.pop("patches", x), inputs.pop("patch_coord", None),
                                             inputs.pop("patch_valid", None))
        if inputs:
            raise UnsupportedModelError("a NaFlexViT takes patches, patch_coord and patch_valid; got "
                                        f"{', '.join(inputs)}")
        return self.embed(patches, coord, valid)

    def features(self, x: torch.Tensor, embedded: Embedded):
        return x if embedded.valid is None else {"patches": x}  # NaFlexVit.forward passes it on as forward_head(**it)

    def head_input(self, x, inputs: dict) -> torch.Tensor:
        return inputs["patches"] if x is None else x  # (the validity is in the tokens' sizes)

    def head(self, x: torch.Tensor, size: torch.Tensor | None = None, pre_logits: bool = False) -> torch.Tensor:
        m = self.model
        if size is None or self.pool_type() == "token":
            return self._forward_head(m, x, pre_logits=pre_logits)
        x = m.head_drop(m.fc_norm(self.pool_by_size(x, size, m.pool_include_prefix)))
        return x if pre_logits else m.head(x)
