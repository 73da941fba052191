"""``edgeloop models import``: a model trained elsewhere becomes a model version (cloud/package/importing.py).

A tiny digits MLP is trained here and written as ONNX, TorchScript, torch.export (.pt2), a float
.tflite and a fully int8 .tflite; each imports on the digits data with its lineage (run record
says imported, file hash), metrics close to the float model's, and packages for the tiers that
run it. Bad files and mismatches are one line, exit 2, nothing registered."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeloop.cloud.train.datasets import default_dataset_path, load_dataset
from edgeloop.cloud.errors import UserError
from edgeloop.cloud.package.export import export_onnx
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.workspace import Workspace
from edgeloop.cloud.store.readonly import query as raw_rows
from conftest import run_cli  # noqa: E402

DIGITS = str(default_dataset_path())


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGELOOP_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)


class _Logits(nn.Module):
    """The trained MLP without its softmax: a classifier that does not output probabilities."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.inner = wrapped.inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The float digits model, its test accuracy, and the model files of every format."""
    from edgeloop.cloud.package import quantize
    from edgeloop.cloud.train.training import TrainParams, train

    ds = load_dataset()
    train_split, _, test = ds.split()
    r = train(ds, TrainParams(epochs=4))
    model = r.model.eval()
    d = tmp_path_factory.mktemp("models")
    x = r.features.model_input(test.x[:64])
    files = {"onnx": d / "digits.onnx", "torchscript": d / "digits.ts", "torch-export": d / "digits.pt2",
             "tflite": d / "digits.tflite", "tflite-int8": d / "digits-int8.tflite", "logits": d / "logits.onnx",
             "wrong-shape": d / "wide.onnx"}
    files["onnx"].write_bytes(export_onnx(model, 64, check_inputs=x))
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    files["torchscript"].write_bytes(buf.getvalue())
    program = torch.export.export(model, (torch.zeros(2, 64),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    files["torch-export"].write_bytes(buf.getvalue())
    fp32 = quantize.litert_fp32(model, (64,))
    files["tflite"].write_bytes(fp32)
    files["tflite-int8"].write_bytes(quantize.litert_full_int8(fp32, r.features.model_input(train_split.x[:256])))
    files["logits"].write_bytes(export_onnx(_Logits(model), 64))
    wide = nn.Sequential(nn.Linear(32, 10), nn.Softmax(dim=-1))
    files["wrong-shape"].write_bytes(export_onnx(wide, 32))
    return {"files": files, "test_accuracy": r.metrics["test_accuracy"]}


def _ws(tmp_path: Path) -> tuple[Workspace, Registry]:
    ws = Workspace.init(tmp_path / "ws")
    return ws, Registry(ws.registry_path)


def _import(tmp_path: Path, capsys, file: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(["models", "import", str(file), "--name", "ext", "--data", DIGITS,
                    "--workspace", str(tmp_path / "ws"), "--json", *extra], capsys)


def _counts(ws: Workspace) -> tuple[int, int]:
    return (raw_rows(ws.registry_path, "select count(*) as n from model_versions")[0]["n"],
            raw_rows(ws.registry_path, "select count(*) as n from runs")[0]["n"])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "torch-export", "tflite", "tflite-int8"])
def test_import_registers_lineage_and_metrics(fmt, models, tmp_path, capsys):
    from edgeloop.contracts.package import sha256_hex

    ws, registry = _ws(tmp_path)
    path = models["files"][fmt]
    code, out, err = _import(tmp_path, capsys, path)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    want_format = "tflite" if fmt.startswith("tflite") else fmt
    assert result["format"] == want_format and result["model_version"] == "ext:1"
    mv = registry.model_version("ext:1")
    sha = sha256_hex(path.read_bytes())
    assert mv["arch"]["kind"] == "imported" and mv["arch"]["format"] == want_format
    assert mv["arch"]["source_sha256"] == sha and mv["arch"]["input_shape"] == [64]
    assert mv["state_sha256"] is None
    run = registry.run(mv["run_id"])
    assert run["status"] == "succeeded" and run["params"]["imported"] is True
    assert run["code"]["imported"]["format"] == want_format and run["code"]["imported"]["sha256"] == sha
    assert run["code"]["imported"]["file"] == str(path.resolve())
    assert {"src": f"import:{sha}", "relation": "imported"} in registry.parents(f"run:{mv['run_id']}")
    assert any(p["src"].startswith("dataset:") for p in registry.parents(f"run:{mv['run_id']}"))
    assert registry.artifact_path(sha)
    if fmt == "onnx":
        assert mv["onnx_sha256"] == sha
    elif fmt.startswith("tflite"):
        assert mv["onnx_sha256"] is None
        assert mv["arch"]["int8"] is (fmt == "tflite-int8")
    else:
        assert mv["onnx_sha256"] and mv["onnx_sha256"] != sha
    tol = 0.03 if fmt == "tflite-int8" else 0.005
    assert abs(mv["metrics"]["test_accuracy"] - models["test_accuracy"]) <= tol, mv["metrics"]
    assert mv["task"]["kind"] == "classification" and len(mv["labels"]) == 10


def test_importing_the_same_file_twice_is_one_version_and_other_settings_are_another(models, tmp_path, capsys):
    """Done twice: the same file, data set, preprocessing and task is the version it already
    made (nothing registered again); another preprocessing is a new version."""
    ws, _ = _ws(tmp_path)
    path = models["files"]["onnx"]
    assert _import(tmp_path, capsys, path)[0] == 0
    before = _counts(ws)
    code, out, err = _import(tmp_path, capsys, path)
    again = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and again["model_version"] == "ext:1" and again["created"] is False
    assert _counts(ws) == before
    code, out, _ = run_cli(["models", "import", str(path), "--name", "ext", "--data", DIGITS,
                            "--workspace", str(tmp_path / "ws")], capsys)
    assert code == 0 and "already imported, unchanged: ext:1" in out
    code, out, _ = _import(tmp_path, capsys, path, "--preprocess", "none")
    other = json.loads(out.strip().splitlines()[-1])
    assert other["model_version"] == "ext:2" and other["created"] is True
    assert _counts(ws) == (before[0] + 1, before[1] + 1)


@pytest.fixture
def imported(models, tmp_path, capsys):
    def make(fmt: str) -> tuple[Workspace, Registry, str]:
        ws, registry = _ws(tmp_path)
        code, _, err = _import(tmp_path, capsys, models["files"][fmt])
        assert code == 0, err
        return ws, registry, "ext:1"
    return make


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "torch-export"])
def test_onnx_backed_import_packages_for_edge_gateway(fmt, imported):
    from edgeloop.cloud.loop.pipeline import package_model

    ws, registry, mv = imported(fmt)
    result = package_model(ws, registry, mv, "edge-gateway")
    assert result.manifest.runtime == "onnxruntime" and result.manifest.numeric_format == "int8"
    assert result.manifest.measured["top1_agreement_with_float"] >= 0.9
    assert registry.package_for(mv, "edge-gateway")["sha256"] == result.sha256


def test_onnx_import_packages_for_mobile_through_onnx2torch(imported):
    """onnx2torch rebuilds a PyTorch module from the imported graph; litert-torch traces it."""
    from edgeloop.cloud.loop.pipeline import package_model

    ws, registry, mv = imported("onnx")
    result = package_model(ws, registry, mv, "mobile")
    assert result.manifest.entrypoint == "model.tflite"
    assert result.manifest.measured["top1_agreement_with_float"] >= 0.95


def test_int8_tflite_packages_for_mcu_and_refuses_onnx_tiers(imported, tmp_path, capsys):
    from edgeloop.cloud.loop.pipeline import package_model

    ws, registry, mv = imported("tflite-int8")
    result = package_model(ws, registry, mv, "mcu")
    assert result.manifest.runtime == "tflite-micro" and result.manifest.numeric_format == "int8"
    assert "model_data.h" in result.manifest.layout.get("c_header", "")
    assert result.manifest.measured["top1_agreement_with_float"] >= 0.9
    # the imported file gets the AOT C library too, proven on the emulated Cortex-M4
    assert result.manifest.measured.get("aot_bitexact_tflm") is True, result.manifest.measured.get("aot_refused")
    assert "model.c" in result.manifest.layout["aot"]
    code, out, err = run_cli(["package", mv, "--tier", "edge-gateway", "--workspace", str(ws.root)], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "an imported .tflite runs only on .tflite tiers" in lines[0]
    with pytest.raises(UserError, match="only on .tflite tiers"):
        package_model(ws, registry, mv, "gpu-server")


def test_float_tflite_packages_for_mobile_not_mcu(imported):
    from edgeloop.cloud.loop.pipeline import package_model

    ws, registry, mv = imported("tflite")
    result = package_model(ws, registry, mv, "mobile")
    assert result.manifest.runtime == "litert" and result.manifest.numeric_format == "fp32"
    with pytest.raises(UserError, match="fully int8"):
        package_model(ws, registry, mv, "mcu")


def test_preprocess_none_gives_a_spec_without_steps(models, tmp_path, capsys):
    ws, registry = _ws(tmp_path)
    code, _, err = _import(tmp_path, capsys, models["files"]["onnx"], "--preprocess", "none")
    assert code == 0, err
    assert registry.model_version("ext:1")["features"]["steps"] == []


def _bad(kind: str, models, tmp_path: Path) -> Path:
    if kind in ("logits", "wrong-shape"):
        return models["files"][kind]
    path = tmp_path / {"text": "notes.onnx", "truncated": "cut.onnx", "random-tflite": "noise.tflite",
                       "fake-tflite": "fake.tflite"}[kind]
    if kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "truncated":
        data = models["files"]["onnx"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random-tflite":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    else:   # the TFL3 identifier, garbage after it
        path.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 4)
    return path


@pytest.mark.parametrize("kind, needle", [
    ("text", "not a model edgeloop can import"),
    ("truncated", "not a model edgeloop can import"),
    ("wrong-shape", "takes inputs of shape (32,) per example, the data set"),
    ("logits", "must end in softmax"),
    ("random-tflite", "is not a .tflite model"),
    ("fake-tflite", "LiteRT cannot load it"),
])
def test_bad_imports_are_one_line_and_register_nothing(kind, needle, models, tmp_path, capsys):
    ws, _ = _ws(tmp_path)
    before = _counts(ws)
    code, out, err = _import(tmp_path, capsys, _bad(kind, models, tmp_path))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines) == 1, err
    assert needle in lines[0] and lines[0].startswith("edgeloop: error:"), lines[0]
    assert _counts(ws) == before
    if kind == "wrong-shape":
        assert "(64,)" in lines[0]
