"""ToE (Token Expansion) as a training-engine method: patch the ViT, advance the schedule, check resumes.

Huang et al., "A General and Efficient Training for Transformer via Token Expansion", CVPR 2024. docs/methods.md §2.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ... import measure, toe, tome
from ...errors import InvalidArgumentError, UnsupportedModelError
from ...hosts import host_of
from ..config import DEIT_EPOCHS, TOE_FIELDS, TrainConfig
from ..protocol import CompareContext, Method, PictureOptions, Variant, comparison_row

__all__ = ["TokenExpansion", "default_epochs", "stage_epochs"]


def stage_epochs(schedule: toe.ToESchedule) -> list[tuple[int, float]]:
    """(stage, first epoch of that stage) for every reduced stage; the full-token stage is the baseline."""
    return [(s, m) for s, m in enumerate(schedule.milestones, start=1) if not schedule.is_full(m)]


def default_epochs(schedule: toe.ToESchedule) -> int:
    """Training length implied by a schedule whose last stage lasts as long as the one before it
    (300 for the DeiT recipe 0/100/200)."""
    ms = schedule.milestones
    return int(ms[-1] + max(ms[-1] - ms[-2], 1)) if len(ms) > 1 else int(ms[0]) + 1


class TokenExpansion(Method):
    """ToE (docs/methods.md §2): fewer tokens after block 0 in training, grown stage by stage."""

    name = "toe"
    tasks = ("classification",)
    picture_flags = ("stage", *TOE_FIELDS)

    def __init__(self, cfg: TrainConfig):
        self.kwargs = cfg.toe_kwargs()
        self.epochs = cfg.epochs
        self.step_schedule = cfg.toe_step_schedule
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
            given = cfg.toe_milestones is not None
            epochs = default_epochs(toe.ToESchedule(**cfg.toe_kwargs())) if given else DEIT_EPOCHS
        return cls(dataclasses.replace(cfg, epochs=epochs))

    def variants(self, model: nn.Module, input_size: tuple[int, ...]) -> list[Variant]:
        return [Variant("ToE-trained (inference = full)", model, measure.macs(model, input_size), match_tome=False)]

    def comparison_rows(self, model: nn.Module, cfg: TrainConfig, ctx: CompareContext) -> list[dict]:
        """The ToE-trained model, alone and with ToMe at each off-the-shelf r (the two savings stack)."""
        rows = super().comparison_rows(model, cfg, ctx)
        for r in ctx.tome_r:
            merged = tome.merging_copy(model, r)
            v = Variant(f"ToE-trained + ToMe r={r}", merged, measure.macs(merged, ctx.input_size))
            rows.append(comparison_row(v.label, self.name, v, ctx.top1(merged), match_tome=False, r=r))
        return rows

    def macs_rows(self, model: nn.Module, input_size: tuple[int, ...], cfg: TrainConfig) -> list[dict]:
        """Training-forward MACs of each ToE stage against the full-token model (operator overhead included),
        and the mean over the schedule's epochs."""
        base = measure.macs(model, input_size, train=True)
        patched = copy.deepcopy(model)
        handle = toe.apply(patched, **self.kwargs)
        by_stage: dict[int, float] = {}
        for epoch in range(self.epochs):
            handle.set_epoch(epoch)
            if handle.stage not in by_stage:
                by_stage[handle.stage] = measure.macs(patched, input_size, train=True)
        rows = [{"stage": "full tokens", "keep_rate": 1.0, "GMACs": base / 1e9, "MACs_ratio": 1.0}]
        for stage, epoch in stage_epochs(handle.schedule):
            handle.set_epoch(epoch)
            m = by_stage.get(stage) or measure.macs(patched, input_size, train=True)
            rows.append({"stage": stage, "keep_rate": handle.keep_rate, "GMACs": m / 1e9, "MACs_ratio": m / base})
        mean = statistics.fmean(by_stage[handle.schedule.stage(e)] for e in range(self.epochs))
        rows.append({"stage": f"mean over {self.epochs} epochs", "keep_rate": "-", "GMACs": mean / 1e9,
                     "MACs_ratio": mean / base})
        return rows

    def bench_rows(self, model: nn.Module, input_size: tuple[int, ...], batch_size: int, warmup: int = 2,
                   repeats: int = 5, dtype: torch.dtype | None = None, compile: bool = False
                   ) -> tuple[list[dict], str]:
        """Measured training-step throughput of each ToE stage against full tokens in the same run, with the
        MACs ratio and the efficiency (speed-up x MACs ratio)."""
        if toe.get_handle(model) is not None:  # a trained --method toe checkpoint: time its plain model's stages
            model = toe.remove(copy.deepcopy(model))
        return stage_speed_rows(model, input_size, batch_size, self.kwargs, warmup=warmup, repeats=repeats,
                                dtype=dtype, compile=compile), "training step (fwd+bwd+AdamW)"

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
                                            schedule.distance)
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
    """Measured throughput of each ToE stage against full tokens in the same run (``dtype``: autocast;
    ``compile``: every step through ``torch.compile``), with the MACs ratio and the efficiency (speed-up x
    MACs ratio)."""
    base_macs = measure.macs(model, input_size, train=True)
    base = measure.throughput(model, input_size, batch_size, train=train, warmup=warmup, repeats=repeats,
                              dtype=dtype, compile=compile)
    patched = copy.deepcopy(model)
    handle = toe.apply(patched, **toe_kwargs)
    rows = [{"stage": "full tokens", "keep_rate": 1.0, "GMACs": base_macs / 1e9, "img_s": base,
             "speedup": 1.0, "MACs_ratio": 1.0, "efficiency": 1.0}]
    for stage, epoch in stage_epochs(handle.schedule):
        handle.set_epoch(epoch)
        m = measure.macs(patched, input_size, train=True)
        ips = measure.throughput(patched, input_size, batch_size, train=train, warmup=warmup, repeats=repeats,
                                 dtype=dtype, compile=compile)
        rows.append({"stage": stage, "keep_rate": handle.keep_rate, "GMACs": m / 1e9, "img_s": ips,
                     "speedup": ips / base, "MACs_ratio": m / base_macs, "efficiency": ips / base * m / base_macs})
    return rows
