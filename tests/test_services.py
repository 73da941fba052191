"""The composition root (cloud/services.py) on a real broker: the stack starts in order, serves,
and stops clean (no thread, socket or MQTT session of it left); a stack that cannot start stops
what it had started; several ingest workers split the stream; and `edgeloop serve`, `edgeloop
demo` and `edgeloop demo --loop` all run through it with the same broker link, fleet and
share group."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.cloud import services
from edgeloop.cloud.ingest.control_plane import ControlPlane
from edgeloop.cloud.errors import ServiceUnavailable
from edgeloop.cloud.services import PlainLink, ServiceStack, StackOptions
from edgeloop.cloud.workspace import Workspace
from conftest import free_port, run_cli, wait_for

pytestmark = pytest.mark.e2e

OURS = ("edgeloop-", "mqtt-")        # thread names of the stack's services (HTTP, blocks, MQTT sessions)


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(OURS)}


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture
def ws(broker, tmp_path):
    w = Workspace.init(tmp_path / "ws", mqtt=broker.address)
    from edgeloop.cloud.registry import Registry
    Registry(w.registry_path).close()     # as `edgeloop init` does: keys without a registry is a damaged workspace
    w.image_repository().init()
    w.director_repository().init()
    return w


def test_stack_serves_everything_and_stops_clean(ws):
    before = _threads()
    with ServiceStack(ws, StackOptions(api=("127.0.0.1", 0))) as stack:
        assert urllib.request.urlopen(stack.repository.url.rsplit("/", 1)[0] + "/healthz", timeout=5).read() == b"ok"
        assert urllib.request.urlopen(f"{stack.repository_url}/metadata/1.root.json", timeout=5).status == 200
        assert urllib.request.urlopen(f"{stack.api.url}/healthz", timeout=5).status == 200
        assert stack.control_plane.alive and stack.control_plane.topics.name == ws.fleet
        assert stack.rollouts.send == stack.control_plane.send_command
        assert stack.rollouts.repository_url == stack.repository_url
        ports = [(stack.repository.host, stack.repository.port), (stack.api.host, stack.api.port)]
        assert all(_listening(*p) for p in ports)
    assert not stack.control_plane.alive
    assert not any(_listening(*p) for p in ports)
    wait_for(lambda: _threads() <= before, 5, "the stack's threads to end")
    with pytest.raises(Exception):
        stack.registry.db.execute("select 1")                  # the stack's registry connection is closed
    stack.stop()                                                # twice is fine


def test_stack_that_cannot_reach_the_broker_stops_what_it_started(ws):
    before = _threads()
    http = free_port()
    dead = PlainLink("127.0.0.1", free_port())                   # nothing listens there
    stack = ServiceStack(ws, StackOptions(broker=dead, http=("127.0.0.1", http), api=("127.0.0.1", 0)))
    with pytest.raises(ServiceUnavailable, match="cannot reach MQTT broker"):
        stack.start()
    assert stack.repository is not None and not _listening("127.0.0.1", http)   # started, then stopped
    assert stack.api is None                                    # never reached
    wait_for(lambda: _threads() <= before, 5, "the started services' threads to end")


def test_an_error_inside_the_stack_stops_it(ws):
    before = _threads()
    with pytest.raises(RuntimeError, match="boom"):
        with ServiceStack(ws, StackOptions(rollouts=False)) as stack:
            port = stack.repository.port
            raise RuntimeError("boom")
    assert not stack.control_plane.alive and not _listening("127.0.0.1", port)
    wait_for(lambda: _threads() <= before, 5, "the stack's threads to end")


def test_several_ingest_workers_split_the_stream_and_each_stores_its_share(ws, broker):
    link = PlainLink(broker.host, broker.port)
    with ServiceStack(ws, StackOptions(broker=link, workers=(link,), repository=False, rollouts=False)) as stack:
        assert len(stack.ingest) == 2 and len({cp.group for cp in stack.ingest}) == 1
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="split-publisher", protocol=mqtt.MQTTv5)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        try:
            for i in range(20):
                pub.publish(ws.topics.telemetry(f"split-{i}"), b"not telemetry", qos=1).wait_for_publish(5)
            wait_for(lambda: sum(cp.stats.received for cp in stack.ingest) >= 20, 10, "all 20 at the ingest")
        finally:
            pub.disconnect()
            pub.loop_stop()
        time.sleep(0.3)
        received = [cp.stats.received for cp in stack.ingest]
        assert sum(received) == 20 and all(n > 0 for n in received), received    # split, each once


# -- serve and both demos go through the stack -----------------------------------------------------
class _Enough(Exception):
    """Raised by the spy once it has seen the options: the demos' bodies need not run."""


def _spy(monkeypatch, let_run: bool) -> list[tuple[Workspace, StackOptions]]:
    seen: list[tuple[Workspace, StackOptions]] = []
    real = ServiceStack.start

    def start(self):  # noqa: ANN001, ANN202
        seen.append((self.ws, self.options))
        if not let_run:
            raise _Enough
        return real(self)
    monkeypatch.setattr(services.ServiceStack, "start", start)
    return seen


def _link(options: StackOptions) -> tuple[str, int, dict]:
    return options.broker.host, options.broker.port, options.broker.control_plane_kwargs()


def test_serve_and_both_demos_run_the_same_stack(ws, monkeypatch, capsys):
    seen = _spy(monkeypatch, let_run=True)
    code, out, err = run_cli(["serve", "-w", str(ws.root), "--duration", "0.5", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["fleet"] == ws.fleet and not (ws.root / "serve.json").exists()
    seen_demo = _spy(monkeypatch, let_run=False)
    for argv in (["demo"], ["demo", "--loop"]):
        with pytest.raises(_Enough):
            run_cli([*argv, "-w", str(ws.root), "--debug"], capsys)
    (serve_ws, serve), (demo_ws, demo), (loop_ws, loop) = seen + seen_demo
    assert serve_ws.fleet == demo_ws.fleet == loop_ws.fleet == ws.fleet
    assert _link(serve) == _link(demo) == _link(loop) == (ws.mqtt_host, ws.mqtt_port, {})
    assert serve.share_group == demo.share_group == loop.share_group != "edgeloop-ingest"   # the workspace's secret
    assert serve.shared and demo.shared and loop.shared
    assert serve.api is not None and serve.session == f"edgeloop-ingest-{ws.fleet}"


def test_serve_with_two_ingest_workers_runs_two_control_planes(ws, monkeypatch, capsys):
    started: list[ControlPlane] = []
    real = ControlPlane.start
    monkeypatch.setattr(ControlPlane, "start", lambda self, *a, **k: started.append(self) or real(self, *a, **k))
    code, out, err = run_cli(["serve", "-w", str(ws.root), "--duration", "0.5", "--ingest-workers", "2", "--json"],
                             capsys)
    assert code == 0, err
    assert [cp.session for cp in started] == [f"edgeloop-ingest-{ws.fleet}", f"edgeloop-ingest-{ws.fleet}-2"]
    assert all(not cp.alive for cp in started)
    code, _, err = run_cli(["serve", "-w", str(ws.root), "--ingest", "exclusive", "--ingest-workers", "2"], capsys)
    assert code == 2 and "--ingest-workers 1" in err and len(err.strip().splitlines()) == 1
