"""Data for a given model, timm's way: a pretrained model's cfg decides its normalisation, interpolation and
crop (``timm.data.resolve_data_config``), so a fine-tune feeds it images as it was trained on them."""
from __future__ import annotations

import timm.data
from torch import nn
from torch.utils.data import Dataset

from ..measure import model_input_shape
from .build import build_dataset
from .info import DatasetInfo, Preprocess

__all__ = ["dataset_for_model", "model_classes", "model_input_shape", "model_preprocess", "set_model_classes"]


def model_classes(model: nn.Module) -> tuple[str, ...] | None:
    """The class names ``model`` predicts, in output order: its pretrained cfg's ``label_names`` (timm's field;
    tokenthrift's checkpoints and shipped models fill it), else a transformers image classifier's
    ``config.id2label`` (also under tokenthrift's ``TransformersClassifier``) unless those are transformers' own
    placeholders (``LABEL_0``, ``LABEL_1``, ...); None when it has none or they do not fit its head (timm keeps the
    pretrained cfg of a model whose ``num_classes`` was changed)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names") or _id2label(model)
    outputs = getattr(model, "num_classes", None)
    if not names or (outputs is not None and len(names) != outputs):
        return None
    return tuple(str(n) for n in names)


def _id2label(model: nn.Module) -> list[str] | None:
    """A transformers image classifier's class names, from its config's ``id2label``; None for transformers'
    placeholder names and for every other model (duck-typed: data knows no host)."""
    classifier = getattr(model, "hf", model)  # tokenthrift's TransformersClassifier holds the transformers model
    if "ForImageClassification" not in type(classifier).__name__:  # an encoder's config may keep a head's names
        return None
    id2label = getattr(getattr(classifier, "config", None), "id2label", None) or {}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


def set_model_classes(model: nn.Module, names) -> nn.Module:
    """Record ``names`` as ``model``'s class names (``pretrained_cfg["label_names"]``, as timm holds them); an
    empty or None ``names`` leaves the model as it is."""
    if names:
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "label_names": tuple(names)}
    return model


def model_preprocess(model: nn.Module, hflip: float = 0.5, crop_pad: int | None = None) -> Preprocess:
    """The :class:`Preprocess` of ``model``'s pretrained cfg: its mean / std, interpolation and crop_pct."""
    data_cfg = timm.data.resolve_data_config(model=model)
    tag = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    return Preprocess(tuple(data_cfg["mean"]), tuple(data_cfg["std"]), data_cfg.get("interpolation", "bilinear"),
                      float(data_cfg.get("crop_pct", 0.875)), hflip, crop_pad,
                      source=f"{tag}'s pretrained cfg, as its weights were trained (timm.data.resolve_data_config)")


def dataset_for_model(spec: str, model: nn.Module, train: bool = True, pretrained: bool = True,
                      hflip: float = 0.5, crop_pad: int | None = None, **kwargs) -> tuple[Dataset, DatasetInfo]:
    """``build_dataset(spec, train, ...)`` sized, channelled and normalised for ``model``, and labelled for it:
    its input size and channels are the model's own (:func:`model_input_shape`); with ``pretrained`` (the model
    holds pretrained weights) the normalisation, interpolation and crop of its pretrained cfg, else the dataset's
    statistics; where the model carries class names (:func:`model_classes`) the data's labels are matched to them by
    name, as ``tokenthrift eval`` matches them (:func:`~tokenthrift.data.match_classes`: data lacking some of the
    model's classes keeps the model's indices, with a warning; a class the model lacks is an error naming it).
    ``classes=`` overrides the names (``classes=None``: the data's own labels, e.g. folder names that are another
    naming of the same classes in the same order). Other keywords go to :func:`build_dataset` (``subset``,
    ``data_dir``, ``augment``, ...)."""
    c, side, frames = model_input_shape(model)
    pre = model_preprocess(model, hflip, crop_pad) if pretrained else Preprocess(hflip=hflip, crop_pad=crop_pad)
    kwargs.setdefault("classes", model_classes(model))
    return build_dataset(spec, train, side, c, frames=frames, preprocess=pre, **kwargs)
