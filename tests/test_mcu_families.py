"""The model families TinyML users train, through the mcu tier (issue 12 item 1): each is
converted to full int8, its operators checked against what the installed TFLite Micro
registers, and run on TFLM against the float model, and compiled by the AOT compiler, whose C
output equals TFLM's bit for bit; a family TFLM cannot take is refused in one line naming the
operator and the layer it came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.package.tier_packagers import UnsupportedOperator, check_operators
from edgeloop.contracts.features import FeatureSpec
from test_tiers_shapes import _bundle, _case, _convert, _device_outputs, tier


class MultiChannelCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.pool = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return torch.softmax(self.fc(torch.flatten(x, 1)), -1)


class DepthwiseSeparable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1)
        self.act, self.pool, self.fc = nn.Hardswish(), nn.AvgPool2d(2), nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.pw(self.act(self.dw(self.act(self.stem(x))))))
        return torch.softmax(self.fc(torch.flatten(self.pool(x), 1)), -1)


class ResidualConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        r = torch.relu(self.a(s) + s)                       # residual Add
        y = torch.cat([r, torch.tanh(self.b(s))], dim=1)      # Concatenate, tanh
        return torch.softmax(self.fc(y.mean(dim=(2, 3))), -1)


class GatedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h, self.g, self.out = nn.Linear(64, 32), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.h(x)) * torch.sigmoid(self.g(x))  # sigmoid and tanh, FC stack
        return torch.softmax(self.out(z), -1)


class Series1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv1d(8, 16, 3, padding=1), nn.Conv1d(16, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return torch.softmax(self.fc(x.mean(dim=-1)), -1)


class GRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru, self.fc = nn.GRU(8, 16, batch_first=True), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return torch.softmax(self.fc(out[:, -1]), -1)


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.fc = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return torch.softmax(self.fc(out[:, -1]), -1)


FAMILIES = {
    "multichannel-cnn": (MultiChannelCNN, (1, 8, 8), "NCHW"),
    "depthwise-separable-hardswish": (DepthwiseSeparable, (1, 8, 8), "NCHW"),
    "residual-add-concat-tanh": (ResidualConcat, (1, 8, 8), "NCHW"),
    "fc-sigmoid-tanh": (GatedMLP, (64,), "flat"),
    "conv1d": (Series1d, (8, 8), "NCL"),
    "gru": (GRUNet, (8, 8), "NLC"),
    "lstm": (LSTMNet, (8, 8), "NLC"),
}


@pytest.fixture(scope="module")
def digits():
    d = load_dataset()
    order = np.random.default_rng(0).permutation(len(d.y))[:900]
    return d.x[order], d.y[order]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_runs_on_tflm_or_is_refused_naming_its_layer(family, digits, tmp_path):
    net, shape, layout = FAMILIES[family]
    x, y = digits
    spec = FeatureSpec(n_features=64, steps=[{"op": "scale", "factor": 1 / 16}],
                       input_shape=shape if len(shape) > 1 else (), layout=layout)
    torch.manual_seed(0)
    case = _case(f"family-{family}", net(), spec, x, y, True, 6, 10)
    artifact = _convert(case, "mcu")
    try:
        check_operators(tier("mcu"), artifact)
    except UnsupportedOperator as refused:
        message = str(refused)
        print(f"{family}: refused: {message}")
        assert family in ("gru", "lstm"), message               # only a recurrent family may be refused
        assert "\n" not in message and "from layer" in message
        return
    out = _device_outputs(case, _bundle(case, "mcu", artifact))
    want = case.float_outputs(case.test_raw)
    agreement = float((out.argmax(1) == want.argmax(1)).mean())
    print(f"{family}: ops {sorted({op.name for op in artifact.operators})}, top-1 agreement {agreement:.3f}")
    assert agreement >= 0.9, (family, agreement)
    assert np.abs(out - want).max() < 0.25
    # the AOT compiler takes the family too, bit for bit against TFLM on the held-out rows
    from edgeloop.cloud.package.aot_firmware import tflm_int8_outputs
    from edgeloop.device_sdk.runtime import quantize
    from edgeloop.kernels.aot import build_host, compile_tflite, run_host

    model = artifact.files["model.tflite"]
    compiled = compile_tflite(model)
    rows = quantize(spec.model_input(case.test_raw).reshape(len(case.test_raw), -1), compiled.input_scale,
                    compiled.input_zero_point, np.int8)
    got = run_host(build_host(compiled, tmp_path), rows)
    assert np.array_equal(got.reshape(len(rows), -1), tflm_int8_outputs(model, rows)), family
