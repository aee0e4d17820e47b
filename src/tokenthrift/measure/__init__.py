"""Honest measurement: MACs of the forward that actually runs, analytic ViT MACs, throughput.

Rules (docs/methods.md §1): "FLOPs" in this field are MACs; count with ``FlopCounterMode`` (total / 2) on the real
forward, including every attention kernel it does not know and the method's own overhead; report
throughput as the median images/s after warm-up and always as a ratio against a baseline measured in the
same run.

One concept per module, every name re-exported here (``tokenthrift.measure.macs`` and
``from tokenthrift.measure import macs`` are the ways to use them):

- :mod:`.counting`: MACs counting (:func:`macs`, :func:`vit_macs`, :class:`UncountedOpError`).
- :mod:`.timing`: throughput (:func:`throughput`, :func:`throughput_samples`, :func:`paired_throughput`),
  the wrappers the timers take (:class:`FixedForward`, :class:`OnImages`) and :func:`run_metadata`.
- :mod:`.oracle`: the same-shape oracle (:func:`block_token_counts`, :class:`TokenCutOracle`) and
  :func:`merge_agreement`.
- :mod:`.state`: module state helpers (:func:`training_mode`, :func:`frozen`, :func:`device_of`,
  :func:`model_input_shape`, :func:`module_modes`, :func:`restore_modes`).
- :mod:`.rows`: table rows (:func:`merging_speed_rows`, :func:`detector_macs_rows`).

Functions call each other through their own modules: replacing a name here (a test's ``monkeypatch.setattr``)
changes what callers outside the package get, not what, say, :func:`merging_speed_rows` calls.
"""
from __future__ import annotations

from . import counting, state, timing
from .counting import UncountedOpError, macs, vit_macs
from .oracle import TokenCutOracle, block_token_counts, merge_agreement
from .rows import detector_macs_rows, merging_speed_rows
from .state import device_of, frozen, model_input_shape, module_modes, restore_modes, training_mode
from .timing import (
                     FixedForward,
                     OnImages,
                     paired_throughput,
                     run_metadata,
                     throughput,
                     throughput_samples,
)

__all__ = ["FixedForward", "OnImages", "TokenCutOracle", "UncountedOpError", "block_token_counts",
           "detector_macs_rows", "device_of", "frozen", "macs", "merge_agreement", "merging_speed_rows",
           "model_input_shape", "module_modes", "paired_throughput", "restore_modes", "run_metadata", "throughput",
           "throughput_samples", "training_mode", "vit_macs"]

# The private names the one-module measure had, still reachable as tokenthrift.measure._NAME. Rebinding one here
# changes nothing inside the package; _EXTRA_FLOPS is the counter's own dict, so a formula added to it counts.
_EXTRA_FLOPS, _HEAVY, _OpRecorder = counting._EXTRA_FLOPS, counting._HEAVY, counting._OpRecorder
_sdpa_forward, _sdpa_backward, _cdist = counting._sdpa_forward, counting._sdpa_backward, counting._cdist
_frozen = state._frozen
_sync, _timed = timing._sync, timing._timed
