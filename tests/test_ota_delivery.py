"""Delivery under bad links: stalled and dropped downloads time out and resume from the bytes
already received (HTTP Range), through python-tuf's verification; and the agent keeps serving
inference, without a failed or delayed request, while an update installs."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import TIER, make_live, wait_for
from edgeloop.simulators.network import Fault, LinkProxy


@pytest.fixture
def slow_live(broker, tmp_path):
    env = make_live(broker, tmp_path, devices=1, agent_overrides={"download_timeout_s": 1.0,
                                                                  "retry_delays_s": (0.2, 0.2, 0.2)})
    proxy = LinkProxy(env.server.url.rsplit("/", 1)[0]).start()
    env.repository_url = f"{proxy.url}/repository"
    env.proxy = proxy
    yield env
    proxy.stop()
    env.close()


def _target_requests(proxy):
    return [r for r in proxy.log if "/targets/" in r.path]


def test_slow_retrieval_stalled_download_times_out_and_resumes(slow_live):
    v2 = slow_live.new_version()
    length = slow_live.registry.package_for(v2, TIER)["length"]
    slow_live.proxy.faults.append(Fault(stall_after=length // 2, stall_s=20))
    slow_live.sign_and_announce(v2)
    wait_for(lambda: slow_live.agents[0].model_version == v2, timeout=30, what="v2 after the stall")
    first, second = _target_requests(slow_live.proxy)[:2]
    assert first.range_start == 0 and 0 < first.sent < length           # stalled part-way
    assert second.range_start == first.sent                             # resumed where it stopped
    assert first.sent + second.sent == length                           # no byte fetched twice
    assert second.status == 206
    assert slow_live.agents[0].client.fetcher.resumed_bytes >= first.sent


def test_dropped_link_resumes_without_refetching_finished_bytes(slow_live):
    v2 = slow_live.new_version()
    length = slow_live.registry.package_for(v2, TIER)["length"]
    slow_live.proxy.faults += [Fault(drop_after=length // 3), Fault(drop_after=length // 3)]
    slow_live.sign_and_announce(v2)
    wait_for(lambda: slow_live.agents[0].model_version == v2, timeout=30, what="v2 after two drops")
    requests = _target_requests(slow_live.proxy)
    assert len(requests) == 3
    assert sum(r.sent for r in requests) == length
    assert [r.range_start for r in requests] == [0, requests[0].sent, requests[0].sent + requests[1].sent]


def test_inference_never_fails_or_waits_during_an_update(broker, tmp_path):
    env = make_live(broker, tmp_path, devices=1)
    try:
        agent = env.agents[0]
        env.fleet.stop_driving()                 # this test drives the agent itself
        v2 = env.new_version()
        served, failures, latencies = [], [], []
        stop = threading.Event()

        def requests():
            while not stop.is_set():
                t = time.perf_counter()
                out = agent.infer(env.test.x[:1])
                latencies.append(time.perf_counter() - t)
                (served if out is not None else failures).append(agent.runtime.manifest.model_version)

        worker = threading.Thread(target=requests)
        worker.start()
        env.sign_and_announce(v2)
        try:
            wait_for(lambda: (agent.step(), agent.model_version == v2 and served[-1] == v2)[1], what="the switch",
                     interval=0.001)
        finally:
            stop.set()
            worker.join(10)
        assert failures == []
        assert served.count(env.v1) > 10 and served.count(v2) >= 1     # served throughout, old then new
        switch = served.index(v2)
        assert set(served[:switch]) == {env.v1} and set(served[switch:]) == {v2}
        assert max(latencies) < 0.25, f"a request waited {max(latencies):.3f} s during the install"
    finally:
        env.close()


def _register_head_only_retrain(env, base_mv: str) -> str:
    """A new model version whose only change is the classifier head (a fine-tune), packaged for
    the tier through the normal pipeline."""
    import io

    import torch

    from edgeloop.cloud.package.export import export_onnx
    from edgeloop.cloud.package.packaging import store_blob
    from edgeloop.cloud.loop.pipeline import _torch_model, package_model

    mv = env.registry.model_version(base_mv)
    model = _torch_model(env.registry, mv)
    head = model.inner.net[-1]
    with torch.no_grad():
        head.weight.add_(0.02 * torch.sign(head.weight))
    buf = io.BytesIO()
    torch.save(model.inner.state_dict(), buf)
    state_sha, state_path = store_blob(env.ws.artifacts_dir, buf.getvalue())
    env.registry.add_artifact(state_sha, "torch-state-dict", len(buf.getvalue()), str(state_path))
    onnx_bytes = export_onnx(model, mv["arch"]["n_features"])
    sha, path = store_blob(env.ws.artifacts_dir, onnx_bytes)
    env.registry.add_artifact(sha, "onnx", len(onnx_bytes), str(path))
    version = env.registry.next_version(mv["model"])
    new_mv = f"{mv['model']}:{version}"
    env.registry.add_model_version({**{k: mv[k] for k in ("model", "run_id", "features", "labels", "metrics",
                                                          "arch")},
                                    "model_version": new_mv, "version": version, "stage": "candidate",
                                    "onnx_sha256": sha, "state_sha256": state_sha})
    package_model(env.ws, env.registry, new_mv, TIER)
    return new_mv


def test_head_only_retrain_ships_as_a_delta_verified_against_the_full_package(slow_live):
    v2 = _register_head_only_retrain(slow_live, slow_live.v1)
    full = slow_live.registry.package_for(v2, TIER)["length"]
    msg = slow_live.sign_and_announce(v2, with_delta=True)
    assert msg.delta is not None and msg.delta["length"] <= 0.1 * full
    agent = slow_live.agents[0]
    wait_for(lambda: agent.model_version == v2, what="v2 through the delta")
    assert agent.client.last_delivery == "delta"
    fetched = [r for r in slow_live.proxy.log if "/targets/" in r.path]
    assert [r.path.endswith(".delta") for r in fetched] == [True]            # the full package never travelled
    assert fetched[0].sent == msg.delta["length"]
    installed = agent.installer.active_package_bytes()
    assert len(installed) == full and __import__("hashlib").sha256(installed).hexdigest() == msg.sha256


def test_a_delta_that_does_not_reproduce_the_package_falls_back_to_the_full_download(slow_live):
    v2 = _register_head_only_retrain(slow_live, slow_live.v1)

    def corrupt_delta(target):
        # the delta target is re-signed over wrong content: TUF accepts it, reconstruction must not
        delta_path = next(p for p in slow_live.repo.targets() if p.endswith(".delta"))
        from edgeloop.contracts.delta import encode_delta
        bogus = encode_delta(slow_live.registry.package_for(slow_live.v1, TIER)["sha256"], b"x" * 100,
                             [["data", 0, 100]], b"x" * 100)
        slow_live.repo.add_target(delta_path, bogus)

    slow_live.sign_and_announce(v2, after_signing=corrupt_delta, with_delta=True)
    agent = slow_live.agents[0]
    wait_for(lambda: agent.model_version == v2, what="v2 in full after the bad delta")
    assert agent.client.last_delivery == "full"


def test_package_over_mqtt_blocks_resumes_from_its_bitmap_after_the_link_drops(broker, tmp_path):
    env = make_live(broker, tmp_path, devices=1, agent_overrides={
        "transport": "mqtt", "download_timeout_s": 0.5, "retry_delays_s": (0.2, 0.2, 0.2)})
    try:
        agent, blocks = env.agents[0], env.cp.blocks
        assert agent.client.over_mqtt and env.v1 == agent.model_version     # v1 already came over MQTT
        v2 = env.new_version()
        length = env.registry.package_for(v2, TIER)["length"]
        n_blocks = -(-length // 8192)
        assert n_blocks >= 3
        blocks.served.clear()
        blocks.drop_after = 2                                              # the link dies mid-package
        env.sign_and_announce(v2)
        package = lambda: [i for _, path, i in blocks.served if path.startswith("targets/")]  # noqa: E731
        wait_for(lambda: len(package()) >= 2, what="the first blocks")
        time.sleep(0.8)                                                    # the device times out...
        assert package() == [0, 1] and agent.model_version == env.v1
        blocks.drop_after = None                                           # ...and the link comes back
        wait_for(lambda: agent.model_version == v2, what="v2 over MQTT after the drop")
        assert package() == list(range(n_blocks))                          # resumed at block 2: none twice
    finally:
        env.close()
