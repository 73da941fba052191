"""The closed loop (issue 7 part 5): pipeline files, content-hash step caching, device-sampled
training data, and the whole loop on real components (broker, agents, rollout controller)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeloop.contracts.errors import SchemaError
from edgeloop.contracts.messages import Telemetry, as_dict, encode, parse
from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.errors import UserError
from edgeloop.cloud.loop.closed_loop import load_pipeline, pipeline_runs, run_pipeline
from edgeloop.cloud.loop.pipeline import train_model
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.train.training import TrainParams
from edgeloop.cloud.workspace import Workspace
from edgeloop.fleet.loop_demo import LoopOptions, run_loop_demo

from conftest import own_broker  # noqa: E402

# this module's own broker: rollouts select devices from the statuses a broker retains
broker = pytest.fixture(scope="module", name="broker")(own_broker)

ROOT = Path(__file__).resolve().parent.parent

PIPE = """
[pipeline]
name = "t"
[collect]
min_samples = 20
[train]
epochs = 3
[gate]
tolerance = 1.0
[package]
tiers = ["edge-gateway"]
"""


def _telemetry(device: str, seq: int, xs: list, ys: list) -> dict:
    rec = Telemetry(device_id=device, seq=seq, model_version="digits-mlp:1", window_start=0.0, window_end=1.0,
                    count=len(ys), labelled=len(ys), correct=0, predictions=[0] * 10, confidence_hist=[0] * 10,
                    latency_ms_p50=1.0, latency_ms_max=1.0, samples={"x": xs, "y": ys})
    parsed = parse(encode(rec))          # what the control plane would store: through the wire format
    row = as_dict(parsed)
    row.pop("extra")
    return row


def _send_samples(registry: Registry, device: str, seq: int, rows: np.ndarray, labels: np.ndarray) -> int:
    return registry.add_telemetry([_telemetry(device, seq, rows.tolist(), labels.tolist())])


@pytest.fixture()
def trained_ws(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    train_model(ws, registry, TrainParams(epochs=3))
    yield ws, registry
    registry.close()


def test_telemetry_samples_are_checked_on_the_wire():
    ok = _telemetry("d1", 0, [[1.0, 2.0]], [3])
    assert ok["samples"] == {"x": [[1.0, 2.0]], "y": [3]}
    base = json.loads(encode(parse(encode(Telemetry(
        device_id="d", seq=0, model_version=None, window_start=0, window_end=1, count=2, labelled=0, correct=0,
        predictions=[], confidence_hist=[], latency_ms_p50=0, latency_ms_max=0)))))
    for bad, why in (({"x": [[1.0]], "y": []}, "same length"), ({"x": [[1.0], [1.0, 2.0]], "y": [1, 1]}, "equal-length"),
                     ({"x": [[1.0]] * 3, "y": [1] * 3}, "at most"), ({"x": [[1.0]], "y": ["3"]}, "finite numbers"),
                     ({"x": [["a"]], "y": [1]}, "finite")):
        with pytest.raises(SchemaError, match=why):
            parse(json.dumps({**base, "samples": bad}))


def test_device_samples_are_stored_once_per_record(trained_ws):
    ws, registry = trained_ws
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert _send_samples(registry, "dev-a", 0, x, np.array([1, 2])) == 1
    assert _send_samples(registry, "dev-a", 0, x, np.array([1, 2])) == 0       # the same record again
    xs, ys, ids = registry.device_samples()
    assert ys == [1, 2] and ids == ["dev-a", "dev-a"] and xs[1] == [4.0, 5.0, 6.0, 7.0]


def test_pipeline_reuses_unchanged_steps_and_reruns_on_new_device_data(trained_ws, tmp_path):
    ws, registry = trained_ws
    digits = load_dataset()
    _send_samples(registry, "dev-a", 0, digits.x[:25], digits.y[:25])
    pipe_file = tmp_path / "p.toml"
    pipe_file.write_text(PIPE)
    pipe = load_pipeline(pipe_file)
    first = run_pipeline(ws, registry, pipe)
    assert first.status == "succeeded", first.reason
    assert [s.step for s in first.steps] == ["collect", "train", "evaluate", "package"]
    assert not any(s.cached for s in first.steps)
    assert first.output("collect")["device_rows"] == 25
    v2 = first.output("train")["model_version"]
    assert v2 == "digits-mlp:2"
    again = run_pipeline(ws, registry, pipe)
    assert all(s.cached for s in again.steps) and again.output("train")["model_version"] == v2
    assert [m["model_version"] for m in registry.model_versions()].count(v2) == 1   # nothing retrained
    _send_samples(registry, "dev-b", 0, digits.x[25:30], digits.y[25:30])          # new device data
    third = run_pipeline(ws, registry, pipe)
    assert not third.steps[0].cached and third.output("collect")["device_rows"] == 30
    assert third.output("train")["model_version"] == "digits-mlp:3"
    runs = pipeline_runs(registry)
    assert [r["status"] for r in runs] == ["succeeded"] * 3
    # the collected data set is content-addressed: lineage reaches the device data
    collected = registry.dataset(third.output("collect")["dataset_id"])
    assert collected["sha256"] == third.output("collect")["dataset_sha256"]


def test_regression_samples_keep_their_float_targets_on_the_wire():
    row = _telemetry("d1", 0, [[1.0, 2.0], [3.0, 4.0]], [-12.5, 151.0])
    assert row["samples"]["y"] == [-12.5, 151.0]


CNN_DEF = """
from torch import nn

def build(input_shape, n_outputs):
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, WIDTH, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(WIDTH * h * w, n_outputs))
"""


def test_pipeline_with_your_model_def_on_image_data_retrains_when_the_definition_changes(tmp_path):
    """model_def in [train], relative to the pipeline file; device samples of 1x8x8 images are
    collected into an .npz that keeps the shape; an edited definition retrains, an unchanged one not."""
    from edgeloop.cloud.train.example_data import write_example

    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    data = write_example("digits-images", tmp_path / "data")
    (tmp_path / "pipe" / "models").mkdir(parents=True)
    (tmp_path / "pipe" / "models" / "cnn.py").write_text(CNN_DEF.replace("WIDTH", "4"))
    train_model(ws, registry, TrainParams(epochs=2), data=str(data), model="img",
                model_def=str(tmp_path / "pipe" / "models" / "cnn.py") + ":build")
    digits = load_dataset()
    _send_samples(registry, "cam-1", 0, digits.x[:25], digits.y[:25])
    pipe_file = tmp_path / "pipe" / "p.toml"
    pipe_file.write_text(PIPE.replace('name = "t"', 'name = "t"\nmodel = "img"')
                         .replace("epochs = 3", 'epochs = 2\nmodel_def = "models/cnn.py:build"'))
    first = run_pipeline(ws, registry, load_pipeline(pipe_file))
    assert first.status == "succeeded", first.reason
    collected = registry.dataset(first.output("collect")["dataset_id"])
    assert collected["schema"]["input_shape"] == [1, 8, 8] and collected["path"].endswith(".npz")
    assert first.output("collect")["device_rows"] == 25
    mv = registry.model_version(first.output("train")["model_version"])
    assert mv["features"]["input_shape"] == [1, 8, 8]
    assert registry.run(mv["run_id"])["code"]["model_def"]["function"] == "build"
    assert all(s.cached for s in run_pipeline(ws, registry, load_pipeline(pipe_file)).steps)
    (tmp_path / "pipe" / "models" / "cnn.py").write_text(CNN_DEF.replace("WIDTH", "6"))
    edited = run_pipeline(ws, registry, load_pipeline(pipe_file))
    assert edited.steps[0].cached and not edited.steps[1].cached
    assert edited.output("train")["model_version"] == "img:3"


def test_regression_pipeline_gates_on_mae(tmp_path):
    from edgeloop.cloud.train.example_data import example_arrays, write_example

    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    data = write_example("diabetes", tmp_path / "data")
    first = train_model(ws, registry, TrainParams(epochs=40), data=str(data), model="dia",
                        model_def="edgeloop.cloud.examples.models:regression_mlp")
    from edgeloop.cloud.models import promote
    promote(registry, first["model_version"], "production")
    arrays = example_arrays("diabetes")
    row = _telemetry("clinic-1", 0, arrays["x"][:30].tolist(), arrays["y"][:30].tolist())
    registry.add_telemetry([row])
    pipe_file = tmp_path / "p.toml"
    pipe_file.write_text(PIPE.replace('name = "t"', 'name = "t"\nmodel = "dia"')
                         .replace("epochs = 3", 'epochs = 40\nmodel_def = "edgeloop.cloud.examples.models:regression_mlp"\n'
                                                'task = "regression"')
                         .replace("tolerance = 1.0", "tolerance = 0.5\nmax_mae = 80.0"))
    run = run_pipeline(ws, registry, load_pipeline(pipe_file))
    assert run.status == "succeeded", run.reason
    verdict = run.output("evaluate")
    assert verdict["metric"] == "mae" and 20 < verdict["candidate_mae"] < 80 and verdict["production_mae"] > 0
    assert "test_mae" in run.output("train")
    collected = registry.dataset(run.output("collect")["dataset_id"])
    assert collected["schema"]["task"] == "regression" and collected["schema"]["rows"] == 442 + 30
    strict = tmp_path / "strict.toml"
    strict.write_text(pipe_file.read_text().replace("max_mae = 80.0", "max_mae = 1.0"))
    failed = run_pipeline(ws, registry, load_pipeline(strict))
    assert failed.status == "failed" and "above max_mae 1.0" in failed.reason


def test_pipeline_gate_failure_stops_before_packaging(trained_ws, tmp_path):
    ws, registry = trained_ws
    digits = load_dataset()
    _send_samples(registry, "dev-a", 0, digits.x[:25], digits.y[:25])
    (tmp_path / "p.toml").write_text(PIPE.replace("tolerance = 1.0", "tolerance = 0.0\nmin_accuracy = 1.01"))
    run = run_pipeline(ws, registry, load_pipeline(tmp_path / "p.toml"))
    assert run.status == "failed" and "below min_accuracy" in run.reason
    assert [s.step for s in run.steps] == ["collect", "train", "evaluate"]


@pytest.mark.parametrize("text, message", [
    ("[pipeline]\nname='x'\n[bogus]\n", "unknown section"),
    ("[pipeline]\n", "needs a name"),
    ("[pipeline\n", "not valid TOML"),
    ("[pipeline]\nname='x'\n[train]\nepochz=3\n", "unknown \\[train\\]"),
    ("[pipeline]\nname='x'\n[rollout]\nstrategy='all'\n", "needs a target"),
])
def test_bad_pipeline_files_are_refused_with_the_reason(tmp_path, text, message):
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(UserError, match=message):
        load_pipeline(tmp_path / "p.toml")


def test_pipeline_without_device_data_says_how_to_get_it(trained_ws, tmp_path):
    ws, registry = trained_ws
    (tmp_path / "p.toml").write_text(PIPE)
    with pytest.raises(UserError, match="edgeloop simulate --devices 20 --sample-rate 0.5"):
        run_pipeline(ws, registry, load_pipeline(tmp_path / "p.toml"))
    assert pipeline_runs(registry)[0]["status"] == "failed"


def test_cli_pipeline_run_with_a_rollout_needs_a_serving_control_plane(tmp_path):
    ws = tmp_path / "ws"
    Workspace.init(ws)
    shipped = ROOT / "cloud" / "loop" / "pipelines" / "digits-retrain.toml"
    proc = subprocess.run([sys.executable, "-m", "edgeloop.fleet.cli", "pipeline", "run", str(shipped), "-w", str(ws)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "edgeloop serve" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "edgeloop.fleet.cli", "pipeline", "show", "nope", "-w", str(ws)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode != 0 and "no pipeline run" in proc.stderr and "Traceback" not in proc.stderr


def test_the_closed_loop_detects_drift_retrains_on_device_data_and_recovers(tmp_path, broker):
    ws = Workspace.init(tmp_path / "ws", mqtt=broker.address)
    r = run_loop_demo(ws, LoopOptions(devices=6, samples=160, epochs=20, timeout_s=180))
    drifted = r["drifted_devices"]
    assert drifted == 3
    # the drift hurt the drifted devices, and only them
    assert r["accuracy_after_drift"]["drifted_devices"] < r["accuracy_before_drift"]["drifted_devices"] - 0.2
    assert abs(r["accuracy_after_drift"]["other_devices"] - r["accuracy_before_drift"]["other_devices"]) < 0.08
    # detected on exactly the drifted devices
    assert r["flagged_drifted"] == drifted and r["flagged_clean"] == 0
    # retrained on what the devices sampled, rolled out by canary, promoted
    assert r["collected_device_rows"] > 100 and r["pipeline_status"] == "succeeded"
    assert r["rollout_counts"]["committed"] == 6 and r["production"] == [r["v2"]]
    # and the fleet recovered on rows no model was trained on
    assert r["accuracy_after_v2"]["drifted_devices"] > r["accuracy_after_drift"]["drifted_devices"] + 0.2
    assert r["accuracy_after_v2"]["fleet"] > r["accuracy_after_drift"]["fleet"]
    # run again in the same workspace (the operator re-runs `demo --loop` in one folder): the
    # story starts over on the fleet as it is now, and is not answered from the first run's records
    again = run_loop_demo(ws, LoopOptions(devices=6, samples=160, epochs=20, timeout_s=180))
    assert again["pipeline_status"] == "succeeded" and again["rollout_id"] != r["rollout_id"]
    assert again["v1"] != r["v1"] and again["production"] == [again["v2"]]
    assert again["rollout_counts"]["committed"] == 6
    assert again["flagged_drifted"] == drifted


def test_a_shipped_pipeline_is_named_by_its_stem_and_a_wrong_name_lists_them(tmp_path):
    from edgeloop.cloud.errors import UserError
    from edgeloop.fleet.cli_pipeline import pipeline_file, shipped_pipelines

    shipped = shipped_pipelines()
    assert "digits-retrain" in shipped and shipped["digits-retrain"].read_text().startswith("#")
    assert pipeline_file("digits-retrain") == shipped["digits-retrain"]
    own = tmp_path / "mine.toml"
    own.write_text("[pipeline]\n")
    assert pipeline_file(str(own)) == own                 # a path that exists is always the path
    assert pipeline_file("nope.toml") == Path("nope.toml")  # a path: load_pipeline says it cannot read it
    with pytest.raises(UserError, match="shipped: digits-retrain"):
        pipeline_file("digits-retrian")
