"""One device, one thread: an agent whose link is polled from step() (no paho network thread)
and whose install is the installer's steps completes an update against a real Mosquitto and real
TUF repositories, and neither it nor its parts start a thread. The threaded simulator
(simulators/fleet.py) runs the same class."""

from __future__ import annotations

import threading
import time

from conftest import make_live


def test_an_agent_driven_only_by_step_on_one_thread_installs_an_update(broker, tmp_path, monkeypatch):
    from edgeloop.device_sdk.agent import Agent

    env = make_live(broker, tmp_path, devices=1, agent_overrides={"network_thread": False})
    try:
        agent = env.agents[0]
        assert type(agent) is Agent and type(env.fleet.runs[0].agent) is Agent   # the threaded simulator's device
        assert agent.link.threaded is False
        env.fleet.stop_driving()                 # from here on, this thread is the device's only thread
        v2 = env.new_version()
        env.sign_and_announce(v2)
        me, started = threading.current_thread(), []
        real_start = threading.Thread.start

        def start(self: threading.Thread) -> None:
            if threading.current_thread() is me:
                started.append(self.name)
                raise AssertionError(f"the device started a thread: {self.name}")
            real_start(self)
        monkeypatch.setattr(threading.Thread, "start", start)
        before = {t.ident for t in threading.enumerate()}
        deadline = time.time() + 60
        while agent.model_version != v2 and time.time() < deadline:
            agent.step(0.02)
        monkeypatch.undo()
        assert agent.model_version == v2 and agent.last_result is not None
        assert str(agent.last_result.state) == "committed"
        assert started == []
        # the cloud side in this process (the repository server's per-request handlers, the ingest)
        # may start threads of its own; none of them is a network or install thread of the device
        appeared = [t for t in threading.enumerate() if t.ident not in before]
        assert not [t.name for t in appeared if "paho" in t.name or "install" in t.name or agent.device_id in t.name]
        assert agent.infer(env.test.x[:1]) is not None
    finally:
        env.close()
