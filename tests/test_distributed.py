"""Distributed training through torchrun (2 gloo processes on CPU), reproducibility, and what
happens when workers die or the loss diverges."""

from __future__ import annotations

import gzip
import shutil

import pytest

from edgeloop.cloud.errors import IntegrityError
from edgeloop.cloud.train.launcher import DistConfig, run_job
from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.loop.pipeline import reproduce_run, train_model
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.train.worker import STARTUP_FAULT_ENV
from edgeloop.cloud.train.training import FAULT_ENV, TrainParams, TrainingFailed
from edgeloop.cloud.workspace import Workspace

PARAMS = TrainParams(epochs=2, checkpoint_every=8)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One clean 2-process run, the reference the other tests compare with."""
    return run_job(load_dataset(), PARAMS, DistConfig(nproc_per_node=2), tmp_path_factory.mktemp("ref"))


def test_two_process_ddp_trains_and_reduces_metrics(uninterrupted):
    assert uninterrupted.world_size == 2
    assert len(uninterrupted.history) == 2 and uninterrupted.history[-1]["loss"] < uninterrupted.history[0]["loss"]
    assert uninterrupted.metrics["test_accuracy"] > 0.8
    assert uninterrupted.resumed_from_step is None


def test_killed_rank_resumes_from_checkpoint_to_the_same_weights(tmp_path, monkeypatch, uninterrupted):
    monkeypatch.setenv(FAULT_ENV, "1:13")          # rank 1 dies at step 13, after the step-8 checkpoint
    result = run_job(load_dataset(), PARAMS, DistConfig(nproc_per_node=2, max_restarts=1), tmp_path)
    assert result.resumed_from_step == 8
    assert result.weights_sha256 == uninterrupted.weights_sha256


def test_workers_that_never_form_a_process_group_are_relaunched_without_using_the_restart_budget(
        tmp_path, monkeypatch, uninterrupted):
    monkeypatch.setenv(STARTUP_FAULT_ENV, "1")
    result = run_job(load_dataset(), PARAMS, DistConfig(nproc_per_node=2, max_restarts=0), tmp_path)
    assert "injected start-up failure" in (tmp_path / "torchrun.log").read_text()
    assert result.resumed_from_step is None
    assert result.weights_sha256 == uninterrupted.weights_sha256


def test_worker_death_beyond_restart_budget_fails_the_run_and_registers_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "0:3")
    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    with pytest.raises(TrainingFailed, match="failed"):
        train_model(ws, registry, PARAMS, dist=DistConfig(nproc_per_node=2, max_restarts=0))
    (run,) = registry.runs()
    assert run["status"] == "failed" and "exit code" in run["reason"]
    assert registry.model_versions() == []


def test_diverging_loss_fails_the_run_with_the_reason(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    with pytest.raises(TrainingFailed, match="non-finite"):
        train_model(ws, registry, TrainParams(epochs=2, lr=1e30))
    (run,) = registry.runs()
    assert run["status"] == "failed" and "non-finite" in run["reason"]
    assert registry.model_versions() == []


def test_reproduce_gives_bit_identical_weights_for_a_two_process_run(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    trained = train_model(ws, registry, PARAMS, dist=DistConfig(nproc_per_node=2))
    record = registry.run(trained["run_id"])
    assert record["dist"]["world_size"] == 2
    for key in ("commit", "dirty", "training_code_sha256"):
        assert key in record["code"]
    assert record["environment"]["torch"] and len(record["environment"]["packages_sha256"]) == 64
    assert record["hardware"]["cpu_count"] >= 1 and len(record["history"]) == 2
    again = reproduce_run(ws, registry, trained["run_id"])
    assert again["identical"] is True and again["bit_identity_expected"] is True
    assert again["weights_sha256"] == again["original_weights_sha256"] == trained["weights_sha256"]
    # on one process instead of two, identity cannot hold: it says so and reports metrics
    other = reproduce_run(ws, registry, trained["run_id"], DistConfig(nproc_per_node=1))
    assert other["bit_identity_expected"] is False and other["notes"]
    assert set(other["metric_difference"]) >= {"test_accuracy", "val_accuracy"}


def test_changed_data_set_under_the_same_name_is_refused(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    data = tmp_path / "digits.csv.gz"
    shutil.copy(load_dataset().path, data)
    from edgeloop.cloud.loop.pipeline import register_dataset
    register_dataset(registry, "mine", data)
    trained = train_model(ws, registry, TrainParams(epochs=1), data="mine")
    assert trained["dataset_id"] == "mine:1"
    rows = gzip.decompress(data.read_bytes()).splitlines()
    data.write_bytes(gzip.compress(b"\n".join(rows[:-5]) + b"\n"))     # someone edits the file in place
    with pytest.raises(IntegrityError, match="changed"):
        train_model(ws, registry, TrainParams(epochs=1), data="mine")
    with pytest.raises(IntegrityError, match="changed"):
        reproduce_run(ws, registry, trained["run_id"])
    # registering the new content makes a new version; the old record is untouched
    _, dataset_id, created = register_dataset(registry, "mine", data)
    assert (dataset_id, created) == ("mine:2", True)
    assert registry.dataset("mine:1")["sha256"] == trained["dataset_sha256"]
