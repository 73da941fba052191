"""A full or read-only state folder never costs a prediction, a telemetry record or a sequence
number, and a failed state write during an install leaves memory and disk in agreement with the
old model serving. Real agents, a real Mosquitto, a real ingest and store; the disk's refusal is
injected behind the real storage Protocols (device_sdk/ports.py): each double wraps the real
store and raises OSError(ENOSPC or EROFS) for writes only (as root, chmod would not stop them).
A last test fills a real tmpfs where this machine lets the test mount one."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import edge_gateway_package, wait_for
from edgeloop.cloud.ingest.control_plane import ControlPlane
from edgeloop.cloud.registry import Registry
from edgeloop.contracts.messages import Announce, Telemetry, encode, parse
from edgeloop.device_sdk import factory
from edgeloop.device_sdk.agent import Agent, AgentConfig
from edgeloop.device_sdk.ota import Installer
from edgeloop.device_sdk.storage import JsonFile

TIER = "edge-gateway"


@pytest.fixture(scope="module")
def packages():
    from edgeloop.cloud.package.export import export_onnx
    from edgeloop.cloud.package.packaging import build_package
    from edgeloop.cloud.train.datasets import load_dataset
    from edgeloop.cloud.train.training import TrainParams, train

    v1, test = edge_gateway_package(epochs=1)
    ds = load_dataset()
    r = train(ds, TrainParams(seed=2, epochs=1))
    v2 = build_package("m", 2, TIER, export_onnx(r.model, ds.x.shape[1]), r.features, [str(i) for i in range(10)],
                       test.x[:8], {})
    return v1, v2, test


class Disk:
    """The state folder's refusal: ``refuse`` an errno for every write, or ``fail_at`` one write
    (counting from 1) of the state store."""

    def __init__(self) -> None:
        self.refuse: int | None = None
        self.fail_at: int | None = None
        self.state_writes = 0
        self.refused = 0

    def write(self, what: str) -> None:
        if what == "state":
            self.state_writes += 1
            if self.state_writes == self.fail_at:
                self.refused += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "state.json")
        if self.refuse is not None:
            self.refused += 1
            raise OSError(self.refuse, os.strerror(self.refuse), what)


class RefusingState:
    """StateStore: the real JsonFile, whose writes the disk may refuse."""

    def __init__(self, real: JsonFile, disk: Disk) -> None:
        self.real, self.disk = real, disk

    def load(self) -> dict[str, Any] | None:
        return self.real.load()

    def save(self, state: dict[str, Any]) -> None:
        self.disk.write("state")
        self.real.save(state)


class RefusingSequence:
    """SequenceStore: the real SequenceCounter, whose writes the disk may refuse."""

    def __init__(self, real: Any, disk: Disk) -> None:
        self.real, self.disk = real, disk

    @property
    def issued(self) -> int:
        return self.real.issued

    def take(self) -> int:
        self.disk.write("telemetry.json")
        return self.real.take()


class RefusingOutbox:
    """OutboxStore: the real SQLite outbox; every write may be refused, reads never are."""

    def __init__(self, real: Any, disk: Disk) -> None:
        self.real, self.disk = real, disk

    def put(self, *args: Any, **kw: Any) -> None:
        self.disk.write("outbox.db")
        self.real.put(*args, **kw)

    def ack(self, message_id: int) -> None:
        self.disk.write("outbox.db")
        self.real.ack(message_id)

    def taken(self, message_id: int) -> None:
        self.disk.write("outbox.db")
        self.real.taken(message_id)

    def confirm(self, seqs: list[int], refs: list[str] | None = None) -> int:
        self.disk.write("outbox.db")
        return self.real.confirm(seqs, refs)

    def take_dropped(self) -> int:
        self.disk.write("outbox.db")
        return self.real.take_dropped()

    def pending(self, *args: Any, **kw: Any) -> Any:
        return self.real.pending(*args, **kw)

    def unsent(self) -> int:
        return self.real.unsent()

    def close(self) -> None:
        self.real.close()

    def __len__(self) -> int:
        return len(self.real)


class Fetched:
    """UpdateFetcher: hands over the package bytes it was given (TUF is tests/test_ota_*.py's)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def start(self, announce: Announce, base: bytes | None) -> None:
        pass

    def result(self) -> bytes | None:
        return self.data

    def discard_partial(self) -> None:
        pass


def _announce(pkg, update_id: str) -> Announce:
    m = pkg.manifest
    return Announce(update_id, "m", m.model_version, TIER, pkg.target_path, len(pkg.data), pkg.sha256,
                    "http://unused", "http://unused", time.time())


def _agent(state: Path, broker, v1, disk: Disk, device_id: str, fetched: bytes = b"", **overrides: Any) -> Agent:
    if not (state / "state.json").exists():
        Installer(state, TIER, 1 << 22).install(_announce(v1, "factory"), lambda a: v1.data)
    config = AgentConfig(device_id=device_id, tier=TIER, state_dir=state, mqtt_host=broker.host,
                         mqtt_port=broker.port, telemetry_window=4, **overrides)
    agent = Agent(config, state=RefusingState(JsonFile(state / "state.json"), disk),
                  sequence=RefusingSequence(factory.sequence(config), disk),
                  outbox=RefusingOutbox(factory.outbox(config), disk), fetcher=Fetched(fetched))
    agent.start()
    wait_for(lambda: agent.link.connected, what="the device online")
    return agent


def _serve(agent: Agent, test, n: int) -> int:
    """Requests answered out of ``n``."""
    return sum(agent.infer(test.x[i % len(test.x)][None, :], int(test.y[i % len(test.y)])) is not None
               for i in range(n))


def _device(registry: Registry, device_id: str) -> dict[str, Any]:
    return next((d for d in registry.devices() if d["device_id"] == device_id), {})


@pytest.mark.parametrize("refusal, code", [(errno.ENOSPC, "storage.full"), (errno.EROFS, "storage.readonly")])
def test_full_or_readonly_disk_serves_every_request_and_loses_no_record(tmp_path, broker, packages, refusal, code):
    v1, _, test = packages
    registry = Registry(tmp_path / "registry.db")
    cp = ControlPlane(registry, broker.host, broker.port).start()
    disk = Disk()
    device = f"disk-{refusal}"
    agent = _agent(tmp_path / "dev", broker, v1, disk, device)
    try:
        assert _serve(agent, test, 8) == 8                                   # 2 records while the disk works
        wait_for(lambda: (cp.drain(), registry.telemetry_count([device]) == 2)[1], what="the first 2 records")
        wait_for(lambda: (agent.pump(), len(agent.outbox) == 0)[1], what="their confirmations")
        disk.refuse = refusal                                                # the state folder refuses writes
        answered = _serve(agent, test, 40)
        assert answered == 40                                                # every request got its prediction
        assert disk.refused >= 1 and agent.spool.held == 10                  # 10 windows held in memory
        assert agent.seq.issued == 2                                         # no number taken for them yet

        def faulted() -> bool:
            cp.drain()
            return code in (json.loads(_device(registry, device).get("faults") or "{}"))
        wait_for(faulted, what=f"{code} on the device's status")
        agent.step()                                                         # a step while still full changes nothing
        assert agent.spool.held == 10
        disk.refuse = None                                                   # space returns
        agent.flush_telemetry()
        assert agent.spool.held == 0 and agent.seq.issued == 12
        wait_for(lambda: (agent.pump(), cp.drain(), registry.telemetry_count([device]) == 12)[2],
                 what="all 12 records stored")
        seqs = sorted(r["seq"] for r in registry.telemetry_records(device))
        assert seqs == list(range(12))                                       # contiguous: no number skipped
        assert sum(r["count"] for r in registry.telemetry_records(device)) == 48
        wait_for(lambda: (cp.drain(), not _device(registry, device).get("faults"))[1],
                 what="the fault cleared on the status")
        wait_for(lambda: (agent.pump(), len(agent.outbox) == 0)[1], what="the outbox emptied by confirmations")
    finally:
        agent.stop(drain_s=0)
        cp.stop()
        registry.close()


def test_memory_bound_drops_oldest_records_counts_them_and_says_so(tmp_path, broker, packages):
    v1, _, test = packages
    disk = Disk()
    agent = _agent(tmp_path / "dev", broker, v1, disk, "disk-bound", held_max=3, confirm_timeout_s=3600.0)
    try:
        disk.refuse = errno.ENOSPC
        assert _serve(agent, test, 40) == 40
        assert agent.spool.held == 3 and agent.spool.dropped == 7            # the bound, and every drop counted
        code, detail = agent.spool.fault
        assert str(code) == "storage.full" and "7 dropped" in detail
        disk.refuse = None
        agent.flush_telemetry()
        kept = [parse(p.payload) for p in agent.outbox.pending(100) if p.seq is not None]
        assert all(isinstance(r, Telemetry) for r in kept)
        assert [r.seq for r in kept] == [0, 1, 2]                             # numbered as persisted: no gap
        assert kept[0].extra.get("held_dropped") == 7 and "held_dropped" not in kept[1].extra
        assert sum(r.count for r in kept) == 12                              # the 3 newest windows
    finally:
        agent.stop(drain_s=0)


def test_enospc_at_each_state_write_of_an_install_keeps_memory_and_disk_agreed(tmp_path, broker, packages):
    v1, v2, test = packages
    writes = None
    for k in range(1, 8):
        disk = Disk()
        state = tmp_path / f"dev{k}"
        agent = _agent(state, broker, v1, disk, f"disk-install-{k}", fetched=v2.data)
        try:
            disk.state_writes, disk.fail_at = 0, k
            agent.handle(agent.topics.announce(TIER), encode(_announce(v2, "u2")))
            while agent.step():
                pass
            if disk.refused == 0:                  # fewer state writes than k: the install ran through
                writes = k - 1
                assert agent.model_version == v2.manifest.model_version
                break
            on_disk = JsonFile(state / "state.json").load()
            assert (on_disk["update"]["state"], on_disk["model_version"], on_disk["active_slot"]) == \
                (str(agent.installer.state), agent.installer.model_version, on_disk["active_slot"])
            assert on_disk == agent.installer._state                        # memory == disk, field by field
            assert agent.model_version == v1.manifest.model_version          # the old model serves
            assert agent.runtime.manifest.model_version == v1.manifest.model_version
            assert _serve(agent, test, 5) == 5
            assert agent.last_status[0] == "failed" and agent.last_status[2].startswith("storage.full")
            # the disk takes writes again: the same update installs
            agent.handle(agent.topics.announce(TIER), encode(_announce(v2, "u2")))
            while agent.step():
                pass
            assert agent.model_version == v2.manifest.model_version and _serve(agent, test, 3) == 3
            restarted = Installer(state, TIER, 1 << 22)
            assert restarted.model_version == v2.manifest.model_version
        finally:
            agent.stop(drain_s=0)
    assert writes == 5                                                      # downloading .. committed: 5 writes tried


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.parametrize("full_at_start", [False, True], ids=["fills-while-serving", "full-at-start"])
def test_a_really_full_tmpfs_costs_no_prediction_and_no_record(tmp_path, broker, packages, full_at_start):
    """The real stores (JsonFile, SequenceCounter, SQLite outbox) on a real file system that fills,
    while serving or before the agent starts (then its outbox lives in memory for the run)."""
    v1, _, test = packages
    root = tmp_path / "fs"
    if not _mount_tmpfs(root, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    registry = Registry(tmp_path / "registry.db")
    cp = ControlPlane(registry, broker.host, broker.port).start()
    state = root / "dev"
    Installer(state, TIER, 1 << 22).install(_announce(v1, "factory"), lambda a: v1.data)
    device = f"disk-tmpfs-{int(full_at_start)}"
    config = AgentConfig(device_id=device, tier=TIER, state_dir=state, mqtt_host=broker.host,
                         mqtt_port=broker.port, telemetry_window=4)
    filler = root / "filler"
    if full_at_start:
        _fill(filler)
    agent = Agent(config)
    try:
        agent.start()
        wait_for(lambda: agent.link.connected, what="the device online")
        if full_at_start:
            assert "storage.full" in agent._faults() and "in memory" in agent._faults()["storage.full"]
        else:
            _fill(filler)                                              # fill the file system
        assert _serve(agent, test, 40) == 40
        assert agent.spool.held > 0 and str(agent.spool.fault[0]) == "storage.full"   # the real ENOSPC
        filler.unlink()                                                # space returns
        agent.flush_telemetry()
        assert agent.spool.held == 0
        wait_for(lambda: (agent.pump(), cp.drain(), registry.telemetry_count([device]) == 10)[2],
                 what="all 10 records stored")
        assert sorted(r["seq"] for r in registry.telemetry_records(device)) == list(range(10))
    finally:
        agent.stop(drain_s=0)
        cp.stop()
        registry.close()
        subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=10)


def test_two_processes_writing_one_file_at_once_each_write_it_whole(tmp_path):
    """Found by tests/test_fleet_scale_bench.py: two swarm processes sharing trusted metadata
    wrote one root.json through one fixed temporary name, and one's rename found it gone."""
    import subprocess
    import sys

    target = tmp_path / "shared" / "root.json"
    code = ("import sys; from pathlib import Path; from edgeloop.device_sdk.storage import atomic_write\n"
            "for i in range(300):\n    atomic_write(Path(sys.argv[1]), sys.argv[2].encode() * 1000)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), tag], stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert target.read_bytes() in (b"a" * 1000, b"b" * 1000)
    assert [p.name for p in target.parent.iterdir()] == ["root.json"]      # no temporary left behind
