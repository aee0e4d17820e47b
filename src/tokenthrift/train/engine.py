"""The training engine: one epoch loop for every timm model and every method.

Reuses timm for the optimizer (``create_optimizer_v2``), the schedule (``create_scheduler_v2``, warm-up
+ cosine, stepped every update), Mixup/CutMix, label smoothing and ``ModelEmaV3``. Methods plug in
through :class:`tokenthrift.train.methods.Method`. Each epoch appends one JSON line to
``<output>/<name>/metrics.jsonl`` and rewrites ``last.pth``, which holds everything needed to resume.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset
from tqdm import tqdm

from .. import measure
from ..data import name_list, set_model_classes
from ..errors import InvalidArgumentError, StateError, TokenthriftWarning
from .build import model_input_size, resolve_preprocess, run_stem
from .checkpoint import check_writable, read_checkpoint, stamp
from .config import AMP_MODES, TrainConfig, method_key
from .distributed import all_reduce_sum, barrier, init_distributed, shutdown
from .methods import METHODS, build_method, method_class
from .protocol import Backward, Method
from .tasks import build_task


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DDP and/or ``torch.compile`` wrapper (the engine's job, not a method's)."""
    net = net.module if isinstance(net, DistributedDataParallel) else net
    return getattr(net, "_orig_mod", net)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StateError(f"--device {name} asked for CUDA but torch sees no GPU; use --device cpu")
    return device


class EpochShuffle(Sampler[int]):
    """A fresh permutation each epoch from ``seed + epoch``: resuming at any epoch sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device``: None (fp32) for ``off`` and for ``auto`` on the CPU;
    ``auto``/``on`` pick bf16 where the device supports it, else fp16; ``bf16``/``fp16`` as named."""
    if mode not in AMP_MODES:
        raise InvalidArgumentError(f"amp={mode!r}: choose {', '.join(AMP_MODES)}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode in ("auto", "on"):
        bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _autocast_factory(cfg: TrainConfig, device: torch.device):
    dtype = amp_dtype(cfg.amp, device)
    if dtype is None:
        return nullcontext, None
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None  # fp16 needs loss scaling
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


class Trainer:
    """Builds everything from a :class:`TrainConfig`; :meth:`fit` runs the epochs and returns a summary.

    ``verbose=False`` prints nothing (no normalisation line, no line per epoch, no progress bars): for a caller
    that reports in its own words (the demo's ``--quiet``). Otherwise ``cfg.progress`` shows progress bars and
    each epoch's whole record, and without it one short line per epoch."""

    def __init__(self, cfg: TrainConfig, method: Method | None = None, verbose: bool = True):
        cfg = self.cfg = copy.copy(cfg)  # the run's own copy (it records the resolved normalisation), not re-validated
        self.verbose = verbose
        wanted = Path(cfg.output) / (cfg.name or f"{run_stem(cfg.model)}-{cfg.method}-s{cfg.seed}")
        check_writable(wanted, "--output / --name")  # before any work: a run that cannot save is not started
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)  # same seed on every rank: identical initial weights
        self.task = build_task(cfg)
        self.method = method or build_method(cfg)
        if self.task.name not in self.method.tasks:
            raise InvalidArgumentError(f"--task {self.task.name} trains with --method "
                                       f"{' or '.join(n for n, c in METHODS.items() if self.task.name in c.tasks)}; "
                                       f"{self.method.name} does not apply to it")
        # a resumed run's weights come from its checkpoint: do not fetch the ones it started from again
        start = (dataclasses.replace(cfg, pretrained=False, init_backbone=None, initial_checkpoint=None) if cfg.resume
                 else cfg)
        self.model = self.method.create_model(start)
        self.preprocess = None  # detection: torchvision's detector normalises its own inputs
        if cfg.task == "classification":  # recorded in the config, so eval & co. feed images the same way
            self.preprocess = self.method.preprocess(resolve_preprocess(cfg, self.model))
            cfg.mean, cfg.std = self.preprocess.mean, self.preprocess.std
            cfg.interpolation, cfg.crop_pct = self.preprocess.interpolation, self.preprocess.crop_pct
        self.input_size = model_input_size(self.model, cfg)
        self.model = self.method.attach(self.model)
        self.model.to(self.device)
        self._build_data()
        set_model_classes(self.model, self.classes)  # as timm keeps them: eval, export and visualize read them
        self.run_dir = run_folder(wanted, bool(cfg.resume) or cfg.overwrite)
        if cfg.name and self.run_dir != wanted:  # a fresh folder beside a taken one: the config records its name
            cfg.name = self.run_dir.name
        if self.preprocess is not None and self.dist.is_main and verbose:  # the run's first line: its folder's name
            print(f"{self.run_dir.name}: {self.preprocess.describe(self.data_info, self.input_size[0])}", flush=True)
        self.lr = cfg.learning_rate(self.dist.world_size)
        self.optimizer = create_optimizer_v2(self.model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
            updates_per_epoch=len(self.train_loader))
        if self.dist.is_main:
            _warn_warmup_epochs(cfg, len(self.train_loader), len(self.train_loader.dataset), self.lr,
                                self.dist.world_size)
        self.criterion, self.mixup = self.task.criterion(self.num_classes)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.autocast, self.scaler = _autocast_factory(cfg, self.device)
        self.net = self.model  # what is called: the model, or its DDP wrapper; self.model stays the module
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.backward = Backward(self.net, self.scaler)
        self.start_epoch, self.history = 0, []
        if cfg.resume:
            self.load_checkpoint(cfg.resume)

    # ------------------------------------------------------------------ data
    def _build_data(self) -> None:
        cfg = self.cfg
        train_ds, eval_ds, info = self.task.datasets(self.input_size, self.method)
        self.data_info = info
        self.num_classes = getattr(self.model, "num_classes", info.num_classes)
        if info.num_classes != self.num_classes:  # extra outputs train for classes no image has, and score so
            named = f" ({name_list(info.classes)})" if info.classes else ""
            raise InvalidArgumentError(f"{cfg.data} has {info.num_classes} classes{named} but the model has "
                                       f"{self.num_classes} outputs; drop --num-classes (it defaults to the data's "
                                       "class count)")
        self.classes = list(info.classes)
        if len(train_ds) < cfg.batch_size * self.dist.world_size:
            raise InvalidArgumentError(f"the training set has {len(train_ds)} images, fewer than one batch of "
                                       f"{cfg.batch_size} per process; lower --batch-size or raise --train-subset")
        if self.dist.enabled:
            self.sampler = DistributedSampler(train_ds, self.dist.world_size, self.dist.rank, shuffle=True,
                                              seed=cfg.seed, drop_last=True)
            eval_ds = Subset(eval_ds, range(self.dist.rank, len(eval_ds), self.dist.world_size))
        else:
            self.sampler = EpochShuffle(len(train_ds), cfg.seed)
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(train_ds, cfg.batch_size, sampler=self.sampler, num_workers=cfg.workers,
                                       drop_last=True, pin_memory=pin, persistent_workers=cfg.workers > 0,
                                       collate_fn=self.task.collate)
        self.eval_loader = DataLoader(eval_ds, cfg.eval_batch_size, shuffle=False, num_workers=cfg.workers,
                                      pin_memory=pin, collate_fn=self.task.collate)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, next_epoch: int) -> dict:
        return stamp({
            "epoch": next_epoch,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "method": {"name": self.method.name, **self.method.state_dict()},
            "classes": self.classes,
            "history": self.history,
            "rng": _rng_state(),
        })

    def load_checkpoint(self, path: str | Path) -> None:
        ckpt = read_checkpoint(path, self.device)
        if ckpt["method"]["name"] != self.method.name:
            raise InvalidArgumentError(f"checkpoint {path} was trained with --method {ckpt['method']['name']}, not "
                                       f"{self.method.name}; resume with the same method")
        trained = ckpt["config"].get("model")
        if trained != self.cfg.model:
            raise InvalidArgumentError(f"checkpoint {path} was trained as --model {trained}, this run is --model "
                                       f"{self.cfg.model}; resume with the checkpoint's model")
        if ckpt.get("classes") and list(ckpt["classes"]) != self.classes:
            raise InvalidArgumentError(f"checkpoint {path} was trained on the classes {name_list(ckpt['classes'])}, "
                                       f"this run's data has {name_list(self.classes)}; resume on the same data")
        _load_weights(self.model, ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None:
            if ckpt["ema"] is None:
                raise InvalidArgumentError(f"checkpoint {path} has no EMA weights; resume without --ema")
            self.ema.module.load_state_dict(ckpt["ema"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.method.load_state_dict(ckpt["method"])
        self.history = list(ckpt["history"])
        self.start_epoch = int(ckpt["epoch"])
        _set_rng_state(ckpt["rng"])

    # ------------------------------------------------------------------ loop
    def _run_eval(self, model: nn.Module, **forward_kwargs) -> dict:
        return self.task.evaluate(model, self.eval_loader, self.device, self.dist, self.autocast, **forward_kwargs)

    def train_one_epoch(self, epoch: int) -> dict:
        cfg, net = self.cfg, self.net
        net.train()
        self.sampler.set_epoch(epoch)
        steps = len(self.train_loader)
        loss_sum, seen = torch.zeros((), device=self.device), 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and self.verbose and self.dist.is_main), dynamic_ncols=True)
        t0 = time.perf_counter()
        for i, (images, targets) in enumerate(bar):
            self.method.on_step(epoch + i / steps)
            images, targets = self.task.batch(images, targets, self.device)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.method.forward_backward(net, images, targets, self.criterion, self.autocast, self.backward)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {i}; lower --lr-base (or --lr) "
                                         "or set --clip-grad")
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            updates = epoch * steps + i + 1
            if self.ema is not None:
                self.ema.update(self.model, step=updates)
            self.scheduler.step_update(num_updates=updates)
            loss_sum += loss * len(images)
            seen += len(images)
            if i % 10 == 0 and bar.format_dict.get("elapsed"):
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        loss_total, seen_total = all_reduce_sum([loss_sum.item(), seen], self.device, self.dist)
        return {"train_loss": loss_total / seen_total, "train_time_s": seconds,
                "images_per_s": seen_total / seconds}

    def fit(self, stop_after: int | None = None) -> dict:
        """Train from the current epoch to ``cfg.epochs`` (or only up to epoch ``stop_after``, leaving a
        checkpoint to resume from, as if the job had been stopped there). Returns the summary."""
        cfg = self.cfg
        fresh = self.dist.is_main and not self.run_dir.exists()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self._start_log()
        try:
            return self._fit(stop_after)
        except BaseException:
            if fresh and not (self.run_dir / "last.pth").exists():  # failed before its first epoch: nothing to keep
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _fit(self, stop_after: int | None) -> dict:
        cfg = self.cfg
        counted = self.task.macs_module(self.model)  # a detector: its backbone (what a method changes)
        inference_macs = measure.macs(counted, self.input_size)
        baseline_macs, baseline = self.method.baseline_macs(counted, self.input_size)
        for epoch in range(self.start_epoch, min(cfg.epochs, stop_after or cfg.epochs)):
            self.method.on_epoch_start(epoch)
            record = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                      "train_macs": self.method.train_macs(counted, self.input_size)}
            record.update(self.train_one_epoch(epoch))
            record.update(self.method.log())
            record.update(self.task.log())
            self.scheduler.step(epoch + 1)
            last = epoch + 1 == cfg.epochs
            if last or (epoch + 1) % cfg.eval_every == 0:
                t0 = time.perf_counter()
                record.update(self.method.evaluate(self.model, self._run_eval))
                if self.ema is not None:
                    ema = self.method.evaluate(self.ema.module, self._run_eval)
                    record.update({k.replace("top1", "top1_ema", 1) if k.startswith("top1") else f"{k}_ema": v
                                   for k, v in ema.items()})
                record["eval_time_s"] = time.perf_counter() - t0
            record["elapsed_train_s"] = record["train_time_s"] + (self.history[-1]["elapsed_train_s"]
                                                                  if self.history else 0.0)
            best = self._best()
            self.history.append(record)
            self.start_epoch = epoch + 1  # a later fit() continues from here (the demo alternates two runs)
            if self.dist.is_main:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                state = self.state_dict(epoch + 1)
                save_atomic(state, self.run_dir / "last.pth")
                metric = self.task.metric
                if metric in record and (best is None or record[metric] > best):
                    save_atomic(state, self.run_dir / "best.pth")  # the best evaluated epoch so far
                if self.verbose:
                    self._print_epoch(record)
            barrier(self.dist)
        summary = summarize(self.history, inference_macs, baseline_macs, baseline, self.task.metric)
        summary["run_dir"], summary["classes"] = str(self.run_dir), self.classes
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _best(self) -> float | None:
        """The best evaluated ``metric`` of the epochs so far (resumed ones included), None before any."""
        scores = [r[self.task.metric] for r in self.history if self.task.metric in r]
        return max(scores) if scores else None

    def _print_epoch(self, record: dict) -> None:
        """With progress bars, the epoch's whole record; without, one short line."""
        if self.cfg.progress:
            tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))
            return
        scores = "".join(f"  {k} {record[k]:.2f}" for k in (self.task.metric, f"{self.task.metric}_ema") if k in record)
        print(f"epoch {record['epoch'] + 1}/{self.cfg.epochs}  loss {record['train_loss']:.4f}{scores}  "
              f"{record['train_time_s']:.1f} s  {record['images_per_s']:.0f} img/s", flush=True)

    def _start_log(self) -> None:
        """Make ``metrics.jsonl`` hold this run's history only: the epochs a resumed run carries over, nothing
        for a fresh one (whose folder :func:`run_folder` chose unused)."""
        log, done = self.run_dir / "metrics.jsonl", self.run_dir / "summary.json"
        log.write_text("".join(json.dumps(record) + "\n" for record in self.history))
        done.unlink(missing_ok=True)  # written again when this run finishes


def _warn_warmup_epochs(cfg: TrainConfig, updates: int, images: int, peak: float, processes: int = 1) -> None:
    """Warn when the warm-up trains whole epochs at its start: an epoch of a single optimizer step (few images for
    the batch; drop_last) runs at the rate timm's linear warm-up gives that update, and its first is always
    ``--warmup-lr``. The schedule itself stays timm's, update for update (what timm's train.py does with these
    flags, and what a resumed run continues): a rule of our own for short epochs would make a recipe mean another
    curve on other data. The warning says what the run gets and the two ways out."""
    if updates != 1 or not cfg.warmup_epochs:
        return
    # timm's warm-up: update t (here epoch t + 1) of the first warmup_epochs * updates runs at this rate
    rates = [cfg.warmup_lr + t * (peak - cfg.warmup_lr) / cfg.warmup_epochs
             for t in range(math.ceil(cfg.warmup_epochs))]
    epochs = "epoch 1" if len(rates) == 1 else f"epochs 1-{len(rates)}"
    shown = ", ".join(f"{r:.2g}" for r in rates[:4]) + (", ..." if len(rates) > 4 else "")
    per = " per process" if processes > 1 else ""
    left = images - cfg.batch_size * processes  # drop_last: the partial batch is not trained on
    dropped = f", {left} left out each epoch" if left else ""
    warnings.warn(f"each epoch is one optimizer step ({images} training images in batches of {cfg.batch_size}{per}"
                  f"{dropped}): the warm-up of {cfg.warmup_epochs:g} epoch"
                  f"{'' if cfg.warmup_epochs == 1 else 's'} trains {epochs} at "
                  f"{shown} (peak {peak:.2g}); lower --batch-size for more steps per epoch, or pass --warmup-epochs 0 "
                  "to start at the peak", TokenthriftWarning, stacklevel=3)


RUN_RECORDS = ("metrics.jsonl", "summary.json", "last.pth", "config.yaml")


def run_folder(wanted: Path, reuse: bool) -> Path:
    """The folder a run writes: ``wanted``, or, when a fresh run would land on another run's records, the
    first free ``wanted-1``, ``wanted-2``, ... (timm's output folders do the same), with a warning that says
    where the new run went. A resumed run (or one told to ``overwrite``) writes ``wanted``."""
    if reuse or not any((wanted / name).exists() for name in RUN_RECORDS):
        return wanted
    n = 1
    while any((wanted.with_name(f"{wanted.name}-{n}") / name).exists() for name in RUN_RECORDS):
        n += 1
    chosen = wanted.with_name(f"{wanted.name}-{n}")
    resume = (f", or --resume {wanted / 'last.pth'} to continue the old run" if (wanted / "last.pth").exists()
              else " (it has no last.pth to resume from)")
    warnings.warn(f"run folder {wanted} already holds a run, which is kept; this run writes {chosen}. Pass --name "
                  f"for a folder of your choice{resume}", TokenthriftWarning, stacklevel=3)
    return chosen


def save_atomic(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``: a kill or a full disk
    mid-write leaves the previous checkpoint whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def summarize(history: list[dict], inference_macs: float, baseline_macs: float, baseline: str,
              metric: str = "top1") -> dict:
    """Final and best ``metric`` (top-1, or box AP for detection), total training wall-clock, the trained
    model's inference MACs, and the mean training-forward MACs per image as a ratio to ``baseline_macs``
    (what ``baseline`` names)."""
    evaluated = [r for r in history if metric in r]
    mean_macs = sum(r["train_macs"] for r in history) / len(history)
    out = {
        "epochs": len(history),
        "metric": metric,
        metric: evaluated[-1][metric] if evaluated else math.nan,
        f"best_{metric}": max(r[metric] for r in evaluated) if evaluated else math.nan,
        "train_time_s": sum(r["train_time_s"] for r in history),
        "mean_train_macs": mean_macs,
        "inference_macs": inference_macs,
        "baseline_macs": baseline_macs,
        "baseline": baseline,
        "macs_ratio": mean_macs / baseline_macs,
        "history": history,
    }
    ema = "top1_ema" if metric == "top1" else f"{metric}_ema"
    if evaluated and ema in evaluated[-1]:
        out[ema] = evaluated[-1][ema]
    return out


def train(cfg: TrainConfig, verbose: bool = True) -> dict:
    """Train with ``cfg`` and return the summary (also written to ``<run_dir>/summary.json``); ``verbose``:
    see :class:`Trainer`."""
    trainer = Trainer(cfg, verbose=verbose)
    try:
        return trainer.fit()
    finally:
        shutdown(trainer.dist)


def load_trained(checkpoint: str | Path, ema: bool = False, device: str = "cpu") -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model of a tokenthrift checkpoint (model or EMA weights, with its method's structure;
    training-only patches such as ToE are inactive in eval mode) and its config."""
    model, cfg, _ = load_run(checkpoint, ema, device)
    return model, cfg


def load_run(checkpoint: str | Path, ema: bool = False, device: str = "cpu") -> tuple[nn.Module, TrainConfig, Method]:
    """:func:`load_trained`, and the run's method adapter as restored from the checkpoint (what owns the
    model's inference side: :func:`~tokenthrift.train.methods.inference_method`)."""
    ckpt = read_checkpoint(checkpoint, device)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(k for k in ckpt["config"] if k not in known and method_key(k) is None)
    if unknown:
        raise InvalidArgumentError(f"checkpoint {checkpoint} was written with options this tokenthrift does not know "
                                   f"({', '.join(unknown)}; tokenthrift {ckpt['versions'].get('tokenthrift', '?')}); "
                                   "upgrade tokenthrift")
    cfg = TrainConfig.from_saved(ckpt["config"])  # any release's: options of other methods than the run's dropped
    method = method_class(cfg.method).restore(cfg, ckpt["method"])
    method.trained = True  # its variants are of a model trained with it (labels say so)
    # the checkpoint holds the weights: never fetch the pretrained ones the run started from
    model = method.attach(method.create_model(dataclasses.replace(cfg, pretrained=False, init_backbone=None,
                                                                  initial_checkpoint=None)))
    weights = ckpt["ema"] if ema else ckpt["model"]
    if weights is None:
        raise InvalidArgumentError(f"checkpoint {checkpoint} has no EMA weights; it was trained without --ema")
    _load_weights(model, weights, checkpoint)
    set_model_classes(model, ckpt.get("classes"))
    return model.to(device).eval(), cfg, method


def _load_weights(model: nn.Module, weights: dict, path: str | Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # missing or unexpected keys, shapes that differ
        first = str(err).splitlines()[0]
        raise InvalidArgumentError(f"the weights in {path} do not fit the model its config describes ({first}); the "
                                   "file was edited or comes from another model") from err
