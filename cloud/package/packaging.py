"""Packages: one model version made into a deployable bundle for a hardware tier.

:func:`build_tier_package` is what the pipeline uses: it converts a model version for a tier
profile (``cloud/package/tiers``), measures the artifact on the tier's runtime, checks its budgets and
writes the package. :func:`build_package` is the plain primitive underneath for an fp32 ONNX
package on onnxruntime, kept for tests, benchmarks and tools that need a package quickly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeloop.contracts.package import Package, Manifest, TensorSpec, read_package, sha256_hex, write_package
from edgeloop.contracts.features import FeatureSpec
from edgeloop.contracts.tasks import CLASSIFICATION, TaskKind, TaskSpec
from edgeloop.cloud.errors import UserError
from edgeloop.cloud.package.export import INPUT_NAME, OUTPUT_NAME
from edgeloop.cloud.package.tiers import TierProfile

if TYPE_CHECKING:
    from torch import nn

    from edgeloop.device_sdk.runtime import ModelRuntime

__all__ = ["TIERS", "PackageResult", "build_package", "build_tier_package", "golden_vectors", "baseline_stats",
           "store_blob", "split_timings", "GOLDEN_ATOL", "TIMING_KEYS"]

# tiers build_package accepts -> (runtime, numeric format, latency budget ms): fp32 ONNX only
TIERS: dict[str, tuple[str, str, float]] = {
    "edge-gateway": ("onnxruntime", "fp32", 50.0),
}


@dataclass(frozen=True)
class PackageResult:
    """A built package: its bytes, their sha256 and manifest; ``timings``, what was timed on
    the packaging host (kept out of the bytes, which must not depend on when they were built);
    ``target``, the name it was registered under (cloud/release/releaser.py), once registered."""

    data: bytes
    sha256: str
    manifest: Manifest
    timings: dict[str, Any] = field(default_factory=dict)
    target: str | None = None

    @property
    def target_path(self) -> str:
        """The package's name in the signed repository."""
        if self.target is not None:
            return self.target
        return f"{self.manifest.model}/{self.manifest.version}/{self.manifest.tier}.elpkg"


# timed on the packaging host: checked against the tier's latency budget and reported, never
# written into the package (the same inputs must give the same bytes)
TIMING_KEYS = ("host_p50_ms", "device_latency_ms")


def split_timings(measured: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the manifest records, what was timed on this host)."""
    return ({k: v for k, v in measured.items() if k not in TIMING_KEYS},
            {k: measured[k] for k in TIMING_KEYS if k in measured})


def golden_vectors(onnx_bytes: bytes, features: FeatureSpec, raw_inputs: np.ndarray) -> dict:
    """Golden inputs (raw) and the outputs the exported graph gives on onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {INPUT_NAME: features.apply(raw_inputs)})[0]
    # 8 significant digits: exact enough for any golden tolerance, and short on the wire
    return {"inputs": raw_inputs.astype(np.float32).tolist(),
            "outputs": [[float(f"{v:.8g}") for v in row] for row in outputs.astype(np.float32).tolist()]}


def build_package(model: str, version: int, tier: str, onnx_bytes: bytes, features: FeatureSpec,
                  labels: list[str], golden_inputs: np.ndarray, lineage: dict) -> PackageResult:
    if tier not in TIERS:
        raise UserError(f"unknown tier {tier!r}; this build packages: {', '.join(TIERS)}")
    runtime, numeric, latency_ms = TIERS[tier]
    golden = golden_vectors(onnx_bytes, features, golden_inputs)
    manifest = Manifest(
        model=model, version=version, tier=tier, runtime=runtime, numeric_format=numeric,
        entrypoint="model.onnx",
        inputs=[TensorSpec(INPUT_NAME, [-1, features.n_features], "float32")],
        outputs=[TensorSpec(OUTPUT_NAME, [-1, len(labels)], "float32")],
        features=features, labels=labels, golden="golden.json", golden_atol=1e-4,
        max_latency_ms=latency_ms, lineage=lineage,
    )
    data = write_package(manifest, {"model.onnx": onnx_bytes,
                                   "golden.json": json.dumps(golden, separators=(",", ":")).encode()})
    return PackageResult(data, sha256_hex(data), read_package(data).manifest)


def store_blob(artifacts_dir: Path, data: bytes) -> tuple[str, Path]:
    """Content-addressed storage: returns (sha256, path). Writing the same bytes twice is a no-op."""
    digest = sha256_hex(data)
    path = artifacts_dir / digest[:2] / digest
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{digest}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return digest, path


# -- per-tier packages ---------------------------------------------------------------------------
BASELINE_BINS = 10


BASELINE_MAX_FEATURES = 256    # beyond this, a shaped input is summarised per channel


def baseline_stats(train_raw: np.ndarray, train_probs: np.ndarray, task: TaskSpec = CLASSIFICATION,
                   features: FeatureSpec | None = None) -> dict:
    """What drift is measured against: per raw input feature, fixed bin edges (equal width over
    the training range, so every device bins the same way) and the training counts in them, plus
    count/mean/std/min/max; and the float model's prediction and confidence distributions on the
    training data, read by the task contract (class, regression bin or anomaly flag).

    An input of more than ``BASELINE_MAX_FEATURES`` values with a channel axis (an image, a
    multi-channel series) is summarised per channel instead: each example contributes the mean
    of each channel (``"reduce"``), which devices apply the same way before summarising."""
    reduce = None
    if features is not None and train_raw.shape[1] > BASELINE_MAX_FEATURES and len(features.shape) > 1:
        first = features.layout in ("NCHW", "NCL", "flat")
        reduce = {"op": "channel_mean", "channels": features.channels if features.layout != "flat"
                  else features.shape[0], "channels_first": first}
        c = reduce["channels"]
        train_raw = (train_raw.reshape(len(train_raw), c, -1).mean(axis=2) if first
                     else train_raw.reshape(len(train_raw), -1, c).mean(axis=1))
    lo, hi = train_raw.min(axis=0), train_raw.max(axis=0)
    hi = np.where(hi > lo, hi, lo + 1.0)                  # a constant feature still gets one real bin
    edges = [np.linspace(a, b, BASELINE_BINS + 1) for a, b in zip(lo, hi)]
    counts = [np.histogram(np.clip(col, e[0], e[-1]), bins=e)[0] for col, e in zip(train_raw.T, edges)]
    decisions = [task.decide(row) for row in train_probs]
    preds = np.bincount([d.bin for d in decisions], minlength=task.n_bins(train_probs.shape[1]))
    conf = np.histogram([d.confidence for d in decisions], bins=10, range=(0.0, 1.0))[0]
    out = {"version": 1, "rows": int(len(train_raw)),
           "features": [{"edges": [round(float(v), 6) for v in e], "counts": [int(c) for c in n],
                         "mean": round(float(col.mean()), 6), "std": round(float(col.std()), 6),
                         "min": float(col.min()), "max": float(col.max())}
                        for e, n, col in zip(edges, counts, train_raw.T)],
           "predictions": [int(v) for v in preds], "confidence_hist": [int(v) for v in conf]}
    if reduce is not None:
        out["reduce"] = reduce
    residuals = residual_model(train_raw)
    if residuals is not None:
        out["residuals"] = residuals
    return out


RESIDUAL_MAX_FEATURES = 256     # the device multiplies each input by an f x f matrix
RESIDUAL_FOLDS = 5


def residual_model(train_raw: np.ndarray, ridge: float = 1e-2) -> dict | None:
    """Each feature's residual given all the others: ``e = (x - center) @ weights``, column ``j``
    being feature ``j`` minus its (ridge) linear prediction from the rest. A shift in one feature
    moves its residual by the full shift while the residual's spread is only what the other
    features cannot explain, so a drift test on residual means sees a one-feature shift that the
    feature's own mean hides in its spread (docs/drift.md). ``mean``/``std``: the residuals'
    mean and spread on rows the model was not fitted on (``RESIDUAL_FOLDS``-fold cross-fitting),
    so drift tests compare with what unseen data give. None for one feature, or too many."""
    x = np.asarray(train_raw, dtype=np.float64)
    n, f = x.shape
    if f < 2 or f > RESIDUAL_MAX_FEATURES or n < 5 * RESIDUAL_FOLDS:
        return None

    def fit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        center = rows.mean(axis=0)
        cov = np.cov(rows - center, rowvar=False, bias=True)
        precision = np.linalg.inv(cov + ridge * max(float(np.trace(cov)) / f, 1e-12) * np.eye(f))
        return center, precision / np.diag(precision)            # column j: residual of feature j

    folds = np.arange(n) % RESIDUAL_FOLDS
    held = np.empty_like(x)
    for k in range(RESIDUAL_FOLDS):
        center, weights = fit(x[folds != k])
        held[folds == k] = (x[folds == k] - center) @ weights
    center, weights = fit(x)
    return {"center": [round(float(v), 6) for v in center],
            "weights": [[round(float(v), 6) for v in row] for row in weights],
            "mean": [round(float(v), 6) for v in held.mean(axis=0)],
            "std": [round(float(v), 6) for v in held.std(axis=0)]}
# allowed |difference| on golden outputs at the device's health check, per numeric format: int8
# outputs are probabilities in steps of 1/256 (TFLM softmax spec), and a device's int8 kernels may
# round a layer one LSB differently from the packaging host's (docs/tiers.md)
GOLDEN_ATOL = {"fp32": 1e-4, "int8": 2.0 / 256, "dynamic-int8": 1e-3}


def build_tier_package(profile: TierProfile, model: nn.Module, onnx_bytes: bytes, features: FeatureSpec,
                       labels: list[str], name: str, version: int, calib_raw: np.ndarray, golden_raw: np.ndarray,
                       test_x: np.ndarray, test_y: np.ndarray, lineage: dict,
                       baseline: dict | None = None, task: TaskSpec = CLASSIFICATION) -> PackageResult:
    """Convert, check operators, measure on the tier's real runtime, check budgets, and
    package. Raises UserError (bad input, failed conversion), UnsupportedOperator or
    BudgetExceeded (does not fit the tier); nothing is written anywhere."""
    import torch

    from edgeloop.cloud.package.tier_packagers import (arena_for_tier, captured_output, check_budgets, check_operators, convert,
                                      measure)

    n_outputs = len(labels) if task.kind is TaskKind.CLASSIFICATION else 1
    artifact = convert(profile, model, onnx_bytes, features, calib_raw, name, version, n_outputs)
    check_operators(profile, artifact)
    # the TFLM arena is measured first: the RAM budget is checked before the runtime is loaded,
    # and the runtime is then given the arena a firmware build would give it
    arena = arena_for_tier(profile, artifact.files[artifact.entrypoint])
    draft = Manifest(model=name, version=version, tier=profile.name, runtime=profile.runtime,
                     numeric_format=artifact.numeric_format, entrypoint=artifact.entrypoint,
                     inputs=[], outputs=[], features=features, labels=labels, golden="golden.json",
                     golden_atol=GOLDEN_ATOL[artifact.numeric_format], max_latency_ms=profile.latency_budget_ms,
                     measured=dict(arena), task=task)
    bundle = Package(draft, artifact.files)
    with torch.no_grad():
        float_probs = model(torch.from_numpy(features.model_input(test_x))).reshape(len(test_x), -1).numpy()
    with captured_output():   # runtimes log to the file descriptors; the CLI stays clean
        runtime = _load(bundle)
        measured = {**measure(profile, bundle, runtime, float_probs, test_x, test_y), **arena}
        measured.update(task_fidelity(task, runtime.predict(test_x), float_probs, test_y))
    check_fidelity(profile, task, measured, artifact.numeric_format)
    if artifact.operators is not None:
        measured["operators"] = sorted({op.name for op in artifact.operators})
    if artifact.folded_transposes:
        measured["folded_layout_transposes"] = artifact.folded_transposes
    check_budgets(profile, measured)
    golden = {"inputs": golden_raw.astype(np.float32).tolist(),
              "outputs": [[float(f"{v:.8g}") for v in row] for row in runtime.predict(golden_raw).tolist()]}
    in_q, out_q = getattr(runtime, "in_q", None), getattr(runtime, "out_q", None)
    aot_files, aot_layout, aot_measured = aot_library(profile, artifact.files[artifact.entrypoint], features,
                                                      golden_raw, test_x, in_q)
    files, layout = {**artifact.files, **aot_files}, {**artifact.layout, **aot_layout}
    measured.update(aot_measured)
    io = {"inputs": [_tensor(INPUT_NAME, list(features.shape), runtime, in_q, "in_dtype")],
          "outputs": [_tensor(OUTPUT_NAME, [n_outputs], runtime, out_q, "out_dtype")]}
    atol = golden_atol(task, artifact.numeric_format, np.asarray(golden["outputs"], dtype=np.float64), out_q)
    recorded, timings = split_timings(measured)
    manifest = Manifest(**{**draft.__dict__, **io, "lineage": lineage, "layout": layout, "golden_atol": atol,
                           "baseline": baseline or {},
                           "measured": {**recorded, "input_quantization": in_q, "output_quantization": out_q}})
    data = write_package(manifest, {**files, "golden.json": json.dumps(golden, separators=(",", ":")).encode()})
    return PackageResult(data, sha256_hex(data), read_package(data).manifest, timings)


AOT_EXTRA_ROWS = 48     # held-out rows the AOT firmware is checked on, besides the golden vectors


def aot_library(profile: TierProfile, tflite: bytes, features: FeatureSpec, golden_raw: np.ndarray,
                held_out_raw: np.ndarray, in_q: tuple[float, int] | None
                ) -> tuple[dict[str, bytes], dict[str, Any], dict[str, Any]]:
    """For a TFLM tier, the package's AOT C library (cloud/package/aot_firmware.py): its bundle members,
    its ``layout`` entry and its ``measured`` figures, proven on the emulated Cortex-M4 against
    TFLM on the golden rows and ``AOT_EXTRA_ROWS`` held-out rows. No members, and
    ``measured.aot_refused`` saying why, when the compiler does not take the model, the firmware
    differs from TFLM or exceeds the tier's budget (the package then ships for TFLM alone).
    Nothing for other tiers."""
    if profile.runtime != "tflite-micro":
        return {}, {}, {}
    from edgeloop.cloud.package.aot_firmware import AotRefused, prove_on_cortex_m4
    from edgeloop.device_sdk.runtime import quantize as quantize_rows

    if in_q is None:
        return {}, {}, {"aot_refused": "the model's input is not int8"}
    raw = np.concatenate([golden_raw, held_out_raw[:AOT_EXTRA_ROWS]])
    vectors = quantize_rows(features.model_input(raw).reshape(len(raw), -1), *in_q, np.int8)
    try:
        proof = prove_on_cortex_m4(tflite, vectors)
    except AotRefused as e:
        return {}, {}, {"aot_refused": str(e)}
    m = proof.measured
    if m["aot_ram_bytes"] > profile.ram_bytes or m["aot_flash_bytes"] > profile.flash_bytes:
        return {}, {}, {"aot_refused": f"the AOT library needs {m['aot_ram_bytes']} B RAM and "
                                       f"{m['aot_flash_bytes']} B flash; {profile.name} has {profile.ram_bytes} "
                                       f"and {profile.flash_bytes}"}
    return proof.files, {"aot": proof.layout}, m


def golden_atol(task: TaskSpec, fmt: str, outputs: np.ndarray, out_q: tuple[float, int] | None) -> float:
    """The device health check's tolerance on golden outputs. Probabilities keep the fixed
    per-format tolerance; outputs in the task's own units (a regression target, an anomaly score)
    get it relative to their magnitude, or two steps of the int8 output scale."""
    if task.kind is TaskKind.CLASSIFICATION:
        return GOLDEN_ATOL[fmt]
    if fmt == "int8" and out_q is not None:
        return float(f"{2.0 * out_q[0]:.6g}")
    return float(f"{GOLDEN_ATOL[fmt] * max(1.0, float(np.max(np.abs(outputs))) if outputs.size else 1.0):.6g}")


def _tensor(name: str, dims: list[int], runtime: object, q: tuple[float, int] | None, dtype_attr: str) -> TensorSpec:
    dtype = np.dtype(getattr(runtime, dtype_attr, np.float32)).name if q else "float32"
    return TensorSpec(name, [-1, *dims], dtype, q)


# the tier's artifact against the float model on held-out rows, per task: classification and
# anomaly detection keep top-1 (flag) agreement; regression may lose at most this fraction of
# the float model's MAE (its mean distance from the float predictions is reported beside)
FIDELITY_MIN_AGREEMENT = {"fp32": 0.99, "dynamic-int8": 0.95, "int8": 0.90}
FIDELITY_MAX_MAE_LOSS = {"fp32": 0.01, "dynamic-int8": 0.05, "int8": 0.10}


def task_fidelity(task: TaskSpec, outputs: np.ndarray, float_outputs: np.ndarray, labels: np.ndarray) -> dict:
    """The task's metric on the artifact and on the float model, and their agreement."""
    got = task.decide_all(outputs)
    want = task.decide_all(float_outputs)
    out = {"task": task.kind.value, "metric": task.score_metric, "metric_value": task.score(outputs, labels),
           "metric_value_float": task.score(float_outputs, labels)}
    if task.kind is TaskKind.REGRESSION:
        spread = max(float(np.std(labels)), 1e-9)
        out["mae_vs_float_relative"] = float(np.mean(np.abs(got - want)) / spread)
        out["accuracy"] = float(np.mean(np.abs(got - labels) <= float(task.tolerance or 0.0)))
        out["top1_agreement_with_float"] = float(np.mean(np.abs(got - want) <= float(task.tolerance or 0.0)))
    else:
        out["accuracy"] = task.score(outputs, labels)
        out["top1_agreement_with_float"] = float(np.mean(got == want))
    if task.kind is TaskKind.ANOMALY:
        out["anomaly_rate"] = float(got.mean())
    return out


def check_fidelity(profile: TierProfile, task: TaskSpec, measured: dict, fmt: str) -> None:
    """Refuse an artifact that does not stay within its tier's tolerance of the float model."""
    from edgeloop.cloud.package.tier_packagers import OutOfTolerance as DoesNotFit

    if task.kind is TaskKind.REGRESSION:
        limit = FIDELITY_MAX_MAE_LOSS.get(fmt, 0.10)
        got, want = measured["metric_value"], measured["metric_value_float"]
        if got > want * (1 + limit) + 1e-9:
            raise DoesNotFit(f"the {profile.name} artifact's MAE is {got:.4g} on held-out rows against the float "
                             f"model's {want:.4g}: more than the tier's tolerance of {limit:.0%} worse")
        return
    limit = FIDELITY_MIN_AGREEMENT.get(fmt, 0.90)
    if measured["top1_agreement_with_float"] < limit:
        raise DoesNotFit(f"the {profile.name} artifact agrees with the float model on "
                         f"{measured['top1_agreement_with_float']:.3f} of held-out rows (tier tolerance {limit})")


def _load(bundle: Package) -> ModelRuntime:
    from edgeloop.device_sdk.errors import UpdateRefused
    from edgeloop.device_sdk.runtime import load_runtime

    try:
        return load_runtime(bundle)
    except UpdateRefused as e:
        raise UserError(f"the {bundle.manifest.tier} artifact does not load on {bundle.manifest.runtime}: "
                        f"{e.message}") from e
