"""Training configuration: one dataclass is the single source of truth for defaults, YAML recipes and
command-line flags (``--field-name`` for every field; a recipe sets defaults, flags override them)."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    # model (any timm name; overrides are passed to timm.create_model only when set)
    model: str = "vit_tiny_patch16_224"
    img_size: int | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    num_classes: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    model_kwargs: dict | None = None
    drop_path: float = 0.0
    grad_checkpointing: bool = False
    # data
    data: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None
    eval_subset: int | None = None
    workers: int = 0
    # optimisation (timm optimizer, scheduler, Mixup and ModelEmaV3)
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 256
    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    sched: str = "cosine"
    warmup_epochs: int = 1
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    label_smoothing: float = 0.1
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
    toe_milestones: tuple[float, ...] = (0, 100, 200)
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
    tla_scale: float = 0.5
    tla_max_macs_fraction: float = 0.02
    ltm_ratio: tuple[float, ...] | None = None
    ltm_tau: float = 1.0
    ltm_tau_final: float | None = None
    ltm_tau_s: float = 0.1
    ltm_ib: bool = True
    ltm_ib_weight: float = 0.1
    ltm_ib_start: float = 0.3
    ltm_kmeans_every: int = 1
    ltm_clusters: int = 1000
    ltm_ib_beta: float = 10.0
    # run
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    output: str = "runs"
    name: str | None = None
    resume: str | None = None
    eval_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs}: train for at least one epoch")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be positive")
        if self.amp not in ("auto", "on", "off"):
            raise ValueError(f"amp={self.amp!r}: choose auto, on or off")
        self.toe_keep_rates = tuple(float(r) for r in self.toe_keep_rates)
        self.toe_milestones = tuple(float(m) for m in self.toe_milestones)
        self.revit_grids = tuple(int(g) for g in self.revit_grids)
        if isinstance(self.ltm_ratio, (int, float)):
            self.ltm_ratio = (float(self.ltm_ratio),)
        elif self.ltm_ratio is not None:
            self.ltm_ratio = tuple(float(r) for r in self.ltm_ratio)
        if isinstance(self.model_kwargs, (list, tuple)):  # command line: key=value words
            self.model_kwargs = parse_kwargs(self.model_kwargs)
        elif self.model_kwargs is not None and not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a mapping of timm keyword: value; got {self.model_kwargs!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_kwargs(words: typing.Iterable[str]) -> dict:
    """``["depths=[2, 4]", "window_size=7"]`` -> ``{"depths": [2, 4], "window_size": 7}`` (values read as YAML)."""
    out = {}
    for word in words:
        key, sep, value = str(word).partition("=")
        if not sep or not key:
            raise ValueError(f"--model-kwargs takes key=value words (e.g. depths=[2,4] window_size=7); got {word!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


HELP = {
    "model": "timm model name",
    "model_kwargs": "extra timm.create_model keywords as key=value (values in YAML, e.g. depths=[2,4])", "data": "fashion-mnist, cifar10, cifar100 or imagefolder:PATH",
    "data_dir": "dataset folder (default for fashion-mnist: /usr/share/datasets/fashion-mnist)",
    "download": "let torchvision download the dataset if it is not found locally",
    "train_subset": "train on a fixed random subset of N images (deterministic)",
    "eval_subset": "evaluate on a fixed random subset of N images",
    "method": "full (plain training), toe (Token Expansion), revit (Resizable ViT: every grid each step), "
              "tla (Token-Length Assigner on labels from assign-labels) or ltm (Learnable Token Merging)",
    "revit_grids": "token grids (side) of the Resizable ViT, largest first",
    "revit_tal_ln": "token-length-aware LayerNorm: one LayerNorm copy per grid",
    "revit_tlsd": "token-length self-distillation from the largest grid",
    "revit_per_grid_backward": "back-propagate grid by grid to cut peak memory",
    "tla_model": "timm CNN for the Token-Length Assigner",
    "tla_labels": "token-length label file written by tokenthrift assign-labels",
    "tla_eval_labels": "token-length label file of the evaluation images (assign-labels --split eval)",
    "tla_balanced": "class-balanced cross-entropy for the assigner",
    "tla_scale": "assigner input resolution as a fraction of the backbone's",
    "tla_max_macs_fraction": "refuse an assigner costing more than this share of the backbone's MACs",
    "ltm_ratio": "LTM keep ratio: one value for every block or one per block",
    "ltm_tau": "Gumbel-softmax temperature", "ltm_tau_final": "anneal the Gumbel temperature to this value",
    "ltm_tau_s": "soft-mask temperature of the LTM mask module",
    "ltm_ib": "information-bottleneck loss on/off", "ltm_ib_weight": "IB loss weight (lambda)",
    "ltm_ib_start": "fraction of the epochs before the IB loss switches on",
    "ltm_clusters": "k-means clusters for the IB loss (capped at samples / 10)",
    "ltm_kmeans_every": "refresh the IB clusters every N epochs",
    "ltm_ib_beta": "sharpness of the IB soft cluster assignment",
    "toe_keep_rates": "cumulative keep rate of each stage (last = 1.0 = full tokens)",
    "toe_milestones": "epoch at which each stage starts",
    "toe_step_schedule": "advance the ToE schedule every step (fractional epochs) instead of every epoch",
    "amp": "mixed precision: auto (on for CUDA), on or off",
    "resume": "checkpoint to resume from (restores model, optimizer, scheduler, EMA, method, RNG)",
    "threads": "torch CPU threads (default: torch's choice)",
    "name": "run folder name under --output (default: model-method-seed)",
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


MODEL_FIELDS = ("model", "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
                "mlp_ratio", "model_kwargs")
TOE_FIELDS = ("toe_r0", "toe_keep_rates", "toe_milestones", "toe_k", "toe_distance")
LTM_FIELDS = ("ltm_ratio", "ltm_tau_s")


def add_config_arguments(parser: argparse.ArgumentParser, only: typing.Iterable[str] | None = None) -> None:
    """One ``--flag`` per TrainConfig field (or per field in ``only``); defaults are None so only the
    flags given on the command line override a recipe."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        kind, many = _parse_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{HELP.get(f.name, '')} (default: {f.default})".strip()
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, nargs="+" if many else None, default=None, help=help_text)


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
        raise FileNotFoundError(f"recipe {path_or_name!r} is neither a file nor a shipped recipe "
                                f"({', '.join(recipe_names())})")
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path_or_name!r} must be a YAML mapping of option: value")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(k.replace("-", "_") for k in values) - known)
    if unknown:
        raise ValueError(f"recipe {path_or_name!r} has unknown keys {unknown}; valid keys are the train flags: "
                         f"{', '.join(sorted(known))}")
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
