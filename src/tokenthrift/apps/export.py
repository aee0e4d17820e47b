"""``tokenthrift export``: a model as a ``torch.export`` program (``.pt2``) or ONNX (``.onnx``, the dynamo
exporter), checked against the eager model on inputs it was not traced with, the difference printed.

The legacy TorchScript-based ONNX exporter (``legacy=True``, ``--legacy``) is checked the same way. The token
merges sum with ``scatter_add``, which both exporters write as a ``ScatterElements`` that adds repeated indices
(the ``index_add_`` they used before became one without reduction in the legacy file: wrong logits). For LTM
models the legacy exporter is refused: its file fails onnxruntime's shape inference at batch sizes above one.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import ltm
from ..errors import InvalidArgumentError, MissingFileError, UnsupportedModelError

__all__ = ["FORMATS", "TOLERANCE", "FixedForward", "export"]

FORMATS = (".pt2", ".onnx")
TOLERANCE = 1e-4  # max |exported - eager| on the logits


class FixedForward(nn.Module):
    """``model(x, **forward_kwargs)`` as a one-input module (e.g. a ReViT at one grid) for the exporters."""

    def __init__(self, model: nn.Module, **forward_kwargs):
        super().__init__()
        self.model, self.forward_kwargs = model, forward_kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, **self.forward_kwargs)


def _check_onnx(path: Path, inputs: list[torch.Tensor], eager: list[torch.Tensor]) -> float:
    try:
        import onnxruntime
    except ImportError as err:
        raise MissingFileError("checking an ONNX file needs onnxruntime: pip install 'tokenthrift[export]'") from err
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return max(float((torch.from_numpy(session.run(None, {name: x.numpy()})[0]) - y).abs().max())
               for x, y in zip(inputs, eager))


def export(model: nn.Module, input_size: tuple[int, ...], out: str | Path, batch_size: int = 2,
           legacy: bool = False, tolerance: float = TOLERANCE, **forward_kwargs) -> dict:
    """Export ``model`` (eval mode; ``forward_kwargs`` fixed, e.g. ``grid=10``) for inputs
    (``batch_size``, *input_size) to ``out`` (``.pt2``: torch.export; ``.onnx``: the dynamo exporter, or the
    legacy one with ``legacy=True``), reload it, and compare with the eager model on two random batches that
    were not the tracing example. Returns {"file", "format", "max_abs_diff", "tolerance"}; raises if the
    difference exceeds ``tolerance``."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise InvalidArgumentError(f"--out {out}: the file name says the format, {' or '.join(FORMATS)}")
    if legacy and out.suffix != ".onnx":
        raise InvalidArgumentError("--legacy picks the TorchScript-based ONNX exporter; it applies to .onnx only")
    if legacy and ltm.is_ltm(model):
        raise UnsupportedModelError("the legacy ONNX exporter (dynamo=False) writes LTM's merge so that onnxruntime "
                                    "rejects the file at batch sizes above one; drop --legacy (the default dynamo "
                                    "exporter is exact) or export to .pt2")
    model = model.eval()
    net = FixedForward(model, **forward_kwargs).eval()
    gen = torch.Generator().manual_seed(0)
    example, *checks = [torch.randn(batch_size, *input_size, generator=gen) for _ in range(3)]
    with torch.no_grad():
        eager = [net(x) for x in checks]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt2":
        program = torch.export.export(net, (example,))
        torch.export.save(program, str(out))
        loaded = torch.export.load(str(out)).module()
        with torch.no_grad():
            diff = max(float((loaded(x) - y).abs().max()) for x, y in zip(checks, eager))
    else:
        torch.onnx.export(net, (example,), str(out), dynamo=not legacy, input_names=["images"],
                          output_names=["logits"])
        diff = _check_onnx(out, checks, eager)
    result = {"file": str(out), "format": ("onnx (legacy)" if legacy else "onnx") if out.suffix == ".onnx"
              else "torch.export", "max_abs_diff": diff, "tolerance": tolerance}
    if not diff <= tolerance:
        raise UnsupportedModelError(f"the exported {out.name} differs from the eager model by {diff:.3g} (more than "
                                    f"{tolerance:g}); do not deploy it")
    return result
