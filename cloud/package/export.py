"""Export a trained model to ONNX (fp32), checked by onnxruntime against PyTorch."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

from edgeloop.cloud.errors import IntegrityError

__all__ = ["export_onnx", "INPUT_NAME", "OUTPUT_NAME"]

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
OPSET = 17


def export_onnx(model: nn.Module, input_shape: int | tuple[int, ...], check_inputs: np.ndarray | None = None,
                atol: float = 1e-5) -> bytes:
    """ONNX bytes with a dynamic batch axis and input ``(batch, *input_shape)``. If
    ``check_inputs`` (model inputs, shaped) is given, the exported graph is run on onnxruntime
    and compared with PyTorch; a difference over ``atol`` (relative to the output's scale for
    outputs beyond [-1, 1], such as regression targets) raises. The output keeps its wire name
    ``probabilities`` whatever the task (contracts/tasks.py says what it holds)."""
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *shape),), buf, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    data = buf.getvalue()
    if check_inputs is not None:
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = session.run(None, {INPUT_NAME: check_inputs.astype(np.float32)})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(check_inputs.astype(np.float32))).numpy()
        diff = float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))
        if diff > atol:
            raise IntegrityError(f"ONNX export differs from PyTorch by {diff:.3g} (> {atol})")
    return data
