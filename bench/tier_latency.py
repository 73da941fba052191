"""Per-tier size, accuracy and latency on this machine: fp32 ONNX (gpu-server) vs int8 ONNX QDQ
(edge-gateway) vs LiteRT dynamic int8 (mobile) vs fully int8 .tflite on LiteRT and on TFLite
Micro (mcu), for the demo model and for MLPerf Tiny-shaped models built in PyTorch with random
weights (DS-CNN keyword spotting 49x10x1, ResNet-8 32x32x3, the FC autoencoder with 640
inputs): their sizes and latencies are real; their accuracy cannot be measured, so their int8
*fidelity* to fp32 is reported instead (top-1 agreement, or relative error for the autoencoder).

Also, per model, whether TFLite Micro equals LiteRT's reference kernels on random int8 inputs
and, where it does not, the cause measured layer by layer (kernels/int8_reference.py).

Batch 1, one thread, p50 of 200 runs (demo) or 50 (MLPerf Tiny shapes; TFLM 50 and 30).
Prints one JSON object as its last line.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from edgeloop.contracts.package import Package, Manifest  # noqa: E402
from edgeloop.contracts.features import FeatureSpec  # noqa: E402
from edgeloop.cloud.train.datasets import load_dataset  # noqa: E402
from edgeloop.cloud.package.export import export_onnx  # noqa: E402
from edgeloop.cloud.package.tier_packagers import captured_output, convert  # noqa: E402
from edgeloop.cloud.package.tiers import load_tiers  # noqa: E402
from edgeloop.cloud.train.training import TrainParams, train  # noqa: E402
from edgeloop.device_sdk.runtime import LiteRTModel, OnnxModel, TFLMModel  # noqa: E402
from edgeloop.kernels.tflite_layers import LiteRTReader, TFLMReader, check_fc_layers, fc_ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ota_bytes import DSCNN  # noqa: E402

TIERS = ("gpu-server", "edge-gateway", "mobile", "mcu")


class ResNet8(nn.Module):
    """MLPerf Tiny image classification ResNet-8 (32x32x3, CIFAR-10)."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.ModuleDict:
            skip = nn.Conv2d(cin, cout, 1, stride) if stride > 1 or cin != cout else nn.Identity()
            return nn.ModuleDict({"a": nn.Conv2d(cin, cout, 3, stride, 1), "b": nn.Conv2d(cout, cout, 3, 1, 1),
                                  "skip": skip})
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)
        self.blocks = nn.ModuleList([block(16, 16, 1), block(16, 32, 2), block(32, 64, 2)])
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x.reshape(-1, 3, 32, 32)))
        for b in self.blocks:
            x = torch.relu(b["b"](torch.relu(b["a"](x))) + b["skip"](x))
        return torch.softmax(self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)), dim=-1)


class AutoEncoder(nn.Module):
    """MLPerf Tiny anomaly detection: fully connected autoencoder, 640 inputs, 10 layers."""

    def __init__(self) -> None:
        super().__init__()
        dims = [640, 128, 128, 128, 128, 8, 128, 128, 128, 128, 640]
        layers: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def cpu() -> dict:
    """Which CPU, and the SIMD features int8 speed depends on."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": platform.processor() or platform.machine()}
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    return {"cpu": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags}


def p50_ms(runtime, x: np.ndarray, runs: int) -> float:
    runtime.predict(x[:1])      # warm-up
    times = []
    for i in range(runs):
        row = x[i % len(x)][None, :]
        t = time.perf_counter()
        runtime.predict(row)
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 4)


def bundle(entry: str, data: bytes, runtime: str, features: FeatureSpec) -> Package:
    m = Manifest("bench", 1, "bench", runtime, "fp32", entry, [], [], features, [], "g", 0.0, 0.0)
    return Package(m, {entry: data})


def tflm_vs_reference(model: bytes, trials: int = 200) -> dict:
    """TFLM against LiteRT's reference kernels on random int8 inputs, end to end, and each
    runtime's FULLY_CONNECTED layers against its requantization rule (the cause, when they differ)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tflite_micro.python.tflite_micro import runtime as tflm

    with captured_output():
        ref = Interpreter(model_content=model, experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                          experimental_preserve_all_tensors=True)
        ref.allocate_tensors()
        micro = tflm.Interpreter.from_bytes(model, arena_size=max(len(model) * 10, 8 << 20),
                                            intrepreter_config=tflm.InterpreterConfig.kPreserveAllTensors)
    inp, out = ref.get_input_details()[0], ref.get_output_details()[0]
    ops = fc_ops(model)
    rng = np.random.default_rng(0)
    diffs, tflm_rule, ref_rule = [], 0, 0
    for _ in range(trials):
        q = rng.integers(-128, 128, size=inp["shape"], dtype=np.int8)
        ref.set_tensor(inp["index"], q)
        ref.invoke()
        micro.set_input(q, 0)
        micro.invoke()
        a, b = ref.get_tensor(out["index"]).astype(np.int32), micro.get_output(0).astype(np.int32)
        diffs.append(int(np.max(np.abs(a - b.reshape(a.shape)))))
        tflm_rule += check_fc_layers(ops, TFLMReader(micro), "fixed_point").mismatches
        ref_rule += check_fc_layers(ops, LiteRTReader(ref), "float").mismatches
    exact = float(np.mean([d == 0 for d in diffs]))
    if max(diffs) == 0:
        cause = "bit-exact"
    elif ops and tflm_rule == 0 and ref_rule == 0:
        cause = (f"FULLY_CONNECTED requantization ({len(ops)} FC layers): TFLM fixed-point (two roundings) vs "
                 "LiteRT reference float (one rounding); each runtime exact to its rule on every layer, "
                 "differences compound through the layers")
    else:
        cause = "unexplained: a runtime departs from its reference rule"
    return {"tflm_exact_fraction": exact, "tflm_max_lsb_diff": max(diffs), "fc_layers": len(ops),
            "tflm_fc_layers_match_fixed_point_rule": tflm_rule == 0,
            "litert_ref_fc_layers_match_float_rule": ref_rule == 0,
            "tflm_vs_litert_ref_cause": cause}


def fidelity(got: np.ndarray, want: np.ndarray, classifier: bool) -> dict:
    """How far an artifact's outputs are from fp32's on the same inputs."""
    out = {"max_abs_diff_vs_fp32": round(float(np.max(np.abs(got - want))), 5)}
    if classifier:
        out["top1_agreement_vs_fp32"] = round(float((got.argmax(1) == want.argmax(1)).mean()), 4)
    else:
        out["relative_error_vs_fp32"] = round(float(np.linalg.norm(got - want) / np.linalg.norm(want)), 4)
    return out


def run_model(name: str, model: nn.Module, n: int, calib: np.ndarray, test_x: np.ndarray,
              test_y: np.ndarray | None, runs: int, classifier: bool = True) -> dict:
    tiers = load_tiers()
    features = FeatureSpec(n_features=n, steps=[])
    onnx_fp32 = export_onnx(model.eval(), n)
    with captured_output():
        art = {t: convert(tiers[t], model, onnx_fp32, features, calib, name, 1, 10) for t in TIERS if t != "gpu-server"}
        runtimes = {
            "fp32_onnx": OnnxModel(bundle("model.onnx", onnx_fp32, "onnxruntime", features)),
            "int8_onnx": OnnxModel(bundle("model.onnx", art["edge-gateway"].files["model.onnx"], "onnxruntime",
                                          features)),
            "litert_dynamic_int8": LiteRTModel(bundle("model.tflite", art["mobile"].files["model.tflite"], "litert",
                                                      features)),
            "litert_int8": LiteRTModel(bundle("model.tflite", art["mcu"].files["model.tflite"], "litert", features)),
            "tflm_int8": TFLMModel(bundle("model.tflite", art["mcu"].files["model.tflite"], "tflite-micro", features),
                                   arena_size=max(len(art["mcu"].files["model.tflite"]) * 10, 8 << 20)),
        }
        out: dict = {key: {"p50_ms": p50_ms(rt, test_x, runs if key != "tflm_int8" else max(30, runs // 4))}
                     for key, rt in runtimes.items()}
        out["mcu_vs_reference"] = tflm_vs_reference(art["mcu"].files["model.tflite"],
                                                   trials=200 if n < 1000 else 40)
    sizes = {"fp32_onnx": len(onnx_fp32), "int8_onnx": len(art["edge-gateway"].files["model.onnx"]),
             "litert_dynamic_int8": len(art["mobile"].files["model.tflite"]),
             "litert_int8": len(art["mcu"].files["model.tflite"]), "tflm_int8": len(art["mcu"].files["model.tflite"])}
    fp32_out = runtimes["fp32_onnx"].predict(test_x)
    for key, rt in runtimes.items():
        got = rt.predict(test_x) if key != "fp32_onnx" else fp32_out
        out[key].update({"model_bytes": sizes[key], **fidelity(got, fp32_out, classifier)})
        if test_y is not None:
            out[key]["accuracy"] = round(float((got.argmax(1) == test_y).mean()), 4)
    out["int8_size_ratio"] = round(sizes["int8_onnx"] / sizes["fp32_onnx"], 3)
    out["int8_speedup"] = round(out["fp32_onnx"]["p50_ms"] / out["int8_onnx"]["p50_ms"], 3)
    return out


def by_tier(models: dict) -> dict:
    """The same figures regrouped per tier: what each tier's runtime gets, per model."""
    keys = {"gpu-server": "fp32_onnx", "edge-gateway": "int8_onnx", "mobile": "litert_dynamic_int8",
            "mcu": "tflm_int8"}
    return {tier: {name: r[key] for name, r in models.items()} for tier, key in keys.items()}


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ds = load_dataset()
    train_split, _, test = ds.split()
    demo = train(ds, TrainParams(epochs=30))
    # the converters take model inputs: the demo's feature contract is applied before the model
    scaled = demo.features.apply(test.x)
    models = {"demo_mlp": run_model("demo", demo.model, 64, demo.features.apply(train_split.x[:256]), scaled,
                                    test.y, 200)}
    shapes = {"kws_dscnn": (DSCNN(), 490, True), "ic_resnet8": (ResNet8(), 3072, True),
              "ad_autoencoder": (AutoEncoder(), 640, False)}
    for name, (model, n, classifier) in shapes.items():
        calib = rng.standard_normal((64, n)).astype(np.float32)
        models[name] = run_model(name, model, n, calib, rng.standard_normal((64, n)).astype(np.float32), None, 50,
                                 classifier)
        print(f"{name}: {json.dumps(models[name])}", file=sys.stderr)
    d = models["demo_mlp"]
    cnn = [models["kws_dscnn"], models["ic_resnet8"]]
    out = {
        "machine": {**cpu(), "python": platform.python_version(), "torch": torch.__version__},
        "fp32_accuracy": d["fp32_onnx"]["accuracy"], "int8_accuracy": d["int8_onnx"]["accuracy"],
        "mobile_accuracy": d["litert_dynamic_int8"]["accuracy"], "mcu_accuracy": d["tflm_int8"]["accuracy"],
        "int8_size_ratio": d["int8_size_ratio"],
        "int8_size_ratio_cnn": round(statistics.mean(r["int8_size_ratio"] for r in cnn), 3),
        "int8_speedup_cnn": round(statistics.mean(r["int8_speedup"] for r in cnn), 3),
        "tflm_bitexact": all(r["mcu_vs_reference"]["tflm_max_lsb_diff"] == 0 for r in models.values()),
        "tflm_bitexact_by_model": {k: r["mcu_vs_reference"]["tflm_max_lsb_diff"] == 0 for k, r in models.items()},
        "tflm_differences_explained": all(r["mcu_vs_reference"]["tflm_fc_layers_match_fixed_point_rule"]
                                          and r["mcu_vs_reference"]["litert_ref_fc_layers_match_float_rule"]
                                          for r in models.values()),
        "tiers": by_tier(models),
        "models": models,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
