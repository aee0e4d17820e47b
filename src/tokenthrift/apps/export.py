"""``tokenthrift export``: a model as a ``torch.export`` program (``.pt2``) or ONNX (``.onnx``, the dynamo
exporter), with a dynamic batch dimension, checked against the eager model at batch 1, 3 and 17 on inputs it
was not traced with, the difference printed. The class names and the input the model expects travel in the
file (:func:`read_metadata`).

The legacy TorchScript-based ONNX exporter (``legacy=True``, ``--legacy``) is checked the same way. The token
merges sum with ``scatter_add``, which both exporters write as a ``ScatterElements`` that adds repeated indices
(the ``index_add_`` they used before became one without reduction in the legacy file: wrong logits). For LTM
models the legacy exporter is refused. A model whose file cannot take any batch size (ToMe through the legacy
exporter: its traced reshapes keep the tracing batch) is exported at one fixed batch instead, and the result
says so and names it.

``tokenthrift export`` (:func:`run`) exports a trained checkpoint as it was trained, or a model built from a recipe
and flags with a previewed method, one of its variants (``--variant``).
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidArgumentError, MissingFileError, UnsupportedModelError
from ..measure import FixedForward
from .common import model_flags, resolve_model

__all__ = ["CHECK_BATCHES", "FORMATS", "METADATA_KEY", "TOLERANCE", "FixedForward", "export", "read_metadata"]

FORMATS = (".pt2", ".onnx")
TOLERANCE = 1e-4  # max |exported - eager| on the logits
CHECK_BATCHES = (1, 3, 17)  # a dynamic export is checked at these batch sizes (none of them the tracing one)
TRACE_BATCH = 2  # the tracing example of a dynamic export (1 would specialise the batch dimension)
MAX_BATCH = 1 << 16
METADATA_KEY = "tokenthrift.json"  # ONNX metadata_props key / .pt2 extra file: label_names, input_size, mean, std


def _onnx_session(path: Path):
    try:
        import onnxruntime
    except ImportError as err:
        raise MissingFileError("checking an ONNX file needs onnxruntime: pip install 'tokenthrift[export]'") from err
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failure comes back as the exception, which the check reports
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _write(net: nn.Module, example: torch.Tensor, out: Path, legacy: bool, dynamic: bool, metadata: dict) -> None:
    """Export ``net`` traced on ``example`` to ``out``, the batch dimension dynamic or fixed, ``metadata`` inside."""
    text = json.dumps(metadata)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if out.suffix == ".pt2":
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},) if dynamic else None)
        torch.export.save(program, str(out), extra_files={METADATA_KEY: text})
        return
    if legacy:
        axes = {"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
        with warnings.catch_warnings():  # the tracer's doubts about Python values: the check against eager answers them
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", "Constant folding", UserWarning)
            torch.onnx.export(net, (example,), str(out), dynamo=False, input_names=["images"],
                              output_names=["logits"], dynamic_axes=axes)
    else:
        torch.onnx.export(net, (example,), str(out), dynamo=True, input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: batch},) if dynamic else None)
    import onnx

    proto = onnx.load(str(out))
    del proto.metadata_props[:]
    proto.metadata_props.add(key=METADATA_KEY, value=text)
    onnx.save(proto, str(out))


def _loaded(out: Path):
    """The exported file as a callable on CPU tensors."""
    if out.suffix == ".pt2":
        module = torch.export.load(str(out)).module()
        return lambda x: module(x)
    return _onnx_session(out)


def _max_diff(run, net: nn.Module, inputs: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return max(float((run(x) - net(x)).abs().max()) for x in inputs)


def read_metadata(path: str | Path) -> dict:
    """What :func:`export` stored in a ``.pt2`` or ``.onnx`` file: ``label_names`` (the class of every output, or
    None), ``input_size``, ``mean`` / ``std`` (the normalisation the model expects, or None), ``batch`` ("dynamic"
    or the fixed batch size)."""
    path = Path(path)
    if path.suffix == ".pt2":
        files = {METADATA_KEY: ""}
        torch.export.load(str(path), extra_files=files)
        text = files[METADATA_KEY]
    else:
        import onnx

        text = next((p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
                     if p.key == METADATA_KEY), "")
    if not text:
        raise InvalidArgumentError(f"{path} holds no tokenthrift metadata: it was not written by tokenthrift export")
    return json.loads(text)


def export(model: nn.Module, input_size: tuple[int, ...], out: str | Path, batch_size: int | None = None,
           legacy: bool = False, tolerance: float = TOLERANCE, label_names=None, mean=None, std=None,
           **forward_kwargs) -> dict:
    """Export ``model`` (eval mode; ``forward_kwargs`` fixed, e.g. ``grid=10``) for inputs (B, *input_size) to
    ``out`` (``.pt2``: torch.export; ``.onnx``: the dynamo exporter, or the legacy one with ``legacy=True``),
    reload it and compare it with the eager model on random inputs it was not traced with.

    By default the batch dimension is dynamic and the check runs at :data:`CHECK_BATCHES` (1, 3 and 17); if
    the file cannot take them, it is exported again at a fixed batch (:data:`TRACE_BATCH`) and checked there,
    and ``batch`` in the result names it (``dynamic_error`` says why). ``batch_size=N`` asks for a fixed batch
    of N. ``label_names`` (one per output), ``mean`` and ``std`` are stored in the file (:func:`read_metadata`).
    Returns {"file", "format", "batch", "checked_batches", "max_abs_diff", "tolerance"}; raises if the
    difference exceeds ``tolerance``."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise InvalidArgumentError(f"--out {out}: the file name says the format, {' or '.join(FORMATS)}")
    if legacy and out.suffix != ".onnx":
        raise InvalidArgumentError("--legacy picks the TorchScript-based ONNX exporter; it applies to .onnx only")
    if batch_size is not None and batch_size < 1:
        raise InvalidArgumentError(f"--batch-size {batch_size}: a fixed batch of at least 1 (or leave it out: dynamic)")
    outputs = getattr(model, "num_classes", None)
    if label_names is not None and outputs is not None and len(label_names) != outputs:
        raise InvalidArgumentError(f"{len(label_names)} label names for a model with {outputs} outputs")
    model = model.eval()
    net = FixedForward(model, **forward_kwargs).eval()
    gen = torch.Generator().manual_seed(0)

    def inputs(*batches: int) -> list[torch.Tensor]:
        return [torch.randn(b, *input_size, generator=gen) for b in batches]

    metadata = {"label_names": list(label_names) if label_names is not None else None,
                "input_size": list(input_size), "mean": list(mean) if mean else None,
                "std": list(std) if std else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    dynamic_error = None
    if batch_size is None:
        try:
            _write(net, inputs(TRACE_BATCH)[0], out, legacy, True, {**metadata, "batch": "dynamic"})
            checks = list(CHECK_BATCHES)
            diff = _max_diff(_loaded(out), net, inputs(*checks))
        except Exception as err:  # the exporter or the runtime refused other batch sizes: fall back, and say so
            dynamic_error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    if batch_size is not None or dynamic_error is not None:
        fixed = batch_size or TRACE_BATCH
        _write(net, inputs(fixed)[0], out, legacy, False, {**metadata, "batch": fixed})
        checks = [fixed, fixed]  # two fresh batches of the one size the file takes
        diff = _max_diff(_loaded(out), net, inputs(*checks))
    kind = ("onnx (legacy)" if legacy else "onnx") if out.suffix == ".onnx" else "torch.export"
    result = {"file": str(out), "format": kind, "batch": "dynamic" if batch_size is None and dynamic_error is None
              else f"fixed at {checks[0]}", "checked_batches": " ".join(map(str, dict.fromkeys(checks))),
              "max_abs_diff": diff, "tolerance": tolerance}
    if dynamic_error is not None:
        result["dynamic_error"] = dynamic_error
    if not diff <= tolerance:
        raise UnsupportedModelError(f"the exported {out.name} differs from the eager model by {diff:.3g} (more than "
                                    f"{tolerance:g}) at batch {result['checked_batches']}; do not deploy it")
    return result


HELP = "a model as torch.export (.pt2) or ONNX (.onnx), checked against eager: the difference is printed"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output file: .pt2 (torch.export) or .onnx (the dynamo exporter)")
    p.add_argument("--checkpoint", help="a tokenthrift last.pth (else a timm model from the flags below)")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights")
    model_flags(p, "export", "take the model settings from a recipe", pretrained=True,
                what="apply this method (with its flags below) before exporting: ")
    p.add_argument("--variant", help="which of the model's variants to export (as tokenthrift eval lists them: the "
                                     "label or its number, e.g. a ReViT grid; default: the first)")
    p.add_argument("--batch-size", type=int, help="export for this one batch size instead of any (default: a dynamic "
                                                   "batch dimension, checked at batch 1, 3 and 17)")
    p.add_argument("--legacy", action="store_true", help="the TorchScript-based ONNX exporter instead of the dynamo "
                                                         "one (checked the same way; refused for methods it writes "
                                                         "wrong)")


def run(args: argparse.Namespace) -> None:
    """Export the chosen variant and print its MACs, the check against eager and what the file stores."""
    from ..data import model_classes, model_preprocess, name_list
    from ..train.build import run_normalisation
    from ..train.checkpoint import check_writable
    from . import report

    check_writable(args.out, "--out", directory=False)
    shown = resolve_model(args, doing="exported")
    method, variants = shown.method, shown.variants()
    if shown.trained:  # the normalisation the run trained with
        mean, std = run_normalisation(shown.cfg)
    else:  # timm's for --pretrained weights; an untrained model expects nothing in particular
        pre = model_preprocess(shown.model) if shown.cfg.pretrained else None
        mean, std = (pre.mean, pre.std) if pre is not None else (None, None)
    chosen = _variant(variants, args.variant)
    if args.legacy and not method.legacy_onnx:
        raise InvalidArgumentError(f"the legacy ONNX exporter (dynamo=False) does not write --method {method.name} "
                                   "models right (onnxruntime rejects the file at batch sizes above one); drop "
                                   "--legacy (the default dynamo exporter is exact) or export to .pt2")
    names = model_classes(chosen.model)
    result = export(chosen.model, shown.size, args.out, batch_size=args.batch_size, legacy=args.legacy,
                    label_names=names, mean=mean, std=std, **chosen.kwargs)
    reason = result.pop("dynamic_error", None)
    print(f"{chosen.label}: {chosen.macs / 1e9:.4g} GMACs per image")
    print(report.table([{**result, "max_abs_diff": f"{result['max_abs_diff']:.2e}",
                         "tolerance": f"{result['tolerance']:.0e}"}]))
    if reason:
        print(f"this file takes batches of {result['batch'].split()[-1]} images only: an export with a dynamic batch "
              f"failed ({reason}); export to .pt2 or drop --legacy for any batch size")
    shown_names = (f"{len(names)} class names ({name_list(names, 4)})" if names
                   else "no class names (the model records none)")
    print(f"stored in the file: {shown_names}, the input size{' and normalisation' if mean else ''} "
          "(tokenthrift.apps.export.read_metadata)")


def _variant(variants, wanted: str | None, flag: str = "--variant"):
    """The variant named ``wanted`` (its label, or its index in ``eval``'s order); the first by default."""
    if wanted is None:
        return variants[0]
    for k, v in enumerate(variants):
        if wanted in (v.label, str(k)):
            return v
    listed = "; ".join(f"{k}: {v.label}" for k, v in enumerate(variants))
    raise InvalidArgumentError(f"{flag} {wanted}: this model runs as {listed} (give the label or the number)")
