"""Video: a folder of video files decoded with TorchCodec, and Moving Fashion-MNIST, an offline
action-recognition set generated from the Fashion-MNIST package. Clips come out as (C, T, H, W) float
tensors, as the TimeSformer and torchvision's video models take them (batched: (B, C, T, H, W)).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..errors import InvalidArgumentError, MissingFileError
from .images import FashionMNIST
from .info import MOVING_FASHION_MNIST_CLASSES

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")


def uniform_indices(num_frames: int, frames: int) -> list[int]:
    """``frames`` frame indices spread uniformly over a video of ``num_frames``: the middle of each of
    ``frames`` equal segments (TimeSformer's test protocol: one clip covering the video)."""
    if num_frames < 1:
        raise InvalidArgumentError("the video has no frames")
    return [min(num_frames - 1, int((k + 0.5) * num_frames / frames)) for k in range(frames)]


def _decoder_class():
    try:
        from torchcodec.decoders import VideoDecoder
    except (ImportError, RuntimeError, OSError) as err:  # torchcodec raises RuntimeError when FFmpeg is missing
        raise MissingFileError(
            "reading video files needs TorchCodec and FFmpeg's libraries: pip install 'tokenthrift[video]' and "
            f"install FFmpeg (apt-get install ffmpeg). Importing torchcodec failed: {err}") from err
    return VideoDecoder


class VideoFolder(Dataset):
    """``root/<class>/<video>`` (class folders sorted by name), decoded with TorchCodec: ``frames`` frames
    sampled uniformly over each video (:func:`uniform_indices`), then ``transform`` on the (T, C, H, W)
    frames (a ``tv_tensors.Video``, so every frame gets the same random crop and flip); items are
    ((C, T, H, W), class index), or ((V, C, T, H, W), class index) with a multi-crop test transform."""

    def __init__(self, root: str | Path, frames: int, transform=None):
        root = Path(root)
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.samples = [(path, label) for label, name in enumerate(self.classes)
                        for path in sorted((root / name).iterdir()) if path.suffix.lower() in VIDEO_EXTENSIONS]
        if not self.samples:
            raise MissingFileError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) in {root}/<class>/; expected "
                                   f"{root}/<class>/<video>")
        self.frames, self.transform = frames, transform
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> torch.Tensor:
        """The sampled frames of video i as uint8 (T, C, H, W)."""
        path = self.samples[i][0]
        decoder_class = _decoder_class()
        try:
            decoder = decoder_class(str(path))
            count = decoder.metadata.num_frames or len(decoder)
            return decoder.get_frames_at(indices=uniform_indices(count, self.frames)).data
        except Exception as err:  # any decoding failure: say which file
            raise InvalidArgumentError(f"cannot decode video {path}: {err}") from err

    def __getitem__(self, i: int):
        frames = tv_tensors.Video(self.read(i))
        clip = self.transform(frames) if self.transform else frames
        # (C, T, H, W); with test crops (views, C, T, H, W)
        return clip.transpose(-4, -3).as_subclass(torch.Tensor), self.samples[i][1]


class MovingFashionMNIST(Dataset):
    """Offline action recognition: each clip is ``frames`` frames of a Fashion-MNIST garment moving on a
    ``size``-pixel canvas, with a dimmer distractor garment drifting on a random line; the label is the
    garment's motion, in three pairs of opposites:

        0 left -> right     1 right -> left
        2 approach (grows)  3 recede (shrinks)
        4 rotate clockwise  5 rotate anticlockwise

    The second class of a pair is the first played backwards (same garment, distractor and trajectory, the
    frames in reverse order), so the frames' *set* is the same for both: a model that averages frames (or
    ignores their order) cannot beat chance within a pair; frame order decides.

    Clip i of a split is deterministic given ``seed`` (its own random generator) and generated on the fly;
    ``num_clips`` defaults to one clip per garment of the split (60 000 / 10 000); clip i shows garment
    i mod the split's garments. Items are ((1, T, size, size) in [0, 1], label) before ``transform``.
    """

    CLASSES = MOVING_FASHION_MNIST_CLASSES

    def __init__(self, root: str | Path | None = None, train: bool = True, frames: int = 8, size: int = 28,
                 num_clips: int | None = None, seed: int = 0, transform=None, download: bool = False):
        if frames < 2 or size < 8:
            raise InvalidArgumentError(f"moving-fashion-mnist needs at least 2 frames and 8 px; got frames={frames}, "
                                       f"size={size}")
        self.garments = FashionMNIST(root, train=train, download=download).images  # (n, 28, 28) uint8
        self.frames, self.size, self.transform = frames, size, transform
        self.num_clips = len(self.garments) if num_clips is None else int(num_clips)
        self.seed = seed + (0 if train else 1_000_003)  # the two splits never share a clip's randomness
        self.targets = [self.label(i) for i in range(self.num_clips)]

    def __len__(self) -> int:
        return self.num_clips

    def _generator(self, i: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 10_000_019 + i)

    def label(self, i: int) -> int:
        return int(torch.randint(len(self.CLASSES), (1,), generator=self._generator(i)))

    def clip(self, i: int, label: int | None = None) -> tuple[torch.Tensor, int]:
        """Clip i as (1, T, size, size) floats in [0, 1] and its label; ``label`` renders clip i's garment,
        distractor and trajectory with another motion class (its pair partner is the same clip reversed)."""
        g = self._generator(i)
        drawn = int(torch.randint(len(self.CLASSES), (1,), generator=g))
        label = drawn if label is None else int(label)
        u = torch.rand(12, generator=g)  # every parameter below is drawn whatever the label
        T = self.frames
        steps = torch.linspace(0, 1, T)
        scale = torch.full((T,), 0.45 + 0.2 * float(u[0]))
        angle = torch.full((T,), (float(u[1]) - 0.5) * 0.6)
        pos = torch.stack([torch.full((T,), (float(u[2]) - 0.5) * 0.4), torch.full((T,), (float(u[3]) - 0.5) * 0.4)], 1)
        pair = label // 2
        if pair == 0:  # horizontal sweep of 0.7 to 1.1 of the canvas half-width
            span = 0.7 + 0.4 * float(u[4])
            pos[:, 0] = -span / 2 + span * steps
        elif pair == 1:  # scale grows by a factor 1.7 to 2.2
            grow = 1.7 + 0.5 * float(u[5])
            scale = 0.35 * grow ** steps
        else:  # a quarter to a half turn
            turn = (0.5 + 0.5 * float(u[6])) * math.pi / 2
            angle = angle + turn * steps
        garment = self.garments[i % len(self.garments)].float().div(255)
        other = self.garments[int(u[7] * len(self.garments)) % len(self.garments)].float().div(255)
        drift = torch.stack([torch.cos(2 * math.pi * u[8]), torch.sin(2 * math.pi * u[8])]) * 0.5
        start = (torch.stack([u[9], u[10]]) - 0.5) * 1.2
        frames = torch.maximum(self._render(garment, pos, scale, angle),
                               0.5 * self._render(other, start + drift * steps[:, None], torch.full((T,), 0.35),
                                                  torch.full((T,), float(u[11]) * 2 * math.pi)))
        if label % 2:  # the pair's second class: the same clip backwards
            frames = frames.flip(0)
        return frames.unsqueeze(0), label

    def _render(self, image: torch.Tensor, pos: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor
                ) -> torch.Tensor:
        """``image`` (28, 28) placed T times: centre ``pos`` (T, 2) in [-1, 1] canvas coordinates, ``scale``
        (T,) of the canvas side, ``angle`` (T,) radians (clockwise on screen) -> (T, size, size)."""
        T = pos.shape[0]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # canvas -> garment coordinates: rotate back by the angle, undo the scale, after removing the offset
        theta = torch.stack([torch.stack([cos, sin, -(cos * pos[:, 0] + sin * pos[:, 1])], 1),
                             torch.stack([-sin, cos, -(-sin * pos[:, 0] + cos * pos[:, 1])], 1)], 1)
        grid = F.affine_grid(theta, (T, 1, self.size, self.size), align_corners=False)
        return F.grid_sample(image.expand(T, 1, 28, 28), grid, padding_mode="zeros", align_corners=False)[:, 0]

    def __getitem__(self, i: int):
        clip, label = self.clip(i)
        if self.transform:  # the transform sees frames (T, C, H, W), as for a VideoFolder
            clip = self.transform(clip.transpose(0, 1)).transpose(0, 1)
        return clip, label
