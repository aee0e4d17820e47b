"""COCO-layout instance data through pycocotools, the COCO metrics, and the offline collage set.

``coco:PATH``: ``PATH/annotations/instances_{train,val}*.json`` and the image folders they name
(``PATH/train2017/``, ``PATH/val2017/``, or any folder ``PATH/{split}*/`` holding the ``file_name`` s).
Items are (image (3, H, W) float in [0, 1], target) with torchvision's detection target: ``boxes`` (N, 4)
x1y1x2y2, ``labels`` (N,) COCO category ids, ``masks`` (N, H, W) uint8, ``image_id``, ``area``,
``iscrowd``. Masks come from polygons or RLE (``COCO.annToMask``). Crowd regions are handled as COCO does:
they are not training targets, and the evaluation (``COCOeval``, on the annotation file itself) ignores
detections that fall on them. Images without annotations are kept for evaluation and dropped from
training. :func:`coco_metrics` scores detections with ``COCOeval``: box AP, AP50, AP75 and mask AP, the
COCO leaderboard's numbers. :func:`make_collage` writes the offline set (Fashion-MNIST garments on
canvases) in the same layout, so it is read back by this very loader.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InvalidArgumentError, MissingFileError
from .images import FashionMNIST

__all__ = ["CocoInstances", "coco_metrics", "detection_collate", "make_collage", "to_coco_results"]

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def _coco():
    try:
        from pycocotools.coco import COCO
    except ImportError as err:
        raise MissingFileError("COCO data and metrics need pycocotools: pip install 'tokenthrift[detection]'") from err
    return COCO


def _quiet(fn, *args):
    """pycocotools prints progress to stdout; keep it out of the tables."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def annotation_file(root: Path, split: str) -> Path:
    found = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if not found:
        raise MissingFileError(f"no {root}/annotations/instances_{split}*.json: a coco:PATH folder holds "
                               "annotations/instances_train*.json, annotations/instances_val*.json and the images")
    return found[0]


class CocoInstances(Dataset):
    """One split of a COCO-layout instance set (module docstring). ``split``: ``train`` or ``val``;
    ``train=True`` drops images without (non-crowd) annotations, as training needs targets."""

    def __init__(self, root: str | Path, split: str, train: bool = False, transform=None):
        root = Path(root)
        self.annotations = annotation_file(root, split)
        self.coco = _quiet(_coco(), str(self.annotations))
        ids = sorted(self.coco.imgs)
        if train:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids
        folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(split)) + [root]
        self.folders = folders
        self.transform = transform
        self.categories = sorted(self.coco.cats)

    def __len__(self) -> int:
        return len(self.ids)

    def _path(self, file_name: str) -> Path:
        for folder in self.folders:
            if (folder / file_name).is_file():
                return folder / file_name
        raise MissingFileError(f"image {file_name} of {self.annotations} is in none of "
                               f"{', '.join(str(f) for f in self.folders)}")

    def __getitem__(self, i: int):
        from PIL import Image

        image_id = self.ids[i]
        info = self.coco.imgs[image_id]
        with Image.open(self._path(info["file_name"])) as img:
            image = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float().div(255)
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> x1y1x2y2
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # degenerate boxes are no targets
        masks = (np.stack([self.coco.annToMask(a) for a in anns]) if anns
                 else np.zeros((0, *image.shape[1:]), np.uint8))
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        target = {"boxes": boxes[keep], "labels": labels[keep],
                  "masks": torch.from_numpy(masks)[keep], "image_id": image_id,
                  "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32)[keep],
                  "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64)}
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def detection_collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Images of different sizes stay a list (torchvision's detectors batch them themselves)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def to_coco_results(outputs: list[dict], image_ids: list[int], masks: bool) -> list[dict]:
    """torchvision detector outputs -> COCO result dicts: bbox in xywh, category_id, score, and with
    ``masks`` the RLE of each mask thresholded at 0.5."""
    import pycocotools.mask as mask_util

    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().cpu().clone()
        boxes[:, 2:] -= boxes[:, :2]
        scores, labels = out["scores"].tolist(), out["labels"].tolist()
        rles = None
        if masks and "masks" in out:
            binary = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
            rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
        for k, (box, score, label) in enumerate(zip(boxes.tolist(), scores, labels)):
            r = {"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": float(score)}
            if rles is not None:
                rle = rles[k]
                r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            results.append(r)
    return results


def coco_metrics(coco_gt, results: list[dict], image_ids: list[int] | None = None, masks: bool = True) -> dict:
    """Box AP (AP@[.5:.95]), AP50 and AP75, and with ``masks`` the same for masks, from pycocotools'
    ``COCOeval`` on ``coco_gt`` (a ``COCO`` object) over ``image_ids`` (default: all of them), in percent.
    No detection at all scores 0."""
    from pycocotools.cocoeval import COCOeval

    out = {}
    for kind in ("bbox", "segm") if masks else ("bbox",):
        prefix = "box" if kind == "bbox" else "mask"
        if not results:
            out.update({f"{prefix}_AP": 0.0, f"{prefix}_AP50": 0.0, f"{prefix}_AP75": 0.0})
            continue
        dt = _quiet(coco_gt.loadRes, results)
        evaluator = COCOeval(coco_gt, dt, kind)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        _quiet(evaluator.evaluate)
        _quiet(evaluator.accumulate)
        _quiet(evaluator.summarize)
        ap, ap50, ap75 = (100.0 * max(float(v), 0.0) for v in evaluator.stats[:3])  # -1: no ground truth
        out.update({f"{prefix}_AP": ap, f"{prefix}_AP50": ap50, f"{prefix}_AP75": ap75})
    return out


# ---------------------------------------------------------------------------------------------- collage
def _paste(canvas: np.ndarray, owner: np.ndarray, garment: np.ndarray, top: int, left: int, index: int) -> None:
    """Draw ``garment`` (h, w) floats at (top, left) over what is there; its visible pixels become ``index``."""
    h, w = garment.shape
    region = canvas[top:top + h, left:left + w]
    solid = garment > 0.1
    region[solid] = garment[solid]
    owner[top:top + h, left:left + w][solid] = index


def make_collage(out: str | Path, train: int = 2000, val: int = 500, size: int = 128, seed: int = 0,
                 max_objects: int = 6, scales: tuple[float, float] = (1.0, 2.5), data_dir: str | None = None) -> dict:
    """Write an instance-segmentation set in the COCO layout: ``size`` px canvases with 1 to ``max_objects``
    Fashion-MNIST garments (training split for ``train``, test split for ``val``) pasted at random
    positions and scales (``scales`` times 28 px), later ones over earlier ones (overlaps allowed). An
    instance's mask is its visible garment pixels (> 0.1 of full intensity), its box the mask's extent;
    an instance hidden entirely is left out. 10 categories, ids 1-10, Fashion-MNIST's class names. Masks are
    stored as RLE. Returns a summary (images and instances per split)."""
    import pycocotools.mask as mask_util
    from PIL import Image

    out = Path(out)
    if train < 1 or val < 1 or size < 32 or max_objects < 1:
        raise InvalidArgumentError("make_collage needs train, val >= 1, size >= 32 px and max_objects >= 1; got "
                                   f"train={train}, val={val}, size={size}, max_objects={max_objects}")
    rng = np.random.default_rng(seed)
    summary = {}
    for split, count, source in (("train", train, True), ("val", val, False)):
        garments = FashionMNIST(data_dir, train=source)
        folder = out / f"{split}2017"
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            canvas = np.zeros((size, size), np.float32)
            owner = np.zeros((size, size), np.int32)  # which instance each pixel shows (0: background)
            placed = []
            for k in range(1, int(rng.integers(1, max_objects + 1)) + 1):
                g = int(rng.integers(len(garments)))
                side = min(size, int(round(28 * rng.uniform(*scales))))
                img = Image.fromarray(garments.images[g].numpy()).resize((side, side), Image.BILINEAR)
                top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
                _paste(canvas, owner, np.asarray(img, np.float32) / 255.0, top, left, k)
                placed.append(int(garments.labels[g]) + 1)
            file_name = f"{image_id:06d}.png"
            Image.fromarray((canvas * 255).round().astype(np.uint8)).convert("RGB").save(folder / file_name)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            for k, category in enumerate(placed, start=1):
                mask = owner == k
                if not mask.any():
                    continue
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                    "bbox": [x, y, w, h], "area": float(mask.sum()), "iscrowd": 0,
                                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        categories = [{"id": i + 1, "name": name, "supercategory": "garment"} for i, name in enumerate(FASHION_CLASSES)]
        (out / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
            {"info": {"description": f"tokenthrift Fashion-MNIST collage, seed {seed}"}, "images": images,
             "annotations": annotations, "categories": categories}))
        summary[split] = {"images": len(images), "instances": len(annotations)}
    return summary
