"""ToE (Token Expansion) as a training-engine method: patch the ViT, advance the schedule, check resumes.

Huang et al., "A General and Efficient Training for Transformer via Token Expansion", CVPR 2024. docs/methods.md §2.
"""
from __future__ import annotations

from torch import nn

from ... import measure, toe
from ...errors import InvalidArgumentError
from ..config import TrainConfig
from ..protocol import Method

__all__ = ["TokenExpansion"]


class TokenExpansion(Method):
    """ToE (docs/methods.md §2): fewer tokens after block 0 in training, grown stage by stage."""

    name = "toe"

    def __init__(self, cfg: TrainConfig):
        self.kwargs = cfg.toe_kwargs()
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
