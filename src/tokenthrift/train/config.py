"""Training configuration: one dataclass is the single source of truth for defaults, YAML recipes and
command-line flags (``--field-name`` for every field; a recipe sets defaults, flags override them)."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from ..errors import InvalidArgumentError, MissingFileError

AMP_MODES = ("auto", "on", "off", "bf16", "fp16")
DEIT_EPOCHS = 300  # the DeiT recipe's length: ToE's stages of a model without a run spread over it (0/100/200)
# what lr_base and warmup_epochs mean when not given: from scratch (DeiT's rule) or fine-tuning (--pretrained),
# where a few epochs must move the weights from the first step (5e-4 at batch 128, warm-up 10 % of the run)
SCRATCH_LR_BASE, SCRATCH_WARMUP_EPOCHS = 5e-4, 1.0
FINETUNE_LR_BASE, FINETUNE_WARMUP_SHARE = 2e-3, 0.1


@dataclass
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
    # method
    method: str = "full"
    toe_r0: float = 0.25
    toe_keep_rates: tuple[float, ...] = (0.5, 0.75, 1.0)
    toe_milestones: tuple[float, ...] | None = None
    toe_k: int = 2
    toe_distance: str = "cosine"
    toe_step_schedule: bool = False
    revit_grids: tuple[int, ...] = (14, 10, 7)
    revit_tal_ln: bool = True
    revit_tlsd: bool = True
    revit_alpha: float = 0.5
    revit_tau: float = 1.0
    revit_per_grid_backward: bool = False
    tla_model: str | None = None
    tla_labels: str | None = None
    tla_eval_labels: str | None = None
    tla_balanced: bool = False
    tla_cost_weight: float = 0.0
    tla_motion: bool = False
    tla_scale: float = 0.5
    tla_max_macs_fraction: float = 0.02
    ltm_macs: float | None = None
    ltm_site_ratio: tuple[float, ...] | None = None
    ltm_tau: float = 1.0
    ltm_tau_final: float | None = None
    ltm_tau_s: float = 0.1
    ltm_ib: bool = True
    ltm_ib_weight: float = 0.1
    ltm_ib_start: float = 0.3
    ltm_kmeans_every: int = 1
    ltm_clusters: int = 1000
    ltm_ib_beta: float = 10.0
    tome_r: int = 8
    tome_prop_kernel: str = "auto"
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

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InvalidArgumentError(f"epochs={self.epochs}: train for at least one epoch")
        if self.batch_size < 1:
            raise InvalidArgumentError(f"batch_size={self.batch_size} must be positive")
        if self.amp not in AMP_MODES:
            raise InvalidArgumentError(f"amp={self.amp!r}: choose {', '.join(AMP_MODES)}")
        if self.train_holdout < 0:
            raise InvalidArgumentError(f"train_holdout={self.train_holdout} must be 0 or a number of images")
        self.toe_keep_rates = tuple(float(r) for r in self.toe_keep_rates)
        if self.toe_milestones is not None:
            self.toe_milestones = tuple(float(m) for m in self.toe_milestones)
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
                          f"{FINETUNE_WARMUP_SHARE * self.epochs:g})", stacklevel=3)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(float(v) for v in ((value,) if isinstance(value, (int, float)) else value)))
        if self.lr is None and self.lr_base <= 0 or self.lr is not None and self.lr <= 0 or self.lr_base_size < 1:
            raise InvalidArgumentError(f"learning rate must be positive: lr={self.lr}, lr_base={self.lr_base} per "
                                       f"lr_base_size={self.lr_base_size} images")
        self.revit_grids = tuple(int(g) for g in self.revit_grids)
        if isinstance(self.ltm_site_ratio, (int, float)):
            self.ltm_site_ratio = (float(self.ltm_site_ratio),)
        elif self.ltm_site_ratio is not None:
            self.ltm_site_ratio = tuple(float(r) for r in self.ltm_site_ratio)
        if self.ltm_macs is not None and self.ltm_site_ratio is not None:
            raise InvalidArgumentError("--ltm-macs (a share of the model's MACs) and --ltm-site-ratio (the share of "
                                       "tokens each merge site keeps) both set LTM's cost; pass one")
        if self.ltm_macs is not None and not 0.0 < self.ltm_macs <= 1.0:
            raise InvalidArgumentError(f"--ltm-macs {self.ltm_macs}: the share of the model's MACs to keep, in (0, 1]")
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
        return dataclasses.asdict(self)

    def learning_rate(self, world_size: int = 1) -> float:
        """The peak learning rate: ``lr`` when given, else ``lr_base`` scaled linearly by the global batch
        (processes x batch size) over ``lr_base_size`` images, as DeiT does."""
        if self.lr is not None:
            return self.lr
        return self.lr_base * self.batch_size * world_size / self.lr_base_size

    def smoothing(self) -> float:
        """The label smoothing a classification run uses: ``label_smoothing``, 0.1 when not set."""
        return 0.1 if self.label_smoothing is None else self.label_smoothing

    def toe_schedule_milestones(self, epochs: int | None = None) -> tuple[float, ...]:
        """``toe_milestones``, or stages spread evenly over ``epochs`` (default: this run's; 0, E/3, 2E/3 for
        three stages)."""
        if self.toe_milestones is not None:
            return self.toe_milestones
        stages, length = len(self.toe_keep_rates), epochs or self.epochs
        return tuple(i * length / stages for i in range(stages))

    def toe_kwargs(self, epochs: int | None = None) -> dict:
        """The :class:`tokenthrift.toe.ToESchedule` keywords of this config (milestones as
        :meth:`toe_schedule_milestones`)."""
        return dict(r0=self.toe_r0, keep_rates=self.toe_keep_rates, milestones=self.toe_schedule_milestones(epochs),
                    k=self.toe_k, distance=self.toe_distance)


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
    # methods
    "method": "full (plain training), toe (Token Expansion), revit (Resizable ViT: every grid each step), "
              "tla (Token-Length Assigner on labels from assign-labels) or ltm (Learnable Token Merging)",
    "toe_r0": "ToE: share of patch tokens kept as spatial seeds",
    "toe_keep_rates": "ToE: cumulative keep rate of each stage (last = 1.0 = full tokens)",
    "toe_milestones": "ToE: epoch at which each stage starts (default: stages spread evenly over --epochs)",
    "toe_k": "ToE: chunks per expansion step",
    "toe_distance": "ToE: token distance, cosine, euclidean or manhattan",
    "toe_step_schedule": "ToE: advance the schedule every step (fractional epochs) instead of every epoch",
    "revit_grids": "ReViT: token grids (tokens per side), largest first",
    "revit_tal_ln": "ReViT: token-length-aware LayerNorm, one LayerNorm copy per grid",
    "revit_tlsd": "ReViT: token-length self-distillation from the largest grid",
    "revit_alpha": "ReViT: weight of the distillation term of every smaller grid",
    "revit_tau": "ReViT: distillation temperature",
    "revit_per_grid_backward": "ReViT: back-propagate grid by grid to cut peak memory",
    "tla_model": "TLA: timm CNN for the Token-Length Assigner",
    "tla_labels": "TLA: token-length label file of the training images (assign-labels --split train or holdout)",
    "tla_eval_labels": "TLA: token-length label file of the evaluation images (assign-labels --split eval)",
    "tla_balanced": "TLA: class-balanced cross-entropy",
    "tla_cost_weight": "TLA: add this weight times the expected MACs share of the predicted grids to the loss "
                       "(a cost-aware assigner; 0: cross-entropy only)",
    "tla_motion": "TLA, video: also feed the assigner the clip's mean absolute frame difference",
    "tla_scale": "TLA: assigner input resolution as a fraction of the backbone's",
    "tla_max_macs_fraction": "TLA: refuse an assigner costing more than this share of the backbone's MACs",
    "ltm_macs": "LTM: the share of the model's MACs to keep (e.g. 0.85); the per-site ratios are calibrated to it "
                "on this model at its input size, as the registered ltm_* models' are (default: a registered model's "
                "own, or the calibrated ratios of a registered base)",
    "ltm_site_ratio": "LTM: the share of tokens each merge site keeps, one value for every site or one per site; in "
                      "ViT and MobileViT the shares compound (0.9 at each of 12 blocks keeps 0.28 of the tokens by the "
                      "last one, 0.57 of DeiT-S's MACs): for a cost, use --ltm-macs (--ltm-ratio: its former name)",
    "ltm_tau": "LTM: Gumbel-softmax temperature", "ltm_tau_final": "LTM: anneal the Gumbel temperature to this value",
    "ltm_tau_s": "LTM: soft-mask temperature of the mask module",
    "ltm_ib": "LTM: information-bottleneck loss on/off", "ltm_ib_weight": "LTM: IB loss weight (lambda)",
    "ltm_ib_start": "LTM: share of the epochs before the IB loss switches on",
    "ltm_kmeans_every": "LTM: refresh the IB clusters every N epochs",
    "ltm_clusters": "LTM: k-means clusters for the IB loss (capped at samples / 10)",
    "ltm_ib_beta": "LTM: sharpness of the IB soft cluster assignment",
    "tome_r": "ToMe: tokens merged away per block (training and inference)",
    "tome_prop_kernel": "ToMe: how proportional attention reaches the fused kernel: fold (a q/k channel), mask, or auto (fold "
                        "on CUDA, mask elsewhere)",
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
TOE_FIELDS = ("toe_r0", "toe_keep_rates", "toe_milestones", "toe_k", "toe_distance")
LTM_FIELDS = ("ltm_macs", "ltm_site_ratio", "ltm_tau_s")
TOME_FIELDS = ("tome_r", "tome_prop_kernel")


def add_config_arguments(parser: argparse.ArgumentParser, only: typing.Iterable[str] | None = None) -> None:
    """One ``--flag`` per TrainConfig field (or per field in ``only``); defaults are None so only the
    flags given on the command line override a recipe."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        kind, many = _parse_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        text = HELP.get(f.name, "")
        help_text = text if f.default is None and "default" in text else f"{text} (default: {f.default})".strip()
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, nargs="+" if many else None, default=None, help=help_text)
        for old, new in RENAMED.items():
            if new == f.name:  # the former flag still works, with a warning
                parser.add_argument(flag_name(old), dest=new, type=kind, nargs="+" if many else None,
                                    action=_Renamed, help=argparse.SUPPRESS)


# config keys and flags that were renamed: old -> new (recipes and checkpoints written with the old name load)
RENAMED = {"ltm_ratio": "ltm_site_ratio"}


def upgrade_keys(values: dict) -> dict:
    """A recipe's or a saved config's keys with the :data:`RENAMED` ones under their new names."""
    out = dict(values)
    for old, new in RENAMED.items():
        if old in out:
            if new in out:
                raise InvalidArgumentError(f"{old} and {new} are the same option under its former and its new name; "
                                           f"keep {new}")
            out[new] = out.pop(old)
    return out


class _Renamed(argparse.Action):
    """A flag under its former name: stores under the new one and says so."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = flag_name(self.dest)
        warnings.warn(f"{option_string} is now {new}" + (" (the share of tokens each merge site keeps, which compounds "
                                                         "over the sites; for a share of the MACs use --ltm-macs)"
                                                         if self.dest == "ltm_site_ratio" else ""), stacklevel=2)
        setattr(namespace, self.dest, values)


SWITCHES = ("ema", "adaptive")  # plain store_true switches of the entry points: False means not given


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
    values = upgrade_keys({k.replace("-", "_"): v for k, v in values.items()})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(k.replace("-", "_") for k in values) - known)
    if unknown:
        raise InvalidArgumentError(f"recipe {path_or_name!r} has unknown keys {unknown}; valid keys are the train "
                                   f"flags: {', '.join(sorted(known))}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def config_from_args(args: argparse.Namespace, **defaults) -> TrainConfig:
    """``defaults``, then recipe values (``args.config``), then every flag given on the command line."""
    values = dict(defaults)
    values.update(load_recipe(args.config) if getattr(args, "config", None) else {})
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return TrainConfig(**values)
