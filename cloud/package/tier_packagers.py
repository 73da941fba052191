"""Per-tier packagers: one model version -> an artifact each tier's real runtime runs.

============  =======================================================================
tier          artifact (``edgeloop.cloud.package.quantize`` makes the model files)
============  =======================================================================
gpu-server    ONNX fp32 (+ fp16 where the graph converts), each with a Triton
              ``config.pbtxt``; the Triton model repository layout is in the manifest
edge-gateway  ONNX int8, static post-training quantization (QDQ, per-channel weights,
              onnxruntime.quantization), calibrated on (at most 256 rows of) the registered
              training data
mobile        LiteRT ``.tflite``, dynamic-range int8 weights (litert-torch +
              ai-edge-quantizer)
mcu           LiteRT ``.tflite`` fully int8 (int8 in and out, int32 bias) that TFLite
              Micro runs, plus ``model_data.h`` (the model as a C byte array)
============  =======================================================================

Models take the feature contract's shape per example (``FeatureSpec.shape``: a flat vector,
an image, a multi-channel time series) and output ``n_outputs`` values per example; every
converter and quantizer gets shaped model inputs ``(n, *shape)``.

Before an artifact is measured, :func:`check_operators` refuses operators its tier's runtime
lacks (by name, saying which ones the converter inserted for the model's layout) and, for int8 ``.tflite`` tiers, any operator left computing in float. Then
:func:`measure` runs it on the runtime the device uses (``edgeloop.device_sdk.runtime``): held-out
accuracy and top-1 agreement with the float model, host latency (p50) scaled by the tier
profile, size and flash; for the mcu tier :func:`tflm_arena_bytes` first finds the smallest
arena TFLM runs the model in (a search in a child process: cloud/package/tflm_arena.py).
:func:`check_budgets` refuses an artifact over any budget, with the numbers.

Errors::

    UserError                 (cloud.errors) bad calibration data, a conversion that failed
    └── DoesNotFit            the artifact cannot ship to its tier
        ├── UnsupportedOperator   an operator the tier's runtime cannot run (named)
        └── BudgetExceeded        over RAM, flash or latency (with the numbers)
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from torch import nn

from edgeloop.contracts.package import ARENA_MIN_SEARCH, Package
from edgeloop.contracts.features import FeatureSpec
from edgeloop.cloud.package import quantize
from edgeloop.cloud.errors import UserError
from edgeloop.cloud.package.export import INPUT_NAME, OUTPUT_NAME
from edgeloop.cloud.package.tflite_passes import fold_layout_transposes
from edgeloop.cloud.package.tiers import TierProfile

__all__ = ["DoesNotFit", "BudgetExceeded", "UnsupportedOperator", "TierArtifact", "convert", "check_operators",
           "measure", "check_budgets", "tflm_arena_bytes", "tflm_arena_measured", "arena_for_tier", "tflm_reported_arena_bytes",
           "triton_config", "captured_output", "MIN_CALIBRATION_ROWS",
           "MAX_CALIBRATION_ROWS", "calibration_rows"]

MIN_CALIBRATION_ROWS = 8
# activation ranges come from at most this many training rows: min/max calibration settles within a few hundred examples (TFLite's guidance is
# 100-500 representative samples), while each row is one interpreter run of the whole graph, so
# calibrating on every training row made the int8 tiers' packaging scale with the dataset
MAX_CALIBRATION_ROWS = 256
TFLM_MEASURE_ARENA = 8 * 1024 * 1024    # generous, so an over-budget model is measured, not just refused


class DoesNotFit(UserError):
    """The artifact cannot ship to its tier; nothing was registered."""


class UnsupportedOperator(DoesNotFit):
    """The artifact uses an operator its tier's runtime cannot run."""


class BudgetExceeded(DoesNotFit):
    """The artifact is over its tier's RAM, flash or latency budget."""


class OutOfTolerance(DoesNotFit):
    """The artifact's outputs stray beyond its tier's tolerance of the float model's."""


@dataclass
class TierArtifact:
    entrypoint: str                          # the model file devices load
    files: dict[str, bytes]                  # package members (golden.json is added later)
    numeric_format: str                      # fp32, int8, dynamic-int8
    layout: dict[str, Any] = field(default_factory=dict)
    operators: list[quantize.Operator] | None = None   # .tflite artifacts only
    folded_transposes: int = 0               # layout TRANSPOSEs folded into FULLY_CONNECTED weights


def triton_config(name: str, input_dims: Sequence[int], output_dims: Sequence[int], dtype: str = "TYPE_FP32") -> bytes:
    """A Triton ``config.pbtxt`` for the ONNX model: ``input_dims`` and ``output_dims`` are the
    per-example shapes (no batch axis; Triton adds it, up to ``max_batch_size``)."""
    def dims(shape: Sequence[int]) -> str:
        return ", ".join(str(int(d)) for d in shape)

    return (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 64\n'
            f'input [\n  {{ name: "{INPUT_NAME}", data_type: {dtype}, dims: [ {dims(input_dims)} ] }}\n]\n'
            f'output [\n  {{ name: "{OUTPUT_NAME}", data_type: {dtype}, dims: [ {dims(output_dims)} ] }}\n]\n'
            f'instance_group [ {{ kind: KIND_GPU, count: 1 }} ]\n').encode()


# -- conversion, one small function per (runtime, format) ------------------------------------
@dataclass(frozen=True)
class _Job:
    profile: TierProfile
    model: nn.Module
    onnx_bytes: bytes
    calib: np.ndarray          # model inputs (n, *shape): the feature contract applied and reshaped
    name: str
    version: int
    n_outputs: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.calib.shape[1:])


def _onnx_dims(job: _Job) -> tuple[list[int], list[int]]:
    """The exported graph's per-example input and output dims, checked against the feature
    contract's shape and ``n_outputs``. Raises UserError on a mismatch or a non-static dim."""
    import onnx

    graph = onnx.load_from_string(job.onnx_bytes).graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]

    def per_example(value: Any, what: str) -> list[int]:
        dims = list(value.type.tensor_type.shape.dim)[1:]
        if any(not d.HasField("dim_value") for d in dims):
            raise UserError(f"the ONNX model's {what} {value.name!r} has a dynamic axis besides the batch axis")
        return [int(d.dim_value) for d in dims]

    input_dims, output_dims = per_example(inputs[0], "input"), per_example(graph.output[0], "output")
    if tuple(input_dims) != job.input_shape:
        raise UserError(f"the ONNX model takes inputs of shape (batch, {', '.join(map(str, input_dims))}), "
                        f"the feature contract gives (batch, {', '.join(map(str, job.input_shape))})")
    if int(np.prod(output_dims)) != job.n_outputs:
        raise UserError(f"the ONNX model outputs shape (batch, {', '.join(map(str, output_dims))}) per batch, "
                        f"{int(np.prod(output_dims))} values per example, not {job.n_outputs}")
    return input_dims, output_dims


def _gpu_server(job: _Job) -> TierArtifact:
    input_dims, output_dims = _onnx_dims(job)
    files = {"model.onnx": job.onnx_bytes, "config.pbtxt": triton_config(job.name, input_dims, output_dims)}
    triton = {f"{job.name}/config.pbtxt": "config.pbtxt", f"{job.name}/{job.version}/model.onnx": "model.onnx"}
    fp16 = quantize.onnx_fp16(job.onnx_bytes)
    if fp16 is not None:
        files["model_fp16.onnx"] = fp16
        files["config_fp16.pbtxt"] = triton_config(f"{job.name}_fp16", input_dims, output_dims, "TYPE_FP16")
        triton.update({f"{job.name}_fp16/config.pbtxt": "config_fp16.pbtxt",
                       f"{job.name}_fp16/{job.version}/model.onnx": "model_fp16.onnx"})
    return TierArtifact("model.onnx", files, "fp32", {"triton": triton})


def _onnx_int8(job: _Job) -> TierArtifact:
    _onnx_dims(job)
    return TierArtifact("model.onnx", {"model.onnx": quantize.onnx_int8_qdq(job.onnx_bytes, job.calib)}, "int8")


def _tflite(model: bytes, numeric_format: str) -> TierArtifact:
    return TierArtifact("model.tflite", {"model.tflite": model}, numeric_format,
                        operators=quantize.tflite_operators(model))


def _litert_fp32(job: _Job) -> TierArtifact:
    return _tflite(quantize.litert_fp32(job.model, job.input_shape), "fp32")


def _litert_dynamic(job: _Job) -> TierArtifact:
    return _tflite(quantize.litert_dynamic_int8(quantize.litert_fp32(job.model, job.input_shape)), "dynamic-int8")


def _full_int8(job: _Job) -> TierArtifact:
    model = quantize.litert_full_int8(quantize.litert_fp32(job.model, job.input_shape), job.calib)
    if job.profile.runtime != "tflite-micro":
        return _tflite(model, "int8")
    model = quantize.inline_buffers(model)      # TFLM cannot read external buffers (cloud/package/quantize.py)
    # the converter's TRANSPOSE before a flatten into FULLY_CONNECTED costs an MCU a buffer: fold it
    folded = fold_layout_transposes(model)
    artifact = _tflite(folded.model, "int8")
    artifact.folded_transposes = folded.folded
    artifact.files["model_data.h"] = quantize.c_header(folded.model, f"g_{job.name}_model",
                                                       f"{job.name}:{job.version} for {job.profile.name}")
    artifact.layout["c_header"] = "model_data.h"
    return artifact


_PACKAGERS: dict[tuple[str, str], Callable[[_Job], TierArtifact]] = {
    ("onnxruntime", "fp32"): _gpu_server,
    ("onnxruntime", "int8"): _onnx_int8,
    ("litert", "fp32"): _litert_fp32,
    ("litert", "dynamic-int8"): _litert_dynamic,
    ("litert", "int8"): _full_int8,
    ("tflite-micro", "int8"): _full_int8,
}


def convert(profile: TierProfile, model: nn.Module, onnx_bytes: bytes, features: FeatureSpec,
            calib_raw: np.ndarray, name: str, version: int, n_outputs: int) -> TierArtifact:
    """Build the tier's artifact from the float model (PyTorch for .tflite, its ONNX export for
    ONNX), both taking ``(n, *features.shape)`` and giving ``n_outputs`` values per example.
    ``calib_raw`` are raw flat training rows ``(n, n_features)``; at most
    :data:`MAX_CALIBRATION_ROWS` of them calibrate (:func:`calibration_rows`), the feature
    contract applied and the rows reshaped here (``features.model_input``). Raises UserError for bad calibration
    data, a tier with no packager, an ONNX graph whose shapes disagree with the contract, or a
    failed conversion."""
    packager = _PACKAGERS.get((profile.runtime, profile.format))
    if packager is None:
        raise UserError(f"tier {profile.name}: no packager for runtime {profile.runtime} with format "
                        f"{profile.format}; packagers: {', '.join(f'{r}/{f}' for r, f in _PACKAGERS)}")
    calib_raw = np.asarray(calib_raw)
    if calib_raw.ndim != 2 or calib_raw.shape[1] != features.n_features or len(calib_raw) < MIN_CALIBRATION_ROWS:
        raise UserError(f"calibration data must be at least {MIN_CALIBRATION_ROWS} rows of {features.n_features} "
                        f"features, got shape {tuple(calib_raw.shape)}")
    calib = features.model_input(calibration_rows(calib_raw))
    if not np.isfinite(calib).all():
        raise UserError("calibration data has non-finite values after the feature contract")
    job = _Job(profile, model, onnx_bytes, calib, name, version, n_outputs)
    with captured_output() as out:   # converters and quantizers print progress; keep the CLI clean
        try:
            return packager(job)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - converters raise anything; the operator gets one line
            failure = e
    last = out.text.strip().splitlines()[-1][:200] if out.text.strip() else ""
    raise UserError(f"could not build the {profile.name} artifact: {type(failure).__name__}: "
                    f"{str(failure).splitlines()[0][:300] if str(failure) else ''}"
                    + (f" ({last})" if last else "")) from failure


def calibration_rows(rows: np.ndarray, most: int = MAX_CALIBRATION_ROWS) -> np.ndarray:
    """The first ``most`` of ``rows`` (the training split is already shuffled by its seed):
    deterministic, so a re-package calibrates on the same rows and gives the same bytes."""
    return rows[:most]


# -- checks before measuring ----------------------------------------------------------------
_INT_TYPES = ("int8", "int16", "int32", "uint8")


_LAYOUT_ORIGIN = ("inserted by the converter for the channels-first layout of the model's tensors "
                  "(LiteRT runs convolutions channels-last)")


def check_operators(profile: TierProfile, artifact: TierArtifact) -> None:
    """Refuse operators the tier's runtime lacks, in one line that names each and says whether
    the converter inserted it for the model's channels-first layout or it is the model's own; for
    a .tflite int8 tier, refuse float operators left in the graph and a float model interface.
    Raises UnsupportedOperator."""
    ops = artifact.operators
    if ops is None:
        return
    if profile.supported_ops:
        missing = sorted({op.name for op in ops} - set(profile.supported_ops))
        if missing:
            where = []
            for op in (op for op in ops if op.name in missing):
                origin = _LAYOUT_ORIGIN if op.inserted_for_layout else "the model's own"
                where.append(f"{op.name} (operator {op.index}, from layer {quantize.layer_label(op.layer)}): {origin}")
            supported = (f"supported: {', '.join(profile.supported_ops)}" if len(profile.supported_ops) <= 24 else
                         f"not among the {len(profile.supported_ops)} operators {profile.runtime} registers")
            raise UnsupportedOperator(f"{profile.name} cannot run operator(s) {', '.join(missing)} ({supported}); "
                                      f"{'; '.join(where)}")
    if artifact.numeric_format != "int8":
        return
    floats = [op.name for op in ops if op.computes_in not in _INT_TYPES]
    named = [n for n in floats if n not in ("QUANTIZE", "DEQUANTIZE")] or floats
    if named:
        raise UnsupportedOperator(f"{profile.name} runs int8 only, but operator(s) {', '.join(sorted(set(named)))} "
                                  "compute in float (the quantizer left them unquantized)")


# -- measuring on the device runtime ----------------------------------------------------------
class captured_output:  # noqa: N801 - used as a context manager
    """Capture what native code (converters, TFLM) writes to file descriptors 1 and 2."""

    def __enter__(self) -> captured_output:
        sys.stdout.flush()
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(self._file.fileno(), 1)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace")
        self._file.close()


def tflm_reported_arena_bytes(model: bytes) -> int:
    """What TFLite Micro's recording allocator reports for this model (head, the planned
    non-persistent tensors, plus tail, the persistent data). It can be below what TFLM needs
    (issue 12 measured up to 30% below): a hint for the search, never the manifest's figure.
    Raises BudgetExceeded if it does not fit even in a generous host arena, UserError if TFLM
    reports nothing."""
    from tflite_micro.python.tflite_micro import runtime as tflm

    with captured_output() as out:
        try:
            interpreter = tflm.Interpreter.from_bytes(bytes(model), arena_size=max(len(model) * 10, TFLM_MEASURE_ARENA))
        except RuntimeError as e:
            failure: Exception | None = e
        else:
            failure = None
            interpreter.print_allocations()
    if failure is not None:
        raise BudgetExceeded(f"TFLite Micro cannot allocate this model in {_kb(TFLM_MEASURE_ARENA)} of arena: "
                             f"{failure}") from failure
    total = re.search(r"Arena allocation total (\d+)", out.text)
    head, tail = (re.search(rf"Arena allocation {k} (\d+)", out.text) for k in ("head", "tail"))
    if total:
        return int(total.group(1))
    if head and tail:
        return int(head.group(1)) + int(tail.group(1))
    raise UserError("TFLite Micro did not report its arena usage")


def tflm_arena_measured(model: bytes) -> dict[str, Any]:
    """The manifest's arena figures for an mcu artifact: ``ram_bytes`` (the smallest arena TFLM
    runs it in), how it was found, and what TFLM's own report said."""
    reported = tflm_reported_arena_bytes(model)
    return {"ram_bytes": tflm_arena_bytes(model, reported), "ram_bytes_method": ARENA_MIN_SEARCH,
            "tflm_reported_arena_bytes": reported}


def arena_for_tier(profile: TierProfile, model: bytes) -> dict[str, Any]:
    """For a TFLM tier: :func:`tflm_arena_measured`, checked against the tier's RAM before the
    runtime is loaded (raises BudgetExceeded); for any other tier, nothing."""
    if profile.runtime != "tflite-micro":
        return {}
    arena = tflm_arena_measured(model)
    check_budgets(profile, {"ram_bytes": arena["ram_bytes"], "flash_bytes": 0, "device_latency_ms": 0.0})
    return arena


def tflm_arena_bytes(model: bytes, reported: int | None = None) -> int:
    """The smallest arena TFLite Micro allocates and invokes this model in, found by bisection in
    a child process (cloud/package/tflm_arena.py; TFLM can crash just below it). This is the figure the
    manifest records and the RAM budget checks. Raises BudgetExceeded or UserError as
    :func:`tflm_reported_arena_bytes`."""
    from edgeloop.cloud.package.tflm_arena import ArenaSearchError, min_arena_bytes

    reported = tflm_reported_arena_bytes(model) if reported is None else reported
    top = max(len(model) * 10, TFLM_MEASURE_ARENA)
    try:
        return min_arena_bytes(model, hi=min(top, 2 * reported + 16384))
    except ArenaSearchError:
        try:
            return min_arena_bytes(model, hi=top)
        except ArenaSearchError as e:
            raise BudgetExceeded(f"TFLite Micro cannot run this model in {_kb(top)} of arena: {e}") from None


def measure(profile: TierProfile, bundle: Package, runtime: Any, float_probs: np.ndarray,
            test_x: np.ndarray, test_y: np.ndarray, latency_runs: int = 50) -> dict[str, Any]:
    """Accuracy, agreement with the float model, latency, size and flash, on the real runtime
    (the TFLM arena is measured separately, before loading: :func:`tflm_arena_bytes`)."""
    probs = runtime.predict(test_x)
    latencies = []
    for row in test_x[:latency_runs]:
        t = time.perf_counter()
        runtime.predict(row[None, :])
        latencies.append((time.perf_counter() - t) * 1000)
    host_p50 = statistics.median(latencies)
    model_bytes = len(bundle.model_bytes)
    out = {"accuracy": float((probs.argmax(1) == test_y).mean()),
           "top1_agreement_with_float": float((probs.argmax(1) == float_probs.argmax(1)).mean()),
           "max_abs_diff_from_float": float(np.max(np.abs(probs - float_probs))),
           "held_out_rows": int(len(test_x)),
           "model_bytes": model_bytes, "host_p50_ms": round(host_p50, 4),
           "device_latency_ms": round(host_p50 * profile.host_to_device, 3),
           "flash_bytes": model_bytes + profile.runtime_flash_bytes, "ram_bytes": None}
    return out


def check_budgets(profile: TierProfile, measured: dict[str, Any]) -> None:
    """Refuse an artifact over its tier's budgets, with the numbers. Raises BudgetExceeded."""
    ram = measured.get("ram_bytes")
    if ram is not None and ram > profile.ram_bytes:
        raise BudgetExceeded(f"needs {_kb(ram)} RAM, {profile.name} allows {_kb(profile.ram_bytes)}")
    if measured["flash_bytes"] > profile.flash_bytes:
        raise BudgetExceeded(f"needs {_kb(measured['flash_bytes'])} flash (model {_kb(measured['model_bytes'])} "
                             f"+ runtime {_kb(profile.runtime_flash_bytes)}), {profile.name} allows "
                             f"{_kb(profile.flash_bytes)}")
    if measured["device_latency_ms"] > profile.latency_budget_ms:
        raise BudgetExceeded(f"needs about {measured['device_latency_ms']:.1f} ms per inference on the device "
                             f"(host {measured['host_p50_ms']:.3f} ms x {profile.host_to_device}), "
                             f"{profile.name} allows {profile.latency_budget_ms} ms")


def _kb(n: int) -> str:
    return f"{(n + 1023) // 1024} KB" if n < 10 * 1024 * 1024 else f"{n / 1024 / 1024:.0f} MB"
