"""Checkpoint files: what a run's ``last.pth`` holds, and reading one with errors that name the file and say
what is wrong (not a checkpoint at all, truncated, someone else's, written by a newer tokenthrift).

Every checkpoint records ``format`` (:data:`FORMAT`), ``format_version`` (:data:`FORMAT_VERSION`) and the
``versions`` of tokenthrift, torch, timm and Python that wrote it; checkpoints from before the format was
recorded read as version 0.
"""
from __future__ import annotations

import json
import os
import pickle
import platform
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import timm
import torch

from .._version import __version__
from ..errors import InvalidArgumentError, MissingFileError

__all__ = ["FORMAT", "FORMAT_VERSION", "check_writable", "export_weights", "read_checkpoint", "read_weights", "stamp",
           "versions"]

FORMAT = "tokenthrift.checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("config", "model", "method", "epoch")


def versions() -> dict:
    return {"tokenthrift": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def stamp(state: dict) -> dict:
    """``state`` with the format, its version and the library versions that write it."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **state}


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a tokenthrift checkpoint, or raise one clear error naming ``path`` and the problem."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as err:
        raise InvalidArgumentError(f"{path} is not a tokenthrift checkpoint (torch cannot read it: {err}); give the "
                                   "last.pth of a tokenthrift run") from err
    except RuntimeError as err:  # torch's zip reader: a file cut short, or a damaged one
        raise InvalidArgumentError(f"checkpoint {path} is truncated or damaged ({err}); was it copied while a run was "
                                   "still writing it? Use a complete last.pth") from err
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in REQUIRED):
        what = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"a dict with keys {sorted(ckpt)[:6]}"
        raise InvalidArgumentError(f"{path} is not a tokenthrift checkpoint: it holds {what}, not a run's "
                                   f"{', '.join(REQUIRED)} (to load plain weights into a model, use "
                                   "model.load_state_dict)")
    version = int(ckpt.get("format_version", 0))
    if ckpt.get("format", FORMAT) != FORMAT:
        raise InvalidArgumentError(f"{path} is a {ckpt['format']!r} file, not a tokenthrift checkpoint")
    if version > FORMAT_VERSION:
        writer = ckpt.get("versions", {}).get("tokenthrift", "a newer version")
        raise InvalidArgumentError(f"checkpoint {path} was written by tokenthrift {writer} in format version "
                                   f"{version}; this tokenthrift reads up to version {FORMAT_VERSION}: upgrade it")
    ckpt.setdefault("format_version", version)
    ckpt.setdefault("versions", {})
    return ckpt


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A model's state dict from a tokenthrift checkpoint (its model weights), a ``.safetensors`` file (e.g.
    the shipped pretrained weights) or a plain state dict saved with ``torch.save`` (also under a
    ``state_dict`` or ``model`` key, as other training scripts write them)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError for a damaged header
            raise InvalidArgumentError(f"{path} is not a readable safetensors file ({err})") from err
    try:
        return read_checkpoint(path)["model"]
    except InvalidArgumentError:
        try:
            plain = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise InvalidArgumentError(f"{path} holds no model weights: give a tokenthrift last.pth, a .safetensors "
                                       "file or a state dict saved with torch.save") from None
    for key in ("state_dict", "model"):
        if isinstance(plain, dict) and isinstance(plain.get(key), dict):
            plain = plain[key]
    if not isinstance(plain, dict) or not plain or not all(isinstance(v, torch.Tensor) for v in plain.values()):
        raise InvalidArgumentError(f"{path} holds no state dict (a dict of tensors); give a tokenthrift last.pth, a "
                                   ".safetensors file or a state dict saved with torch.save")
    return plain


def export_weights(checkpoint: str | Path, out: str | Path, model_name: str, command: str) -> dict:
    """Ship a finished run as a package model: the better of the checkpoint's model and EMA weights (by their last
    top-1) as ``out`` (.safetensors), the run's training log beside it (.jsonl, from the checkpoint's folder) and
    a summary (.json: which weights, top-1 of both, epochs, the run's config and ``command``). Returns the summary."""
    from safetensors.torch import save_file

    checkpoint, out = Path(checkpoint), Path(out)
    ckpt = read_checkpoint(checkpoint)
    if not ckpt.get("history"):
        raise InvalidArgumentError(f"{checkpoint} has no finished epoch to export")
    last = ckpt["history"][-1]
    use_ema = ckpt.get("ema") is not None and last.get("top1_ema", -1) >= last.get("top1", -1)
    weights = ckpt["ema"] if use_ema else ckpt["model"]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out))
    log = checkpoint.with_name("metrics.jsonl")
    if log.exists():
        shutil.copyfile(log, out.with_suffix(".jsonl"))
    planned = ckpt["config"]["epochs"]
    summary = {"model": model_name, "weights": "EMA" if use_ema else "model", "epochs": len(ckpt["history"]),
               "epochs_planned": planned, "finished": len(ckpt["history"]) == planned,
               "top1": last["top1_ema"] if use_ema else last["top1"], "top1_model": last["top1"],
               "top1_ema": last.get("top1_ema"), "test_images": ckpt["config"].get("eval_subset") or "all",
               "config": ckpt["config"], "command": command, "date": time.strftime("%Y-%m-%d")}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return summary


def check_writable(path: str | Path, flag: str, directory: bool = True) -> None:
    """Raise one clear error, before any work, if ``path`` (a folder to write into, or with ``directory=False``
    a file to write) cannot be written: a file where a folder should be, or a nearest existing folder that
    refuses a new file (permissions, a read-only file system). Creates nothing: a probe file is written into
    that nearest existing folder and removed."""
    path = Path(path)
    folder = path if directory else path.parent
    if directory and path.exists() and not path.is_dir():
        raise InvalidArgumentError(f"{flag}: {path} is a file, not a folder; pick another path")
    if not directory and path.is_dir():
        raise InvalidArgumentError(f"{flag}: {path} is a folder; give a file name")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidArgumentError(f"{flag}: cannot create {folder}: {existing} is a file; pick another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise InvalidArgumentError(f"{flag}: cannot write to {existing} ({err.strerror or err}); pick a folder you "
                                   "can write to") from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"{flag}: cannot write to {existing} (permission denied); pick a folder you can "
                                   "write to")

