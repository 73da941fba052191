"""An mcu device serving its package's own AOT C library (device_sdk/aot_runtime.py): picked by
load_runtime, bit-exact to TFLite Micro, healthy on its golden vectors, built once per source
content, and refused with one line (the working model kept) when the library does not build."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from edgeloop.contracts.package import Package, read_package, sha256_hex, write_package
from edgeloop.contracts.messages import Announce
from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.loop.pipeline import package_model, train_model
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.train.training import TrainParams
from edgeloop.cloud.workspace import Workspace
from edgeloop.device_sdk import aot_runtime
from edgeloop.device_sdk.aot_runtime import AOTModel, int8_outputs
from edgeloop.device_sdk.errors import UpdateRefused
from edgeloop.device_sdk.ota import Installer, InstallState
from edgeloop.device_sdk.runtime import TFLMModel, health_check, load_runtime

AOT_LAYOUT = {"model.c": "aot-model.c", "model.h": "aot-model.h", "edgeloop_kernels.c": "aot-edgeloop_kernels.c",
              "edgeloop_kernels.h": "aot-edgeloop_kernels.h", "prefix": "edgeloop_model"}


def _with_aot(data: bytes) -> bytes:
    """The package as the packager ships it; if it does not carry the AOT library yet, add it
    from a compile of its own .tflite (the layout the packager writes)."""
    bundle = read_package(data)
    if "aot" in bundle.manifest.layout and "aot-model.c" in bundle.files:
        return data
    from edgeloop.kernels.aot import compile_tflite

    compiled = compile_tflite(bundle.model_bytes)
    files = {**bundle.files, **{"aot-" + name: text.encode() for name, text in compiled.files.items()}}
    layout = {**bundle.manifest.layout, "aot": AOT_LAYOUT}
    return write_package(dataclasses.replace(bundle.manifest, layout=layout), files)


def _rewritten(bundle: Package, files: dict[str, bytes] | None = None, **changes) -> bytes:
    return write_package(dataclasses.replace(bundle.manifest, **changes), files or dict(bundle.files))


@pytest.fixture(scope="module")
def mcu(tmp_path_factory):
    ws = Workspace.init(tmp_path_factory.mktemp("aot") / "ws")
    registry = Registry(ws.registry_path)
    mv = train_model(ws, registry, TrainParams(epochs=8))["model_version"]
    pkg = package_model(ws, registry, mv, "mcu")
    data = _with_aot(pkg.data)
    _, _, test = load_dataset().split()
    return pkg, data, read_package(data), test.x[:200]


def _announce(data: bytes, uid: str) -> Announce:
    m = read_package(data).manifest
    return Announce(uid, m.model, m.model_version, m.tier, f"{m.model}/{m.version}/{m.tier}.elpkg", len(data),
                    sha256_hex(data), "http://unused", "http://unused", time.time())


def test_the_package_carries_the_aot_library_and_load_runtime_picks_it(mcu):
    pkg, _, bundle, _ = mcu
    shipped = read_package(pkg.data)
    # the packager ships the library when the emulated board proved it (else it says why)
    assert "aot-model.c" in shipped.files or "aot_refused" in shipped.manifest.measured
    assert bundle.manifest.layout["aot"] == AOT_LAYOUT
    runtime = load_runtime(bundle)
    assert isinstance(runtime, AOTModel)
    assert isinstance(load_runtime(bundle, prefer_aot=False), TFLMModel)


def test_aot_is_bit_exact_to_tflm_on_golden_and_200_digits_rows(mcu):
    _, _, bundle, rows = mcu
    aot, tflm = load_runtime(bundle), TFLMModel(bundle)
    golden = np.asarray(json.loads(bundle.files[bundle.manifest.golden])["inputs"], dtype=np.float32)
    for raw in (golden, rows):
        got, want = int8_outputs(aot, raw), int8_outputs(tflm, raw)
        assert got.dtype == np.int8 and got.shape == (len(raw), 10)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(aot.predict(raw), tflm.predict(raw))
    assert aot.check_against_tflm(rows)


def test_the_aot_library_passes_the_packages_golden_check(mcu):
    _, _, bundle, _ = mcu
    report = health_check(load_runtime(bundle), bundle)
    assert report.golden_max_abs_diff <= bundle.manifest.golden_atol
    assert report.golden_max_abs_diff == 0.0        # the golden outputs are TFLM's, and AOT is bit-exact


def test_a_second_load_reuses_the_cached_build(mcu, tmp_path):
    _, _, bundle, rows = mcu
    # new source content (a comment) so this test sees its own first build
    files = {**bundle.files, "aot-model.c": bundle.files["aot-model.c"] + b"\n/* cache test */\n"}
    fresh = read_package(_rewritten(bundle, files))
    before = aot_runtime.build_count()
    start = time.perf_counter()
    first = AOTModel(fresh, build_dir=tmp_path)
    built_s = time.perf_counter() - start
    start = time.perf_counter()
    second = AOTModel(fresh, build_dir=tmp_path)
    cached_s = time.perf_counter() - start
    assert aot_runtime.build_count() == before + 1
    assert first.library_path == second.library_path and first.library_path.parent.parent == tmp_path
    assert cached_s < built_s
    np.testing.assert_array_equal(first.predict(rows[:5]), second.predict(rows[:5]))


def test_two_devices_loading_one_package_at_once_build_it_once_and_serve_in_parallel(mcu, tmp_path):
    """Two at once: devices in one process that load the same new package together share one
    build, and their concurrent requests (one static arena per library) give TFLM's outputs."""
    from concurrent.futures import ThreadPoolExecutor

    _, _, bundle, rows = mcu
    files = {**bundle.files, "aot-model.c": bundle.files["aot-model.c"] + b"\n/* two at once */\n"}
    fresh = read_package(_rewritten(bundle, files))
    before = aot_runtime.build_count()
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: AOTModel(fresh, build_dir=tmp_path), range(4)))
        outputs = list(pool.map(lambda m: int8_outputs(m, rows), models))
    assert aot_runtime.build_count() == before + 1
    assert len({m.library_path for m in models}) == 1
    want = int8_outputs(TFLMModel(fresh), rows)
    assert all(np.array_equal(o, want) for o in outputs)


def test_a_package_without_aot_files_still_runs_on_tflm(mcu):
    _, _, bundle, rows = mcu
    files = {k: v for k, v in bundle.files.items() if not k.startswith("aot-")}
    layout = {k: v for k, v in bundle.manifest.layout.items() if k != "aot"}
    plain = read_package(_rewritten(bundle, files, layout=layout))
    runtime = load_runtime(plain)
    assert type(runtime) is TFLMModel
    np.testing.assert_array_equal(runtime.predict(rows[:20]), TFLMModel(bundle).predict(rows[:20]))


def test_a_library_for_other_sizes_or_without_a_compiler_is_refused(mcu, monkeypatch):
    _, _, bundle, _ = mcu
    out = bundle.manifest.outputs[0]
    wrong = read_package(_rewritten(bundle, outputs=[dataclasses.replace(out, shape=[11])]))
    with pytest.raises(UpdateRefused, match=r"^health\.load: AOT library: the library takes 64 int8 values and "
                                            r"gives 10; the manifest declares 64 and 11$"):
        load_runtime(wrong)
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(UpdateRefused, match=r"^health\.load: AOT library: no C compiler \('no-such-cc'\)"):
        load_runtime(bundle)


def test_a_package_whose_c_does_not_compile_is_rolled_back_and_the_working_model_stays(mcu, tmp_path):
    _, data, bundle, _ = mcu
    inst = Installer(tmp_path, "mcu", 1 << 20)
    result, runtime = inst.install(_announce(data, "u1"), lambda a: data)
    assert result.state == InstallState.COMMITTED and isinstance(runtime, AOTModel)
    working = inst.model_version
    broken_c = bundle.files["aot-model.c"] + b"\nint edgeloop_broken( {\n"
    bad = _rewritten(bundle, {**bundle.files, "aot-model.c": broken_c}, version=bundle.manifest.version + 1)
    result, runtime = inst.install(_announce(bad, "u2"), lambda a: bad)
    assert (result.state, result.code, runtime) == (InstallState.ROLLED_BACK, "health.load", None)
    assert "\n" not in result.reason
    assert result.reason.startswith("AOT library: the C compiler rejected the package's C sources: ")
    assert "model.c" in result.reason and "error" in result.reason
    assert inst.model_version == working
    assert Installer(tmp_path, "mcu", 1 << 20).active_package().manifest.model_version == working
    assert inst.already_handled("u2")
