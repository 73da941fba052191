"""Every tier's package, proven on the tier's real runtime: onnxruntime, LiteRT, and TFLite
Micro's own interpreter; features computed one way everywhere; budgets enforced before shipping."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeloop.contracts.package import Package, read_package, write_package
from edgeloop.contracts.errors import SchemaError
from edgeloop.contracts.messages import Announce
from edgeloop.cloud.errors import IntegrityError, UserError
from edgeloop.cloud.package.export import export_onnx
from edgeloop.cloud.package.packaging import build_tier_package
from edgeloop.cloud.loop.pipeline import _torch_model, package_model, train_model
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.package.tier_packagers import BudgetExceeded, UnsupportedOperator, captured_output, check_operators, convert
from edgeloop.cloud.package.tiers import load_tiers
from edgeloop.cloud.train.training import TrainParams
from edgeloop.cloud.workspace import Workspace
from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.device_sdk.ota import Installer, InstallState
from edgeloop.device_sdk.errors import UpdateRefused
from edgeloop.device_sdk.runtime import LiteRTModel, OnnxModel, TFLMModel, health_check, load_runtime

TIERS = ("gpu-server", "edge-gateway", "mobile", "mcu")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ws = Workspace.init(tmp_path_factory.mktemp("tiers") / "ws")
    registry = Registry(ws.registry_path)
    mv = train_model(ws, registry, TrainParams(epochs=8))["model_version"]
    packages = {tier: package_model(ws, registry, mv, tier) for tier in TIERS}
    _, _, test = load_dataset().split()
    model = _torch_model(registry, registry.model_version(mv))
    with torch.no_grad():
        float_probs = model(torch.from_numpy(packages["mcu"].manifest.features.apply(test.x))).numpy()
    return ws, registry, mv, packages, test, float_probs


def test_each_tier_gets_its_runtime_and_format(built):
    _, _, _, packages, _, _ = built
    got = {t: (p.manifest.runtime, p.manifest.numeric_format, p.manifest.entrypoint) for t, p in packages.items()}
    assert got == {"gpu-server": ("onnxruntime", "fp32", "model.onnx"),
                   "edge-gateway": ("onnxruntime", "int8", "model.onnx"),
                   "mobile": ("litert", "dynamic-int8", "model.tflite"),
                   "mcu": ("tflite-micro", "int8", "model.tflite")}
    assert set(load_tiers()) >= set(TIERS)


def test_float_tier_matches_the_training_pipeline_on_raw_inputs(built):
    _, _, _, packages, test, float_probs = built
    bundle = read_package(packages["gpu-server"].data)
    assert np.max(np.abs(OnnxModel(bundle).predict(test.x) - float_probs)) < 1e-5
    fp16 = OnnxModel(type(bundle)(bundle.manifest, {**bundle.files, "model.onnx": bundle.files["model_fp16.onnx"]}))
    assert np.max(np.abs(fp16.predict(test.x) - float_probs)) < 1e-2
    layout = bundle.manifest.layout["triton"]
    assert layout["digits-mlp/config.pbtxt"] == "config.pbtxt" and "digits-mlp/1/model.onnx" in layout
    assert b'backend: "onnxruntime"' in bundle.files["config.pbtxt"]


@pytest.mark.parametrize("tier", ["edge-gateway", "mobile", "mcu"])
def test_int8_tiers_agree_with_the_float_model_on_held_out_data(built, tier):
    _, _, _, packages, test, float_probs = built
    bundle = read_package(packages[tier].data)
    probs = load_runtime(bundle).predict(test.x)           # raw pixels in, as on a device
    agreement = float((probs.argmax(1) == float_probs.argmax(1)).mean())
    assert agreement >= 0.99, f"{tier}: top-1 agreement {agreement:.4f}"
    assert bundle.manifest.measured["top1_agreement_with_float"] == pytest.approx(agreement)


def test_tflm_against_litert_reference_kernels_on_random_int8_inputs(built):
    """Bit for bit where it can hold, and the measured bound where it cannot. This MLP is three
    FULLY_CONNECTED layers and a softmax; TFLM requantizes FULLY_CONNECTED by the fixed-point rule
    and LiteRT's reference kernel by the float rule, which differ by one LSB on about 0.2% of
    accumulators (tests/test_tiers_kernels.py proves each runtime follows its rule exactly). The
    softmax turns one logit LSB into up to ~7 output LSB (scale 1/256). Measured: over 99% of random
    int8 inputs and of held-out inputs bit-exact, the rest a few LSB off, the top-1 class the same."""
    _, _, _, packages, test, _ = built
    bundle = read_package(packages["mcu"].data)
    micro, reference = TFLMModel(bundle), LiteRTModel(bundle, reference=True)
    assert micro.in_dtype == np.int8 and micro.out_q == (1 / 256, -128)     # int8 in and out, TFLM softmax spec
    assert reference.op_names() == ["FULLY_CONNECTED"] * 3 + ["SOFTMAX"]
    rng = np.random.default_rng(7)
    diffs = np.array([int(np.max(np.abs(micro._invoke(q).astype(np.int32) - reference._invoke(q).astype(np.int32))))
                      for q in (rng.integers(-128, 128, size=micro.in_shape, dtype=np.int8) for _ in range(500))])
    assert (diffs == 0).mean() >= 0.98, f"only {(diffs == 0).mean():.3f} of random inputs bit-exact"
    assert diffs.max() <= 16
    real_micro, real_ref = micro.predict(test.x), reference.predict(test.x)
    lsb = (np.abs(real_micro - real_ref) * 256).round().max(axis=1)
    assert (lsb == 0).mean() >= 0.98 and lsb.max() <= 16
    assert (real_micro.argmax(1) == real_ref.argmax(1)).mean() >= 0.99


def test_raw_inputs_reach_the_int8_model_through_the_feature_contract_and_its_own_quantization(built):
    """raw -> FeatureSpec.apply (float32) -> q = clamp(round_half_away(x / scale) + zero_point),
    with (scale, zero_point) read from the model and declared in the manifest: the documented path."""
    _, _, _, packages, test, _ = built
    bundle = read_package(packages["mcu"].data)
    declared = bundle.manifest.inputs[0]
    micro = TFLMModel(bundle)
    assert declared.dtype == "int8" and declared.quantization == micro.in_q
    assert bundle.manifest.outputs[0].quantization == (1 / 256, -128)
    scale, zero_point = declared.quantization
    x = bundle.manifest.features.apply(test.x[:20])
    v = (x / np.float32(scale)).astype(np.float64)
    by_hand = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5) + zero_point, -128, 127).astype(np.int8)
    for row, q in zip(test.x[:20], by_hand):
        fed_by_hand = (micro._invoke(q[None, :]).reshape(-1).astype(np.int32) + 128) / 256
        assert np.array_equal(micro.predict(row[None, :])[0], fed_by_hand)


def test_mcu_package_carries_its_c_array_and_measured_budgets(built):
    _, _, _, packages, _, _ = built
    bundle = read_package(packages["mcu"].data)
    header = bundle.files["model_data.h"].decode()
    values = bytes(int(v, 16) for v in header.split("{", 1)[1].split("}", 1)[0].replace(",", " ").split())
    assert values == bundle.files["model.tflite"]
    assert f"g_digits_mlp_model_len = {len(values)};" in header
    measured = bundle.manifest.measured
    assert 0 < measured["ram_bytes"] <= 256 * 1024
    assert measured["flash_bytes"] == len(values) + load_tiers()["mcu"].runtime_flash_bytes
    assert set(measured["operators"]) <= set(load_tiers()["mcu"].supported_ops)


def _override(ws, **changes) -> None:
    base = load_tiers()["mcu"]
    (ws.root / "tiers").mkdir(exist_ok=True)
    fields = {**base.__dict__, **changes}
    ops = ", ".join(f'"{op}"' for op in fields.pop("supported_ops"))
    text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items()) + f"\nsupported_ops = [{ops}]\n"
    (ws.root / "tiers" / "mcu.toml").write_text(text)


def test_an_artifact_over_budget_is_refused_with_the_numbers_and_nothing_registered(built):
    ws, registry, mv, _, _, _ = built
    before = registry.count_packages()
    try:
        _override(ws, ram_bytes=1024)
        with pytest.raises(BudgetExceeded, match=r"needs 3 KB RAM, mcu allows 1 KB"):
            package_model(ws, registry, mv, "mcu")
        _override(ws, supported_ops=("FULLY_CONNECTED",))
        with pytest.raises(UnsupportedOperator, match="cannot run operator.*SOFTMAX"):
            package_model(ws, registry, mv, "mcu")
    finally:
        (ws.root / "tiers" / "mcu.toml").unlink()
    assert registry.count_packages() == before


def test_bad_conversion_input_gets_one_clear_error(built):
    _, registry, mv, packages, test, _ = built
    profile = load_tiers()["edge-gateway"]
    model = _torch_model(registry, registry.model_version(mv))
    features = packages["edge-gateway"].manifest.features
    with pytest.raises(UserError, match="calibration data"):
        convert(profile, model, b"", features, test.x[:, :10], "m", 1, 10)
    with pytest.raises(UserError, match="could not build the edge-gateway artifact"):
        convert(profile, model, b"not an onnx model", features, test.x[:64], "m", 1, 10)


def test_a_malformed_tier_profile_is_refused(tmp_path):
    (tmp_path / "tiers").mkdir()
    (tmp_path / "tiers" / "x.toml").write_text('name = "x"\nruntime = "coreml"\n')
    with pytest.raises(UserError, match="malformed tier profile"):
        load_tiers(tmp_path)


def test_an_mcu_device_installs_and_health_checks_its_package_on_the_aot_library(built, tmp_path):
    """The device serves the C library that ran on the emulated board (TFLM is the reference the
    packager checked it against); its golden health check reproduces TFLM's outputs exactly."""
    from edgeloop.device_sdk.aot_runtime import AOTModel

    _, _, _, packages, _, _ = built
    pkg = packages["mcu"]
    m = pkg.manifest
    announce = Announce("u1", m.model, m.model_version, "mcu", pkg.target_path, len(pkg.data), pkg.sha256,
                        "http://unused", "http://unused", time.time())
    result, runtime = Installer(tmp_path, "mcu", 1 << 20).install(announce, lambda a: pkg.data)
    assert result.state == InstallState.COMMITTED and isinstance(runtime, AOTModel)
    assert result.health.golden_max_abs_diff == 0.0


def test_every_package_carries_the_training_baseline_for_drift(built):
    _, _, _, packages, _, _ = built
    train_split, _, _ = load_dataset().split()
    for tier, pkg in packages.items():
        base = pkg.manifest.baseline
        assert base["rows"] == len(train_split.x) and len(base["features"]) == 64, tier
        f = base["features"][36]
        assert len(f["edges"]) == 11 and sum(f["counts"]) == len(train_split.x)
        assert f["mean"] == pytest.approx(float(train_split.x[:, 36].mean()), abs=1e-5)
        assert sum(base["predictions"]) == len(train_split.x) and sum(base["confidence_hist"]) == len(train_split.x)
    assert packages["mcu"].manifest.baseline == packages["gpu-server"].manifest.baseline   # one baseline per model


class _WithGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.b(nn.functional.gelu(self.a(x))), dim=-1)


def _build(built, tier: str, model: nn.Module):
    _, _, _, packages, test, _ = built
    features = packages["mcu"].manifest.features
    return build_tier_package(load_tiers()[tier], model.eval(), export_onnx(model.eval(), 64), features,
                              [str(i) for i in range(10)], "m", 1, test.x[:64], test.x[:4], test.x, test.y, {})


def test_an_operator_the_mcu_cannot_run_is_named_before_anything_runs(built):
    """TFLM has no GELU kernel: the refusal names it (not a failed arena allocation)."""
    with pytest.raises(UnsupportedOperator, match=r"mcu cannot run operator\(s\) GELU \(not among the \d+ "
                       r"operators tflite-micro registers\); GELU \(operator \d+, from layer _WithGelu.forward\): "
                       r"the model's own$"):
        _build(built, "mcu", _WithGelu())


def test_float_operators_left_in_an_int8_model_are_refused(built):
    """The quantizer leaves SIN in float (DEQUANTIZE, SIN, QUANTIZE): not fully int8, not for an MCU,
    even where the tier's operator list would allow SIN."""
    class WithSin(_WithGelu):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.b(torch.sin(self.a(x))), dim=-1)

    _, _, _, packages, test, _ = built
    features = packages["mcu"].manifest.features
    model = WithSin().eval()
    with captured_output():
        artifact = convert(load_tiers()["mcu"], model, export_onnx(model, 64), features, test.x[:64], "m", 1, 10)
    unrestricted = dataclasses.replace(load_tiers()["mcu"], supported_ops=())
    with pytest.raises(UnsupportedOperator, match="runs int8 only, but operator\\(s\\) SIN compute in float"):
        check_operators(unrestricted, artifact)


def test_a_corrupted_model_file_is_refused_and_nothing_registered(built):
    ws, registry, mv, _, _, _ = built
    before = registry.count_packages()
    path = Path(registry.artifact_path(registry.model_version(mv)["onnx_sha256"]))
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-100] + bytes(100))
        with pytest.raises(IntegrityError, match="stored ONNX export of digits-mlp:1 is corrupted"):
            package_model(ws, registry, mv, "edge-gateway")
    finally:
        path.write_bytes(original)
    state = Path(registry.artifact_path(registry.model_version(mv)["state_sha256"]))
    original = state.read_bytes()
    try:
        state.write_bytes(b"not a state dict")
        with pytest.raises(IntegrityError, match="PyTorch weights of digits-mlp:1 is corrupted"):
            package_model(ws, registry, mv, "mcu")
    finally:
        state.write_bytes(original)
    assert registry.count_packages() == before


def _rewritten(pkg, **changes) -> Package:
    bundle = read_package(pkg.data)
    manifest = dataclasses.replace(bundle.manifest, **changes)
    files = {k: v for k, v in bundle.files.items()}
    return read_package(write_package(manifest, files))


def test_a_device_refuses_an_int8_package_whose_manifest_misstates_the_quantization(built):
    pkg = built[3]["mcu"]
    declared = pkg.manifest.inputs[0]
    wrong = dataclasses.replace(declared, quantization=(declared.quantization[0], declared.quantization[1] + 1))
    with pytest.raises(UpdateRefused, match="verify.package: the manifest declares input quantization"):
        load_runtime(_rewritten(pkg, inputs=[wrong]))


def test_an_int8_package_with_wrong_golden_outputs_fails_its_health_check(built):
    pkg = built[3]["mcu"]
    bundle = read_package(pkg.data)
    golden = json.loads(bundle.files["golden.json"])
    assert health_check(load_runtime(bundle), bundle).golden_max_abs_diff == 0.0   # TFLM reproduces itself
    golden["outputs"][0][0] += 3 / 256
    tampered = read_package(write_package(bundle.manifest, {**bundle.files, "golden.json": json.dumps(golden).encode()}))
    with pytest.raises(UpdateRefused, match="health.golden"):
        health_check(load_runtime(tampered), tampered)


def test_package_all_reports_every_tier_and_refuses_only_the_one_that_does_not_fit(built, capsys):
    """`package --tier all --report --json`: fp32 first, each tier's accuracy drop and size ratio,
    the mcu tier refused with its numbers (exit 2), the other tiers still packaged."""
    from edgeloop.fleet.cli import main

    ws, registry, mv, _, _, _ = built
    try:
        _override(ws, ram_bytes=1024)
        code = main(["package", mv, "--tier", "all", "--report", "--json", "-w", str(ws.root)])
    finally:
        (ws.root / "tiers" / "mcu.toml").unlink()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 2
    assert [p["tier"] for p in report["packages"]] == ["gpu-server", "edge-gateway", "mobile"]
    assert report["refused"] == [{"tier": "mcu", "reason": "needs 3 KB RAM, mcu allows 1 KB"}]
    gpu, edge = report["packages"][0], report["packages"][1]
    assert gpu["size_ratio_vs_fp32"] == 1.0 and edge["size_ratio_vs_fp32"] < 1.0
    assert edge["accuracy_drop_points"] == pytest.approx((report["fp32_accuracy"] - edge["accuracy"]) * 100, abs=0.01)


def _with_manifest(data: bytes, edit) -> bytes:
    """The package's tar with its manifest.json edited by ``edit`` (hashes left as they were)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    manifest = json.loads(members["manifest.json"])
    edit(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, blob in sorted(members.items(), key=lambda kv: kv[0] != "manifest.json"):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


@pytest.mark.parametrize("quantization", [
    {"scale": -1.0, "zero_point": 0}, {"scale": float("inf"), "zero_point": 0}, {"scale": True, "zero_point": 0},
    {"scale": 0.1, "zero_point": 1.5}, {"scale": 0.1}, [0.1, 0]])
def test_a_manifest_with_malformed_quantization_is_refused_by_the_reader(built, quantization):
    pkg = built[3]["mcu"]
    assert read_package(_with_manifest(pkg.data, lambda m: None)).manifest.inputs == pkg.manifest.inputs
    bad = _with_manifest(pkg.data, lambda m: m["inputs"][0].update(quantization=quantization))
    with pytest.raises(SchemaError, match="quantization"):
        read_package(bad)


def test_package_report_shows_the_microcontroller_memory(built, capsys):
    """`package --tier mcu --report`: the TFLM arena (the smallest that runs), TFLM's own report
    beside it, the folded layout transposes and the operator list."""
    from edgeloop.fleet.cli import main

    ws, registry, mv, packages, _, _ = built
    assert main(["package", mv, "--tier", "mcu", "--report", "-w", str(ws.root)]) == 0
    text = capsys.readouterr().out
    measured = read_package(registry_package(registry, mv)).manifest.measured
    assert "microcontroller memory" in text and f"{measured['ram_bytes']:,} B" in text
    assert f"{measured['tflm_reported_arena_bytes']:,} B" in text and "FULLY_CONNECTED" in text


def registry_package(registry, mv: str) -> bytes:  # noqa: ANN001
    from pathlib import Path
    return Path(registry.artifact_path(registry.package_for(mv, "mcu")["sha256"])).read_bytes()


def test_mcu_package_carries_the_aot_library_proven_on_the_emulated_cortex_m4(built):
    """The package holds the generated C beside the .tflite; its flash and RAM were measured on
    the firmware qemu ran, whose outputs equalled TFLM's on the golden and held-out vectors."""
    _, _, _, packages, _, _ = built
    bundle = read_package(packages["mcu"].data)
    m, layout = bundle.manifest.measured, bundle.manifest.layout["aot"]
    assert {layout[k] for k in ("model.c", "model.h", "edgeloop_kernels.c", "edgeloop_kernels.h")} <= set(bundle.files)
    assert b"edgeloop_model_invoke" in bundle.files[layout["model.h"]]
    assert m["aot_bitexact_tflm"] is True and m["aot_vectors_checked"] >= 16
    assert 0 < m["aot_ram_bytes"] < m["ram_bytes"] and 0 < m["aot_flash_bytes"] < m["flash_bytes"]
    assert m["aot_arena_bytes"] <= m["aot_ram_bytes"] and m["aot_instructions"] > 0


class _Upsampled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.interpolate(x.reshape(-1, 1, 8, 8), scale_factor=2, mode="nearest")
        return torch.softmax(self.fc(torch.flatten(y, 1)), -1)          # RESIZE_NEAREST_NEIGHBOR, int8


def test_a_model_the_aot_compiler_lacks_ships_for_tflm_and_says_why(built):
    """RESIZE_NEAREST_NEIGHBOR runs on TFLM but has no AOT kernel: the package ships without the C library,
    with the reason in one line."""
    torch.manual_seed(0)
    pkg = _build(built, "mcu", _Upsampled())
    bundle = read_package(pkg.data)
    reason = bundle.manifest.measured["aot_refused"]
    assert "RESIZE_NEAREST_NEIGHBOR" in reason and "does not take this model" in reason and "\n" not in reason
    assert "aot" not in bundle.manifest.layout and not any(n.startswith("aot-") for n in bundle.files)


def test_export_c_writes_the_aot_library_that_builds_and_refuses_to_overwrite(built, tmp_path, capsys):
    import subprocess

    from edgeloop.fleet.cli import main

    ws, _, mv, _, _, _ = built
    dest = tmp_path / "fw"
    assert main(["package", mv, "--tier", "mcu", "--export-c", str(dest), "-w", str(ws.root)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["edgeloop_kernels.c", "edgeloop_kernels.h", "model.c", "model.h"]
    done = subprocess.run(["gcc", "-std=c99", "-Wall", "-Werror", "-c", "model.c", "edgeloop_kernels.c"], cwd=dest,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    capsys.readouterr()
    (dest / "model.c").write_text("/* mine */")
    assert main(["package", mv, "--tier", "mcu", "--export-c", str(dest), "-w", str(ws.root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists with other contents" in err
    assert (dest / "model.c").read_text() == "/* mine */"
