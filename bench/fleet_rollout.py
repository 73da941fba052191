"""A canary-then-waves rollout to a simulated fleet of N devices, end to end, on this machine.

Brings up, all private to the run: a Mosquitto broker (open-files limit raised to the hard
limit), a workspace with two trained and packaged model versions (v1 on every device at start,
v2 rolled out), the repository server (its own process), the control plane and the rollout
controller (this process, built by cloud/services.py's ServiceStack as `serve` builds them), and ``edgeloop swarm`` (its own process, one
event loop, one MQTT connection per device). Then: create the rollout, step the controller
until it completes or aborts, and stop the swarm, which reports when each device committed.

Times are from the rollout's creation (signing included) to each device's ``committed``;
``seconds`` is creation to the rollout's final state; ``updates_per_min`` = updated devices /
seconds; ``updated`` counts devices that committed the new version (after an abort, also
those rolled back since); ``failed`` is failed + timed out. CPU seconds are for the rollout only
(not start-up). With ``--fail-pct P``, P% of devices fail their health check and the rollout
must abort itself at ``--max-failure-pct`` and roll the updated devices back (``aborted``,
``rolled_back``, ``cancelled`` in the JSON).

    .venv/bin/python bench/fleet_rollout.py --devices 2000
    .venv/bin/python bench/fleet_rollout.py --devices 500 --fail-pct 20

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeloop.cloud.loop.pipeline import package_model, train_model  # noqa: E402
from edgeloop.cloud.registry import Registry  # noqa: E402
from edgeloop.cloud.rollouts.controller import RolloutSpec  # noqa: E402
from edgeloop.cloud.services import PlainLink, ServiceStack, StackOptions  # noqa: E402
from edgeloop.cloud.train.training import TrainParams  # noqa: E402
from edgeloop.cloud.workspace import Workspace  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """Terminate the bench's helper processes, newest first; kill one that is still there 30 s on."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_broker(root: Path, listeners: int = 1) -> tuple[subprocess.Popen, list[int]]:
    """A private Mosquitto on ``listeners`` ports of 127.0.0.1 (one broker: every listener sees
    every topic). More than one lets more clients connect than the ephemeral port range allows
    towards one address and port (bench/fleet_scale.py). It inherits this process's open-files
    limit."""
    ports = [free_port() for _ in range(listeners)]
    conf = root / "mosquitto.conf"
    conf.write_text("".join(f"listener {port} 127.0.0.1\nmax_connections -1\n" for port in ports)
                    + "allow_anonymous true\npersistence false\n"
                    "max_queued_messages 100000\nset_tcp_nodelay true\nlog_dest none\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait(lambda: all(_listening(port) for port in ports), 10, "mosquitto to listen")
    return proc, ports


def start_repository(ws: Workspace) -> tuple[subprocess.Popen, str]:
    """The repository server in its own process, so its CPU is not the control plane's."""
    port = free_port()
    code = ("import sys, threading; sys.path.insert(0, %r)\n"
            "from edgeloop.cloud.release.repo_server import RepositoryServer\n"
            "RepositoryServer(%r, '127.0.0.1', %d, %r).start(); threading.Event().wait()"
            % (str(ROOT), str(ws.repository_dir), port, str(ws.director_dir)))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
    wait(lambda: _listening(port), 20, "the repository server to listen")
    return proc, f"http://127.0.0.1:{port}/repository"


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait(predicate, timeout: float, what: str, interval: float = 0.05) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise SystemExit(f"fleet_rollout: timed out after {timeout:.0f} s waiting for {what}")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(-(-q * len(values) // 1)) - 1))]


def prepare(ws: Workspace, registry: Registry, tiers: list[str]) -> tuple[str, str]:
    ws.image_repository().init()
    ws.director_repository().init()
    versions = []
    for seed in (1, 2):
        mv = train_model(ws, registry, TrainParams(seed=seed, epochs=2))["model_version"]
        for tier in tiers:
            package_model(ws, registry, mv, tier)
        versions.append(mv)
    return versions[0], versions[1]


def swarm_command(args: argparse.Namespace, ws: Workspace, v1: str, report: Path) -> list[str]:
    return [sys.executable, "-m", "edgeloop.fleet.cli", "swarm", "-w", str(ws.root), "--json", "--devices", str(args.devices),
            "--tier-mix", f"{args.tier}:1", "--initial-version", v1, "--fail-pct", str(args.fail_pct),
            "--heartbeat-s", "0", "--install-s", str(args.install_s), "--prefix", "bench",
            "--download-concurrency", str(args.download_concurrency), "--report", str(report)]


def run(args: argparse.Namespace) -> dict:
    fds = raise_fd_limit()
    if fds < args.devices + 512:
        raise SystemExit(f"fleet_rollout: {args.devices} devices need about {args.devices + 512} open files; "
                         f"the limit is {fds} (raise it: ulimit -n)")
    tmp = Path(tempfile.mkdtemp(prefix="fleet-rollout-"))
    procs: list[subprocess.Popen] = []
    try:
        broker, (port,) = start_broker(tmp)
        procs.append(broker)
        ws = Workspace.init(tmp / "ws", mqtt=f"127.0.0.1:{port}")
        registry = Registry(ws.store_location)
        v1, v2 = prepare(ws, registry, [args.tier])
        repo, url = start_repository(ws)
        procs.append(repo)
        registry.close()
        # the one service stack serve uses (cloud/services.py), less the repository (its own process here)
        stack = ServiceStack(ws, StackOptions(broker=PlainLink("127.0.0.1", port), repository=False,
                                              repository_url=url, blocks=False)).start()
        registry, cp = stack.registry, stack.control_plane
        began = time.time()
        report_path = tmp / "swarm.json"
        swarm = subprocess.Popen(swarm_command(args, ws, v1, report_path), cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        procs.append(swarm)

        def registered() -> bool:
            if swarm.poll() is not None:
                raise SystemExit(f"fleet_rollout: the swarm stopped: {swarm.stderr.read()[-2000:]}")
            cp.drain(1)
            return len(registry.devices(state="online")) >= args.devices
        wait(registered, 60 + args.devices / 50, "every simulated device to connect and register", 0.5)
        connect_s = time.time() - began

        ctl = stack.rollouts
        assert ctl is not None
        spec = RolloutSpec(model_version=v2, target=f"tier={args.tier}",
                           strategy="canary", canary=args.canary, bake_s=args.bake_s, growth=args.growth,
                           rate_per_min=args.rate_per_min, max_failure_pct=args.max_failure_pct,
                           min_devices=args.min_devices, timeout_s=args.timeout_s)
        cpu0 = {"broker": cpu_s(broker.pid), "control_plane": time.process_time(), "swarm": cpu_s(swarm.pid),
                "repository": cpu_s(repo.pid)}
        t0 = time.time()
        rid = ctl.create(spec)
        deadline = t0 + args.max_seconds
        while time.time() < deadline:
            ctl.step()
            if ctl.status(rid)["state"] in ("completed", "aborted"):
                break
            time.sleep(args.step_s)
        t1 = time.time()
        status = ctl.status(rid)
        cpu1 = {"broker": cpu_s(broker.pid), "control_plane": time.process_time(), "swarm": cpu_s(swarm.pid),
                "repository": cpu_s(repo.pid)}
        update_ids = registry.rollout_update_ids(rid)
        waves = [{"wave": w["wave"], "n": w["n"]} for w in registry.rollout_waves(rid)]
        swarm.send_signal(signal.SIGTERM)
        out, err = swarm.communicate(timeout=300)
        if swarm.returncode not in (0, 143):      # 143: stopped by the SIGTERM above
            raise SystemExit(f"fleet_rollout: the swarm failed ({swarm.returncode}): {err[-2000:]}")
        swarm_report = json.loads(report_path.read_text())
        per_device = swarm_report["per_device"]
        times = [t - t0 for d in per_device for u, t in d["committed_at"].items() if u in update_ids]
        counts = status["counts"]
        updated = len(times)
        seconds = t1 - t0
        stack.stop()
        return {
            "devices": args.devices, "updated": updated, "failed": counts["failed"] + counts["timed_out"],
            "seconds": round(seconds, 2), "updates_per_min": round(updated / seconds * 60, 1),
            "p50_s": round(statistics.median(times), 3) if times else None,
            "p99_s": round(percentile(times, 0.99), 3) if times else None,
            "broker_cpu_s": round(cpu1["broker"] - cpu0["broker"], 2),
            "control_plane_cpu_s": round(cpu1["control_plane"] - cpu0["control_plane"], 2),
            "swarm_cpu_s": round(cpu1["swarm"] - cpu0["swarm"], 2),
            "repository_cpu_s": round(cpu1["repository"] - cpu0["repository"], 2),
            "aborted": status["state"] == "aborted", "abort_reason": status.get("reason"),
            "rolled_back": counts["rolled_back"], "rollback_failed": counts["rollback_failed"],
            "cancelled": counts["cancelled"], "committed_at_end": counts["committed"],
            "state": status["state"], "fail_pct": args.fail_pct, "connect_s": round(connect_s, 1),
            "canary": args.canary, "waves": [w["n"] for w in waves], "commands_sent": status["commands_sent"],
            "device_code": swarm_report["device_code"], "device_classes": swarm_report["device_classes"],
            "shared_work": swarm_report["shared_work"], "device_state": swarm_report["device_state"],
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "open_files": fds},
        }
    finally:
        stop_processes(procs)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--fail-pct", type=float, default=0.0, help="%% of devices whose health check fails")
    p.add_argument("--tier", default="edge-gateway", help="the fleet's tier (the rollout targets it)")
    p.add_argument("--canary", default="1%", help="canary size: N devices or P%% (default 1%%)")
    p.add_argument("--bake-s", type=float, default=1.0)
    p.add_argument("--growth", type=float, default=2.0, help="each wave is this many times the previous")
    p.add_argument("--rate-per-min", type=float, help="waves never send faster than this (default: no limit)")
    p.add_argument("--max-failure-pct", type=float, default=10.0)
    p.add_argument("--min-devices", type=int, default=20, help="finished devices before the abort check")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per-device deadline")
    p.add_argument("--install-s", type=float, default=0.05, help="simulated install time per device")
    p.add_argument("--download-concurrency", type=int, default=64)
    p.add_argument("--step-s", type=float, default=0.05, help="pause between controller steps")
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = p.parse_args()
    if args.devices < 1 or not 0 <= args.fail_pct <= 100:
        p.error("--devices must be at least 1 and --fail-pct between 0 and 100")
    print(json.dumps(run(args), sort_keys=True))


if __name__ == "__main__":
    main()
