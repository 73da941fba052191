"""Export a trained model to ONNX (fp32), checked by onnxruntime against PyTorch."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

from cloud.errors import IntegrityError

__all__ = ["export_onnx", "INPUT_NAME", "OUTPUT_NAME"]

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
OPSET = 17


def export_onnx(model: nn.Module, n_features: int, check_inputs: np.ndarray | None = None,
                atol: float = 1e-5) -> bytes:
    """ONNX bytes with a dynamic batch axis. If ``check_inputs`` is given, the exported graph
    is run on onnxruntime and compared with PyTorch; a difference over ``atol`` raises."""
    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, n_features),), buf, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    data = buf.getvalue()
    if check_inputs is not None:
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = session.run(None, {INPUT_NAME: check_inputs.astype(np.float32)})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(check_inputs.astype(np.float32))).numpy()
        diff = float(np.max(np.abs(got - want)))
        if diff > atol:
            raise IntegrityError(f"ONNX export differs from PyTorch by {diff:.3g} (> {atol})")
    return data
