"""The AOT compiler (kernels/aot) against TensorFlow Lite Micro, bit for bit.

Every model is a PyTorch module converted with the project's own full-int8 path (the mcu
tier's: litert_fp32 -> litert_full_int8 -> inline_buffers), compiled to C, built with the
host ``gcc -std=c99 -O2 -Wall -Werror`` and run on random int8 inputs and on real digits rows;
its outputs must equal TFLM's Python interpreter's exactly. One small model per operator
family, then the whole models; then the refusals, each one line.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeloop.kernels.aot import CompiledModel, UnsupportedByCompiler, build_host, compile_tflite, run_host
from edgeloop.kernels.aot._graph import read_graph
from edgeloop.kernels.aot._planner import plan
from edgeloop.kernels.aot.compiler import lowered_steps
from test_tiers_shapes import SeriesConv1d   # the Conv1d net: TRANSPOSE, PAD + stride 2, MEAN

N_RANDOM = 200


# ---- models ---------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """Conv2d + ReLU + pool + Linear on 1x8x8 (one input channel: the converter makes it a
    DEPTHWISE_CONV_2D with depth multiplier 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2), 1))


class TwoConvPools(nn.Module):
    """CONV_2D (SAME), MAX_POOL_2D, AVERAGE_POOL_2D, SOFTMAX."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        x = nn.functional.avg_pool2d(torch.relu(self.c2(x)), 2)
        return torch.softmax(self.fc(torch.flatten(x, 1)), -1)


class SeparableHardSwish(nn.Module):
    """Depthwise-separable block with hard-swish: DEPTHWISE_CONV_2D (multipliers 8 and 1, stride
    1 SAME and stride 2 after a PAD), HARD_SWISH, 1x1 CONV_2D, MEAN over H and W, SOFTMAX."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.dw = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw, self.fc = nn.Conv2d(8, 16, 1), nn.Linear(16, 10)
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.hardswish(self.stem(x))
        x = torch.relu(self.pw(nn.functional.hardswish(self.dw(x))))
        x = nn.functional.hardswish(self.down(x))           # stride 2 after an explicit PAD
        return torch.softmax(self.fc(x.mean(dim=(2, 3))), -1)


class ResidualConcat(nn.Module):
    """ADD (residual), QUANTIZE (the converter's rescale before the concatenation), CONCATENATION."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.c(torch.cat([h, h + torch.relu(self.b(h))], -1))


class Gates(nn.Module):
    """LOGISTIC, TANH, MUL (element-wise and broadcast against a constant), SUB."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 16), nn.Linear(64, 16), nn.Linear(16, 10)
        self.gain = nn.Parameter(torch.linspace(0.5, 2.0, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        return self.c(torch.sigmoid(a) * torch.tanh(b) * self.gain - a)


class Pointwise(nn.Module):
    """1x1 convolutions that narrow (8 -> 4) and widen (4 -> 16): both run in place, pixel by pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.narrow, self.wide = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.wide(torch.relu(self.narrow(torch.relu(self.stem(x))))))
        return torch.softmax(self.fc(x.mean(dim=(2, 3))), -1)


class ResidualBlocks(nn.Module):
    """ResNet-style: an identity-skip block and a strided block with a 1x1 convolution skip."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.a2, self.b2, self.skip2 = nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(8, 16, 1, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.b1(torch.relu(self.a1(x))) + x)
        x = torch.relu(self.b2(torch.relu(self.a2(x))) + self.skip2(x))
        return torch.softmax(self.fc(x.mean(dim=(2, 3))), -1)


class StridedHalf(nn.Module):
    """STRIDED_SLICE: every second feature."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(x[:, ::2]), -1)


class Recurrent(nn.Module):
    """A GRU and an LSTM over 8 steps of 8 features: the converter unrolls them into
    FULLY_CONNECTED, SLICE, LOGISTIC, TANH, MUL, ADD, SUB."""

    def __init__(self) -> None:
        super().__init__()
        self.gru, self.lstm, self.fc = nn.GRU(8, 12, batch_first=True), nn.LSTM(12, 12, batch_first=True), nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(x.reshape(-1, 8, 8))
        h, _ = self.lstm(h)
        return torch.softmax(self.fc(h[:, -1]), -1)


class ReluMaximum(nn.Module):
    """A standalone RELU (after a concatenation) and MAXIMUM (clamp from below)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.fc = nn.Linear(64, 16), nn.Linear(64, 16), nn.Linear(64, 32), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(torch.cat([self.a(x), self.b(x)], -1))
        return torch.softmax(self.fc(torch.cat([r, torch.clamp(self.c(x), min=-0.3)], -1)), -1)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), nn.Softmax(-1))


# name -> (module factory, input shape per example, trained on digits)
ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]] = {
    "digits_mlp": (_mlp, (64,), True),
    "digits_cnn": (DigitsCNN, (1, 8, 8), True),
    "conv_pools": (TwoConvPools, (1, 8, 8), False),
    "separable_hswish": (SeparableHardSwish, (1, 8, 8), False),
    "residual_concat": (ResidualConcat, (64,), False),
    "conv1d": (SeriesConv1d, (3, 32), False),
    "gates": (Gates, (64,), False),
    "pointwise": (Pointwise, (1, 8, 8), True),
    "residual_blocks": (ResidualBlocks, (1, 8, 8), True),
    "strided_half": (StridedHalf, (64,), True),
    "recurrent": (Recurrent, (64,), True),
    "relu_maximum": (ReluMaximum, (64,), True),
}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from edgeloop.cloud.train.datasets import load_dataset

    ds = load_dataset()
    return np.asarray(ds.x, dtype=np.float32), np.asarray(ds.y).astype(np.int64)


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 60) -> None:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        logits = model[:-1](xt) if isinstance(model, nn.Sequential) else model(xt)
        nn.functional.cross_entropy(logits, yt).backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def zoo(digits: tuple[np.ndarray, np.ndarray]) -> Callable[[str], bytes]:
    """Converted .tflite bytes by name, converted once on first use."""
    from edgeloop.cloud.package import quantize

    cache: dict[str, bytes] = {}

    def get(name: str) -> bytes:
        if name not in cache:
            factory, shape, trained = ZOO[name]
            torch.manual_seed(0)
            model = factory()
            if shape == (64,) or shape == (1, 8, 8):
                x = digits[0].reshape(-1, *shape)
                if trained:
                    _train(model, x, digits[1])
                calib = x[::12]
            else:
                calib = np.random.default_rng(0).normal(size=(48, *shape)).astype(np.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fp32 = quantize.litert_fp32(model.eval(), shape)
                cache[name] = quantize.inline_buffers(quantize.litert_full_int8(fp32, calib))
        return cache[name]

    return get


# ---- the reference and the check -------------------------------------------------------------
def _tflm(model: bytes, x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    from tflite_micro.python.tflite_micro import runtime as tflm

    interpreter = tflm.Interpreter.from_bytes(model, arena_size=256 * 1024)
    out = []
    for row in x:
        interpreter.set_input(row.reshape(input_shape), 0)
        interpreter.invoke()
        out.append(np.array(interpreter.get_output(0)).reshape(-1))
    return np.stack(out).astype(np.int8)


def _quantize_rows(compiled: CompiledModel, rows: np.ndarray) -> np.ndarray:
    q = np.round(rows / compiled.input_scale) + compiled.input_zero_point
    return np.clip(q, -128, 127).astype(np.int8)


def _assert_bit_exact(model: bytes, tmp_path: Path, real: np.ndarray | None = None) -> CompiledModel:
    compiled = compile_tflite(model)
    exe = build_host(compiled, tmp_path)
    shape = compiled.input_shape
    x = np.random.default_rng(1).integers(-128, 128, (N_RANDOM, *shape[1:]), dtype=np.int8)
    if real is not None:
        x = np.concatenate([x, _quantize_rows(compiled, real.reshape(len(real), *shape[1:]))])
    got, want = run_host(exe, x), _tflm(model, x, shape)
    mismatched = np.argwhere(got != want)
    assert mismatched.size == 0, (f"{len(mismatched)} of {got.size} outputs differ from TFLM, first at "
                                  f"{mismatched[0].tolist()}: {got[tuple(mismatched[0])]} vs {want[tuple(mismatched[0])]}")
    assert compiled.arena_bytes <= compiled.arena_bytes_no_inplace
    _assert_plan_is_safe(model)
    return compiled


def _assert_plan_is_safe(model: bytes) -> None:
    """No two buffers alive at the same time overlap in the arena, with or without in place."""
    graph = read_graph(model)
    steps = lowered_steps(graph)            # as the compiler plans them: folded and fused
    for inplace in (True, False):
        buffers = plan(graph, steps, inplace).buffers
        for i, a in enumerate(buffers):
            for b in buffers[i + 1:]:
                if a.first <= b.last and b.first <= a.last:
                    assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, (a, b)


# ---- operator families ------------------------------------------------------------------------
def test_fully_connected_relu_and_softmax_match_tflm_on_the_digits_mlp(zoo, digits, tmp_path):
    compiled = _assert_bit_exact(zoo("digits_mlp"), tmp_path, real=digits[0][:300])
    assert compiled.operators == ("FULLY_CONNECTED", "FULLY_CONNECTED", "SOFTMAX")


def test_conv2d_same_max_and_average_pool_match_tflm(zoo, digits, tmp_path):
    compiled = _assert_bit_exact(zoo("conv_pools"), tmp_path, real=digits[0][:200])
    assert {"CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D", "DEPTHWISE_CONV_2D"} <= set(compiled.operators)


def test_depthwise_separable_block_with_hard_swish_runs_in_place_and_matches_tflm(zoo, digits, tmp_path):
    compiled = _assert_bit_exact(zoo("separable_hswish"), tmp_path, real=digits[0][:200])
    kinds = compiled.operators
    assert {"HARD_SWISH", "MEAN", "TRANSPOSE", "SOFTMAX"} <= set(kinds)
    in_place = {kinds[i] for i in compiled.inplace_operators}
    assert {"DEPTHWISE_CONV_2D", "HARD_SWISH", "RESHAPE"} <= in_place
    depthwise_in_place = [i for i in compiled.inplace_operators if kinds[i] == "DEPTHWISE_CONV_2D"]
    assert len(depthwise_in_place) == 2 and kinds[depthwise_in_place[-1] - 1] == "PAD"   # stride 1 and 2
    assert "el_depthwise_conv2d_inplace(" in compiled.files["model.c"]
    assert [kinds[i] for i in compiled.folded_operators] == ["PAD"]      # into the stride-2 depthwise


def test_residual_add_quantize_and_concatenation_match_tflm(zoo, digits, tmp_path):
    compiled = _assert_bit_exact(zoo("residual_concat"), tmp_path, real=digits[0][:200])
    assert {"ADD", "QUANTIZE", "CONCATENATION"} <= set(compiled.operators)
    # ADD writes over a dying input (the arena then equals the best plan without in place: the
    # planner tries several placement orders for both)
    assert compiled.arena_bytes <= compiled.arena_bytes_no_inplace
    assert any(compiled.operators[i] == "ADD" for i in compiled.inplace_operators)


def test_conv1d_net_pad_transpose_reshape_and_mean_match_tflm(zoo, tmp_path):
    series = np.sin(np.linspace(0, 12, 3 * 32 * 40)).reshape(40, 3, 32).astype(np.float32) * 2
    compiled = _assert_bit_exact(zoo("conv1d"), tmp_path, real=series)
    assert {"PAD", "TRANSPOSE", "RESHAPE", "CONV_2D", "MEAN"} <= set(compiled.operators)


def test_logistic_tanh_mul_and_sub_match_tflm(zoo, digits, tmp_path):
    compiled = _assert_bit_exact(zoo("gates"), tmp_path, real=digits[0][:200])
    assert {"LOGISTIC", "TANH", "MUL", "SUB"} <= set(compiled.operators)


def test_digits_cnn_matches_tflm_on_real_digits(zoo, digits, tmp_path):
    compiled = _assert_bit_exact(zoo("digits_cnn"), tmp_path, real=digits[0][:400])
    assert compiled.operators[-1] == "FULLY_CONNECTED"
    header = compiled.files["model.h"]
    assert "int edgeloop_model_invoke(const int8_t *input, int8_t *output);" in header
    assert f"#define EDGELOOP_MODEL_ARENA_BYTES {compiled.arena_bytes}" in header
    assert "#define EDGELOOP_MODEL_INPUT_SIZE 64" in header


def test_pointwise_convolutions_run_in_place_forward_and_backward_and_match_tflm(zoo, digits, tmp_path):
    compiled = _assert_bit_exact(zoo("pointwise"), tmp_path, real=digits[0][:200])
    assert compiled.files["model.c"].count("el_pointwise_conv2d_inplace(") == 2
    assert compiled.arena_bytes <= compiled.arena_bytes_no_inplace   # (the peak here is elsewhere)


def test_a_convolution_feeding_a_residual_add_runs_inside_it_in_place_and_matches_tflm(zoo, digits, tmp_path):
    """The convolution's output is never stored; the sum overwrites the skip input: one
    activation fewer alive in each block."""
    compiled = _assert_bit_exact(zoo("residual_blocks"), tmp_path, real=digits[0][:200])
    assert compiled.files["model.c"].count("el_conv2d_add(") == 2
    assert [compiled.operators[i] for i in compiled.folded_operators].count("CONV_2D") == 2
    assert compiled.arena_bytes < compiled.arena_bytes_no_inplace


def test_slices_and_recurrent_nets_match_tflm(zoo, digits, tmp_path):
    """SLICE and STRIDED_SLICE are strided gathers; with them the unrolled GRU and LSTM compile."""
    assert "STRIDED_SLICE" in _assert_bit_exact(zoo("strided_half"), tmp_path / "s", real=digits[0][:200]).operators
    compiled = _assert_bit_exact(zoo("recurrent"), tmp_path / "r", real=digits[0][:200])
    assert {"SLICE", "LOGISTIC", "TANH", "FULLY_CONNECTED"} <= set(compiled.operators)


def test_standalone_relu_and_maximum_match_tflm(zoo, digits, tmp_path):
    compiled = _assert_bit_exact(zoo("relu_maximum"), tmp_path, real=digits[0][:200])
    assert {"RELU", "MAXIMUM"} <= set(compiled.operators)


def test_a_fused_convolution_never_writes_over_a_buffer_it_reads_around(zoo):
    """The residual ADD may write over its skip input only if the convolution computed inside it
    does not read that buffer (it reads neighbourhoods, not the element being written)."""
    import dataclasses

    graph = read_graph(zoo("residual_blocks"))
    steps = lowered_steps(graph)
    fused = [i for i, s in enumerate(steps) if s.call.startswith("el_conv2d_add(")]
    assert fused and all(i in plan(graph, steps).inplace_steps for i in fused)
    # the same step, as if its convolution read the skip buffer: never in place then
    poisoned = [dataclasses.replace(s, windowed=(*s.windowed, s.eligible[0])) if i in fused else s
                for i, s in enumerate(steps)]
    assert not any(i in plan(graph, poisoned).inplace_steps for i in fused)


def test_kernels_use_no_heap_and_no_floats():
    from edgeloop.kernels.aot.compiler import _kernel_sources

    import re

    code = re.sub(r"/\*.*?\*/", "", "\n".join(_kernel_sources().values()), flags=re.S)
    for word in ("malloc", "calloc", "free", "float", "double"):
        assert not re.search(rf"\b{word}\b", code), word


def _per_tensor_weights(flat) -> None:
    """Every filter's per-channel scales collapsed to one per-tensor scale (the largest), the
    bias scale set to match: the weights TFLM and the compiler read as per-tensor."""
    sub = flat.subgraphs[0]
    for op in sub.operators:
        if len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        x, w, b = (sub.tensors[i] for i in op.inputs[:3])
        if w.quantization is None or w.quantization.scale is None or len(w.quantization.scale) < 2:
            continue
        scale = np.float32(np.max(w.quantization.scale))
        w.quantization.scale, w.quantization.zeroPoint = np.array([scale], np.float32), np.array([0], np.int64)
        w.quantization.quantizedDimension = 0
        b.quantization.scale = np.array([np.float32(x.quantization.scale[0]) * scale], np.float32)
        b.quantization.zeroPoint = np.array([0], np.int64)


def test_per_tensor_weight_scales_match_tflm_in_dense_and_conv_layers(zoo, digits, tmp_path):
    for name in ("digits_mlp", "conv_pools"):
        model = _repacked(zoo(name), _per_tensor_weights)
        graph = read_graph(model)
        per_tensor = [op.kind for op in graph.operators if len(op.inputs) > 2
                      and len(graph.tensors[op.inputs[1]].scale) == 1 and graph.tensors[op.inputs[1]].is_const]
        assert per_tensor, name
        _assert_bit_exact(model, tmp_path / name, real=digits[0][:100])


# ---- refusals, one line each ------------------------------------------------------------------
def _repacked(model: bytes, edit: Callable[[object], None]) -> bytes:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as tfl

    flat = tfl.ModelT.InitFromPackedBuf(bytearray(model), 0)
    edit(flat)
    builder = flatbuffers.Builder(1024)
    builder.Finish(flat.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def test_an_unsupported_operator_is_refused_naming_it_its_index_and_output(zoo):
    from ai_edge_litert import schema_py_generated as tfl

    def to_leaky_relu(flat) -> None:
        for code in flat.operatorCodes:
            if code.builtinCode == tfl.BuiltinOperator.SOFTMAX:
                code.builtinCode = code.deprecatedBuiltinCode = tfl.BuiltinOperator.LEAKY_RELU

    with pytest.raises(UnsupportedByCompiler) as e:
        compile_tflite(_repacked(zoo("digits_mlp"), to_leaky_relu))
    message = _one_line(e)
    assert message.startswith("operator 2 (LEAKY_RELU, output '") and "no kernel for LEAKY_RELU" in message


def test_an_unsupported_fused_activation_is_refused(zoo):
    def tanh_on_first_dense(flat) -> None:
        flat.subgraphs[0].operators[0].builtinOptions.fusedActivationFunction = 4   # TANH

    with pytest.raises(UnsupportedByCompiler) as e:
        compile_tflite(_repacked(zoo("digits_mlp"), tanh_on_first_dense))
    assert "operator 0 (FULLY_CONNECTED" in _one_line(e) and "fused activation TANH" in str(e.value)


def test_a_float_model_is_refused_as_not_fully_int8():
    from edgeloop.cloud.package import quantize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = quantize.litert_fp32(_mlp().eval(), (64,))
    with pytest.raises(UnsupportedByCompiler) as e:
        compile_tflite(fp32)
    assert "not fully int8" in _one_line(e) and "float32" in str(e.value)


@pytest.mark.parametrize("corrupt", [b"", b"not a flatbuffer at all", b"\x10\x00\x00\x00TFL3" + b"\xff" * 40])
def test_corrupt_bytes_are_refused_in_one_line(corrupt):
    with pytest.raises(UnsupportedByCompiler) as e:
        compile_tflite(corrupt)
    assert _one_line(e)


def test_a_truncated_model_is_refused_in_one_line(zoo):
    model = zoo("digits_mlp")
    with pytest.raises(UnsupportedByCompiler) as e:
        compile_tflite(model[: len(model) // 3])
    assert _one_line(e)


def test_the_refusal_is_a_user_error():
    from edgeloop.cloud.errors import UserError

    assert issubclass(UnsupportedByCompiler, UserError)
