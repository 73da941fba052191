"""Field faults, counted: power cuts during installs and their recovery, kill -9 of the control
plane mid-rollout, kill -9 of the broker mid-stream, full and read-only disks, and clocks two days
ahead and behind.

1. **Power cuts** (``power_cuts``): an agent process installs an update (tests/powerloss_child.py's
   chunked, resumable download, then ``device_sdk/ota.py``'s installer) with every ``write``,
   ``fsync`` and ``rename`` (``os.replace``) it makes counted; a trial cuts the power just before
   operation K, for every K of an install, and again at a random operation of the recovery that
   follows (the restarted agent resuming or rolling back), then lets a last recovery run to the
   end. A cut is SIGKILL after dropping what a real power cut loses: bytes written since their
   file's last fsync, and a rename whose folder was not fsynced since (the old file comes back).
   ``bricked``: cuts after which the device's active slot did not hold a verified package, plus
   trials whose last recovery did not end with a healthy model (loaded, golden vectors passed)
   in a final install state.
2. **Control-plane kills** (``rollout_crashes``): real agents (simulators/fleet.py) on a private
   Mosquitto, the repository served from this process, and the control plane (cloud/services.py's
   ServiceStack: ingest and rollout controller) in a child process that is killed with SIGKILL
   mid-rollout, half the time at a random moment and half the time by itself right after a wave
   was marked sent and before its commands were published (the window issue 15 found), then
   started again. ``rollout_crashes`` counts kills while a rollout was active;
   ``duplicate_commands``: attempts recorded beyond one per device, plus installs a device
   committed more than once for one update id; ``stalled_devices``: devices that waited out a
   deadline (an attempt ended by timeout) or never committed.
3. **Broker kills** (``broker_kills``): devices with the SDK's outbox and delivery stream
   telemetry (and error reports) through Mosquitto (persistence on, autosaved every second) into
   an ingest worker process (tests/test_ingest_restart.py's Device and Worker); mid-stream the
   broker is killed with SIGKILL and started again on the same port with the same persistence
   file. ``telemetry_lost``: records produced and never stored; ``telemetry_duplicated``: stored
   rows beyond one per (device, seq); the same for error reports.

4. **Full and read-only disks**: N real agents (real broker, ingest and store) serve 8 requests
   each on a working disk, then M each while their state folder refuses every write, then space
   returns and they flush. The refusal comes through tests/test_disk_faults.py's doubles behind
   the real storage Protocols (ENOSPC, then EROFS), and, when this process may mount one (root),
   from a real tmpfs (4 MB a device) that is filled, and another bind-mounted read-only over
   itself; without the permission the JSON says ``"disk_tmpfs": "skipped: ..."``.
   ``infer_failures_disk_full`` / ``_readonly``: requests that got no prediction;
   ``telemetry_lost_disk``: records produced (answered requests / window) minus stored;
   ``seq_gaps_disk``: numbers missing below a device's highest stored; ``telemetry_duplicated_disk``:
   stored rows beyond one per (device, seq). Then an install of version 2 with ENOSPC at state
   write K, for each K: ``installs_disagreeing`` (the state on disk != the installer's memory)
   and ``old_model_not_serving`` (the old model not active or not answering); the same update
   must install once the disk takes writes again (``not_installed_after``).
5. **Clocks two days off**: devices with ``clock_skew_s`` = +172800 and -172800 against a control
   plane with the time server (tests/conftest.py's make_live: TUF repositories, v1 installed by
   a valid update), each getting a second valid update, telemetry, and an update whose timestamp
   expired a day ago by the control plane's time; and the same skews against a control plane
   without one (no signed time to be had). ``telemetry_lost_clock``: records numbered minus
   stored; ``clock_flagged``: stored with ``clock_suspect`` (impossible times);
   ``updates_refused_clock_ahead``: valid updates a device ahead failed to install;
   ``expired_accepted_clock_behind``: expired metadata a device behind accepted;
   ``skew_reported``: devices whose ``devices`` row shows the offset and the ``clock.skewed`` fault.

The top-level ``telemetry_lost`` / ``telemetry_duplicated`` sum sections 3, 4 and 5.

    .venv/bin/python bench/faults.py            # >= 1,000 power cuts, >= 20 control-plane kills
    .venv/bin/python bench/faults.py --quick    # a small version (about a minute; 58 s at load 2)

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import builtins
import errno
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "tests", ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

TIER = "edge-gateway"


# -- 1. power cuts ------------------------------------------------------------------------------
class Disk:
    """Counts a process's writes, fsyncs and renames and cuts the power before operation
    ``cut_at`` (1-based): what was not yet durable is undone, then SIGKILL."""

    def __init__(self, cut_at: int | None, note: str | None = None) -> None:
        self.cut_at, self.ops, self.note = cut_at, 0, note     # note: where the cut says what it undid
        self.synced: dict[str, int] = {}          # file written to -> its size at its last fsync
        self.dirty: set[str] = set()
        self.fd_paths: dict[int, str] = {}        # open fds (files and folders) -> path
        self.renames: list[tuple[str, str, bytes | None]] = []   # (src, dst, dst's old bytes): folder not fsynced
        self.real = (builtins.open, os.fsync, os.replace, os.open)

    def op(self) -> None:
        self.ops += 1
        if self.cut_at is not None and self.ops >= self.cut_at:
            self.cut()

    def cut(self) -> None:
        torn = 0
        for path in self.dirty:                   # bytes since the last fsync never reached the disk
            if os.path.exists(path) and os.path.getsize(path) > self.synced.get(path, 0):
                os.truncate(path, self.synced.get(path, 0))
                torn += 1
        for src, dst, old in reversed(self.renames):    # a rename whose folder was not fsynced is undone
            if os.path.exists(dst):
                self.real[2](dst, src)
            if old is not None:
                with self.real[0](dst, "wb") as f:
                    f.write(old)
        if self.note:
            with self.real[0](self.note, "w") as f:
                f.write(json.dumps({"torn_writes": torn, "undone_renames": len(self.renames)}))
        os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        real_open, real_fsync, real_replace, real_os_open = self.real
        disk = self

        class Tracked:
            def __init__(self, f: Any, path: str) -> None:
                self._f, self._path = f, path

            def write(self, data: Any) -> int:
                disk.op()
                disk.dirty.add(self._path)
                return self._f.write(data)

            def fileno(self) -> int:
                fd = self._f.fileno()
                disk.fd_paths[fd] = self._path
                return fd

            def __enter__(self) -> Tracked:
                return self

            def __exit__(self, *exc: Any) -> None:
                self._f.close()

            def __getattr__(self, name: str) -> Any:
                return getattr(self._f, name)

        def tracked_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                path = os.fspath(file)
                if "w" in mode:
                    disk.synced[path] = 0
                else:
                    disk.synced.setdefault(path, os.path.getsize(path))
                return Tracked(f, path)
            return f

        def tracked_fsync(fd: int) -> None:
            disk.op()
            real_fsync(fd)
            path = disk.fd_paths.get(fd)
            if path is not None and os.path.isdir(path):
                disk.renames = [r for r in disk.renames if os.path.dirname(r[1]) != path]
            elif path is not None:
                disk.synced[path] = os.path.getsize(path)
                disk.dirty.discard(path)

        def tracked_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            disk.op()
            s, d = os.fspath(src), os.fspath(dst)
            old = None
            if os.path.exists(d):
                with real_open(d, "rb") as f:
                    old = f.read()
            real_replace(src, dst, *args, **kwargs)
            disk.renames.append((s, d, old))
            for table in (disk.synced,):
                if s in table:
                    table[d] = table.pop(s)
            if s in disk.dirty:
                disk.dirty.discard(s)
                disk.dirty.add(d)

        def tracked_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            fd = real_os_open(path, flags, *args, **kwargs)
            disk.fd_paths[fd] = os.fspath(path)
            return fd

        builtins.open, os.fsync, os.replace, os.open = tracked_open, tracked_fsync, tracked_replace, tracked_os_open


def _agent_run(device: str, announce: dict[str, Any], package: str, cut_at: int | None, ops_file: str) -> None:
    """The child: an agent (re)starting on ``device`` with the power cut before operation
    ``cut_at``. It recovers what it finds (resume, or roll back), and installs ``announce``
    unless it has handled it already (the control plane keeps sending it). When it gets to the
    end it writes to ``ops_file`` its operation count and whether its model is healthy."""
    from edgeloop.contracts.messages import Announce
    from edgeloop.device_sdk.ota import Installer
    from powerloss_child import chunked_fetch

    disk = Disk(cut_at, ops_file + ".cut")
    disk.install()
    root = Path(device)
    installer = Installer(root, TIER, 1 << 22)
    resume = installer.recover()
    target = Announce.from_obj(announce)
    if resume is not None:
        installer.install(resume, chunked_fetch(Path(package), root / "partial.bin", None))
    elif not installer.already_handled(target.update_id) and installer.model_version != target.model_version:
        installer.install(target, chunked_fetch(Path(package), root / "partial.bin", None))
    ops = disk.ops
    ok, version = _healthy(root)
    with disk.real[0](ops_file, "w") as f:
        f.write(json.dumps({"ops": ops, "healthy": ok, "version": version}))
    os._exit(0)


class PowerRig:
    """Two packaged versions, a device with version 1 installed, and a forkserver for agents."""

    def __init__(self, root: Path) -> None:
        from edgeloop.cloud.package.export import export_onnx
        from edgeloop.cloud.package.packaging import build_package
        from edgeloop.cloud.train.datasets import load_dataset
        from edgeloop.cloud.train.training import TrainParams, train
        from edgeloop.contracts.messages import as_dict
        from edgeloop.device_sdk.ota import Installer
        from test_ota_powerloss import _announce

        self.root = root
        ds = load_dataset()
        _, _, test = ds.split()
        self.packages = {}
        for version in (1, 2):
            result = train(ds, TrainParams(seed=version, epochs=1))
            pkg = build_package("m", version, TIER, export_onnx(result.model, 64), result.features,
                                [str(i) for i in range(10)], test.x[:8], {})
            path = root / f"v{version}.elpkg"
            path.write_bytes(pkg.data)
            self.packages[version] = (pkg, path)
        self.template = root / "template"
        Installer(self.template, TIER, 1 << 22).install(_announce(self.packages[1][0], "u1"),
                                                       lambda a: self.packages[1][0].data)
        self.announce = as_dict(_announce(self.packages[2][0], "u2"))
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["faults", "powerloss_child", "edgeloop.device_sdk.ota", "onnxruntime", "numpy"])

    def launch(self, device: Path, cut_at: int | None) -> tuple[int | None, dict[str, Any] | None]:
        """(exit code, {ops, healthy, version} if it got to the end)."""
        ops_file = device.parent / f"{device.name}.ops"
        ops_file.unlink(missing_ok=True)
        self.note = Path(f"{ops_file}.cut")
        self.note.unlink(missing_ok=True)
        p = self.ctx.Process(target=_agent_run, args=(str(device), self.announce, str(self.packages[2][1]),
                                                      cut_at, str(ops_file)))
        p.start()
        p.join(60)
        if p.is_alive():
            p.kill()
            p.join()
        return p.exitcode, json.loads(ops_file.read_text()) if ops_file.exists() else None


def _verified(device: Path) -> bool:
    """The active slot holds a package whose every file matches its manifest."""
    from edgeloop.device_sdk.ota import Installer
    try:
        return Installer(device, TIER, 1 << 22).active_package() is not None
    except Exception:  # noqa: BLE001 - any failure to read it back is a bricked device
        return False


def _healthy(device: Path) -> tuple[bool, str | None]:
    from edgeloop.device_sdk.ota import InstallState, Installer
    from edgeloop.device_sdk.runtime import health_check, load_runtime
    try:
        installer = Installer(device, TIER, 1 << 22)
        bundle = installer.active_package()
        health_check(load_runtime(bundle), bundle)
        final = installer.state in (InstallState.COMMITTED, InstallState.FAILED, InstallState.ROLLED_BACK, InstallState.IDLE)
        return final and installer.model_version == bundle.manifest.model_version, installer.model_version
    except Exception:  # noqa: BLE001
        return False, None


def power_cuts(root: Path, share: float = 1.0, recovery_share: float = 1.0, seed: int = 15) -> dict[str, Any]:
    """Cut the power before every operation K of an install (``share`` < 1: a random share of
    them); for each K, let the restarted agent's recovery run once uncut (counting its
    operations R), and cut it before each of those R operations (``recovery_share``: a random
    share), each cut followed by an uncut recovery. Returns the counts."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)

    def points(n: int, part: float) -> list[int]:
        return list(range(1, n + 1)) if part >= 1 else sorted(rng.sample(range(1, n + 1), max(1, round(n * part))))

    rig = PowerRig(root)
    code, done = rig.launch(_copy(rig.template, root / "probe"), None)
    assert code == 0 and done and done["healthy"], f"the uncut install did not finish ({code}, {done})"
    install_ops = done["ops"]
    counts: dict[str, Any] = {"power_cuts": 0, "install_cuts": 0, "recovery_cuts": 0, "bricked": 0,
                              "not_cut": 0, "torn_writes": 0, "undone_renames": 0, "install_ops": install_ops,
                              "finals": {"m:1": 0, "m:2": 0}}

    def cut(device: Path, at: int) -> bool:
        code, _ = rig.launch(device, at)
        if code != -signal.SIGKILL:
            counts["not_cut"] += 1                 # it finished first: not counted as a cut
            return False
        counts["power_cuts"] += 1
        counts["bricked"] += not _verified(device)
        if rig.note.exists():
            undone = json.loads(rig.note.read_text())
            counts["torn_writes"] += undone["torn_writes"]
            counts["undone_renames"] += undone["undone_renames"]
        return True

    def recover(device: Path) -> dict[str, Any] | None:
        code, done = rig.launch(device, None)
        healthy = code == 0 and done is not None and done["healthy"]
        counts["bricked"] += not healthy
        if healthy and done["version"] in counts["finals"]:
            counts["finals"][done["version"]] += 1
        return done

    for k in points(install_ops, share):
        snapshot = _copy(rig.template, root / f"cut-{k}")
        counts["install_cuts"] += cut(snapshot, k)
        done = recover(_copy(snapshot, root / "recovery"))
        for j in points(done["ops"], recovery_share) if done else []:
            device = _copy(snapshot, root / "recovery")
            if cut(device, j):
                counts["recovery_cuts"] += 1
                recover(device)
        shutil.rmtree(snapshot)
    return counts


def _copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


# -- 2. control-plane kills --------------------------------------------------------------------------
CONTROL_PLANE = r"""
import os, random, signal, sys, threading
from edgeloop.cloud.services import PlainLink, ServiceStack, StackOptions
from edgeloop.cloud.store.rollouts import RolloutOps
from edgeloop.cloud.workspace import Workspace
ws, port, url, die_after_mark = Workspace.open(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
if die_after_mark:      # kill -9 right after a wave is marked sent, before its commands are published
    real = RolloutOps.mark_sent
    def mark_sent(self, *args, **kwargs):
        sends = real(self, *args, **kwargs)
        if sends:
            os.kill(os.getpid(), signal.SIGKILL)
        return sends
    RolloutOps.mark_sent = mark_sent
stack = ServiceStack(ws, StackOptions(broker=PlainLink("127.0.0.1", port), repository=False, repository_url=url,
                                      blocks=False, session="faults-control-plane", shared=False)).start()
print("ready", flush=True)
stack.rollouts.run(threading.Event(), interval_s=0.2)
"""


class ControlPlaneProcess:
    def __init__(self, ws_root: Path, port: int, url: str, die_after_mark: bool) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", CONTROL_PLANE, str(ws_root), str(port), url,
                                      "1" if die_after_mark else "0"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the control plane did not start ({self.proc.poll()})")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def rollout_crashes(root: Path, kills: int = 20, devices: int = 12, kills_per_rollout: int = 3,
                    deadline_s: float | None = None, seed: int = 15) -> dict[str, Any]:
    """Roll versions back and forth to ``devices`` real agents while killing the control plane
    ``kills`` times mid-rollout (``kills_per_rollout`` each); ``deadline_s``: the devices'
    deadline (default: the tier's, 300 s). Returns the counts."""
    from conftest import Broker, make_live, wait_for
    from edgeloop.cloud.rollouts.controller import RolloutController, RolloutSpec

    rng = random.Random(seed)
    broker = Broker(root / "broker")
    broker.root.mkdir(parents=True)
    broker.start()
    env = make_live(broker, root, devices=devices)
    procs: list[ControlPlaneProcess] = []
    try:
        v2 = env.new_version()
        env.cp.stop()                              # from here on the control plane is the child process
        committed: dict[tuple[str, str], int] = {}
        lock = threading.Lock()
        for agent in env.agents:
            real = agent.installer.complete

            def complete(announce, data, prepared=None, real=real, device=agent.device_id):  # noqa: ANN001
                result = real(announce, data, prepared)
                if str(result[0].state) == "committed":
                    with lock:
                        key = (device, announce.update_id)
                        committed[key] = committed.get(key, 0) + 1
                return result
            agent.installer.complete = complete
        creator = RolloutController(env.ws, env.registry, lambda d, c: None, repository_url=env.repository_url,
                                    director_url=env.director_url)
        out = {"rollout_crashes": 0, "kills_random": 0, "kills_after_mark": 0, "rollouts": 0,
               "duplicate_commands": 0, "stalled_devices": 0, "commands_resent": 0, "rollout_seconds": []}
        version = v2
        while out["rollout_crashes"] < kills:
            rid = creator.create(RolloutSpec(version, f"tier={TIER}", strategy="waves", wave_size=2, growth=2.0,
                                             timeout_s=deadline_s))
            t0 = time.time()
            for i in range(kills_per_rollout):
                after_mark = i % 2 == 1
                cp = ControlPlaneProcess(env.ws.root, broker.port, env.repository_url, after_mark)
                procs.append(cp)
                deadline = time.time() + (30 if after_mark else rng.uniform(0.2, 1.5))
                while time.time() < deadline and cp.proc.poll() is None:
                    time.sleep(0.02)
                active = creator.status(rid)["state"] not in ("completed", "aborted")
                died_by_itself = cp.proc.poll() is not None
                cp.kill()
                if active:
                    out["rollout_crashes"] += 1
                    out["kills_after_mark" if died_by_itself else "kills_random"] += 1
            cp = ControlPlaneProcess(env.ws.root, broker.port, env.repository_url, False)
            procs.append(cp)
            wait_for(lambda: creator.status(rid)["state"] in ("completed", "aborted"), timeout=600,
                     what=f"rollout {rid} to end", interval=0.2)
            cp.kill()
            status = creator.status(rid)
            out["rollouts"] += 1
            out["rollout_seconds"].append(round(time.time() - t0, 1))
            out["commands_resent"] += status["commands_resent"]
            attempts = env.registry.rollout_attempts(rid)
            out["duplicate_commands"] += len(attempts) - status["total"]
            out["stalled_devices"] += sum(1 for a in attempts if "timeout" in str(a["outcome"]))
            out["stalled_devices"] += status["total"] - status["counts"]["committed"]
            version = env.v1 if version == v2 else v2
        out["duplicate_commands"] += sum(n - 1 for n in committed.values())
        return out
    finally:
        for cp in procs:
            cp.kill()
        env.fleet.stop()
        env.server.stop()
        env.registry.close()
        broker.stop()


# -- 3. broker kills ---------------------------------------------------------------------------------
def broker_kills(root: Path, kills: int = 3, devices: int = 8, records: int = 40) -> dict[str, Any]:
    """Stream ``records`` per device through a broker killed with SIGKILL ``kills`` times
    mid-stream and restarted on its persistence file; returns the counts."""
    from conftest import Broker, mosquitto_binary, wait_for
    from edgeloop.cloud.registry import Registry
    from fleet_rollout import _listening
    from test_ingest_restart import Device, Worker, _reports, _stored

    class AutosavingBroker(Broker):
        def start(self) -> None:               # conftest's broker, its persistence file rewritten every second
            conf = self.root / "mosquitto.conf"
            user = "user root\n" if os.geteuid() == 0 else ""
            conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence true\n"
                            f"persistence_location {self.root}/\nautosave_interval 1\n{user}"
                            f"log_dest file {self.root / 'mosquitto.log'}\nmax_queued_messages 10000\n")
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            wait_for(lambda: _listening(self.port), timeout=10, what="mosquitto to listen")

        def kill(self) -> None:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    broker = AutosavingBroker(root / "broker")
    broker.root.mkdir(parents=True)
    broker.persistent = True
    broker.start()
    db = root / "registry.db"
    Registry(db).close()
    worker = Worker(db, broker.port, "exclusive")
    fleet = [Device(f"faults-dev-{i:02d}", root, broker.port) for i in range(devices)]
    produced = 0
    try:
        assert worker.subscribed.wait(60), "the ingest worker never subscribed"
        for d in fleet:
            d.connect()

        def stream(steps: int) -> None:
            nonlocal produced
            for _ in range(steps):
                for d in fleet:
                    if produced < records * devices and d.seq < records:
                        d.produce()
                        produced += 1
                    d.pump()
                time.sleep(0.01)

        per_round = max(1, records // (kills + 1))
        for _ in range(kills):
            stream(per_round)
            time.sleep(1.2)                    # an autosave lands with some of the stream in it
            stream(2)
            broker.kill()                      # mid-stream: messages in flight, sessions, queues
            for d in fleet:
                d.disconnect()
            stream(3)                          # held in the devices' outboxes
            broker.start()                     # the same port, the same persistence file
            for d in fleet:
                d.connect()
            assert worker.subscribed.wait(60), "the worker did not come back"
        stream(records)
        for d in fleet:
            wait_for(lambda d=d: (d.pump(), len(d.outbox) == 0)[1], timeout=120, what=f"{d.device_id} flushed")
        expected = {d.device_id: list(range(d.seq)) for d in fleet}
        try:
            wait_for(lambda: {k: sorted(set(v)) for k, v in _stored(db).items()} == expected, timeout=60,
                     what="every record stored")
        except AssertionError:
            pass                               # counted below
        time.sleep(1.0)                        # late redeliveries would add rows now
        stored = _stored(db)
        reports = _reports(db)
        want_reports = {f"{d.device_id}-r{s}" for d in fleet for s in range(d.seq) if s % 10 == 3}
        return {"broker_kills": kills, "telemetry_produced": sum(d.seq for d in fleet),
                "telemetry_lost": sum(len(set(want) - set(stored.get(dev, []))) for dev, want in expected.items()),
                "telemetry_duplicated": sum(len(v) - len(set(v)) for v in stored.values()),
                "reports_lost": len(want_reports - set(reports)), "reports_duplicated": len(reports) - len(set(reports)),
                "resent_by_devices": sum(d.delivery.resent for d in fleet)}
    finally:
        for d in fleet:
            d.disconnect()
        worker.kill()
        if broker.proc is not None:
            broker.stop()


# -- 4. full and read-only disks --------------------------------------------------------------------
DAY = 86400.0
SETTLE_S = 120.0        # how long a disk run waits for every record to be stored after space returns


def _disk_packages() -> tuple[Any, Any, Any]:
    """Versions 1 and 2 of a small edge-gateway model, and the held-out test split."""
    from conftest import edge_gateway_package
    from edgeloop.cloud.package.export import export_onnx
    from edgeloop.cloud.package.packaging import build_package
    from edgeloop.cloud.train.datasets import load_dataset
    from edgeloop.cloud.train.training import TrainParams, train

    v1, test = edge_gateway_package(epochs=1)
    ds = load_dataset()
    r = train(ds, TrainParams(seed=2, epochs=1))
    v2 = build_package("m", 2, TIER, export_onnx(r.model, ds.x.shape[1]), r.features,
                       [str(i) for i in range(10)], test.x[:8], {})
    return v1, v2, test


def _answered(agent: Any, test: Any, n: int) -> int:
    """Requests out of ``n`` that got a prediction (one that raised got none)."""
    got = 0
    for i in range(n):
        try:
            got += agent.infer(test.x[i % len(test.x)][None, :], int(test.y[i % len(test.y)])) is not None
        except Exception:  # noqa: BLE001 - a request that raised is a request without a prediction
            pass
    return got


def _stored_seqs(registry: Any, device_id: str) -> list[int]:
    return [r["seq"] for r in registry.telemetry_records(device_id)]


def _settle_telemetry(agents: list[Any], registry: Any, cp: Any, want: dict[str, int], timeout: float) -> None:
    """Pump and drain until every device has ``want`` distinct records stored and an empty
    outbox, or ``timeout`` passes (what is missing is counted by the caller)."""
    from conftest import wait_for

    def done() -> bool:
        for a in agents:
            a.pump()
        cp.drain()
        return all(len(set(_stored_seqs(registry, a.device_id))) >= want[a.device_id] for a in agents) \
            and all(len(a.outbox) == 0 for a in agents)
    try:
        wait_for(done, timeout=timeout, what="every record stored and confirmed", interval=0.1)
    except AssertionError:
        pass


def _telemetry_counts(agents: list[Any], registry: Any, produced: dict[str, int], answered: dict[str, int]) -> dict[str, int]:
    """lost (produced minus stored), seq gaps (numbers missing below a device's highest stored),
    duplicated rows, requests the stored records do not count, and records left in outboxes."""
    out = {"produced": sum(produced.values()), "lost": 0, "seq_gaps": 0, "duplicated": 0, "requests_uncounted": 0,
           "outbox_left": sum(len(a.outbox) for a in agents)}
    for a in agents:
        rows = registry.telemetry_records(a.device_id)
        seqs = [r["seq"] for r in rows]
        distinct = set(seqs)
        out["lost"] += max(0, produced[a.device_id] - len(distinct))
        out["seq_gaps"] += (max(distinct) + 1 - len(distinct)) if distinct else 0
        out["duplicated"] += len(seqs) - len(distinct)
        out["requests_uncounted"] += answered[a.device_id] - sum(r["count"] for r in rows)
    return out


def _disk_run(root: Path, db: Path, broker: Any, packages: tuple[Any, Any, Any], devices: int, requests: int,
              refusal: str, refuse: Any, restore: Any, make_agent: Any) -> dict[str, Any]:
    """``devices`` agents serve 8 requests each on a working disk, then ``requests`` each while
    ``refuse()`` makes their state folders refuse writes, then ``restore()`` gives space back;
    every agent flushes and the store (``db``, off the faulty disk) is counted. ``make_agent(i,
    state_dir)`` builds one."""
    from edgeloop.cloud.ingest.control_plane import ControlPlane
    from edgeloop.cloud.registry import Registry
    from conftest import wait_for

    _, _, test = packages
    started = time.time()
    root.mkdir(parents=True, exist_ok=True)
    registry = Registry(db)
    cp = ControlPlane(registry, broker.host, broker.port).start()
    agents: list[Any] = []
    try:
        for i in range(devices):
            agents.append(make_agent(i, root / f"dev-{i}"))
        window = agents[0].config.telemetry_window
        answered = {a.device_id: _answered(a, test, 2 * window) for a in agents}     # 2 records on a working disk
        _settle_telemetry(agents, registry, cp, {a.device_id: 2 for a in agents}, 60)
        refuse()
        during = {a.device_id: _answered(a, test, requests) for a in agents}
        held = sum(a.spool.held for a in agents)

        def reported() -> int:
            cp.drain()
            rows = {d["device_id"]: d for d in registry.devices()}
            return sum(refusal in json.loads(rows.get(a.device_id, {}).get("faults") or "{}") for a in agents)
        try:
            wait_for(lambda: (cp.drain(), [a.step() for a in agents], reported() == devices)[2], timeout=30,
                     what=f"{refusal} on every status")
        except AssertionError:
            pass
        faults_reported = reported()
        restore()
        for a in agents:
            a.flush_telemetry()
            answered[a.device_id] += during[a.device_id]
        produced = {d: n // window for d, n in answered.items()}
        _settle_telemetry(agents, registry, cp, produced, SETTLE_S)
        counts = _telemetry_counts(agents, registry, produced, answered)
        try:
            wait_for(lambda: (cp.drain(), [a.step() for a in agents], reported() == 0)[2], timeout=30,
                     what=f"{refusal} cleared on every status")
        except AssertionError:
            pass
        counts.update(devices=devices, requests=devices * requests, held_in_memory=held,
                      faults_not_cleared=reported(),
                      infer_failures=devices * requests - sum(during.values()), faults_reported=faults_reported,
                      dropped_in_memory=sum(a.spool.dropped for a in agents), seconds=round(time.time() - started, 1))
        return counts
    finally:
        for a in agents:
            a.stop(drain_s=0)
        cp.stop()
        registry.close()


def _doubled_agent(broker: Any, v1: Any, disks: list[Any]) -> Any:
    """make_agent for _disk_run: a real Agent whose state, sequence and outbox stores are the
    real ones behind tests/test_disk_faults.py's refusing doubles (one Disk per device)."""
    from test_disk_faults import Disk as Refusal, _agent

    def make(i: int, state: Path) -> Any:
        disk = Refusal()
        disks.append(disk)
        return _agent(state, broker, v1, disk, f"faults-disk-{state.parent.name}-{i}")
    return make


def _real_agent(broker: Any, v1: Any, tag: str, **overrides: Any) -> Any:
    """make_agent for _disk_run: a real Agent with its real stores, state under ``state``
    (``overrides``: more AgentConfig fields)."""
    from conftest import wait_for
    from edgeloop.device_sdk.agent import Agent, AgentConfig
    from edgeloop.device_sdk.ota import Installer
    from test_disk_faults import _announce

    def make(i: int, state: Path) -> Any:
        Installer(state, TIER, 1 << 22).install(_announce(v1, "factory"), lambda a: v1.data)
        agent = Agent(AgentConfig(device_id=f"faults-{tag}-{i}", tier=TIER, state_dir=state, mqtt_host=broker.host,
                                  mqtt_port=broker.port, telemetry_window=4, **overrides))
        agent.start()
        wait_for(lambda: agent.link.connected, what="the device online")
        return agent
    return make


def _install_faults(root: Path, broker: Any, packages: tuple[Any, Any, Any]) -> dict[str, Any]:
    """An install of version 2 with ENOSPC at state write K, for each K of the install: memory
    and disk must agree, the old model must serve, and the same update must install once the
    disk takes writes again (tests/test_disk_faults.py's doubles)."""
    from edgeloop.contracts.messages import encode
    from edgeloop.device_sdk.ota import Installer
    from edgeloop.device_sdk.storage import JsonFile
    from test_disk_faults import Disk as Refusal, _agent, _announce

    v1, v2, test = packages
    out = {"install_faults": 0, "installs_disagreeing": 0, "old_model_not_serving": 0, "not_installed_after": 0,
           "state_writes": None}
    for k in range(1, 20):
        disk = Refusal()
        state = root / f"install-{k}"
        agent = _agent(state, broker, v1, disk, f"faults-install-{k}", fetched=v2.data)
        try:
            disk.state_writes, disk.fail_at = 0, k
            agent.handle(agent.topics.announce(TIER), encode(_announce(v2, "u2")))
            while agent.step():
                pass
            if disk.refused == 0:              # the install made fewer than k state writes
                out["state_writes"] = k - 1
                break
            out["install_faults"] += 1
            on_disk = JsonFile(state / "state.json").load()
            out["installs_disagreeing"] += on_disk != agent.installer._state
            out["old_model_not_serving"] += not (agent.model_version == v1.manifest.model_version
                                                 and agent.runtime.manifest.model_version == v1.manifest.model_version
                                                 and _answered(agent, test, 5) == 5)
            agent.handle(agent.topics.announce(TIER), encode(_announce(v2, "u2")))
            while agent.step():
                pass
            out["not_installed_after"] += not (agent.model_version == v2.manifest.model_version
                                               and Installer(state, TIER, 1 << 22).model_version == v2.manifest.model_version)
        finally:
            agent.stop(drain_s=0)
    return out


def _mount(*args: str) -> bool:
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def disks(root: Path, devices: int = 8, requests: int = 200, tmpfs: bool = True) -> dict[str, Any]:
    """Full (ENOSPC) and read-only (EROFS) state folders: through the refusing doubles, and on a
    real tmpfs of 4 MB a device (filled; another bind-mounted read-only over itself) when this process may
    mount one; then an install with ENOSPC at each of its state writes. Returns the counts."""
    from test_disk_faults import _fill

    from conftest import Broker

    root.mkdir(parents=True, exist_ok=True)
    broker = Broker(root / "broker")
    broker.root.mkdir(parents=True)
    broker.start()
    packages = _disk_packages()
    out: dict[str, Any] = {}
    try:
        for name, refusal, code in (("full", errno.ENOSPC, "storage.full"), ("readonly", errno.EROFS, "storage.readonly")):
            doubles: list[Any] = []

            def refuse(value: int | None, doubles: list[Any] = doubles) -> None:
                for d in doubles:
                    d.refuse = value
            counts = _disk_run(root / f"doubles-{name}", root / f"doubles-{name}.db", broker, packages, devices, requests, code,
                               lambda refusal=refusal, refuse=refuse: refuse(refusal), lambda refuse=refuse: refuse(None),
                               _doubled_agent(broker, packages[0], doubles))
            counts["writes_refused"] = sum(d.refused for d in doubles)
            out[f"doubles_{name}"] = counts
        if not tmpfs:
            out["tmpfs"] = "not run (tmpfs=False)"
        elif not _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(_mkdir(root / "tmpfs-probe"))):
            out["tmpfs"] = f"skipped: cannot mount a tmpfs here (uid {os.getuid()}; needs root / CAP_SYS_ADMIN)"
        else:
            _umount(root / "tmpfs-probe")
            size = f"size={4 * devices}m"                    # 4 MB a device: its two slots, outbox, state
            fs = _mkdir(root / "tmpfs-full")                 # a tmpfs of its own, filled
            _mount("-t", "tmpfs", "-o", size, "tmpfs", str(fs))
            try:
                filler = fs / "filler"
                out["tmpfs_full"] = _disk_run(fs, root / "tmpfs-full.db", broker, packages, devices, requests,
                                              "storage.full", lambda: _fill(filler), lambda: filler.unlink(),
                                              _real_agent(broker, packages[0], "tmpfs-full"))
            finally:
                _umount(fs)
            ro = _mkdir(root / "tmpfs-readonly")             # another, bind-mounted read-only over itself
            _mount("-t", "tmpfs", "-o", size, "tmpfs", str(ro))
            try:
                bound: list[bool] = []

                def read_only() -> None:   # a new open for writing there gets EROFS
                    bound.append(_mount("--bind", str(ro), str(ro)) and _mount("-o", "remount,bind,ro", str(ro)))
                counts = _disk_run(ro, root / "tmpfs-readonly.db", broker, packages, devices, requests,
                                   "storage.readonly", read_only, lambda: _umount(ro),
                                   _real_agent(broker, packages[0], "tmpfs-ro"))
                counts["read_only_mounted"] = bool(bound) and all(bound)
                out["tmpfs_readonly"] = counts
            finally:
                _umount(ro)
        out["install"] = _install_faults(root / "install", broker, packages)
    finally:
        broker.stop()
    full = [out[k] for k in ("doubles_full", "tmpfs_full") if k in out]
    readonly = [out[k] for k in ("doubles_readonly", "tmpfs_readonly") if k in out]
    runs = full + readonly
    out.update(infer_failures_disk_full=sum(c["infer_failures"] for c in full),
               infer_failures_disk_readonly=sum(c["infer_failures"] for c in readonly),
               telemetry_lost_disk=sum(c["lost"] for c in runs), seq_gaps_disk=sum(c["seq_gaps"] for c in runs),
               telemetry_duplicated_disk=sum(c["duplicated"] for c in runs),
               telemetry_produced_disk=sum(c["produced"] for c in runs),
               installs_disagreeing=out["install"]["installs_disagreeing"],
               old_model_not_serving=out["install"]["old_model_not_serving"])
    return out


# -- 5. clocks two days ahead and behind ---------------------------------------------------------------
def _clock_synced(root: Path, broker: Any, devices: int, skew: float, windows: int) -> dict[str, Any]:
    """``devices`` agents whose clocks run ``skew`` off, against a control plane with the time
    server (tests/conftest.py's make_live: TUF repositories, fleet of real agents, v1 installed
    by a valid update): a second valid update, ``windows`` telemetry windows each, then an
    update whose timestamp metadata expired a day ago by the control plane's time."""
    from datetime import timedelta

    from conftest import make_live, settled, wait_for

    # expired metadata is a transient refusal (metadata.stale: a lagging repository or a wrong
    # clock cures it): retried, so with short back-off the refusal is reached in well under a second
    env = make_live(broker, root, devices=devices, agent_overrides={"clock_skew_s": skew,
                                                                  "retry_delays_s": (0.05, 0.1)})
    try:
        agents = env.agents
        c: dict[str, Any] = {"devices": devices, "skew_s": skew,
                             "own_clock_off_s": sorted({round(a._wall() - time.time()) for a in agents}),
                             "learned_offset_s": sorted({round(a.clock.offset_s) if a.clock.offset_s is not None else None
                                                         for a in agents}, key=str),
                             "updates_valid": 2 * devices}      # v1 (make_live waits for it on every device) and v2
        v2 = env.new_version()
        msg = env.sign_and_announce(v2)
        try:
            wait_for(lambda: settled(env, msg.update_id), timeout=120, what="the valid update", interval=0.1)
        except AssertionError:
            pass
        c["updates_refused"] = sum(a.model_version != v2 for a in agents)
        window = agents[0].config.telemetry_window
        for a in agents:
            _answered(a, env.test, windows * window)
            a.flush_telemetry()
        v3 = env.new_version()
        msg = env.sign_and_announce(v3, after_signing=lambda target: env.director.refresh_timestamp(
            lifetime=timedelta(days=-1)))
        try:
            wait_for(lambda: settled(env, msg.update_id), timeout=120, what="the expired update", interval=0.1)
        except AssertionError:
            pass
        c["expired_offered"] = devices
        c["expired_accepted"] = sum(a.model_version == v3 for a in agents)
        c["expired_refused_as_expired"] = sum(a.last_result is not None and a.last_result.code == "metadata.stale"
                                              and "xpired" in (a.last_result.reason or "") for a in agents)
        for a in agents:
            a.flush_telemetry()
        produced = {a.device_id: a.seq.issued for a in agents}
        _settle_telemetry(agents, env.registry, env.cp, produced, 120)
        c.update(_clock_telemetry(agents, env.registry, produced))

        def reported() -> int:
            env.cp.drain()
            rows = {d["device_id"]: d for d in env.registry.devices()}
            return sum(rows.get(a.device_id, {}).get("clock_offset_s") is not None
                       and abs(rows[a.device_id]["clock_offset_s"] + skew) < 60
                       and "clock.skewed" in json.loads(rows[a.device_id].get("faults") or "{}") for a in agents)
        try:
            wait_for(lambda: reported() == devices, timeout=30, what="the skew on every device's row")
        except AssertionError:
            pass
        c["skew_reported"] = reported()
        return c
    finally:
        env.close()


def _clock_telemetry(agents: list[Any], registry: Any, produced: dict[str, int]) -> dict[str, Any]:
    lost = duplicated = flagged = 0
    for a in agents:
        rows = registry.telemetry_records(a.device_id)
        seqs = {r["seq"] for r in rows}
        lost += len(set(range(produced[a.device_id])) - seqs)
        duplicated += len(rows) - len(seqs)
        flagged += sum(bool(r["clock_suspect"]) for r in rows)
    return {"produced": sum(produced.values()), "lost": lost, "duplicated": duplicated, "flagged": flagged,
            "outbox_left": sum(len(a.outbox) for a in agents)}


def _clock_unsynced(root: Path, broker: Any, v1: Any, test: Any, devices: int, skew: float,
                    windows: int) -> dict[str, Any]:
    """The same skew with no signed time to be had (a control plane without the time server):
    the ingest must store every record, flagged when its time is impossible."""
    from edgeloop.cloud.ingest.control_plane import ControlPlane
    from edgeloop.cloud.registry import Registry

    root.mkdir(parents=True, exist_ok=True)
    registry = Registry(root / "registry.db")
    cp = ControlPlane(registry, broker.host, broker.port).start()
    make = _real_agent(broker, v1, f"clock-{'ahead' if skew > 0 else 'behind'}", clock_skew_s=skew)
    agents: list[Any] = []
    try:
        for i in range(devices):
            agents.append(make(i, root / f"dev-{i}"))
        for a in agents:
            _answered(a, test, windows * a.config.telemetry_window)
            a.flush_telemetry()
        produced = {a.device_id: a.seq.issued for a in agents}
        _settle_telemetry(agents, registry, cp, produced, 60)
        c = {"devices": devices, "skew_s": skew, "own_clock_off_s": sorted({round(a._wall() - time.time()) for a in agents}),
             "synced": sum(a.clock.synced for a in agents), **_clock_telemetry(agents, registry, produced)}
        return c
    finally:
        for a in agents:
            a.stop(drain_s=0)
        cp.stop()
        registry.close()


def clocks(root: Path, devices: int = 6, windows: int = 5) -> dict[str, Any]:
    """Devices two days ahead and two days behind, with the time server (synced) and without
    (unsynced); returns the counts."""
    from conftest import Broker, edge_gateway_package

    root.mkdir(parents=True, exist_ok=True)
    broker = Broker(root / "broker")
    broker.root.mkdir(parents=True)
    broker.start()
    out: dict[str, Any] = {}
    try:
        v1, test = edge_gateway_package(epochs=1)
        for name, skew in (("ahead", 2 * DAY), ("behind", -2 * DAY)):
            out[name] = _clock_synced(root / name, broker, devices, skew, windows)
            out[f"unsynced_{name}"] = _clock_unsynced(root / f"unsynced-{name}", broker, v1, test, devices, skew, windows)
    finally:
        broker.stop()
    runs = [out[k] for k in ("ahead", "behind", "unsynced_ahead", "unsynced_behind")]
    out.update(telemetry_lost_clock=sum(c["lost"] for c in runs),
               telemetry_duplicated_clock=sum(c["duplicated"] for c in runs),
               telemetry_produced_clock=sum(c["produced"] for c in runs),
               clock_flagged=sum(c["flagged"] for c in runs),
               updates_refused_clock_ahead=out["ahead"]["updates_refused"],
               expired_accepted_clock_behind=out["behind"]["expired_accepted"],
               skew_reported=out["ahead"]["skew_reported"] + out["behind"]["skew_reported"])
    return out


DISK_KEYS = ("infer_failures_disk_full", "infer_failures_disk_readonly", "telemetry_lost_disk", "seq_gaps_disk",
             "telemetry_duplicated_disk", "installs_disagreeing", "old_model_not_serving")
CLOCK_KEYS = ("telemetry_lost_clock", "clock_flagged", "updates_refused_clock_ahead", "expired_accepted_clock_behind",
              "skew_reported")


# -- the run ---------------------------------------------------------------------------------------------
def _timed(section: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """One section's counts, with the seconds it took."""
    t = time.time()
    counts = section(*args, **kwargs)
    counts["seconds"] = round(time.time() - t, 1)
    return counts


def run(quick: bool, keep: bool = False) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="faults-"))
    started, load_before = time.time(), os.getloadavg()
    try:
        cuts = _timed(power_cuts, tmp / "power", share=0.15 if quick else 1.0, recovery_share=0.1 if quick else 0.5)
        crashes = _timed(rollout_crashes, tmp / "rollouts", kills=4 if quick else 20, devices=6 if quick else 12)
        stream = _timed(broker_kills, tmp / "stream", kills=1 if quick else 3, records=20 if quick else 40)
        disk = _timed(disks, tmp / "disks", devices=2 if quick else 8, requests=40 if quick else 200)
        clock = _timed(clocks, tmp / "clocks", devices=2 if quick else 6, windows=3 if quick else 5)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"power_cuts": cuts["power_cuts"], "bricked": cuts["bricked"],
            "rollout_crashes": crashes["rollout_crashes"], "duplicate_commands": crashes["duplicate_commands"],
            "stalled_devices": crashes["stalled_devices"], "broker_kills": stream["broker_kills"],
            "telemetry_lost": stream["telemetry_lost"] + disk["telemetry_lost_disk"] + clock["telemetry_lost_clock"],
            "telemetry_duplicated": stream["telemetry_duplicated"] + disk["telemetry_duplicated_disk"]
            + clock["telemetry_duplicated_clock"],
            **{k: disk[k] for k in DISK_KEYS}, **{k: clock[k] for k in CLOCK_KEYS},
            "disk_tmpfs": disk.get("tmpfs", "run"),
            "power": cuts, "rollouts": crashes, "stream": stream, "disks": disk, "clocks": clock, "quick": quick,
            "seconds": round(time.time() - started, 1),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version(),
                        "load_1m": {"start": round(load_before[0], 1), "end": round(os.getloadavg()[0], 1)}}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small version: a share of the cut points, 4 kills, 1 broker kill, "
                   "2 devices per disk and clock run")
    p.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = p.parse_args()
    print(json.dumps(run(args.quick, args.keep), sort_keys=True))


if __name__ == "__main__":
    main()
