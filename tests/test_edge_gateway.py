"""The edge-gateway runtime (edge/gateway.py): a real agent with an installed package, a real
broker and ingest, and local HTTP clients asking it for inferences."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from edgeloop.cloud.ingest.control_plane import ControlPlane
from edgeloop.cloud.registry import Registry
from conftest import edge_gateway_package, wait_for
from edgeloop.contracts.messages import Announce
from edgeloop.device_sdk.agent import Agent, AgentConfig
from edgeloop.device_sdk.ota import Installer
from edgeloop.edge.gateway import MAX_ROWS, GatewayServer, main


@pytest.fixture(scope="module")
def package():
    return edge_gateway_package(epochs=2)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/infer", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _agent(state, broker, pkg=None) -> Agent:
    if pkg is not None:
        m = pkg.manifest
        Installer(state, "edge-gateway", 1 << 22).install(
            Announce("u1", "m", m.model_version, "edge-gateway", pkg.target_path, len(pkg.data), pkg.sha256,
                     "http://unused", "http://unused", time.time()), lambda a: pkg.data)
    agent = Agent(AgentConfig(device_id=state.name, tier="edge-gateway", state_dir=state, mqtt_host=broker.host,
                              mqtt_port=broker.port, telemetry_window=10))
    agent.start()
    return agent


def test_gateway_serves_the_installed_model_and_reports_it_in_telemetry(tmp_path, broker, package):
    pkg, test = package
    registry = Registry(tmp_path / "registry.db")
    cp = ControlPlane(registry, broker.host, broker.port).start()
    agent = _agent(tmp_path / "gw-local-1", broker, pkg)
    server = GatewayServer(agent, port=0).start()
    try:
        x, y = test.x[:40], test.y[:40]
        status, out = _post(server.url, json.dumps({"inputs": x.tolist(), "labels": y.tolist()}).encode())
        assert status == 200 and out["model_version"] == "m:1" and len(out["predictions"]) == 40
        ref = np.argmax(agent.runtime.predict(x), axis=1)                 # the same model, called directly
        assert out["predictions"] == ref.tolist()
        assert np.mean(np.array(out["predictions"]) == y) > 0.8
        wait_for(lambda: (agent.pump(), registry.telemetry_summary()["inferences"] == 40)[1],
                 what="the requests in the gateway's telemetry")
        summary = registry.telemetry_summary()
        assert summary["records"] == 4 and summary["accuracy"] == pytest.approx(np.mean(ref == y))
        with urllib.request.urlopen(server.url + "/v1/health", timeout=10) as resp:
            health = json.loads(resp.read())
        assert health["model_version"] == "m:1" and health["device_id"] == "gw-local-1"
    finally:
        server.stop()
        agent.stop()
        cp.stop()
        registry.close()


def test_bad_requests_get_one_line_and_a_gateway_without_a_model_says_so(tmp_path, broker, package):
    pkg, test = package
    empty = _agent(tmp_path / "gw-local-empty", broker)
    server = GatewayServer(empty, port=0).start()
    try:
        status, out = _post(server.url, json.dumps({"inputs": test.x[:1].tolist()}).encode())
        assert status == 503 and "no model" in out["error"]
    finally:
        server.stop()
        empty.stop()
    agent = _agent(tmp_path / "gw-local-2", broker, pkg)
    server = GatewayServer(agent, port=0).start()
    try:
        row = test.x[0].tolist()
        bad = [b"{not json", b"[]", json.dumps({"inputs": []}).encode(),
               json.dumps({"inputs": [row[:10]]}).encode(),                   # wrong width
               json.dumps({"inputs": [row, row[:-1]]}).encode(),              # ragged
               json.dumps({"inputs": [[True] * 64]}).encode(),
               json.dumps({"inputs": [row], "labels": [1, 2]}).encode(),
               json.dumps({"inputs": [row], "labels": [1.5]}).encode(),            # a classifier's label is a class
               json.dumps({"inputs": [row], "labels": [-1]}).encode(),
               json.dumps({"inputs": [row] * (MAX_ROWS + 1)}).encode()]
        for body in bad:
            status, out = _post(server.url, body)
            assert status == 400 and "\n" not in out["error"] and out["error"], (body[:40], out)
        assert _post(server.url, json.dumps({"inputs": [row]}).encode())[0] == 200   # and it still serves
    finally:
        server.stop()
        agent.stop()


def test_gateway_command_refuses_a_bad_address_in_one_line(tmp_path, capsys):
    code = main(["--device-id", "gw-x", "--state-dir", str(tmp_path / "gw-x"), "--mqtt", "nowhere"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--mqtt needs HOST:PORT" in err
