"""Shaped, non-MLP models through every tier's converter: a CNN on 1x8x8 digit images (NCHW), a
Conv1d net on 3-channel time series (NCL) and a regression MLP with one output. Each artifact
is loaded on the device runtime and compared with the float PyTorch model on held-out rows,
TFLite Micro included: the mcu tier takes the operators the installed TFLM registers, the
converter's layout TRANSPOSE among them. A refusal names the operator, the layer it came from
and whether the converter put it there."""

from __future__ import annotations

import dataclasses
import io
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from edgeloop.contracts.package import Package, Manifest
from edgeloop.contracts.features import FeatureSpec
from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.package.export import INPUT_NAME, OUTPUT_NAME
from edgeloop.cloud.package.packaging import GOLDEN_ATOL
from edgeloop.cloud.package.tier_packagers import (TierArtifact, UnsupportedOperator, captured_output, check_operators, convert,
                                  tflm_arena_bytes, triton_config)
from edgeloop.cloud.package.tiers import tier
from edgeloop.device_sdk.runtime import LiteRTModel, load_runtime

TIERS = ("gpu-server", "edge-gateway", "mobile", "mcu")
ONNX_TIERS = ("gpu-server", "edge-gateway")


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return torch.softmax(self.fc(torch.flatten(x, 1)), dim=-1)


class SeriesConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 8, 5, padding=2), nn.Conv1d(8, 16, 5, stride=2, padding=2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return torch.softmax(self.fc(x.mean(dim=-1)), dim=-1)


def _regression_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


@dataclasses.dataclass
class Case:
    name: str
    model: nn.Module
    features: FeatureSpec
    onnx: bytes
    train_raw: np.ndarray
    test_raw: np.ndarray
    test_y: np.ndarray
    n_outputs: int
    classification: bool

    def float_outputs(self, raw: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(self.features.model_input(raw))).numpy()


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, classification: bool, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y).long() if classification else torch.from_numpy(y).float()[:, None]
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            out = model(xt[idx])
            loss = (nn.functional.nll_loss(torch.log(out.clamp_min(1e-8)), yt[idx]) if classification
                    else nn.functional.mse_loss(out, yt[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _export(model: nn.Module, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, *shape),), buf, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=17, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return buf.getvalue()


def _case(name: str, model: nn.Module, features: FeatureSpec, raw: np.ndarray, y: np.ndarray,
          classification: bool, epochs: int, n_outputs: int) -> Case:
    n_test = len(raw) // 5
    train_raw, test_raw, train_y, test_y = raw[n_test:], raw[:n_test], y[n_test:], y[:n_test]
    torch.manual_seed(0)
    _train(model, features.model_input(train_raw), train_y, classification, epochs)
    return Case(name, model, features, _export(model, features.shape), train_raw, test_raw, test_y, n_outputs,
                classification)


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    digits = load_dataset()
    order = np.random.default_rng(0).permutation(len(digits.y))
    images = FeatureSpec(n_features=64, steps=[{"op": "scale", "factor": 1 / 16}], input_shape=(1, 8, 8),
                         layout="NCHW")
    torch.manual_seed(0)
    cnn = _case("cnn", DigitsCNN(), images, digits.x[order], digits.y[order], True, 12, 10)

    rng = np.random.default_rng(1)
    n, t = 1500, np.arange(32)
    y = rng.integers(0, 3, n)
    phase = rng.uniform(0, 2 * np.pi, (n, 3, 1))
    series = np.sin(2 * np.pi * (2.0 * (y[:, None, None] + 1)) * t / 32 + phase) * np.array([1.0, 0.6, 0.3])[:, None]
    series = (series + 0.3 * rng.standard_normal((n, 3, 32))).astype(np.float32).reshape(n, 96)
    ncl = FeatureSpec(n_features=96, input_shape=(3, 32), layout="NCL")
    torch.manual_seed(0)
    conv1d = _case("conv1d", SeriesConv1d(), ncl, series, y, True, 12, 3)

    x = rng.uniform(-1, 1, (2000, 8)).astype(np.float32)
    target = (np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3]).astype(np.float32)
    torch.manual_seed(0)
    regression = _case("regression", _regression_mlp(), FeatureSpec(n_features=8), x, target, False, 40, 1)
    return {c.name: c for c in (cnn, conv1d, regression)}


_built: dict[tuple[str, str], TierArtifact] = {}


def _convert(case: Case, tier_name: str) -> TierArtifact:
    key = (case.name, tier_name)
    if key not in _built:
        with captured_output():
            _built[key] = convert(tier(tier_name), case.model, case.onnx, case.features, case.train_raw,
                                  f"shaped_{case.name}", 1, case.n_outputs)
    return _built[key]


def _bundle(case: Case, tier_name: str, artifact: TierArtifact) -> Package:
    profile = tier(tier_name)
    model = artifact.files[artifact.entrypoint]
    measured = {"ram_bytes": tflm_arena_bytes(model)} if profile.runtime == "tflite-micro" else {}
    labels = [str(i) for i in range(case.n_outputs)] if case.classification else ["value"]
    draft = Manifest(model=f"shaped_{case.name}", version=1, tier=profile.name, runtime=profile.runtime,
                     numeric_format=artifact.numeric_format, entrypoint=artifact.entrypoint, inputs=[], outputs=[],
                     features=case.features, labels=labels, golden="golden.json",
                     golden_atol=GOLDEN_ATOL[artifact.numeric_format], max_latency_ms=profile.latency_budget_ms,
                     measured=measured)
    return Package(draft, artifact.files)


def _device_outputs(case: Case, bundle: Package) -> np.ndarray:
    """The device runtime's outputs on raw rows; for an ONNX package, onnxruntime fed
    ``model_input`` directly if this tree's OnnxModel does not reshape yet."""
    with captured_output():
        runtime = load_runtime(bundle)
        try:
            return runtime.predict(case.test_raw)
        except Exception:
            if bundle.manifest.runtime != "onnxruntime":
                raise
            import onnxruntime as ort

            session = ort.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])
            return session.run(None, {INPUT_NAME: case.features.model_input(case.test_raw)})[0]


def _agreement(case: Case, got: np.ndarray) -> tuple[str, float]:
    want = case.float_outputs(case.test_raw)
    got = np.asarray(got, dtype=np.float32).reshape(want.shape)
    if case.classification:
        return "top1_agreement", float((got.argmax(1) == want.argmax(1)).mean())
    spread = float(case.test_y.max() - case.test_y.min())
    return "max_abs_diff_over_target_range", float(np.max(np.abs(got - want)) / spread)


def _assert_close(case: Case, tier_name: str, got: np.ndarray) -> None:
    metric, value = _agreement(case, got)
    print(f"{case.name} on {tier_name}: {metric} {value:.4f}")
    if case.classification:
        assert value >= 0.95, f"{case.name} on {tier_name}: top-1 agreement {value:.4f}"
    else:
        # int8 on 256 calibration rows, as every package is calibrated (MAX_CALIBRATION_ROWS): 0.060 measured
        assert value <= 0.065, f"{case.name} on {tier_name}: max |diff| is {value:.4f} of the target's range"


def test_the_float_models_learned_their_tasks(cases):
    for case in cases.values():
        out = case.float_outputs(case.test_raw)
        if case.classification:
            assert (out.argmax(1) == case.test_y).mean() >= 0.9, case.name
        else:
            assert np.abs(out[:, 0] - case.test_y).mean() <= 0.3 * case.test_y.std()


@pytest.mark.parametrize("tier_name", TIERS)
@pytest.mark.parametrize("name", ["cnn", "conv1d", "regression"])
def test_each_tier_packages_the_shaped_model_and_agrees_with_float(cases, name, tier_name):
    case = cases[name]
    artifact = _convert(case, tier_name)
    check_operators(tier(tier_name), artifact)
    _assert_close(case, tier_name, _device_outputs(case, _bundle(case, tier_name, artifact)))


def test_the_flat_mlp_runs_on_the_mcu_with_int8_in_and_out(cases):
    case = cases["regression"]
    artifact = _convert(case, "mcu")
    check_operators(tier("mcu"), artifact)
    assert [op.name for op in artifact.operators] == ["FULLY_CONNECTED"] * 3
    assert not any(op.inserted_for_layout for op in artifact.operators)
    assert "model_data.h" in artifact.files


def test_the_converter_inserted_layout_operators_are_told_from_the_models_own(cases):
    ops = _convert(cases["cnn"], "mobile").operators        # as converted (mcu folds the TRANSPOSE away)
    marked = [(op.name, op.inserted_for_layout) for op in ops if op.name in ("TRANSPOSE", "RESHAPE")]
    # (1,1,8,8) -> (1,8,8,1) before the first convolution is the converter's; flatten is the model's
    assert marked == [("RESHAPE", True), ("TRANSPOSE", True), ("RESHAPE", False)]
    series = [(op.name, op.inserted_for_layout) for op in _convert(cases["conv1d"], "mobile").operators]
    assert ("TRANSPOSE", True) in series and ("TRANSPOSE", False) not in series
    assert ("MEAN", False) in series


def test_a_refusal_names_the_operator_its_layer_and_whether_the_converter_inserted_it(cases):
    """A runtime without SOFTMAX and TRANSPOSE (a custom tier profile): the refusal says, per
    operator, which layer of the user's model it came from and who put it there."""
    profile = dataclasses.replace(tier("mcu"), supported_ops=tuple(op for op in tier("mcu").supported_ops
                                                                     if op not in ("SOFTMAX", "TRANSPOSE")))
    with pytest.raises(UnsupportedOperator) as refused:
        check_operators(profile, _convert(cases["conv1d"], "mcu"))
    message = str(refused.value)
    print(message)
    assert "\n" not in message and "cannot run operator(s) SOFTMAX, TRANSPOSE (not among the " in message
    # the channels-first input is turned channels-last for the first Conv1d: the converter's TRANSPOSE
    assert re.search(r"TRANSPOSE \(operator \d+, from layer \S+ \(Conv1d\)\): inserted by the converter", message)
    assert re.search(r"SOFTMAX \(operator \d+, from layer the model's output\): the model's own", message)


class _FlattenConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv1d(3, 5, 3, padding=1), nn.Linear(5 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_the_mcu_cnn_artifact_has_its_layout_transpose_folded(cases):
    mobile = [op.name for op in _convert(cases["cnn"], "mobile").operators]
    folded = _convert(cases["cnn"], "mcu")
    assert folded.folded_transposes == 1 and "TRANSPOSE" in mobile
    assert "TRANSPOSE" not in [op.name for op in folded.operators]


@pytest.mark.parametrize("net,shape", [(DigitsCNN, (1, 8, 8)), (_FlattenConv1d, (3, 16))])
def test_the_layout_transpose_before_a_flatten_folds_into_the_fc_weights_bit_for_bit(net, shape):
    """TRANSPOSE -> RESHAPE -> FULLY_CONNECTED becomes a permuted weight (NHWC and NLC): one
    operator and one buffer fewer, the same int8 outputs on TFLM for every input."""
    from tflite_micro.python.tflite_micro import runtime as tflm

    from edgeloop.cloud.package import quantize
    from edgeloop.cloud.package.tflite_passes import fold_layout_transposes

    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    with captured_output():
        unfolded = quantize.inline_buffers(quantize.litert_full_int8(
            quantize.litert_fp32(net().eval(), shape), rng.uniform(0, 1, (64, *shape)).astype(np.float32)))
    result = fold_layout_transposes(unfolded)
    before = [op.name for op in quantize.tflite_operators(unfolded)]
    after = [op.name for op in quantize.tflite_operators(result.model)]
    assert result.folded == 1 and after.count("TRANSPOSE") == before.count("TRANSPOSE") - 1
    assert fold_layout_transposes(result.model).folded == 0       # a second pass is a no-op
    inputs = rng.integers(-128, 128, (40, 1, *shape), dtype=np.int16).astype(np.int8)
    outs = []
    for m in (unfolded, result.model):
        interpreter = tflm.Interpreter.from_bytes(m, arena_size=1 << 20)
        want = tuple(interpreter.get_input_details(0)["shape"])
        rows = []
        for x in inputs:
            interpreter.set_input(x.reshape(want), 0)
            interpreter.invoke()
            rows.append(interpreter.get_output(0).copy())
        outs.append(np.stack(rows))
    assert np.array_equal(outs[0], outs[1])
    assert tflm_arena_bytes(result.model) < tflm_arena_bytes(unfolded)


def test_the_mcu_tier_takes_what_the_installed_tflm_registers():
    """The operator list is read from the TFLM build: the layout and activation operators that
    convolutional and recurrent models need are there (the hand list lacked them)."""
    from edgeloop.cloud.package.tflm_ops import tflm_builtin_operators

    ops = set(tier("mcu").supported_ops)
    assert ops == set(tflm_builtin_operators()) and len(ops) > 80
    assert {"TRANSPOSE", "HARD_SWISH", "SLICE", "STRIDED_SLICE", "UNIDIRECTIONAL_SEQUENCE_LSTM", "CONV_2D",
            "DEPTHWISE_CONV_2D", "CONCATENATION", "MEAN", "LOGISTIC", "TANH"} <= ops
    assert "GELU" not in ops and "FRAMER" not in ops      # no kernel; a signal-library custom operator


def test_triton_configs_carry_the_real_shapes(cases):
    files = _convert(cases["cnn"], "gpu-server").files
    assert 'dims: [ 1, 8, 8 ]' in files["config.pbtxt"].decode() and 'dims: [ 10 ]' in files["config.pbtxt"].decode()
    if "config_fp16.pbtxt" in files:
        assert "TYPE_FP16" in files["config_fp16.pbtxt"].decode()
        assert 'dims: [ 1, 8, 8 ]' in files["config_fp16.pbtxt"].decode()
    series = _convert(cases["conv1d"], "gpu-server").files["config.pbtxt"].decode()
    assert 'dims: [ 3, 32 ]' in series and 'dims: [ 3 ]' in series
    regression = _convert(cases["regression"], "gpu-server").files["config.pbtxt"].decode()
    assert 'dims: [ 8 ]' in regression and 'dims: [ 1 ]' in regression
    assert triton_config("m", [3, 32], [1]).count(b"dims: [") == 2


def test_an_onnx_export_that_disagrees_with_the_feature_contract_is_refused_in_one_line(cases):
    case = cases["cnn"]
    from edgeloop.cloud.errors import UserError

    flat = dataclasses.replace(case.features, input_shape=(), layout="flat")
    with pytest.raises(UserError, match=r"takes inputs of shape \(batch, 1, 8, 8\), the feature contract gives "
                                        r"\(batch, 64\)"):
        convert(tier("gpu-server"), case.model, case.onnx, flat, case.train_raw[:64], "m", 1, 10)
    with pytest.raises(UserError, match=r"10 values per example, not 3"):
        convert(tier("edge-gateway"), case.model, case.onnx, case.features, case.train_raw[:64], "m", 1, 3)
