"""Training configuration: one dataclass is the single source of truth for defaults, YAML recipes and
command-line flags (``--field-name`` for every field; a recipe sets defaults, flags override them).

:class:`TrainConfig` holds the engine's fields, the method's name and the method's own options: an instance
of the dataclass its adapter declares (:data:`METHOD_SPECS`, filled by :mod:`tokenthrift.train.methods`; this
module names no method). Recipes, saved configs and the command line spell a method option flat,
``<method>_<field>`` (``--<method>-<field>``), as they always have."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from typing import Any

import yaml

from ..errors import InvalidArgumentError, MissingFileError, TokenthriftWarning

AMP_MODES = ("auto", "on", "off", "bf16", "fp16")
# what lr_base and warmup_epochs mean when not given: from scratch (DeiT's rule) or fine-tuning (--pretrained),
# where a few epochs must move the weights from the first step (5e-4 at batch 128, warm-up 10 % of the run)
SCRATCH_LR_BASE, SCRATCH_WARMUP_EPOCHS = 5e-4, 1.0
FINETUNE_LR_BASE, FINETUNE_WARMUP_SHARE = 2e-3, 0.1


_NONE = object()


def option(default: Any, help: str, preview: bool = False, renamed_from: str | None = None,
           saved_default: Any = _NONE) -> Any:
    """A field of a method's options dataclass: its default, its help text (the flag's), whether ``macs``,
    ``bench``, ``export`` and ``visualize`` take it for a preview on an untrained model, a former name that
    still loads (with a warning on the command line), and ``saved_default``: what a saved config without the option
    (written by a release before it existed) meant, where that differs from today's default."""
    factory = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return dataclasses.field(**factory, metadata={"help": help, "preview": preview, "renamed_from": renamed_from,
                                                  "saved_default": saved_default})


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none (full-token training)."""


@dataclass(frozen=True)
class MethodSpec:
    """What the configuration knows of a registered method: its name, its options dataclass, a one-line summary
    (the ``--method`` help), its label in flag help texts, and whether it can be shown on an untrained model."""

    name: str
    options: type
    summary: str
    label: str
    previewable: bool = True


METHOD_SPECS: dict[str, MethodSpec] = {}  # method name -> spec, registered by tokenthrift.train.methods


def register_method(spec: MethodSpec) -> None:
    METHOD_SPECS[spec.name] = spec


def method_spec(name: str) -> MethodSpec:
    if name not in METHOD_SPECS:
        raise InvalidArgumentError(f"unknown method {name!r}; choose one of {', '.join(METHOD_SPECS)}")
    return METHOD_SPECS[name]


def method_key(key: str) -> tuple[str, str] | None:
    """``"ltm_site_ratio"`` -> ``("ltm", "site_ratio")`` for a registered method's option (or a former name of
    one: ``"ltm_ratio"`` -> ``("ltm", "site_ratio")``); None for any other key."""
    for name, spec in METHOD_SPECS.items():
        if key.startswith(name + "_"):
            field = key[len(name) + 1:]
            for f in dataclasses.fields(spec.options):
                if field in (f.name, f.metadata.get("renamed_from")):
                    return name, f.name
    return None


def method_flags(preview: bool = False) -> list[str]:
    """The flat keys (argparse dests) of every registered method's options (``preview``: only those a preview
    of a previewable method takes)."""
    return [f"{name}_{f.name}" for name, spec in METHOD_SPECS.items() if spec.previewable or not preview
            for f in dataclasses.fields(spec.options) if f.metadata.get("preview") or not preview]


def build_options(method: str, flat: dict, options: Any = None) -> Any:
    """The options of ``method`` from its flat keys (``{"site_ratio": 0.7}``), on top of ``options`` (an instance,
    e.g. the one a config being replaced held)."""
    cls = method_spec(method).options
    if options is not None and not isinstance(options, cls):
        if isinstance(options, dict):
            options = cls(**options)
        elif options != type(options)():
            raise InvalidArgumentError(f"the options of another method ({type(options).__name__}) were given for "
                                       f"--method {method}")
        else:
            options = None
    return dataclasses.replace(options, **flat) if options is not None else cls(**flat)


def split_values(values: dict, method: str, lenient: bool = False) -> tuple[dict, dict]:
    """(engine values, the chosen method's flat options) of config ``values``; a key of another method's options
    is refused, naming its method (``lenient``: dropped, for configs saved when every method's fields were
    written)."""
    engine, own = {}, {}
    for key, value in values.items():
        owner = method_key(key)
        if owner is None:
            engine[key] = value
        elif owner[0] == method:
            if key != f"{owner[0]}_{owner[1]}":
                warnings.warn(f"{flag_name(key)} is now {flag_name('_'.join(owner))}", TokenthriftWarning, stacklevel=4)
            if owner[1] in own:
                raise InvalidArgumentError(f"{key} and {owner[0]}_{owner[1]} are the same option under its former "
                                           f"and its new name; keep {owner[0]}_{owner[1]}")
            own[owner[1]] = value
        elif not lenient:
            raise InvalidArgumentError(f"{flag_name(key)} applies to --method {owner[0]}, but this run is --method "
                                       f"{method}")
    return engine, own


@dataclass(init=False)
class TrainConfig:
    # task and model (any timm name; overrides are passed to timm.create_model only when set)
    task: str = "classification"
    model: str = "vit_tiny_patch16_224"
    backbone: str | None = None
    det_head_width: int | None = None
    det_kwargs: dict | None = None
    img_size: int | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    num_classes: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    num_frames: int | None = None
    model_kwargs: dict | None = None
    pretrained: bool = False
    initial_checkpoint: str | None = None
    init_backbone: str | None = None
    drop_path: float = 0.0
    grad_checkpointing: bool = False
    # data
    data: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None
    train_holdout: int = 0
    eval_subset: int | None = None
    test_crops: int = 1
    workers: int = 0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    hflip: float = 0.5
    crop_pad: int | None = None
    skip_bad_images: bool = False
    # optimisation (timm optimizer, scheduler, Mixup and ModelEmaV3)
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 256
    opt: str = "adamw"
    lr_base: float | None = None
    lr_base_size: int = 512
    lr: float | None = None
    weight_decay: float = 0.05
    sched: str = "cosine"
    warmup_epochs: float | None = None
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    label_smoothing: float | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    clip_grad: float | None = None
    ema: bool = False
    ema_decay: float = 0.999
    amp: str = "auto"
    # method: its name, and its own options (the adapter's dataclass, filled from the flat keys <method>_<field>)
    method: str = "full"
    options: Any = None
    # run
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    output: str = "runs"
    name: str | None = None
    resume: str | None = None
    overwrite: bool = False
    eval_every: int = 1
    progress: bool = True

    def __init__(self, **values: Any):
        """Any field by name; a method option flat as ``<method>_<field>`` (or inside ``options``)."""
        method = values.get("method", "full")
        engine, own = split_values(values, method)
        known = {f.name: f for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(engine) - set(known))
        if unknown:
            raise InvalidArgumentError(f"unknown config keys {unknown}: the engine's are {', '.join(sorted(known))}; a "
                                       f"method's options are <method>_<option> (tokenthrift train --help lists them)")
        for name, f in known.items():
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, name, engine.get(name, default))
        self.options = build_options(self.method, own, self.options)
        self.__post_init__()

    @classmethod
    def from_saved(cls, values: dict) -> TrainConfig:
        """The config of a checkpoint or a run folder: saved by any release (earlier ones wrote every method's
        options; those of other methods than the run's are dropped)."""
        method = values.get("method", "full")
        engine, own = split_values(values, method, lenient=True)
        for f in dataclasses.fields(method_spec(method).options):  # options newer than the save: what it meant then
            if f.name not in own and f.metadata.get("saved_default", _NONE) is not _NONE:
                own[f.name] = f.metadata["saved_default"]
        return cls(**engine, options=build_options(method, own, None))

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InvalidArgumentError(f"epochs={self.epochs}: train for at least one epoch")
        if self.batch_size < 1:
            raise InvalidArgumentError(f"batch_size={self.batch_size} must be positive")
        if self.amp not in AMP_MODES:
            raise InvalidArgumentError(f"amp={self.amp!r}: choose {', '.join(AMP_MODES)}")
        if self.train_holdout < 0:
            raise InvalidArgumentError(f"train_holdout={self.train_holdout} must be 0 or a number of images")
        if self.pretrained and self.initial_checkpoint:
            raise InvalidArgumentError("--pretrained and --initial-checkpoint both give the starting weights; pass one")
        if self.lr_base is None:
            self.lr_base = FINETUNE_LR_BASE if self.finetuning else SCRATCH_LR_BASE
        if self.warmup_epochs is None:
            self.warmup_epochs = (FINETUNE_WARMUP_SHARE * self.epochs if self.finetuning
                                  else min(SCRATCH_WARMUP_EPOCHS, self.epochs / 2))
        if self.warmup_epochs < 0:
            raise InvalidArgumentError(f"warmup_epochs={self.warmup_epochs} must be 0 (no warm-up) or more")
        if self.warmup_epochs >= self.epochs:
            warnings.warn(f"warm-up of {self.warmup_epochs:g} epochs covers the whole {self.epochs}-epoch run: the "
                          f"learning rate never reaches its peak; lower --warmup-epochs (e.g. "
                          f"{FINETUNE_WARMUP_SHARE * self.epochs:g})", TokenthriftWarning, stacklevel=3)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(float(v) for v in ((value,) if isinstance(value, (int, float)) else value)))
        if self.lr is None and self.lr_base <= 0 or self.lr is not None and self.lr <= 0 or self.lr_base_size < 1:
            raise InvalidArgumentError(f"learning rate must be positive: lr={self.lr}, lr_base={self.lr_base} per "
                                       f"lr_base_size={self.lr_base_size} images")
        for name in ("model_kwargs", "det_kwargs"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):  # command line: key=value words
                setattr(self, name, parse_kwargs(value, name))
            elif value is not None and not isinstance(value, dict):
                raise InvalidArgumentError(f"{name} must be a mapping of keyword: value; got {value!r}")

    @property
    def finetuning(self) -> bool:
        """The run starts from trained weights (``--pretrained`` or ``--initial-checkpoint``)."""
        return bool(self.pretrained or self.initial_checkpoint)

    def to_dict(self) -> dict:
        """Every field, the method's options flat (``<method>_<field>``), as recipes spell them."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        out.update({f"{self.method}_{k}": v for k, v in dataclasses.asdict(self.options).items()})
        return copy.deepcopy(out)

    def with_method(self, method: str, **flat: Any) -> TrainConfig:
        """This config for ``method`` with the options ``flat`` (field names; the rest: this config's if it is
        the same method, else the defaults)."""
        options = self.options if method == self.method else None
        return dataclasses.replace(self, method=method, options=build_options(method, flat, options))

    def learning_rate(self, world_size: int = 1) -> float:
        """The peak learning rate: ``lr`` when given, else ``lr_base`` scaled linearly by the global batch
        (processes x batch size) over ``lr_base_size`` images, as DeiT does."""
        if self.lr is not None:
            return self.lr
        return self.lr_base * self.batch_size * world_size / self.lr_base_size

    def smoothing(self) -> float:
        """The label smoothing a classification run uses: ``label_smoothing``, 0.1 when not set."""
        return 0.1 if self.label_smoothing is None else self.label_smoothing


def parse_kwargs(words: typing.Iterable[str], name: str = "model_kwargs") -> dict:
    """``["depths=[2, 4]", "window_size=7"]`` -> ``{"depths": [2, 4], "window_size": 7}`` (values read as YAML)."""
    out = {}
    for word in words:
        key, sep, value = str(word).partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} takes key=value words (e.g. depths=[2,4] "
                                       f"window_size=7); got {word!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


HELP = {
    # task and model
    "task": "classification (images or clips) or detection (--data coco:PATH; --model maskrcnn or fasterrcnn)",
    "model": "timm model name (any timm model; ltm_* names are LTM models registered by tokenthrift); for "
             "--task detection: maskrcnn or fasterrcnn",
    "backbone": "detection: the timm backbone (swin_*, ltm_swin_*, vit_*, ltm_vit_*, or any timm model with "
                "features_only); --model-kwargs go to it",
    "det_head_width": "detection: FPN and head width (default: torchvision's 256 and its heads)",
    "det_kwargs": "detection: torchvision MaskRCNN/FasterRCNN keywords as key=value (e.g. box_detections_per_img=20)",
    "img_size": "input image side in pixels (timm override; default: the model's own)",
    "patch_size": "ViT patch side in pixels (timm override)",
    "in_chans": "input channels (timm override; default: the dataset's)",
    "num_classes": "classifier outputs (default: the dataset's class count)",
    "embed_dim": "ViT width D (timm override)",
    "depth": "number of ViT blocks (timm override)",
    "num_heads": "attention heads per block (timm override)",
    "mlp_ratio": "MLP hidden width / D (timm override)",
    "num_frames": "frames per clip of a video model (timm override; default: the model's own, 8 for timesformer_*)",
    "model_kwargs": "extra timm.create_model keywords as key=value (values in YAML, e.g. depths=[2,4])",
    "pretrained": "start from the model's pretrained weights (timm pretrained=True; they must be on this machine, "
                  "e.g. vit_fmnist_tiny_patch2_28, which ships with tokenthrift)",
    "initial_checkpoint": "start from the weights in this local file (a tokenthrift last.pth, a .safetensors file or a "
                          "saved state dict), adapted as timm adapts pretrained weights (position table resampled; a "
                          "classifier of another class count starts fresh); fine-tuning defaults apply as with "
                          "--pretrained",
    "init_backbone": "detection: initialise the backbone from a classifier's weights (a tokenthrift last.pth of "
                     "the same backbone, a .safetensors file or a saved state dict)",
    "drop_path": "stochastic depth rate (timm drop_path_rate)",
    "grad_checkpointing": "recompute activations in backward to save memory (timm set_grad_checkpointing)",
    # data
    "data": "fashion-mnist, cifar10, cifar100, imagefolder:PATH; video: moving-fashion-mnist, videofolder:PATH",
    "data_dir": "dataset folder (default for fashion-mnist: /usr/share/datasets/fashion-mnist)",
    "download": "let torchvision download the dataset if it is not found locally",
    "train_subset": "train on a fixed random subset of N images (deterministic)",
    "train_holdout": "keep N training images out of training (a fixed random slice, chosen with --seed), e.g. "
                     "to label them for the token-length assigner (assign-labels --split holdout)",
    "eval_subset": "evaluate on a fixed random subset of N images",
    "test_crops": "videofolder evaluation: 1 centre crop per clip, or 3 crops along the longer side with their "
                  "probabilities averaged (TimeSformer's test)",
    "workers": "data-loading worker processes (0: load in the training process)",
    "mean": "normalisation mean per channel (default: a --pretrained model's pretrained cfg, as it was trained; "
            "else the dataset's statistics)",
    "std": "normalisation std per channel (default: as --mean)",
    "interpolation": "resize interpolation, bilinear, bicubic or nearest (default: a --pretrained model's cfg, "
                     "else bilinear)",
    "crop_pct": "large images: evaluation centre crop share (default: a --pretrained model's cfg, else 0.875)",
    "hflip": "training: probability of a random horizontal flip (0 for digits, text or anything a mirror changes)",
    "crop_pad": "small images (<= 64 px) in training: pixels of padding before the random crop (default: model "
                "side / 14; 0: no crop)",
    "skip_bad_images": "imagefolder: leave unreadable image files out (counted in a warning) instead of stopping at "
                       "the first",
    # optimisation
    "epochs": "training epochs",
    "batch_size": "images per step and process",
    "eval_batch_size": "images per evaluation batch",
    "opt": "timm optimizer name (adamw, sgd, lamb, ...)",
    "lr_base": "peak learning rate per lr_base_size images of global batch; the run uses lr_base x processes "
               "x batch size / lr_base_size (linear scaling, as DeiT); default 5e-4 from scratch, 2e-3 with "
               "--pretrained (fine-tuning: 5e-4 at batch 128)",
    "lr_base_size": "global batch size that lr_base is stated for",
    "lr": "peak learning rate as is, overriding lr_base and its batch scaling",
    "weight_decay": "weight decay (timm applies none to norms, biases and position tables)",
    "sched": "timm learning-rate schedule (cosine, step, ...), stepped every update",
    "warmup_epochs": "epochs of linear warm-up from warmup_lr (fractions allowed); default 1 from scratch (half "
                     "of a 1-epoch run), a tenth of --epochs with --pretrained",
    "warmup_lr": "learning rate at the start of the warm-up",
    "min_lr": "learning rate at the end of the schedule",
    "label_smoothing": "label smoothing of the cross-entropy (classification; default 0.1)",
    "mixup": "mixup alpha (0: off)",
    "cutmix": "cutmix alpha (0: off)",
    "clip_grad": "clip the gradient norm to this value (default: no clipping)",
    "ema": "keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it too",
    "ema_decay": "EMA decay per update",
    "amp": "mixed precision: auto (bf16 or fp16 on CUDA, off on the CPU), on, off, bf16 or fp16",
    # method (its options' help is in each adapter's options dataclass)
    "method": "the method: full (plain training) or one of the methods tokenthrift registers (listed below with their "
              "flags)",
    # run
    "seed": "random seed (weights, data order, subsets)",
    "device": "auto (CUDA if present), cpu, cuda or cuda:N",
    "threads": "torch CPU threads (default: torch's choice)",
    "output": "folder that holds the run folders",
    "name": "run folder name under --output (default: model-method-seed)",
    "overwrite": "let a new run replace the records of a run already in its folder (default: keep them and write "
                 "the new run to <name>-1, <name>-2, ...)",
    "resume": "checkpoint to resume from (restores model, optimizer, scheduler, EMA, method, RNG)",
    "eval_every": "evaluate every N epochs (and always after the last)",
    "progress": "progress bars and one printed line per epoch",
}


def _parse_type(hint) -> tuple[type, bool]:
    """(element type, is_tuple) of a field annotation such as ``int | None`` or ``tuple[float, ...]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _parse_type(args[0])
    if typing.get_origin(hint) is tuple:
        return args[0], True
    if hint is dict:
        return str, True  # key=value words, parsed by TrainConfig
    return hint, False


MODEL_FIELDS = ("task", "model", "backbone", "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                "num_heads", "mlp_ratio", "num_frames", "model_kwargs", "det_head_width", "det_kwargs")
def _add_flag(parser: argparse.ArgumentParser, dest: str, hint: Any, text: str, default: Any) -> None:
    kind, many = _parse_type(hint)
    help_text = text if default is None and "default" in text else f"{text} (default: {default})".strip()
    if kind is bool:
        parser.add_argument(flag_name(dest), dest=dest, action=argparse.BooleanOptionalAction, default=None,
                            help=help_text)
    else:
        parser.add_argument(flag_name(dest), dest=dest, type=kind, nargs="+" if many else None, default=None,
                            help=help_text)


def add_config_arguments(parser: argparse.ArgumentParser, only: typing.Iterable[str] | None = None) -> None:
    """One ``--flag`` per engine field of TrainConfig (or per field in ``only``); defaults are None so only the
    flags given on the command line override a recipe. ``--method`` lists the registered methods."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "options" or only is not None and f.name not in only:
            continue
        text = HELP.get(f.name, "")
        if f.name == "method":
            text = "; ".join(f"{s.name} ({s.summary})" for s in METHOD_SPECS.values())
        _add_flag(parser, f.name, hints[f.name], text, f.default)


def add_method_arguments(parser: argparse.ArgumentParser, preview: bool = False) -> None:
    """One ``--<method>-<option>`` flag per option of every registered method (``preview``: only those a preview
    of a previewable method takes), in a group per method; a former name still works, with a warning."""
    wanted = set(method_flags(preview))
    for name, spec in METHOD_SPECS.items():
        fields = [f for f in dataclasses.fields(spec.options) if f"{name}_{f.name}" in wanted]
        if not fields:
            continue
        group = parser.add_argument_group(f"--method {name} ({spec.label})")
        hints = typing.get_type_hints(spec.options)
        for f in fields:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            _add_flag(group, f"{name}_{f.name}", hints[f.name], f"{spec.label}: {f.metadata.get('help', '')}", default)
            old = f.metadata.get("renamed_from")
            if old:  # the former flag still works, with a warning
                kind, many = _parse_type(hints[f.name])
                action = group.add_argument(flag_name(f"{name}_{old}"), dest=f"{name}_{f.name}", type=kind,
                                            nargs="+" if many else None, action=_Renamed, help=argparse.SUPPRESS)
                action.help_of_new = f.metadata.get("help", "")


class _Renamed(argparse.Action):
    """A flag under its former name: stores under the new one and says so."""

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is now {flag_name(self.dest)} ({self.help_of_new})", TokenthriftWarning,
                      stacklevel=2)
        setattr(namespace, self.dest, values)


SWITCHES = ("ema",)  # plain store_true switches of the entry points: False means not given


def flag_name(name: str) -> str:
    """argparse dest -> its flag: ``ltm_macs`` -> ``--ltm-macs``."""
    return "--" + name.replace("_", "-")


def given_flags(args: argparse.Namespace, names: typing.Iterable[str]) -> list[str]:
    """The flags among ``names`` (argparse dests) given on the command line: train flags default to None
    (``--no-x`` gives False, which counts), the plain :data:`SWITCHES` to False."""
    return [n for n in names if getattr(args, n, None) is not None
            and not (n in SWITCHES and getattr(args, n) is False)]


def refuse_flags(args: argparse.Namespace, names: typing.Iterable[str], reason: str) -> None:
    """One error naming every flag of ``names`` that was given, and ``reason``."""
    given = given_flags(args, names)
    if given:
        raise InvalidArgumentError(f"{', '.join(flag_name(n) for n in given)} {reason}")


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("tokenthrift.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(path_or_name: str) -> dict:
    """A YAML recipe by file path, or by the name of one shipped in ``tokenthrift/recipes``."""
    path = Path(path_or_name)
    if path.is_file():
        text = path.read_text()
    elif path_or_name in recipe_names():
        text = resources.files("tokenthrift.recipes").joinpath(f"{path_or_name}.yaml").read_text()
    else:
        raise MissingFileError(f"recipe {path_or_name!r} is neither a file nor a shipped recipe "
                               f"({', '.join(recipe_names())})")
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise InvalidArgumentError(f"recipe {path_or_name!r} must be a YAML mapping of option: value")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"options"}
    unknown = sorted(k for k in values if k not in known and method_key(k) is None)
    if unknown:
        raise InvalidArgumentError(f"recipe {path_or_name!r} has unknown keys {unknown}; valid keys are the train "
                                   f"flags: {', '.join(sorted(known | set(method_flags())))}")
    return values


def config_from_args(args: argparse.Namespace, **defaults) -> TrainConfig:
    """``defaults``, then recipe values (``args.config``), then every flag given on the command line."""
    values = dict(defaults)
    recipe = load_recipe(args.config) if getattr(args, "config", None) else {}
    asked = getattr(args, "method", None) or defaults.get("method")
    if asked and recipe.get("method", "full") != asked:  # the recipe's method options do not apply to another one
        other = sorted(k for k in recipe if method_key(k) is not None and method_key(k)[0] != asked)
        if other:
            warnings.warn(f"recipe {args.config}: {', '.join(flag_name(k) for k in other)} belong to its --method "
                          f"{recipe.get('method', 'full')}, not to --method {asked}; left out", TokenthriftWarning,
                          stacklevel=2)
        recipe = {k: v for k, v in recipe.items() if k not in other}
    values.update(recipe)
    for name in [f.name for f in dataclasses.fields(TrainConfig) if f.name != "options"] + method_flags():
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    return TrainConfig(**values)
