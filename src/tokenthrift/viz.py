"""Plots (matplotlib, files only): accuracy against training wall-clock, comparison fronts, and maps of what a
method did to the tokens. A leaf helper: method adapters draw their pictures with it."""
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


def plot_demo(histories: Mapping[str, Sequence[dict]], inference: Sequence[dict], path: str | Path,
              title: str = "") -> Path:
    """The demo's figure. Left: the training race, top-1 against training wall-clock, one line per run.
    Right: inference, top-1 against MMACs per image, one point per model (rows with ``model``, ``top1``,
    ``MMACs``; the first is the full-token model)."""
    fig, (race, infer) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for label, history in histories.items():
        points = [(r["elapsed_train_s"], r["top1"]) for r in history if "top1" in r]
        race.plot(*zip(*points), marker="o", label=label)
    race.set_xlabel("training wall-clock (s)")
    race.set_ylabel("top-1 (%)")
    race.set_title("training from scratch: full tokens vs ToE", fontsize=9)
    race.grid(alpha=0.3)
    race.legend(fontsize=8)
    palette = plt.get_cmap("tab10").colors
    for i, row in enumerate(inference):  # named in a legend: a dozen labels on the points would overlap
        infer.scatter(row["MMACs"], row["top1"], s=60 if i == 0 else 40, marker="*" if i == 0 else "o", zorder=3,
                      color=palette[i % 10], label=row["model"])
    infer.set_xlabel("MMACs per image (inference)")
    infer.set_ylabel("top-1 (%)")
    infer.set_title("applied to the pretrained ViT", fontsize=9)
    infer.grid(alpha=0.3)
    infer.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_token_groups(images: torch.Tensor, groups: torch.Tensor, kept: torch.Tensor, grid: tuple[int, int],
                      path: str | Path, title: str = "", captions: Sequence[str] | None = None) -> Path:
    """For each image: the image, and its patch grid coloured by the kept token each patch was merged
    into, kept patches outlined. ``captions``: one line under each image's column (e.g. its class).

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
    _caption(axes, captions)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


OUTLINE = (1.0, 0.5, 0.0)  # the outline of a merged token's region: orange reads on grey and on colour images


def merge_picture(image: torch.Tensor, ids: torch.Tensor, width: int = 224) -> torch.Tensor:
    """RGB picture (H', W', 3) of one image's merge map, read at a glance: the region of every merged token
    filled with the mean of its pixels and outlined (a token that holds one patch shows that patch's mean).

    image (C, H, W); ids (h, w) the merged token every patch (or token-map cell) joined, laid over the image
    by nearest neighbour. Drawn about ``width`` pixels wide so that the one-pixel outlines stay thinner than
    a patch.
    """
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min() + 1e-8)
    img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
    scale = max(1, round(width / img.shape[-1]))
    img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    H, W = img.shape[1:]
    cells = torch.nn.functional.interpolate(ids.detach().cpu()[None, None].float(), size=(H, W), mode="nearest")
    cells = torch.unique(cells.long().flatten(), return_inverse=True)[1].view(H, W)  # ids -> 0..K-1
    K = int(cells.max()) + 1
    sums = torch.zeros(K, 3).index_add_(0, cells.flatten(), img.reshape(3, -1).T)
    counts = torch.bincount(cells.flatten(), minlength=K).clamp_min(1).unsqueeze(1)
    picture = (sums / counts)[cells]
    edge = torch.zeros(H, W, dtype=torch.bool)
    edge[:, 1:] |= cells[:, 1:] != cells[:, :-1]
    edge[1:, :] |= cells[1:, :] != cells[:-1, :]
    picture[edge] = torch.tensor(OUTLINE)
    return picture


def plot_merge_maps(images: torch.Tensor, maps: Sequence[tuple[str, torch.Tensor]], path: str | Path,
                    title: str = "", agreement: Sequence[float] | None = None,
                    captions: Sequence[str] | None = None) -> Path:
    """For each image (column): the image, then one row per merge site: ``maps`` holds (label, ids) with ids
    (B, h, w) the merged token every patch joined there, drawn with :func:`merge_picture` (every merged token's
    patches filled with their mean, outlined). ``agreement``: one value per site (e.g.
    :func:`tokenthrift.measure.merge_agreement`), written beside its label."""
    B = images.shape[0]
    rows = 1 + len(maps)
    fig, axes = plt.subplots(rows, B, figsize=(2.1 * B, 2.2 * rows), dpi=120, squeeze=False)
    for b in range(B):
        _show(axes[0, b], images[b])
        for r, (_, ids) in enumerate(maps, start=1):
            axes[r, b].imshow(merge_picture(images[b], ids[b]).numpy(), interpolation="nearest")
    for r, (label, _) in enumerate(maps, start=1):
        extra = f"\nagreement {agreement[r - 1]:.2f}" if agreement is not None else ""
        axes[r, 0].set_ylabel(label + extra, fontsize=7)
    axes[0, 0].set_ylabel("input")
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    _caption(axes, captions)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _caption(axes, captions: Sequence[str] | None) -> None:
    """One line under each column of an image grid (axes (rows, B))."""
    for ax, text in zip(axes[-1], captions or ()):
        ax.set_xlabel(text, fontsize=7)


def _show(ax, image: torch.Tensor) -> None:
    """One image (C, H, W), contrast-stretched, grey or colour."""
    img = image.float()
    img = (img - img.min()) / (img.max() - img.min() + 1e-8)
    ax.imshow(img.permute(1, 2, 0).squeeze(-1).cpu().numpy(), cmap="gray", interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])


def _patch_lines(ax, grid: int, side: int) -> None:
    for k in range(1, grid):
        pos = k * side / grid - 0.5
        ax.axhline(pos, color="tab:orange", lw=0.4, alpha=0.7)
        ax.axvline(pos, color="tab:orange", lw=0.4, alpha=0.7)


def plot_revit_grids(views: Sequence[tuple[int, torch.Tensor]], path: str | Path, title: str = "",
                     probs: torch.Tensor | None = None, grids: Sequence[int] = (),
                     captions: Sequence[str] | None = None) -> Path:
    """ReViT: what the patch embedding sees at every grid. ``views`` holds (grid, images (B, C, h, w)) pairs,
    the images already resized for that grid; one row per grid, the patch grid drawn over each image.
    With ``probs`` (B, K) of a token-length assigner over ``grids`` (largest first), the chosen grid of each
    image is framed and the column titled with its probability."""
    B = views[0][1].shape[0]
    fig, axes = plt.subplots(len(views), B, figsize=(2.0 * B, 2.1 * len(views)), dpi=120, squeeze=False)
    chosen = probs.argmax(-1) if probs is not None else None
    for r, (grid, images) in enumerate(views):
        for b in range(B):
            ax = axes[r, b]
            _show(ax, images[b])
            _patch_lines(ax, grid, images.shape[-1])
            if chosen is not None and grids[int(chosen[b])] == grid:
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:red"), spine.set_linewidth(2.5)
        axes[r, 0].set_ylabel(f"{grid}x{grid} tokens\n({images.shape[-1]} px)", fontsize=8)
    if chosen is not None:
        for b in range(B):
            k = int(chosen[b])
            axes[0, b].set_title(f"assigner: {grids[k]}x{grids[k]}\np = {float(probs[b, k]):.2f}", fontsize=8)
    _caption(axes, captions)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_detections(images: torch.Tensor, outputs: Sequence[dict], path: str | Path, title: str = "",
                    names: Mapping[int, str] | None = None, maps: Sequence = (), threshold: float = 0.5) -> Path:
    """For each image (column): the image with the detector's boxes (score >= ``threshold``, labelled with
    ``names``) and masks (tinted, thresholded at 0.5); below, the merge maps of an LTM backbone on the same
    image (:class:`tokenthrift.ltm.MergeMap` rows, see :func:`merge_picture`)."""
    B = images.shape[0]
    rows = 1 + len(maps)
    fig, axes = plt.subplots(rows, B, figsize=(2.6 * B, 2.6 * rows), dpi=120, squeeze=False)
    palette = plt.get_cmap("tab10").colors
    for b, out in enumerate(outputs):
        ax = axes[0, b]
        _show(ax, images[b])
        keep = out["scores"] >= threshold
        for k, (box, label) in enumerate(zip(out["boxes"][keep].tolist(), out["labels"][keep].tolist())):
            colour = palette[label % len(palette)]
            x1, y1, x2, y2 = box
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colour, lw=1))
            ax.text(x1, y1, (names or {}).get(label, str(label)), color=colour, fontsize=5, va="bottom")
            if "masks" in out:
                mask = (out["masks"][keep][k, 0] > 0.5).float().cpu().numpy()
                tint = torch.zeros(*mask.shape, 4)
                tint[..., :3] = torch.tensor(colour)
                tint[..., 3] = torch.from_numpy(mask) * 0.35
                ax.imshow(tint.numpy(), interpolation="nearest")
        for r, m in enumerate(maps, start=1):
            axes[r, b].imshow(merge_picture(images[b], m.spatial()[0][b]).numpy(), interpolation="nearest")
            axes[r, b].set_xticks([]), axes[r, b].set_yticks([])
    for r, m in enumerate(maps, start=1):
        axes[r, 0].set_ylabel(f"{m.site}", fontsize=6)
    axes[0, 0].set_ylabel(f"detections (score >= {threshold})", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _pareto(points: Sequence[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (x: cost if ``lower_is_better``, else speed; y: top-1)."""
    ordered = sorted(points, key=lambda p: (p[0] if lower_is_better else -p[0], -p[1]))
    front, best = [], float("-inf")
    for x, y in ordered:
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_compare(rows: Sequence[dict], path: str | Path, speed_key: str, title: str = "", span: float = 8.0) -> Path:
    """``tokenthrift compare``'s figure: top-1 against MACs per image (left) and against measured images/s
    (right), one marker per row (rows with ``model``, ``kind``, ``top1``, ``MMACs`` and ``speed_key``; marker
    by kind), the Pareto front dashed. Rows with ``panel="training"`` (runs that infer as the plain model: the
    method acted in training) get their own row of panels, against their own full-token training run if one
    is among them (else the first row), so their accuracies do not squash the inference methods' axis. Each
    panel row shows ``span`` points of top-1 below its best: a row further down sits on the lower edge as a
    downward triangle, its top-1 in the legend. Rows are named in a legend per panel row, never on the points."""
    training = [r for r in rows if r.get("panel") == "training"]
    groups = [("inference: methods on the full model, and trained runs that merge or resize",
               [r for r in rows if r.get("panel") != "training"])]
    if training:
        reference = [] if any(r["kind"] == "full" for r in training) else [rows[0]]
        groups.append(("training methods (the model infers with full tokens)", [*reference, *training]))
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.4 * len(groups)), dpi=120, squeeze=False)
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    markers = "os^D<>PXh*"  # "v" marks a row below the axis
    palette = plt.get_cmap("tab20").colors
    for (label, group), (cost, speed) in zip(groups, axes):
        best = max(r["top1"] for r in group)
        floor = max(min(r["top1"] for r in group), best - span)
        margin = 0.04 * max(best - floor, 1.0)
        for ax, key, lower in ((cost, "MMACs", True), (speed, speed_key, False)):
            for i, r in enumerate(group):
                below = r["top1"] < floor
                name = f"{r['model']} [{r['kind']}]" + (f" ({r['top1']:.1f} %, below the axis)" if below else "")
                ax.scatter(r[key], floor - margin / 2 if below else r["top1"], color=palette[i % 20], s=36, zorder=3,
                           marker="v" if below else markers[kinds.index(r["kind"]) % len(markers)], label=name)
            front = _pareto([(r[key], r["top1"]) for r in group], lower)
            ax.plot(*zip(*front), color="grey", lw=0.8, ls="--", zorder=1)
            ax.set_ylim(floor - margin, best + margin)
            ax.set_ylabel("top-1 (%)")
            ax.grid(alpha=0.3)
        cost.set_xlabel("MMACs per image")
        speed.set_xlabel(f"measured images/s ({speed_key})")
        cost.set_title(label, fontsize=8, loc="left")
        speed.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


_FAMILY_STYLE = {"fixed grid": ("s", "tab:grey"), "TLA": ("^", "tab:blue"), "cascade": ("o", "tab:orange"),
                 "TLA + cascade": ("D", "tab:green"), "oracle": ("*", "tab:red")}


def plot_adaptive(rows: Sequence[dict], curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path,
                  title: str = "") -> Path:
    """``tokenthrift adaptive``'s figure: top-1 against the MACs ratio (left) and against measured images/s (right),
    one marker per rule (``rule``, ``family``, ``top1``, ``MACs_ratio``, optional ``img_s``), the fixed grids
    joined by a line; ``curves``: (MACs ratio, top-1) fronts drawn on the left (the calibrated cascades). Every
    rule is named in the legend, not on the plot, so labels never overlap."""
    fig, (cost, speed) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    scored = [r for r in rows if "top1" in r]
    for name, points in curves.items():
        if points:
            cost.plot(*zip(*sorted(points)), lw=1.0, alpha=0.6, label=f"{name}: calibrated front")
    fixed = [r for r in scored if r["family"] == "fixed grid"]
    for ax, key in ((cost, "MACs_ratio"), (speed, "img_s")):
        line = sorted((r[key], r["top1"]) for r in fixed if key in r)
        if line:
            ax.plot(*zip(*line), color="tab:grey", lw=0.8, ls="--", zorder=1)
    palette = plt.get_cmap("tab20").colors
    for i, r in enumerate(scored):
        marker, colour = _FAMILY_STYLE.get(r["family"], ("o", "black"))
        colour = colour if r["family"] in ("fixed grid", "oracle") else palette[i % 20]
        cost.scatter(r["MACs_ratio"], r["top1"], marker=marker, color=colour, s=42, zorder=3, label=r["rule"])
        if "img_s" in r:
            speed.scatter(r["img_s"], r["top1"], marker=marker, color=colour, s=42, zorder=3)
    cost.set_xlabel("MACs per image as executed / the largest grid's")
    speed.set_xlabel("measured images/s")
    for ax in (cost, speed):
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    if not any("img_s" in r for r in scored):
        speed.text(0.5, 0.5, "not timed", ha="center", va="center", transform=speed.transAxes)
    fig.legend(*cost.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # a legend outside the axes stays in the file
    plt.close(fig)
    return path
