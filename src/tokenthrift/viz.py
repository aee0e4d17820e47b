"""Plots: accuracy against training wall-clock, and maps of what a method did to the tokens."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_accuracy_vs_time(histories: Mapping[str, Sequence[dict]], path: str | Path,
                          title: str = "top-1 against training wall-clock") -> Path:
    """One line per run: top-1 after each evaluated epoch against cumulative training seconds."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, history in histories.items():
        points = [(r["elapsed_train_s"], r["top1"]) for r in history if "top1" in r]
        ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_token_groups(images: torch.Tensor, groups: torch.Tensor, kept: torch.Tensor, grid: tuple[int, int],
                      path: str | Path, title: str = "") -> Path:
    """For each image: the image, and its patch grid coloured by the kept token each patch was merged
    into, kept patches outlined.

    images (B, C, H, W) for display; groups (B, N) the slot (0..M-1) of every patch; kept (B, M) the
    patch index of every slot; grid (h, w) with h * w = N.
    """
    h, w = grid
    B = images.shape[0]
    fig, axes = plt.subplots(2, B, figsize=(2.2 * B, 4.6), dpi=120, squeeze=False)
    for b in range(B):
        img = images[b].float()
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        axes[0, b].imshow(img.permute(1, 2, 0).squeeze(-1).cpu().numpy(), cmap="gray")
        # colour by the kept token's own position so neighbouring groups get different hues
        colour = kept[b].gather(0, groups[b]).float().reshape(h, w).cpu().numpy()
        axes[1, b].imshow(colour, cmap="tab20", interpolation="nearest")
        rows, cols = (kept[b].cpu() // w).numpy(), (kept[b].cpu() % w).numpy()
        axes[1, b].scatter(cols, rows, s=6, c="black", marker="s")
        for ax in axes[:, b]:
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("merge groups\n(black: kept)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
