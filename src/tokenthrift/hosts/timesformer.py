"""Host for tokenthrift's video model, the divided space-time :class:`~tokenthrift.video.TimeSformer`
(docs/methods.md §6): clips (B, C, T, H, W) in; its embedding (one patch embedding per frame, the spatial table
resampled to the clip's grid and the time table to its frame count) gives a CLS token and every frame's patches,
patch-major and time-minor; each ``DividedBlock`` takes the frame count beside the tokens; 3 norms per block
(``temporal_norm1``, ``norm1``, ``norm2``) and the final ``norm``; its head pools the CLS token or the patches' mean.

Its blocks run whole (temporal attention over every patch position's frames, then spatial attention over every
frame's patches): they need every frame's patches in the embedding's layout, so a method that changes the tokens
between blocks (ToMe, ToE, EViT, LTM) is refused (``reducible`` False); ReViT runs it at smaller grids.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..video.model import TimeSformer
from .base import Embedded, Host

__all__ = ["TimeSformerHost"]


class TimeSformerHost(Host):
    family = "tokenthrift TimeSformer"
    reducible = False
    inputs = "clips"

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return isinstance(model, TimeSformer)

    @property
    def dynamic(self) -> bool:
        return True  # the grid and the frame count come from every clip

    @property
    def frame_dims(self) -> tuple[int, ...]:
        return (int(self.model.num_frames),)

    def check_blocks(self, method: str) -> None:
        """No attention or MLP step of its own: a ``DividedBlock`` runs whole (:meth:`check_tokens` refuses)."""
        self.check_tokens(method)

    def token_norms(self) -> list[str]:
        """Every block's ``temporal_norm1``, ``norm1`` and ``norm2``, and the final ``norm`` (37 at depth 12)."""
        return [f"blocks.{i}.{n}" for i in range(len(self.blocks)) for n in ("temporal_norm1", "norm1", "norm2")] + [
            "norm"]

    def follow_input_size(self) -> None:
        """Nothing to switch: the TimeSformer takes its grid and frame count from every clip."""

    def embed(self, clips: torch.Tensor) -> Embedded:
        """Clips (B, C, T, H, W) -> the CLS token and the patches of every frame (B, 1 + N·T, D), patch-major and
        time-minor, with the clip's grid and frame count."""
        x, frames = self.model.embed(clips)
        ph, pw = self.patch_size
        return Embedded(x, (clips.shape[-2] // ph, clips.shape[-1] // pw), frames=frames)

    def block_args(self, embedded: Embedded, block: int) -> tuple:
        return (embedded.frames,)

    def run_block(self, block: nn.Module, x: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        return block(x, frames)

    def head(self, x: torch.Tensor, size: torch.Tensor | None = None, pre_logits: bool = False) -> torch.Tensor:
        if size is not None:
            raise UnsupportedModelError("the TimeSformer's head pools the tokens of whole clips; it takes no merged "
                                        "tokens")
        return self._forward_head(self.model, x, pre_logits=pre_logits)
