"""The mcu arena in the manifest is the smallest arena TFLite Micro runs the model in (issue 12
item 2): found by bisection in a child process, since TFLM can crash just below it."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeloop.cloud.loop.pipeline import package_model, train_model
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.package.tflm_arena import ArenaSearchError, _run_child, min_arena_bytes
from edgeloop.cloud.train.training import TrainParams
from edgeloop.cloud.workspace import Workspace
from edgeloop.contracts.package import ARENA_MIN_SEARCH, read_package
from edgeloop.device_sdk.runtime import TFLMModel, load_runtime


@pytest.fixture(scope="module")
def mcu_package(tmp_path_factory):
    ws = Workspace.init(tmp_path_factory.mktemp("arena") / "ws")
    registry = Registry(ws.registry_path)
    mv = train_model(ws, registry, TrainParams(epochs=2))["model_version"]
    pkg = package_model(ws, registry, mv, "mcu")
    yield read_package(pkg.data), tmp_path_factory.mktemp("model")
    registry.close()


def test_manifest_arena_runs_and_one_byte_less_does_not(mcu_package):
    bundle, tmp = mcu_package
    m = bundle.manifest.measured
    assert m["ram_bytes_method"] == ARENA_MIN_SEARCH
    assert m["tflm_reported_arena_bytes"] > 0     # beside it, for comparison: it can be below or above
    path = Path(tmp) / "m.tflite"
    path.write_bytes(bundle.model_bytes)
    n = m["ram_bytes"]
    assert _run_child(path, n - 1, n, True, 60.0)[0][-1] == f"ok {n}"
    below, crashed = _run_child(path, n - 2, n - 1, True, 60.0)
    assert crashed or below[-1] == f"fail {n - 1}"


def test_a_device_runs_the_package_in_exactly_the_declared_arena(mcu_package):
    bundle, _ = mcu_package
    runtime = load_runtime(bundle, prefer_aot=False)      # TFLM, the reference, in the declared arena
    assert isinstance(runtime, TFLMModel)
    import json
    import numpy as np
    golden = json.loads(bundle.files[bundle.manifest.golden])
    got = runtime.predict(np.asarray(golden["inputs"], dtype=np.float32))
    assert np.allclose(got, golden["outputs"], atol=bundle.manifest.golden_atol)


def test_search_survives_a_child_that_crashes_just_below_the_minimum(mcu_package):
    """TFLM can take the process down below its minimum: a crashed probe counts as too small and
    a new child carries on. The runner stands in for the child; it crashes within 64 bytes below."""
    true_min = 5000
    children = []

    def runner(path, lo, hi, probe_top, timeout_s):  # noqa: ANN001
        children.append((lo, hi))
        lines = []
        probes = [hi] if probe_top else []
        while True:
            if probes:
                n = probes.pop()
            elif hi - lo > 1:
                n = (lo + hi) // 2
            else:
                return lines, False
            lines.append(f"try {n}")
            if true_min - 64 <= n < true_min:
                return lines, True                       # died inside the probe
            if n >= true_min:
                lines.append(f"ok {n}")
                hi = n
            else:
                lines.append(f"fail {n}")
                if n == hi:
                    return lines, False                  # the top failed: the child stops there
                lo = n

    assert min_arena_bytes(b"model", hi=65536, runner=runner) == true_min
    assert len(children) > 1                              # it had to restart at least once
    with pytest.raises(ArenaSearchError):
        min_arena_bytes(b"model", hi=4000, runner=runner)  # even the top fails: said at once
    assert children[-1] == (0, 4000)
