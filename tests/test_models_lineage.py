"""Model stages with an evaluation gate, and lineage from a device back to the data hash."""

from __future__ import annotations

import pytest

from edgeloop.cloud.models import GateFailed, lineage, promote
from edgeloop.cloud.loop.pipeline import train_model
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.train.training import TrainParams
from edgeloop.cloud.workspace import Workspace
from edgeloop.fleet.demo import DemoOptions, run_demo


def test_promotion_gate_blocks_a_worse_model_and_leaves_stages_alone(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    good = train_model(ws, registry, TrainParams(epochs=10))["model_version"]
    worse = train_model(ws, registry, TrainParams(epochs=1, seed=7, lr=0.001))["model_version"]
    first = promote(registry, good, "production")
    assert first.to_stage == "production" and first.replaced is None
    with pytest.raises(GateFailed, match="below production"):
        promote(registry, worse, "production")
    assert registry.model_version(worse)["stage"] == "candidate"
    assert registry.model_version(good)["stage"] == "production"
    # through staging, an equally good model is promoted and replaces the incumbent
    better = train_model(ws, registry, TrainParams(epochs=10, seed=1))["model_version"]
    promote(registry, better, "staging")
    result = promote(registry, better, "production", tolerance=0.05)
    assert result.replaced == good and registry.model_version(good)["stage"] == "archived"


def test_unknown_stage_moves_are_refused(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    mv = train_model(ws, registry, TrainParams(epochs=1))["model_version"]
    promote(registry, mv, "archived")
    from edgeloop.cloud.errors import UserError
    with pytest.raises(UserError, match="cannot move"):
        promote(registry, mv, "production")


def test_lineage_walks_from_a_device_back_to_the_data_hash(broker, tmp_path):
    ws = Workspace.init(tmp_path / "ws", mqtt=broker.address)
    result = run_demo(ws, DemoOptions(devices=2, samples=20, epochs=3, prefix="lineage"))
    registry = Registry(ws.registry_path)
    chain = lineage(registry, "lineage-edge-gateway-00001")
    assert chain["device"]["model_version"] == result["model_version"]
    assert chain["update"]["update_id"] == result["update_id"]
    assert chain["package"]["model_version"] == result["model_version"]
    assert chain["model_version"]["run_id"] == result["run_id"] == chain["run"]["run_id"]
    assert chain["dataset"]["sha256"] == result["dataset_sha256"]
    assert chain["run"]["code"]["training_code_sha256"]
