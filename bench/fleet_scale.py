"""One rollout over a whole simulated fleet on one broker and the PostgreSQL store (issue 16).

Brings up, all private to the run: PostgreSQL (tests/pg_server.py: initdb and pg_ctl on a free
port), Mosquitto on several listeners of 127.0.0.1 (one broker; see "ports" below), a workspace
whose store is that database, two trained and packaged model versions (bench/fleet_rollout.py's
``prepare``: v1 on every device at start, v2 rolled out), the repository server (its own
process), the control plane and rollout controller (this process: cloud/services.py's
ServiceStack, as ``serve`` builds them), and ``--procs`` ``edgeloop swarm`` processes, each
driving its share of the devices as real ``device_sdk.agent.Agent`` objects on one event loop,
one MQTT connection each. It waits until every device is registered ``online``, creates ONE
canary-then-waves rollout over the whole tier, steps the controller until it completes or
aborts, then stops the swarms (each reports when its devices committed).

Then the drift report: every updated device gets ``--records`` telemetry records (64-feature
summaries of 20 digits inputs against v2's own baseline, stored through the store's
``add_telemetry`` as the ingest stores them; the devices themselves do not serve requests here,
which would measure numpy, not the fleet), and ``drift_report(registry, by="fleet")`` is timed.
``store_bytes_per_device``: the store's tables and indexes (``Store.stored_bytes``) over devices,
after the telemetry; ``store_bytes_per_device_fleet_only`` before it.

Figures: ``updates_per_min`` = updated / rollout seconds (creation, signing included, to the
final state); ``updated`` counts devices whose swarm saw them commit the rollout's update;
``failed`` = failed + timed out. ``control_plane_cpu_s`` is the rollout window's CPU of this
process (ingest + controller), the repository server and PostgreSQL (all its processes);
``_per_1k_devices`` divides it by devices / 1000. ``swarm_rss_mb`` is the swarms' peak RSS
(VmHWM) summed; ``rss_kb_per_device`` that over devices (process baselines included);
``connect_s``: from starting the swarms until every device is registered; ``commit_p50_s``/``p99``:
rollout creation to a device's commit; ``command_to_commit_*``: its command's arrival to its commit.

Limits this handles, or refuses in one line (exit 2) before starting anything:
- open files: one socket per device in its swarm and one in the broker; the hard limit is raised
  where allowed (root with CAP_SYS_RESOURCE) or the run refused, naming the most devices that fit;
- ports: every connection to one broker address and port takes an ephemeral port
  (net.ipv4.ip_local_port_range, ~28k), so the broker listens on enough ports that no port
  carries more than ``--per-port`` devices, and each swarm connects to one of them;
- memory: ``--rss-kb-per-device`` (measured: about 190 kB at 5k, mostly each agent's in-memory
  SQLite outbox) per device for the swarms, 8 kB for the broker and, on /dev/shm (the default
  ``--device-dir``), 320 kB of device state (two slots of a 140 kB package) must fit in the
  available memory; with ``--device-dir`` on disk, that state must fit on the disk.
Anything that fails later is one line too (exit 1), also a stall (no progress for ``--stall-s``)
or memory running out; it, Ctrl-C and SIGTERM (exit 130) stop every process the run started and
remove its folders.

    .venv/bin/python bench/fleet_scale.py --devices 5000
    .venv/bin/python bench/fleet_scale.py --devices 100000 --procs 5      # 5 listeners of 20k

Progress goes to stderr; one JSON object is the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet_rollout import (cpu_s, percentile, prepare, start_broker, start_repository,  # noqa: E402
                                 stop_processes)
from edgeloop.cloud.registry import Registry  # noqa: E402
from edgeloop.cloud.rollouts.controller import RolloutSpec  # noqa: E402
from edgeloop.cloud.services import PlainLink, ServiceStack, StackOptions  # noqa: E402
from edgeloop.cloud.workspace import Workspace  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
BROKER_SPARE_FDS = 1024     # the broker's own files, the control plane's connection, headroom
RSS_KB_PER_DEVICE = 200      # a swarm's memory per device, measured at 1k-5k (mostly each agent's
                             # in-memory SQLite outbox); for the memory check before the run
SWARM_BASE_KB = 150 * 1024   # a swarm process before its devices (Python, numpy, paho, tuf)
BROKER_KB_PER_DEVICE = 8     # Mosquitto per connected client with a persistent session
STATE_KB_PER_DEVICE = 320    # a device's state folder after the rollout: both slots hold a package
                             # (edge-gateway: 140 kB) plus state, clock and TUF roots (4 kB pages)


class BenchError(Exception):
    """A failure the run reports in one line (exit 1), after stopping what it started."""


class Refused(BenchError):
    """The machine cannot take the run as asked (exit 2); nothing was started."""


def log(message: str) -> None:
    print(f"[fleet_scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- limits ------------------------------------------------------------------------------------
def open_files(needed: int) -> int:
    """Raise this process's open-files limit (inherited by the broker and the swarms) to
    ``needed``: the soft limit up to the hard one, the hard one too where allowed (root with
    CAP_SYS_RESOURCE, up to fs.nr_open). Returns the limit; raises Refused if it stays below."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    if hard != inf and hard < needed:
        want = min(needed, int(Path("/proc/sys/fs/nr_open").read_text()))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            pass                      # not allowed: refused below
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != inf and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard == inf else min(needed, hard), hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != inf and soft < needed:
        raise Refused(f"the broker holds one socket per device: it needs about {needed} open files, and the "
                      f"hard limit here is {hard}, which this process may not raise (raise it as root with "
                      f"CAP_SYS_RESOURCE: ulimit -Hn {needed}, systemd LimitNOFILE=, docker --ulimit "
                      f"nofile={needed}), or run at most {hard - BROKER_SPARE_FDS} devices")
    return soft


def ephemeral_ports() -> int:
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return hi - lo + 1


def available_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


# -- processes -----------------------------------------------------------------------------------
def status_kb(pid: int, key: str) -> int:
    """A /proc/<pid>/status figure in kB (VmHWM: peak RSS; VmRSS: now); 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants (PostgreSQL's
    postmaster and backends). Linux /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = sum(int(f) for f in fields[11:15]) / TICK          # utime stime cutime cstime
    for child in Path("/proc").iterdir():
        if child.name.isdigit():
            try:
                if int(child.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    total += tree_cpu_s(int(child.name))
            except (OSError, IndexError, ValueError):
                continue
    return total


def postmaster_pid(server: Any) -> int:
    return int((server.root / "data" / "postmaster.pid").read_text().split()[0])


class Swarms:
    """The swarm processes: ``edgeloop swarm`` each, its output in files, stopped by SIGTERM."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.reports: list[Path] = []
        self.logs: list[Path] = []

    def start(self, argv: list[str], report: Path) -> None:
        n = len(self.procs)
        err = self.root / f"swarm-{n}.err"
        self.logs.append(err)
        self.reports.append(report)
        with open(self.root / f"swarm-{n}.out", "wb") as out, open(err, "wb") as e:
            self.procs.append(subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=e))

    def check(self) -> None:
        """Raises BenchError if a swarm has stopped (with the end of what it said)."""
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                tail = self.logs[i].read_text(errors="replace").strip().splitlines()[-5:]
                raise BenchError(f"swarm {i} exited with {proc.returncode} before the run ended: "
                                 + (" | ".join(tail) or "(no output)"))

    def stop(self, timeout: float) -> list[dict[str, Any]]:
        """SIGTERM every swarm, wait for each, and return their reports. Raises BenchError."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        reports = []
        for i, proc in enumerate(self.procs):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise BenchError(f"swarm {i} did not stop within {timeout:.0f} s of SIGTERM") from None
            if proc.returncode not in (0, 143):
                tail = self.logs[i].read_text(errors="replace").strip().splitlines()[-5:]
                raise BenchError(f"swarm {i} failed ({proc.returncode}): {' | '.join(tail)}")
            reports.append(json.loads(self.reports[i].read_text()))
        return reports

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Watch:
    """Fails the run early, in one line, instead of at its deadline: when ``progress`` has not
    changed for ``stall_s`` seconds, or the machine is about to run out of memory (the kernel's
    OOM killer would take a process without a word)."""

    def __init__(self, what: str, stall_s: float) -> None:
        self.what, self.stall_s = what, stall_s
        self.last: object = None
        self.since = time.time()

    def check(self, progress: object) -> None:
        if progress != self.last:
            self.last, self.since = progress, time.time()
        elif time.time() - self.since > self.stall_s:
            raise BenchError(f"{self.what} made no progress for {self.stall_s:.0f} s (at {progress})")
        left, total = available_kb(), _total_kb()
        if left < total * 0.03:
            raise BenchError(f"stopped before the machine runs out of memory: {left // 1024} MiB left of "
                             f"{total // 1024} MiB during {self.what} (fewer devices, or --device-dir on disk)")


def _total_kb() -> int:
    return int(Path("/proc/meminfo").read_text().split()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 1.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- the run -------------------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> tuple[int, int, list[int]]:
    """(listeners, procs, devices per proc): enough listeners that none carries more than
    ``per_port`` devices, at least one proc per listener, the devices split evenly."""
    listeners = max(1, math.ceil(args.devices / args.per_port))
    procs = max(args.procs, listeners)
    share = [args.devices // procs + (1 if i < args.devices % procs else 0) for i in range(procs)]
    return listeners, procs, share


def swarm_argv(args: argparse.Namespace, ws: Workspace, port: int, n: int, index: int, v1: str, report: Path,
               device_dir: Path) -> list[str]:
    return [sys.executable, "-m", "edgeloop.fleet.cli", "swarm", "-w", str(ws.root), "--json",
            "--mqtt", f"127.0.0.1:{port}", "--devices", str(n), "--tier-mix", f"{args.tier}:1",
            "--initial-version", v1, "--heartbeat-s", "0", "--install-s", str(args.install_s),
            "--prefix", f"scale{index}", "--seed", str(index), "--download-concurrency", str(args.download_concurrency),
            "--connect-timeout", str(args.connect_timeout), "--device-dir", str(device_dir), "--report", str(report)]


def fill_telemetry(ws: Workspace, registry: Registry, devices: list[str], version: str, tier: str,
                   records: int) -> float:
    """``records`` telemetry records per device for ``version``, each carrying a 64-feature
    summary of 20 digits inputs against that version's own baseline. Returns the seconds."""
    import numpy as np

    from edgeloop.cloud.drift.baselines import model_baseline
    from edgeloop.cloud.train.datasets import load_dataset
    from edgeloop.device_sdk.telemetry import FeatureSummary

    baseline = model_baseline(registry, version, tier)
    if baseline is None:
        raise BenchError(f"{version} has no drift baseline for {tier}: nothing to report drift against")
    train = load_dataset().split()[0]
    rng = np.random.default_rng(0)
    summaries = []
    for _ in range(64):
        summary = FeatureSummary(baseline)
        summary.record_batch(train.x[rng.choice(len(train.x), 20, replace=False)])
        summaries.append(summary.to_obj())
    pick = random.Random(0)
    t0 = time.perf_counter()
    for start in range(0, len(devices), 1000):
        chunk = devices[start:start + 1000]
        for seq in range(records):
            now = time.time()
            registry.add_telemetry([{"device_id": d, "seq": 1_000_000 + seq, "model_version": version,
                                     "window_start": now, "window_end": now + 1, "count": 20, "labelled": 20,
                                     "correct": 19, "errors": 0, "latency_ms_p50": 0.2, "latency_ms_max": 0.5,
                                     "predictions": [2] * 10, "confidence_hist": [0] * 9 + [20],
                                     "features": summaries[pick.randrange(len(summaries))]} for d in chunk])
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edgeloop.cloud.drift.monitor import drift_report
    from tests.pg_server import PrivatePostgres, available

    listeners, nprocs, share = plan(args)
    if args.per_port > ephemeral_ports() - 1000:
        raise Refused(f"--per-port {args.per_port} does not fit the {ephemeral_ports()} ephemeral ports "
                         "(net.ipv4.ip_local_port_range) with 1000 to spare: lower it")
    on_tmpfs = args.device_dir is None and Path("/dev/shm").is_dir()
    state_kb = STATE_KB_PER_DEVICE if on_tmpfs else 0
    need_kb = args.devices * (args.rss_kb_per_device + BROKER_KB_PER_DEVICE + state_kb) + nprocs * SWARM_BASE_KB
    if need_kb > available_kb() * 0.9:
        raise Refused(f"{args.devices} devices need about {need_kb // 1024} MiB of memory (swarms at "
                      f"{args.rss_kb_per_device} kB per device, the broker, {nprocs} swarm processes"
                      + (f", {STATE_KB_PER_DEVICE} kB of state per device on /dev/shm" if on_tmpfs else "")
                      + f"); {available_kb() // 1024} MiB are available: fewer devices, a machine with more memory"
                      + (", or --device-dir on disk (slower: agents sync their state writes)" if on_tmpfs else ""))
    if not on_tmpfs:
        parent = args.device_dir or Path(tempfile.gettempdir())
        free_kb = shutil.disk_usage(parent).free // 1024
        if args.devices * STATE_KB_PER_DEVICE > free_kb * 0.9:
            raise Refused(f"{args.devices} devices need about {args.devices * STATE_KB_PER_DEVICE // 1024} MiB for "
                          f"their state under {parent}; {free_kb // 1024} MiB are free")
    fds = open_files(args.devices + BROKER_SPARE_FDS)   # the broker's; each swarm needs only its share
    if not available():
        raise Refused("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)")
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    parent = args.device_dir or (Path("/dev/shm") if on_tmpfs else tmp)
    parent.mkdir(parents=True, exist_ok=True)
    device_dir = Path(tempfile.mkdtemp(prefix="fleet-scale-devices-", dir=parent))
    swarms = Swarms(tmp)
    procs: list[subprocess.Popen] = []
    server = PrivatePostgres()
    stack: ServiceStack | None = None
    try:
        url = server.start()
        broker, ports = start_broker(tmp, listeners)
        procs.append(broker)
        log(f"PostgreSQL on {server.port}, Mosquitto on {len(ports)} port(s); {nprocs} swarms of "
            f"{min(share)}-{max(share)} devices; open files {fds}")
        ws = Workspace.init(tmp / "ws", mqtt=f"127.0.0.1:{ports[0]}")
        config = ws.root / "edgeloop.toml"
        config.write_text(f'store = "{url}"\n' + config.read_text())
        ws = Workspace.open(ws.root)
        registry = Registry(ws.store_location)
        t = time.time()
        v1, v2 = prepare(ws, registry, [args.tier])
        registry.close()
        log(f"trained and packaged {v1}, {v2} in {time.time() - t:.0f} s")
        repo, repo_url = start_repository(ws)
        procs.append(repo)
        stack = ServiceStack(ws, StackOptions(broker=PlainLink("127.0.0.1", ports[0]), repository=False,
                                              repository_url=repo_url, blocks=False)).start()
        registry, cp = stack.registry, stack.control_plane

        began = time.time()
        for i, n in enumerate(share):
            swarms.start(swarm_argv(args, ws, ports[i % len(ports)], n, i, v1, tmp / f"swarm-{i}.json", device_dir),
                         tmp / f"swarm-{i}.json")
        last = [0.0]

        watch = Watch("connecting and registering", args.stall_s)

        def registered() -> bool:
            swarms.check()
            online = registry.device_states().get("online", 0)
            watch.check((online, sum(status_kb(p.pid, "VmRSS") // 10240 for p in swarms.procs)))
            if time.time() - last[0] >= 10:
                last[0] = time.time()
                rss = sum(status_kb(p.pid, "VmRSS") for p in swarms.procs)
                log(f"registered {online} of {args.devices} ({time.time() - began:.0f} s; swarms {rss // 1024} MiB)")
            return online >= args.devices
        wait_until(registered, args.connect_timeout + 60, "every device to connect and register")
        connect_s = time.time() - began
        log(f"all {args.devices} devices registered in {connect_s:.1f} s")

        ctl = stack.rollouts
        assert ctl is not None
        spec = RolloutSpec(model_version=v2, target=f"tier={args.tier}", strategy="canary", canary=args.canary,
                           bake_s=args.bake_s, growth=args.growth, max_failure_pct=args.max_failure_pct,
                           min_devices=args.min_devices, timeout_s=args.timeout_s)
        pg = postmaster_pid(server)

        def cpu() -> dict[str, float]:
            return {"control_plane": time.process_time(), "repository": cpu_s(repo.pid), "store": tree_cpu_s(pg),
                    "broker": cpu_s(broker.pid), "swarms": sum(cpu_s(p.pid) for p in swarms.procs)}
        cpu0 = cpu()
        t0 = time.time()
        rid = ctl.create(spec)
        log(f"rollout {rid} created ({time.time() - t0:.1f} s)")
        deadline, shown = t0 + args.max_seconds, 0.0
        watch = Watch("the rollout", args.stall_s)
        while True:
            ctl.step()
            status = ctl.status(rid)
            watch.check(status["counts"])
            if status["state"] in ("completed", "aborted"):
                break
            if time.time() > deadline:
                raise BenchError(f"the rollout did not finish within {args.max_seconds:.0f} s: {status['state']}, "
                                 f"{status['counts']}")
            if time.time() - shown >= 10:
                shown = time.time()
                swarms.check()
                done = {k: v for k, v in status["counts"].items() if v}
                log(f"rollout {status['state']} at {time.time() - t0:.0f} s: {done}")
            time.sleep(args.step_s)
        t1 = time.time()
        cpu1 = cpu()
        counts = status["counts"]
        log(f"rollout {status['state']} in {t1 - t0:.1f} s: {counts}")
        update_ids = registry.rollout_update_ids(rid)
        swarm_hwm = [status_kb(p.pid, "VmHWM") for p in swarms.procs]
        broker_hwm = status_kb(broker.pid, "VmHWM")
        reports = swarms.stop(timeout=120 + args.devices / 500)
        times = [t - t0 for r in reports for d in r["per_device"] for u, t in d["committed_at"].items()
                 if u in update_ids]
        c2c = sorted(d["command_to_commit_s"] for r in reports for d in r["per_device"]
                     if d["command_to_commit_s"] is not None and d["update_id"] in update_ids)
        updated = sorted(d["device_id"] for r in reports for d in r["per_device"]
                         if any(u in update_ids for u in d["committed_at"]))
        cp.drain(10)
        stack.stop()
        stack = None

        registry = Registry(ws.store_location)
        try:
            fleet_bytes = registry.stored_bytes()
            log(f"filling {args.records} telemetry records for each of {len(updated)} devices")
            fill_s = fill_telemetry(ws, registry, updated, v2, args.tier, args.records)
            store_bytes = registry.stored_bytes()
            t = time.perf_counter()
            report = drift_report(registry, by="fleet", store_alerts=False)
            drift_s = time.perf_counter() - t
            log(f"drift report by fleet: {len(report)} cohort(s) {sorted({e['status'] for e in report})} "
                f"in {drift_s:.2f} s")
        finally:
            registry.close()
        seconds = t1 - t0
        cp_cpu = sum(cpu1[k] - cpu0[k] for k in ("control_plane", "repository", "store"))
        return {
            "devices": args.devices, "updated": len(times), "failed": counts["failed"] + counts["timed_out"],
            "updates_per_min": round(len(times) / seconds * 60, 1),
            "control_plane_cpu_s_per_1k_devices": round(cp_cpu / (args.devices / 1000), 3),
            "store_bytes_per_device": round(store_bytes / args.devices),
            "store_bytes_per_device_fleet_only": round(fleet_bytes / args.devices),
            "drift_report_s": round(drift_s, 3), "telemetry_records": len(updated) * args.records,
            "telemetry_fill_s": round(fill_s, 1),
            "state": status["state"], "abort_reason": status.get("reason"), "commands_sent": status["commands_sent"],
            "connect_s": round(connect_s, 1), "rollout_s": round(seconds, 1),
            "commit_p50_s": _rounded(statistics.median(times) if times else None, 2),
            "commit_p99_s": _rounded(percentile(times, 0.99), 2),
            "command_to_commit_p50_s": _rounded(statistics.median(c2c) if c2c else None, 3),
            "command_to_commit_p99_s": _rounded(percentile(c2c, 0.99), 3),
            "cpu_s": {k: round(cpu1[k] - cpu0[k], 1) for k in cpu0},
            "control_plane_cpu_s": round(cp_cpu, 1), "swarm_cpu_s": round(cpu1["swarms"] - cpu0["swarms"], 1),
            "procs": nprocs, "listeners": len(ports), "per_port": args.per_port,
            "swarm_rss_mb": round(sum(swarm_hwm) / 1024), "rss_kb_per_device": round(sum(swarm_hwm) / args.devices, 1),
            "broker_rss_mb": round(broker_hwm / 1024),
            "bench_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "device_code": reports[0]["device_code"], "shared_work": reports[0]["shared_work"],
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 30, 1),
                        "python": platform.python_version(), "open_files": fds,
                        "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()]},
        }
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):       # a second Ctrl-C must not cut the clean-up short
            signal.signal(signum, signal.SIG_IGN)
        log("stopping")
        swarms.kill()
        if stack is not None:
            stack.stop()
        stop_processes(procs)
        server.stop()
        shutil.rmtree(device_dir, ignore_errors=True)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _stop_on(signum: int, frame: Any) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=100_000)
    p.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="swarm processes (default: cores; "
                   "at least one per broker listener)")
    p.add_argument("--per-port", type=int, default=20_000, help="devices per broker listener (default 20000)")
    p.add_argument("--tier", default="edge-gateway", help="the fleet's tier (the rollout targets it)")
    p.add_argument("--canary", default="1%", help="canary size: N devices or P%% (default 1%%)")
    p.add_argument("--bake-s", type=float, default=1.0)
    p.add_argument("--growth", type=float, default=2.0, help="each wave is this many times the previous")
    p.add_argument("--max-failure-pct", type=float, default=10.0)
    p.add_argument("--min-devices", type=int, default=20, help="finished devices before the abort check")
    p.add_argument("--timeout-s", type=float, help="per-device deadline (default: 120 s + 10 ms per device)")
    p.add_argument("--install-s", type=float, default=0.05, help="simulated install time per device")
    p.add_argument("--download-concurrency", type=int, default=64, help="per swarm")
    p.add_argument("--connect-timeout", type=float, help="seconds for every swarm to connect (default: "
                   "120 s + 40 ms per device)")
    p.add_argument("--records", type=int, default=2, help="telemetry records per device for the drift report")
    p.add_argument("--step-s", type=float, default=0.1, help="pause between controller steps")
    p.add_argument("--max-seconds", type=float, help="give up on the rollout after this long "
                   "(default: 300 s + 30 ms per device)")
    p.add_argument("--rss-kb-per-device", type=int, default=RSS_KB_PER_DEVICE,
                   help=f"expected swarm memory per device, for the memory check (default {RSS_KB_PER_DEVICE})")
    p.add_argument("--stall-s", type=float, default=300.0,
                   help="fail when connecting or the rollout makes no progress for this long (default 300)")
    p.add_argument("--device-dir", type=Path, help="where the devices' state folders go (default: /dev/shm; "
                   f"{STATE_KB_PER_DEVICE} kB each, counted in the memory check)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, workspace)")
    args = p.parse_args()
    if args.devices < 1 or args.procs < 1 or args.per_port < 1 or args.records < 1:
        p.error("--devices, --procs, --per-port and --records must be at least 1")
    args.timeout_s = args.timeout_s or 120 + args.devices * 0.01
    args.connect_timeout = args.connect_timeout or 120 + args.devices * 0.04
    args.max_seconds = args.max_seconds or 300 + args.devices * 0.03
    signal.signal(signal.SIGTERM, _stop_on)
    try:
        result = run(args)
    except BenchError as e:
        print(f"fleet_scale: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, Refused) else 1) from None
    except KeyboardInterrupt:
        print("fleet_scale: interrupted; everything it started is stopped", file=sys.stderr)
        raise SystemExit(130) from None
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
