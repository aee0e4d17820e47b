"""ToE (Token Expansion) as a training-engine method: patch the ViT, advance the schedule, check resumes.

Huang et al., "A General and Efficient Training for Transformer via Token Expansion", CVPR 2024. docs/methods.md §2.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ... import measure, toe
from ...errors import InvalidArgumentError, UnsupportedModelError
from ...hosts import host_of
from ..config import TrainConfig, option
from ..protocol import Method, PictureOptions, Variant

__all__ = ["DEIT_EPOCHS", "ToEOptions", "TokenExpansion", "default_epochs", "stage_copies", "stage_epochs",
           "stage_speed_rows"]

DEIT_EPOCHS = 300  # the DeiT recipe's length: ToE's stages of a model without a run spread over it (0/100/200)


@dataclass
class ToEOptions:
    r0: float = option(0.25, "share of patch tokens kept as spatial seeds", preview=True)
    keep_rates: tuple[float, ...] = option((0.5, 0.75, 1.0), "cumulative keep rate of each stage (last = 1.0 = full "
                                           "tokens)", preview=True)
    milestones: tuple[float, ...] | None = option(None, "epoch at which each stage starts (default: stages spread "
                                                  "evenly over --epochs)", preview=True)
    k: int = option(2, "chunks per expansion step", preview=True)
    distance: str = option("cosine", "token distance, cosine, euclidean or manhattan", preview=True)
    step_schedule: bool = option(False, "advance the schedule every step (fractional epochs) instead of every epoch")

    def __post_init__(self) -> None:
        self.keep_rates = tuple(float(r) for r in self.keep_rates)
        if self.milestones is not None:
            self.milestones = tuple(float(m) for m in self.milestones)

    def schedule_milestones(self, epochs: int) -> tuple[float, ...]:
        """``milestones``, or stages spread evenly over ``epochs`` (0, E/3, 2E/3 for three stages)."""
        if self.milestones is not None:
            return self.milestones
        stages = len(self.keep_rates)
        return tuple(i * epochs / stages for i in range(stages))

    def kwargs(self, epochs: int) -> dict:
        """The :class:`tokenthrift.toe.ToESchedule` keywords (milestones as :meth:`schedule_milestones`)."""
        return dict(r0=self.r0, keep_rates=self.keep_rates, milestones=self.schedule_milestones(epochs), k=self.k,
                    distance=self.distance)


def stage_epochs(schedule: toe.ToESchedule) -> list[tuple[int, float]]:
    """(stage, first epoch of that stage) for every reduced stage; the full-token stage is the baseline."""
    return [(s, m) for s, m in enumerate(schedule.milestones, start=1) if not schedule.is_full(m)]


def stage_copies(model: nn.Module, toe_kwargs: dict) -> list[tuple[int, float, nn.Module]]:
    """(stage, keep rate, a copy of ``model`` with ToE at that stage's first epoch) for every reduced stage."""
    out = []
    for stage, epoch in stage_epochs(toe.ToESchedule(**toe_kwargs)):
        patched = copy.deepcopy(model)
        handle = toe.apply(patched, **toe_kwargs)
        handle.set_epoch(epoch)
        out.append((stage, handle.keep_rate, patched))
    return out


def default_epochs(schedule: toe.ToESchedule) -> int:
    """Training length implied by a schedule whose last stage lasts as long as the one before it
    (300 for the DeiT recipe 0/100/200)."""
    ms = schedule.milestones
    return int(ms[-1] + max(ms[-1] - ms[-2], 1)) if len(ms) > 1 else int(ms[0]) + 1


class TokenExpansion(Method):
    """ToE (docs/methods.md §2): fewer tokens after block 0 in training, grown stage by stage."""

    name = "toe"
    summary = "Token Expansion: fewer tokens in training, grown stage by stage"
    label = "ToE"
    order = 10
    Options = ToEOptions
    tasks = ("classification",)
    picture_flags = ("stage",)
    default_for = ("bench", "visualize")

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.kwargs = self.options.kwargs(cfg.epochs)
        self.epochs = cfg.epochs
        self.step_schedule = self.options.step_schedule
        toe.ToESchedule(**self.kwargs)  # validate the flags before any model is built
        self.handle: toe.ToEHandle | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        self.handle = toe.apply(model, **self.kwargs)
        return model

    def on_epoch_start(self, epoch: int) -> None:
        self.handle.set_epoch(epoch)

    def on_step(self, progress: float) -> None:
        if self.step_schedule:
            self.handle.set_epoch(progress)

    def baseline_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> tuple[float, str]:
        """The same model without the ToE reduction (its eval-mode forward keeps every token)."""
        return measure.macs(model, input_size), "a full-token training forward of the same model"

    # ------------------------------------------------------------------ inference side (= the plain model)
    @classmethod
    def preview(cls, cfg: TrainConfig, epochs: int | None = None) -> TokenExpansion:
        """ToE on an untrained model: stages spread over ``epochs`` where the config gives no milestones
        (default: DeiT's 300 epochs, which gives its 0 / 100 / 200), means taken over that length (given
        milestones: the length they imply)."""
        if epochs is None:
            given = cfg.options.milestones is not None
            epochs = default_epochs(toe.ToESchedule(**cfg.options.kwargs(cfg.epochs))) if given else DEIT_EPOCHS
        return cls(dataclasses.replace(cfg, epochs=epochs))

    def variants(self, model: nn.Module, input_size: tuple[int, ...]) -> list[Variant]:
        return [Variant("ToE-trained (inference = full)", model, measure.macs(model, input_size), match=False)]

    def training_variants(self, model: nn.Module, input_size: tuple[int, ...]) -> list[Variant]:
        """A training step of the full-token model, then of each ToE stage (a copy of the model at that stage's
        first epoch), and the mean MACs over the schedule's epochs (not a model: not timed)."""
        if toe.get_handle(model) is not None:  # a trained --method toe checkpoint: its plain model's stages
            model = toe.remove(copy.deepcopy(model))
        full = Variant("full tokens", model, measure.macs(model, input_size, train=True),
                       columns={"stage": "full tokens", "keep_rate": 1.0}, train=True, match=False)
        out, by_stage = [full], {}
        for stage, keep_rate, patched in stage_copies(model, self.kwargs):
            by_stage[stage] = measure.macs(patched, input_size, train=True)
            out.append(Variant(f"ToE stage {stage}", patched, by_stage[stage], baseline=model, train=True,
                               columns={"stage": stage, "keep_rate": keep_rate}, match=False))
        schedule = toe.ToESchedule(**self.kwargs)
        mean = statistics.fmean(by_stage.get(schedule.stage(e), full.macs) for e in range(self.epochs))
        out.append(Variant(f"ToE, mean over {self.epochs} epochs", None, mean, baseline=model, train=True,
                           columns={"stage": f"mean over {self.epochs} epochs", "keep_rate": "-"}, match=False))
        return out

    def draw(self, model: nn.Module, cfg: TrainConfig, images: torch.Tensor, options: PictureOptions) -> Path:
        """The patches ToE keeps after block 0 and the groups merged into them (``options.stage``: that
        stage's keep rate; default the first stage's)."""
        from ... import viz

        try:
            host = host_of(model, "ToE")
        except UnsupportedModelError:
            raise UnsupportedModelError(
                f"this is a plain {type(model).__name__}: visualize draws ToE token groups of ViT-like encoders (timm "
                "VisionTransformer and Eva), ReViT grids and LTM merge maps. To preview learnable token merging on it, "
                "add --method ltm (with --ltm-macs or --ltm-site-ratio)") from None
        schedule = toe.ToESchedule(**self.kwargs)
        x = toe.block0_output(model, images)
        rates = schedule.keep_rates[: options.stage] if options.stage is not None else schedule.rates(0)
        kept, groups = toe.expansion_groups(x, rates, schedule.r0, schedule.k, host.num_prefix_tokens,
                                            schedule.distance, last_stage=len(rates) == len(schedule.keep_rates))
        title = (f"{options.preview}ToE {options.label(cfg)}: keep {rates[-1] if rates else schedule.r0} "
                 f"({kept.shape[1]} of {groups.shape[1]} tokens after block 0)")
        return viz.plot_token_groups(images, groups, kept, host.grid_size, options.out, title,
                                     captions=options.captions)

    def log(self) -> dict:
        return {"toe_stage": self.handle.stage, "toe_keep_rate": self.handle.keep_rate}

    def state_dict(self) -> dict:
        return {"schedule": self.handle.state_dict(), "step_schedule": self.step_schedule}

    def load_state_dict(self, state: dict) -> None:
        saved = state["schedule"]
        flags = {"toe_r0": "r0", "toe_keep_rates": "keep_rates", "toe_milestones": "milestones", "toe_k": "k",
                 "toe_distance": "distance"}
        ours = toe.ToESchedule(**self.kwargs).state_dict()
        differ = [f"--{flag.replace('_', '-')} {_show(saved[key])} (this run: {_show(ours[key])})"
                  for flag, key in flags.items() if saved[key] != ours[key]]
        if state.get("step_schedule", self.step_schedule) != self.step_schedule:
            differ.append(f"--toe-step-schedule {state['step_schedule']} (this run: {self.step_schedule})")
        if differ:
            raise InvalidArgumentError("the checkpoint was trained with other ToE settings: " + "; ".join(differ) +
                             ". Resume with the checkpoint's settings (a different schedule is a different run)")
        self.handle.load_state_dict(saved)


def _show(value) -> str:
    return " ".join(f"{v:g}" for v in value) if isinstance(value, (tuple, list)) else str(value)


def stage_speed_rows(model: nn.Module, input_size: Sequence[int], batch_size: int, toe_kwargs: dict,
                     train: bool = True, warmup: int = 2, repeats: int = 5,
                     dtype: torch.dtype | None = None, compile: bool = False) -> list[dict]:
    """Measured throughput of each ToE stage against full tokens, timed in alternating rounds
    (:func:`tokenthrift.measure.paired_throughput`; ``dtype``: autocast; ``compile``: every step through
    ``torch.compile``), with the MACs ratio and the efficiency (speed-up x MACs ratio)."""
    stages = stage_copies(model, toe_kwargs)
    nets = [model, *(patched for _, _, patched in stages)]
    rows = [{"stage": "full tokens", "keep_rate": 1.0}, *({"stage": s, "keep_rate": k} for s, k, _ in stages)]
    macs = [measure.macs(n, input_size, train=True) for n in nets]
    ips = measure.paired_throughput(nets, input_size, batch_size, train=train, warmup=warmup, repeats=repeats,
                                    dtype=dtype, compile=compile)
    for row, m, v in zip(rows, macs, ips):
        row.update(GMACs=m / 1e9, img_s=v, speedup=v / ips[0], MACs_ratio=m / macs[0],
                   efficiency=v / ips[0] * m / macs[0])
    return rows
