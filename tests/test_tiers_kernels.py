"""TFLite Micro against LiteRT's reference kernels, explained layer by layer.

The mcu artifact must run the same on TFLM as on LiteRT's reference kernels. On convolutions it
does, bit for bit. On FULLY_CONNECTED it cannot: the two requantize the int32 accumulator by
different rules (kernels/int8_reference.py): TFLM with a Q31 fixed-point multiplier and two
roundings, LiteRT's reference FULLY_CONNECTED in double with one rounding. These tests hold each
runtime to its own rule bit for bit, on every layer, so any difference between the runtimes is
exactly that rule and nothing else (a wrong scale, a wrong zero point, a kernel bug).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from edgeloop.contracts.package import Package, Manifest
from edgeloop.contracts.features import FeatureSpec
from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.package.export import export_onnx
from edgeloop.cloud.package.tier_packagers import captured_output, convert
from edgeloop.cloud.package.tiers import load_tiers
from edgeloop.cloud.train.training import TrainParams, train
from edgeloop.device_sdk.runtime import LiteRTModel, TFLMModel, quantize
from edgeloop.kernels.int8_reference import FCLayer, fully_connected, quantize_multiplier, requantize_fixed_point, \
    requantize_float
from edgeloop.kernels.tflite_layers import LiteRTReader, TFLMReader, check_fc_layers, fc_ops

RANDOM_INPUTS = 200


def _mcu_package(model: nn.Module, features: FeatureSpec, calib_raw: np.ndarray) -> Package:
    with captured_output():
        artifact = convert(load_tiers()["mcu"], model, export_onnx(model.eval(), features.n_features), features,
                           calib_raw, "k", 1, 10)
    manifest = Manifest("k", 1, "mcu", "tflite-micro", "int8", "model.tflite", [], [], features, [], "g", 0.0, 0.0)
    return Package(manifest, {"model.tflite": artifact.files["model.tflite"]})


@pytest.fixture(scope="module")
def mlp():
    """The demo task's MLP (three FULLY_CONNECTED layers and a softmax), fully int8, plus held-out
    model inputs quantized the way devices quantize them."""
    ds = load_dataset()
    train_split, _, test = ds.split()
    result = train(ds, TrainParams(epochs=8))
    bundle = _mcu_package(result.model, result.features, train_split.x[:256])
    return bundle, test.x


def _interpreters(model: bytes):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tflite_micro.python.tflite_micro import runtime as tflm

    with captured_output(), warnings.catch_warnings():
        warnings.simplefilter("ignore")     # keeping every tensor is the point here
        ref = Interpreter(model_content=model, experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                          experimental_preserve_all_tensors=True)
        ref.allocate_tensors()
        micro = tflm.Interpreter.from_bytes(model, intrepreter_config=tflm.InterpreterConfig.kPreserveAllTensors)
    return ref, micro


def _int8_inputs(bundle: Package, raw: np.ndarray) -> list[np.ndarray]:
    """Random int8 inputs plus held-out rows through the feature contract and input quantization."""
    runtime = TFLMModel(bundle)
    rng = np.random.default_rng(11)
    random = [rng.integers(-128, 128, size=runtime.in_shape, dtype=np.int8) for _ in range(RANDOM_INPUTS)]
    real = [quantize(row.reshape(runtime.in_shape), *runtime.in_q)
            for row in bundle.manifest.features.apply(raw[:100])]
    return random + real


def test_the_two_requantization_rules_on_values_worked_by_hand():
    assert quantize_multiplier(0.5) == (1 << 30, 0)
    assert quantize_multiplier(0.375) == (3 << 29, -1)
    acc = np.array([3, -3, 5, -5, 1000], dtype=np.int64)
    # scale 1/2: fixed point rounds a negative half toward +inf, the float rule away from zero
    assert requantize_fixed_point(acc, np.array([0.5])).tolist() == [2, -1, 3, -2, 500]
    assert requantize_float(acc, np.array([0.5])).tolist() == [2, -2, 3, -3, 500]
    layer = FCLayer(np.array([[1, 2]], np.int8), np.array([1], np.int32), 0.5, -1, np.array([0.5], np.float32),
                    0.25, 3, -128, 127)
    # acc = 1*(4+1) + 2*(-2+1) + 1 = 4; 4 * 0.5 * 0.5 / 0.25 = 4; + zero point 3
    assert fully_connected(layer, np.array([[4, -2]], np.int8), "fixed_point").tolist() == [[7]]


def test_tflm_fully_connected_is_the_fixed_point_rule_bit_for_bit(mlp):
    bundle, raw = mlp
    ops = fc_ops(bundle.model_bytes)
    assert len(ops) == 3
    _, micro = _interpreters(bundle.model_bytes)
    reader, mismatches = TFLMReader(micro), 0
    for q in _int8_inputs(bundle, raw):
        micro.set_input(q, 0)
        micro.invoke()
        mismatches += check_fc_layers(ops, reader, "fixed_point").mismatches
    assert mismatches == 0


def test_litert_reference_fully_connected_is_the_float_rule_bit_for_bit(mlp):
    bundle, raw = mlp
    ops = fc_ops(bundle.model_bytes)
    ref, _ = _interpreters(bundle.model_bytes)
    index = ref.get_input_details()[0]["index"]
    reader, mismatches = LiteRTReader(ref), 0
    for q in _int8_inputs(bundle, raw):
        ref.set_tensor(index, q)
        ref.invoke()
        mismatches += check_fc_layers(ops, reader, "float").mismatches
    assert mismatches == 0


def test_the_rules_differ_by_at_most_one_lsb_on_the_same_accumulators(mlp):
    """So TFLM and LiteRT's reference drift apart one LSB at a time, only through the layers."""
    bundle, raw = mlp
    ops = fc_ops(bundle.model_bytes)
    ref, _ = _interpreters(bundle.model_bytes)
    index = ref.get_input_details()[0]["index"]
    reader = LiteRTReader(ref)
    diffs = []
    for q in _int8_inputs(bundle, raw):
        ref.set_tensor(index, q)
        ref.invoke()
        for op in ops:
            x = reader.tensor(op.input_index).reshape(1, -1)
            a, b = fully_connected(op.layer, x, "fixed_point"), fully_connected(op.layer, x, "float")
            diffs.append(np.abs(a.astype(np.int32) - b.astype(np.int32)))
    diffs = np.concatenate(diffs, axis=None)
    assert diffs.max() == 1
    assert 0 < (diffs > 0).mean() < 0.01      # rare: only accumulators within rounding error of a half step


class _Convs(nn.Module):
    """A 1x1 convolution (a fully connected layer in conv clothing) and a depthwise 3x3."""

    def __init__(self) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(4, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Conv2d(8, 10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.depthwise(torch.relu(self.pointwise(x.reshape(-1, 4, 4, 4)))))
        return torch.softmax(self.head(x).flatten(1), dim=-1)


def test_convolutions_agree_bit_for_bit_between_tflm_and_litert_reference():
    """Both runtimes' CONV_2D and DEPTHWISE_CONV_2D kernels requantize by the fixed-point rule."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    features = FeatureSpec(n_features=64)
    bundle = _mcu_package(_Convs(), features, rng.standard_normal((64, 64)).astype(np.float32))
    micro, ref = TFLMModel(bundle), LiteRTModel(bundle, reference=True)
    assert {"CONV_2D", "DEPTHWISE_CONV_2D"} <= set(ref.op_names())
    assert "FULLY_CONNECTED" not in ref.op_names()
    for _ in range(RANDOM_INPUTS):
        q = rng.integers(-128, 128, size=micro.in_shape, dtype=np.int8)
        assert np.array_equal(micro._invoke(q), ref._invoke(q))


def test_a_model_with_over_256_kb_of_weights_runs_on_tflm_with_its_real_weights():
    """ai-edge-quantizer stores buffers outside the flatbuffer once they pass 256 KB, and TFLM
    silently ignores such buffers (garbage outputs, every layer off by up to 255 LSB). The mcu
    packager inlines them; TFLM must then follow the fixed-point rule on every layer."""
    from edgeloop.cloud.package import quantize

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    model = nn.Sequential(nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10)).eval()   # 265 KB of int8 weights
    calib = rng.standard_normal((32, 1024)).astype(np.float32)
    with captured_output():
        external = quantize.litert_full_int8(quantize.litert_fp32(model, 1024), calib)
    assert quantize.has_external_buffers(external)          # what the quantizer makes
    bundle = _mcu_package(model, FeatureSpec(n_features=1024), calib)
    assert not quantize.has_external_buffers(bundle.model_bytes)
    ops = fc_ops(bundle.model_bytes)
    ref, micro = _interpreters(bundle.model_bytes)
    for _ in range(20):
        q = rng.integers(-128, 128, size=(1, 1024), dtype=np.int8)
        micro.set_input(q, 0)
        micro.invoke()
        ref.set_tensor(ref.get_input_details()[0]["index"], q)
        ref.invoke()
        assert check_fc_layers(ops, TFLMReader(micro), "fixed_point").bit_exact
        assert check_fc_layers(ops, LiteRTReader(ref), "float").bit_exact
