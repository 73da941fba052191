"""Model runtimes on the device, behind one small interface.

A runtime is made from a verified package (:class:`edgeloop.contracts.package.Package`). It applies the
package's feature contract to raw inputs, quantizes them if the model takes int8, runs the
tier's real runtime, dequantizes int8 outputs, and returns class probabilities:

    raw --FeatureSpec.apply (float32)--> x --q = clamp(round(x / s) + z)--> int8 --model--> int8
        --(q - z) * s--> probabilities

with ``(s, z)`` the model's own input and output quantization (rounding half away from zero,
as TFLite's QUANTIZE does). A package whose manifest declares quantization that differs from
its model's is refused (``verify.package``). Every tier's runtime is here:

=============  =====================================  =============================
runtime        package entrypoint                     engine
=============  =====================================  =============================
onnxruntime    ``model.onnx`` (fp32, fp16, int8 QDQ)  onnxruntime, CPU
litert         ``model.tflite``                       ai-edge-litert (LiteRT)
tflite-micro   ``model.tflite`` (int8 in and out)     TFLite Micro's own interpreter
=============  =====================================  =============================

The control plane measures packages with these same classes, so what it verifies is what
devices run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgeloop.contracts.codes import ErrorCode
from edgeloop.contracts.package import ARENA_MIN_SEARCH, Package, Manifest
from edgeloop.device_sdk.errors import UpdateRefused

__all__ = ["ModelRuntime", "OnnxModel", "LiteRTModel", "TFLMModel", "load_runtime", "health_check",
           "HealthReport", "quantize", "dequantize"]


class ModelRuntime(Protocol):
    manifest: Manifest

    def predict(self, raw: np.ndarray) -> np.ndarray:
        """Raw inputs (n, n_features) -> outputs (n, k): class probabilities, or what the
        package's task contract says (contracts/tasks.py)."""
        ...


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: type = np.int8) -> np.ndarray:
    """TFLite's QUANTIZE: ``q = clamp(round(x / scale) + zero_point)``, the division in float32
    and rounding half away from zero (``std::round``), as LiteRT and TFLite Micro do."""
    info = np.iinfo(dtype)
    v = (np.asarray(x, dtype=np.float32) / np.float32(scale)).astype(np.float64)
    rounded = np.sign(v) * np.floor(np.abs(v) + 0.5)
    return np.clip(rounded + zero_point, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """``real = (q - zero_point) * scale`` in float32."""
    return ((q.astype(np.int32) - zero_point) * np.float32(scale)).astype(np.float32)


class OnnxModel:
    """An ONNX package on onnxruntime (CPU), one intra-op thread: devices are small."""

    def __init__(self, bundle: Package) -> None:
        import onnxruntime as ort

        self.manifest = bundle.manifest
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(bundle.model_bytes, opts, providers=["CPUExecutionProvider"])
        first = self._session.get_inputs()[0]
        self._input = first.name
        self._dtype = np.float16 if first.type == "tensor(float16)" else np.float32

    def predict(self, raw: np.ndarray) -> np.ndarray:
        x = self.manifest.features.model_input(raw).astype(self._dtype)
        out = self._session.run(None, {self._input: x})[0].astype(np.float32)
        return out.reshape(len(x), -1)


class _PerSampleInt8:
    """Shared by the two .tflite runtimes: one sample per invoke, int8 in/out handled."""

    in_q: tuple[float, int] | None
    out_q: tuple[float, int] | None
    in_dtype: type

    def predict(self, raw: np.ndarray) -> np.ndarray:
        return np.stack([dequantize(out, *self.out_q) if self.out_q else out.astype(np.float32)
                         for out in self.raw_outputs(raw)])

    def raw_outputs(self, raw: np.ndarray) -> list[np.ndarray]:
        """The model's own outputs (int8 for an int8 model), one flat row per raw input row: the
        feature contract and the input quantization applied, the output not dequantized."""
        x = self.manifest.features.apply(np.atleast_2d(raw))   # type: ignore[attr-defined]
        rows = []
        for sample in x:
            v = sample.reshape(self.in_shape)                    # type: ignore[attr-defined]
            v = quantize(v, *self.in_q, self.in_dtype) if self.in_q else v.astype(np.float32)
            rows.append(np.asarray(self._invoke(v)).reshape(-1))
        return rows

    def _invoke(self, v: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _qparams(scale: float, zero_point: int, dtype: type) -> tuple[float, int] | None:
    return (float(scale), int(zero_point)) if dtype in (np.int8, np.uint8, np.int16) and scale else None


def _check_declared(manifest: Manifest, in_q: tuple[float, int] | None, out_q: tuple[float, int] | None) -> None:
    """A package whose manifest declares input/output quantization must carry a model with the
    same parameters: otherwise what the manifest documents is not what the device computes."""
    for what, specs, actual in (("input", manifest.inputs, in_q), ("output", manifest.outputs, out_q)):
        declared = specs[0].quantization if specs else None
        if declared is None:
            continue
        if actual is None or actual[1] != declared[1] or not np.isclose(actual[0], declared[0], rtol=1e-6, atol=0):
            raise UpdateRefused(ErrorCode.VERIFY_PACKAGE, f"the manifest declares {what} quantization {declared}, "
                                                  f"the model has {actual}")


class LiteRTModel(_PerSampleInt8):
    """A .tflite package on LiteRT (ai-edge-litert). ``reference=True`` uses LiteRT's reference
    kernels, the yardstick TFLite Micro is compared against."""

    def __init__(self, bundle: Package, reference: bool = False) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.manifest = bundle.manifest
        kind = OpResolverType.BUILTIN_REF if reference else OpResolverType.AUTO
        self.interpreter = Interpreter(model_content=bytes(bundle.model_bytes), num_threads=1,
                                       experimental_op_resolver_type=kind)
        self.interpreter.allocate_tensors()
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        self.in_shape = tuple(self._in["shape"])
        self.in_dtype = self._in["dtype"]
        self.in_q = _qparams(self._in["quantization"][0], self._in["quantization"][1], self._in["dtype"])
        self.out_q = _qparams(self._out["quantization"][0], self._out["quantization"][1], self._out["dtype"])
        _check_declared(self.manifest, self.in_q, self.out_q)

    def _invoke(self, v: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self._in["index"], v)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._out["index"])

    def op_names(self) -> list[str]:
        return [op["op_name"] for op in self.interpreter._get_ops_details()]


# packages whose arena was found by running TFLM in it (ARENA_MIN_SEARCH) are given exactly that;
# older packages recorded TFLM's own report, which can be below what it needs: a margin
LEGACY_ARENA_MARGIN = 4096


class TFLMModel(_PerSampleInt8):
    """A .tflite package on TensorFlow Lite Micro's own interpreter (the mcu tier). The arena is
    the one the package declares (``measured.ram_bytes``), exactly, as a firmware build sized
    from the manifest would get it: packaging found it as the smallest arena TFLM runs the model
    in. Packages from before that search get 4 KB more; ``arena_size`` overrides."""

    def __init__(self, bundle: Package, arena_size: int | None = None) -> None:
        from tflite_micro.python.tflite_micro import runtime as tflm

        self.manifest = bundle.manifest
        declared = bundle.manifest.measured.get("ram_bytes")
        if arena_size is None and isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
            exact = bundle.manifest.measured.get("ram_bytes_method") == ARENA_MIN_SEARCH
            arena_size = declared if exact else declared + LEGACY_ARENA_MARGIN
        kwargs = {"arena_size": arena_size} if arena_size else {}
        self.interpreter = tflm.Interpreter.from_bytes(bytes(bundle.model_bytes), **kwargs)
        inp, out = self.interpreter.get_input_details(0), self.interpreter.get_output_details(0)
        self.in_shape = tuple(int(d) for d in inp["shape"])
        self.in_dtype = inp["dtype"]
        self.in_q = _qparams(inp["quantization_parameters"]["scales"][0],
                             inp["quantization_parameters"]["zero_points"][0], inp["dtype"])
        self.out_q = _qparams(out["quantization_parameters"]["scales"][0],
                              out["quantization_parameters"]["zero_points"][0], out["dtype"])
        _check_declared(self.manifest, self.in_q, self.out_q)

    def _invoke(self, v: np.ndarray) -> np.ndarray:
        self.interpreter.set_input(v, 0)
        self.interpreter.invoke()
        return self.interpreter.get_output(0)


_RUNTIMES = {"onnxruntime": OnnxModel, "litert": LiteRTModel, "tflite-micro": TFLMModel}


def load_runtime(bundle: Package, prefer_aot: bool = True) -> ModelRuntime:
    """The runtime a package names. Raises UpdateRefused('health.load') if it cannot load.

    A ``tflite-micro`` package that carries its AOT C library (``layout.aot``) runs on it
    (:class:`edgeloop.device_sdk.aot_runtime.AOTModel`, the code proven on the emulated board) unless
    ``prefer_aot`` is false; a library that does not build is refused, not silently replaced
    by TFLM, so the device keeps its working model and reports why."""
    runtime = bundle.manifest.runtime
    if runtime not in _RUNTIMES:
        raise UpdateRefused(ErrorCode.HEALTH_LOAD, f"runtime {runtime!r} is not available on this device")
    try:
        if runtime == "tflite-micro" and prefer_aot and "aot" in bundle.manifest.layout:
            from edgeloop.device_sdk.aot_runtime import AOTModel

            return AOTModel(bundle)
        return _RUNTIMES[runtime](bundle)
    except ImportError as e:
        raise UpdateRefused(ErrorCode.HEALTH_LOAD, f"{runtime} is not installed on this device: {e}") from e
    except UpdateRefused:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure means the package is unusable
        raise UpdateRefused(ErrorCode.HEALTH_LOAD, f"{runtime} could not load the model: {e}") from e


@dataclass(frozen=True)
class HealthReport:
    golden_max_abs_diff: float
    latency_ms: float


def health_check(runtime: ModelRuntime, bundle: Package) -> HealthReport:
    """Run the package's golden vectors; refuse if outputs or latency are out of bounds."""
    m = bundle.manifest
    try:
        golden = json.loads(bundle.files[m.golden])
        inputs = np.asarray(golden["inputs"], dtype=np.float32)
        expected = np.asarray(golden["outputs"], dtype=np.float32)
    except (KeyError, ValueError, TypeError) as e:
        raise UpdateRefused(ErrorCode.VERIFY_PACKAGE, f"golden vectors unreadable: {e}") from e
    start = time.perf_counter()
    try:
        got = runtime.predict(inputs)
    except Exception as e:  # noqa: BLE001 - a model that cannot run is unhealthy
        raise UpdateRefused(ErrorCode.HEALTH_LOAD, f"inference failed on golden inputs: {e}") from e
    latency_ms = (time.perf_counter() - start) * 1000 / max(1, len(inputs))
    if got.shape != expected.shape:
        raise UpdateRefused(ErrorCode.HEALTH_GOLDEN, f"golden output shape {got.shape} != {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if not diff <= m.golden_atol:
        raise UpdateRefused(ErrorCode.HEALTH_GOLDEN, f"golden outputs differ by {diff:.3g} > {m.golden_atol}")
    if latency_ms > m.max_latency_ms:
        raise UpdateRefused(ErrorCode.HEALTH_LATENCY,
                            f"{latency_ms:.2f} ms per inference is over the {m.max_latency_ms} ms budget")
    return HealthReport(diff, latency_ms)


class DefaultRuntimeLoader:
    """The device's own runtimes (:func:`load_runtime`, :func:`health_check`)."""

    def load(self, bundle: Package, package_sha256: str | None = None) -> ModelRuntime:
        return load_runtime(bundle)

    def check(self, runtime: ModelRuntime, bundle: Package) -> HealthReport:
        return health_check(runtime, bundle)


DEFAULT_LOADER = DefaultRuntimeLoader()
