"""Training is reproducible, and the features the model was trained on are the features every
runtime computes (no training-serving skew)."""

from __future__ import annotations

import numpy as np
import torch

from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.package.export import export_onnx
from edgeloop.cloud.package.packaging import build_package
from edgeloop.cloud.train.training import TrainParams, train
from edgeloop.contracts.package import read_package
from edgeloop.device_sdk.runtime import OnnxModel


def test_same_seed_gives_bit_identical_weights_and_another_seed_does_not():
    ds = load_dataset()
    a = train(ds, TrainParams(seed=3, epochs=3))
    b = train(ds, TrainParams(seed=3, epochs=3))
    c = train(ds, TrainParams(seed=4, epochs=3))
    assert a.weights_sha256 == b.weights_sha256
    assert a.weights_sha256 != c.weights_sha256
    assert a.metrics == b.metrics


def test_device_runtime_on_raw_inputs_matches_training_pipeline():
    ds = load_dataset()
    _, _, test = ds.split()
    result = train(ds, TrainParams(seed=0, epochs=10))
    assert result.metrics["test_accuracy"] > 0.9
    onnx = export_onnx(result.model, ds.x.shape[1], check_inputs=result.features.apply(test.x[:32]))
    pkg = build_package("m", 1, "edge-gateway", onnx, result.features, [str(i) for i in range(10)],
                        test.x[:8], {})
    runtime = OnnxModel(read_package(pkg.data))
    with torch.no_grad():
        want = result.model(torch.from_numpy(result.features.apply(test.x))).numpy()
    got = runtime.predict(test.x)            # the device gets raw pixels, as in the field
    assert np.max(np.abs(got - want)) < 1e-5
    assert (got.argmax(1) == want.argmax(1)).all()
