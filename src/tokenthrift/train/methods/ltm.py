"""LTM as a training-engine method: convert the model, anneal the Gumbel temperature, add the IB loss.

Wang & Yang, "Efficient Visual Transformer by Learnable Token Merging", TPAMI 2025 (arXiv 2407.15219);
the training objective is this project's reconstruction (docs/methods.md §4): label-smoothed CE (the engine's
criterion) + λ·IB, with IB switched on after a warm-up share of the epochs.

Options (:class:`LTMOptions`, flags ``--ltm-<option>``):
``ltm_macs`` (a share of the model's MACs: the per-site ratios calibrated to it on the model at its input size),
``ltm_site_ratio`` (the share of tokens each merge site keeps; with neither, an ``ltm_*`` model keeps its
calibrated ratios and another model takes the calibrated default of its base name), ``ltm_tau`` (1.0, Gumbel
temperature), ``ltm_tau_final`` (None: no annealing; else exponential
annealing to this value over the epochs, stepped with the engine's progress), ``ltm_tau_s`` (0.1,
soft-mask temperature), ``ltm_ib`` (True), ``ltm_ib_weight`` (0.1), ``ltm_ib_start`` (0.3 of the
epochs), ``ltm_kmeans_every`` (1), ``ltm_clusters`` (1000), ``ltm_ib_beta`` (10.0).

*Decision* on where the IB's training-set features come from: they are the pooled (pre-logits)
features of the training forward passes themselves, captured by a forward pre-hook on the classifier,
collected during the epoch before each refresh and clustered at the next ``on_epoch_start``. That costs
no extra pass over the data and needs no access to the loader; the price is that the features are those
of the augmented images under a model that moved during the epoch (with mixup/cutmix, Q is estimated
with each sample's dominant class; the loss itself uses the soft targets). Features are kept on the CPU
in fp16 (N·D·2 bytes). Under DDP each rank collects its share and :meth:`IBLoss.fit` gathers them.
A resumed run refreshes the clusters only after it has collected a new epoch of features; until then it
keeps the clusters saved in the checkpoint.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import measure
from ...errors import InvalidArgumentError
from ...hosts import find_host
from ...ltm import IBLoss, convert, is_ltm, merge_maps, merge_sites, mergers, plain_copy, set_macs, set_temperature
from ...ltm.registry import DEFAULT_RATIOS
from ..build import model_input_size
from ..config import TrainConfig, option
from ..protocol import Method, PictureOptions, Variant

__all__ = ["LTMMethod", "LTMOptions", "prepare", "ratio_of"]


@dataclass
class LTMOptions:
    macs: float | None = option(None, "the share of the model's MACs to keep (e.g. 0.85); the per-site ratios are "
                                "calibrated to it on this model at its input size, as the registered ltm_* models' "
                                "are (default: a registered model's own, or the calibrated ratios of a registered "
                                "base)", preview=True)
    site_ratio: tuple[float, ...] | None = option(
        None, "the share of tokens each merge site keeps, one value for every site or one per site; in ViT and "
        "MobileViT the shares compound (0.9 at each of 12 blocks keeps 0.28 of the tokens by the last one, 0.57 of "
        "DeiT-S's MACs): for a cost, use --ltm-macs (--ltm-ratio: its former name)", preview=True,
        renamed_from="ratio")
    tau: float = option(1.0, "Gumbel-softmax temperature")
    tau_final: float | None = option(None, "anneal the Gumbel temperature to this value")
    tau_s: float = option(0.1, "soft-mask temperature of the mask module", preview=True)
    ib: bool = option(True, "information-bottleneck loss on/off")
    ib_weight: float = option(0.1, "IB loss weight (lambda)")
    ib_start: float = option(0.3, "share of the epochs before the IB loss switches on")
    kmeans_every: int = option(1, "refresh the IB clusters every N epochs")
    clusters: int = option(1000, "k-means clusters for the IB loss (capped at samples / 10)")
    ib_beta: float = option(10.0, "sharpness of the IB soft cluster assignment")

    def __post_init__(self) -> None:
        if isinstance(self.site_ratio, (int, float)):
            self.site_ratio = (float(self.site_ratio),)
        elif self.site_ratio is not None:
            self.site_ratio = tuple(float(r) for r in self.site_ratio)
        if self.macs is not None and self.site_ratio is not None:
            raise InvalidArgumentError("--ltm-macs (a share of the model's MACs) and --ltm-site-ratio (the share of "
                                       "tokens each merge site keeps) both set LTM's cost; pass one")
        if self.macs is not None and not 0.0 < self.macs <= 1.0:
            raise InvalidArgumentError(f"--ltm-macs {self.macs}: the share of the model's MACs to keep, in (0, 1]")
        if self.tau <= 0 or (self.tau_final is not None and self.tau_final <= 0) or self.tau_s <= 0:
            raise InvalidArgumentError(f"LTM temperatures must be positive: ltm_tau={self.tau}, "
                                       f"ltm_tau_final={self.tau_final}, ltm_tau_s={self.tau_s}")
        if not 0.0 <= self.ib_start <= 1.0:
            raise InvalidArgumentError(f"ltm_ib_start={self.ib_start} is a share of the epochs: pick a value in [0, 1]")
        if self.kmeans_every < 1 or self.clusters < 1 or self.ib_weight < 0:
            raise InvalidArgumentError(f"ltm_kmeans_every={self.kmeans_every} and ltm_clusters={self.clusters} must "
                                       f"be positive and ltm_ib_weight={self.ib_weight} non-negative")


def ratio_of(value: Sequence[float] | None) -> float | list[float] | None:
    """``--ltm-site-ratio`` as TrainConfig holds it (None, or a tuple of floats) -> what convert takes: one value
    for every site, or one per site."""
    if value is None:
        return None
    return float(value[0]) if len(value) == 1 else [float(v) for v in value]


def default_ratio(model: nn.Module, model_name: str) -> tuple[float, ...]:
    """The calibrated per-site ratios of ``model_name`` (a base name such as ``vit_small_patch16_224``),
    or a ValueError that says how to choose ratios when there are none for this architecture."""
    ratio = DEFAULT_RATIOS.get(model_name)
    if ratio is None or len(ratio) != merge_sites(model):
        raise InvalidArgumentError(f"no calibrated LTM ratio for {model_name!r} as configured; pass --ltm-macs (a "
                                   f"share of its MACs, e.g. 0.85) or --ltm-site-ratio (a float, or {merge_sites(model)} "
                                   "values, one per merge site), or use a registered ltm_* model "
                                   f"({', '.join('ltm_' + k for k in DEFAULT_RATIOS)})")
    return ratio


def prepare(model: nn.Module, model_name: str, ratio: float | Sequence[float] | None = None,
            tau_s: float | None = None, tau_g: float | None = None, macs: float | None = None,
            input_size: Sequence[int] | None = None) -> nn.Module:
    """The LTM model to train or measure: an ``ltm_*`` model as it is (its calibrated ratios; temperatures
    set), any other supported model converted with the per-site ``ratio`` or, if None, its calibrated default.
    ``macs``: instead, the share of the MACs to keep, the per-site ratios calibrated to it on ``input_size``
    (an ``ltm_*`` model's ratios too); a detector's ``macs`` are its backbone's."""
    counted = getattr(model, "backbone", model)  # a detector: what LTM changes is its backbone
    if is_ltm(model):
        if ratio is not None:
            raise InvalidArgumentError(f"{model_name} is already an LTM model with calibrated ratios; drop "
                                       "--ltm-site-ratio (--ltm-macs sets another cost) or start from the plain timm "
                                       "model to choose your own")
        set_temperature(model, tau_g=tau_g, tau_s=tau_s)
    else:
        kwargs = {k: v for k, v in dict(tau_s=tau_s, tau_g=tau_g).items() if v is not None}
        if macs is None and ratio is None:
            ratio = list(default_ratio(model, model_name))
        convert(model, ratio if macs is None else 1.0, **kwargs)
    if macs is not None:
        set_macs(counted, macs, input_size)
    return model


class _PreLogits:
    """Forward pre-hook on the classifier: keeps the latest training-mode input (the pooled features).

    Deep copies (EMA, the engine's MACs count) share this object instead of copying the method."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if module.training:
            self.value = args[0]

    def take(self) -> torch.Tensor | None:
        value, self.value = self.value, None
        return value

    def __deepcopy__(self, memo: dict) -> _PreLogits:
        return self


class LTMMethod(Method):
    """LTM (docs/methods.md §4): learnable token merging, Gumbel-temperature annealing, CE + λ·IB."""

    name = "ltm"
    summary = "Learnable Token Merging"
    label = "LTM"
    order = 40
    Options = LTMOptions
    plain_inference = False
    picture_flags = ("sites",)
    legacy_onnx = False  # the TorchScript exporter writes its merge so that onnxruntime rejects batches above one

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        o = self.options
        # the network LTM converts: a detector's backbone, whose calibrated ratios apply
        self.model_name = str(cfg.backbone if cfg.task == "detection" else cfg.model)
        self.ratio = ratio_of(o.site_ratio)
        self.macs = o.macs
        self.cfg = cfg  # the model's input size, for --ltm-macs
        self.site_ratios: list[float] | None = None  # set by restore()
        self.tau = float(o.tau)
        self.tau_final = None if o.tau_final is None else float(o.tau_final)
        self.tau_s = float(o.tau_s)
        self.use_ib = bool(o.ib)
        self.ib_weight = float(o.ib_weight)
        self.ib_start = float(o.ib_start)
        self.every = int(o.kmeans_every)
        self.clusters = int(o.clusters)
        self.beta = float(o.ib_beta)
        self.epochs = int(cfg.epochs)
        self.seed = int(cfg.seed)
        self.start_epoch = round(self.ib_start * self.epochs)
        self.model: nn.Module | None = None
        self.ib: IBLoss | None = None
        self.capture = _PreLogits()
        self.epoch = 0
        self.current_tau = self.tau
        self._collect = False
        self._features: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._ib_sum = 0.0
        self._ib_steps = 0
        self._refreshed = False

    # ------------------------------------------------------------------ engine hooks
    def attach(self, model: nn.Module) -> nn.Module:
        model = prepare(model, self.model_name, self.ratio, tau_s=self.tau_s, tau_g=self.tau, macs=self.macs,
                        input_size=self._input_size(model))
        if self.site_ratios is not None:  # a restored run: exactly the ratios it trained with
            for merger, r in zip(mergers(model), self.site_ratios):
                merger.ratio = float(r)
        self.model = model
        if self.use_ib and self.task == "detection":
            raise InvalidArgumentError("the LTM IB loss needs one class label per image; a detector has none: add "
                                       "--no-ltm-ib for --task detection")
        if self.use_ib:
            classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
            if not isinstance(classifier, nn.Linear):
                raise InvalidArgumentError("the LTM IB loss needs the pooled features entering a linear classifier; "
                                           "this model has none (num_classes=0?). Train it with --no-ltm-ib")
            classifier.register_forward_pre_hook(self.capture)
            self.ib = IBLoss(classifier.out_features, self.clusters, self.beta, seed=self.seed)
        return model

    def _input_size(self, model: nn.Module) -> tuple[int, ...] | None:
        """The input ``--ltm-macs`` is calibrated on: the model's, as the run feeds it (None without --ltm-macs)."""
        return model_input_size(model, self.cfg) if self.macs is not None else None

    def baseline_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> tuple[float, str]:
        """The same model with merging removed."""
        plain = plain_copy(model)
        return measure.macs(plain, input_size, train=True), "a training forward of the same model without merging"

    # ------------------------------------------------------------------ inference side
    def pair(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(plain, LTM) in eval mode: ``model`` as LTM trains it (:func:`prepare`: an ``ltm_*`` model as it is,
        another converted with this config's ratio or its calibrated default), and the same model without
        merging."""
        # a plain model is converted as a copy: ``model`` stays as given, so a second call (another batch
        # size, compiled) pairs the same way
        given = model if is_ltm(model) else copy.deepcopy(model)
        merged = prepare(given, self.model_name, self.ratio, tau_s=self.tau_s, macs=self.macs,
                         input_size=self._input_size(given)).eval()
        return plain_copy(merged).eval(), merged

    def inference_model(self, model: nn.Module) -> nn.Module:
        return self.pair(model)[1]

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        """A registered ``ltm_*`` model (or a detector with an LTM backbone) merges by itself."""
        return is_ltm(model)

    def variants(self, model: nn.Module, input_size: tuple[int, ...]) -> list[Variant]:
        """The merged model against the same model without merging (a detector: its backbone's MACs, the FPN
        included)."""
        plain = plain_copy(model)
        if self.task == "detection":  # the backbone's MACs (with the FPN), as a detector's rows give them
            base, macs = measure.macs(plain.backbone, input_size), measure.macs(model.backbone, input_size)
            return [Variant(f"LTM {self.model_name.removeprefix('ltm_')} backbone", model, macs, baseline=plain,
                            baseline_macs=base)]
        host = find_host(plain)  # a ViT-like encoder: its oracle (Swin, MobileViT, EfficientViT: none)
        oracle = None if host is None else measure.TokenCutOracle.of(plain, model, input_size, host)
        return [Variant("LTM", model, measure.macs(model, input_size), baseline=plain, oracle=oracle)]

    def detector_maps(self, detector: nn.Module, images: list[torch.Tensor]) -> list:
        """The backbone's merge maps on the images as the detector feeds them (resized and normalised)."""
        if not is_ltm(detector):
            return []
        batch, _ = detector.transform(images)
        return merge_maps(detector.backbone.body, batch.tensors, sites=None)

    def draw(self, model: nn.Module, cfg: TrainConfig, images: torch.Tensor, options: PictureOptions) -> Path:
        """Merge maps: which original patches feed each merged token (the first, middle and last merge, or
        ``options.sites``)."""
        from ... import viz

        merged = model if is_ltm(model) else self.pair(model)[1]
        maps = merge_maps(merged, images, sites=options.sites or None)
        if not maps:
            raise InvalidArgumentError("no merge site of this model merged anything at this input size (every ratio "
                                       "kept its grid); lower --ltm-macs")
        title = (f"{options.preview}LTM {options.label(cfg)}: each merged token's patches, filled with their mean and "
                 "outlined")
        rows = [(f"{m.site}\n{m.target[0] * m.target[1] * m.windows[0] * m.windows[1]} merged tokens", m.spatial()[0])
                for m in maps]
        agreement = [measure.merge_agreement(ids.flatten(1)) for _, ids in rows] if len(images) > 1 else None
        return viz.plot_merge_maps(images, rows, options.out, title, agreement, captions=options.captions)

    def _tau_at(self, progress: float) -> float:
        if self.tau_final is None:
            return self.tau
        share = min(max(progress / max(self.epochs, 1), 0.0), 1.0)
        return self.tau * (self.tau_final / self.tau) ** share  # exponential annealing

    def ib_active(self, epoch: int | None = None) -> bool:
        epoch = self.epoch if epoch is None else epoch
        return self.use_ib and self.ib_weight > 0 and epoch >= self.start_epoch

    def _refresh_due(self, epoch: int) -> bool:
        return self.ib_active(epoch) and (epoch - self.start_epoch) % self.every == 0

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        self.current_tau = self._tau_at(epoch)
        set_temperature(self.model, tau_g=self.current_tau)
        self._refreshed = False
        if self.use_ib and self._refresh_due(epoch) and self._features:
            device = next(self.model.parameters()).device
            feats = torch.cat(self._features).to(device)
            targets = torch.cat(self._targets).to(device)
            self.ib.fit(feats, targets, seed=self.seed + epoch)
            self._refreshed = True
        self._features, self._targets = [], []
        # collect during this epoch only if the next epoch refreshes the clusters
        self._collect = self.use_ib and self._refresh_due(epoch + 1)
        self._ib_sum, self._ib_steps = 0.0, 0

    def on_step(self, progress: float) -> None:
        if self.tau_final is not None:
            self.current_tau = self._tau_at(progress)
            set_temperature(self.model, tau_g=self.current_tau)

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
             criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        self.capture.value = None
        out = model(images)
        loss = criterion(out, targets)
        feats = self.capture.take()
        if not self.use_ib or feats is None:
            return loss
        if self._collect:
            labels = targets.argmax(-1) if targets.dim() > 1 else targets  # dominant class under mixup
            self._features.append(feats.detach().to("cpu", torch.float16))
            self._targets.append(labels.detach().to("cpu"))
        if self.ib_active() and self.ib.fitted:
            ib = self.ib(feats.float(), targets)
            self._ib_sum += float(ib.detach())
            self._ib_steps += 1
            loss = loss + self.ib_weight * ib
        return loss

    def log(self) -> dict:
        """The epoch's record (called after its steps): Gumbel temperature at the end of the epoch, whether
        the IB term was on, the clusters in use, whether they were refreshed at its start, its mean IB term."""
        out = {"ltm_tau": self.current_tau, "ltm_ib_active": bool(self.ib_active() and self.ib is not None
                                                                   and self.ib.fitted)}
        if self.ib is not None and self.ib.fitted:
            out["ltm_clusters"] = int(self.ib.centroids.shape[0])
            out["ltm_ib_refreshed"] = self._refreshed
        if self._ib_steps:
            out["ltm_ib"] = self._ib_sum / self._ib_steps
        return out

    def state_dict(self) -> dict:
        ratios = [m.ratio for m in mergers(self.model)] if self.model is not None else None
        return {"ib": self.ib.state_dict() if self.ib is not None else None, "epoch": self.epoch,
                "site_ratios": ratios}

    @classmethod
    def restore(cls, cfg: TrainConfig, state: dict) -> LTMMethod:
        """The method of a saved run, with the per-site ratios it trained with (not calibrated again)."""
        method = cls(cfg)
        if state.get("site_ratios") is not None:
            method.site_ratios, method.macs = list(state["site_ratios"]), None
            method.ratio = None if cfg.model.startswith("ltm_") else method.site_ratios
        return method

    def load_state_dict(self, state: dict) -> None:
        if self.ib is not None and state.get("ib") is not None and state["ib"]["centroids"] is not None:
            self.ib.load_state_dict(state["ib"])
        self.epoch = int(state.get("epoch", 0))

