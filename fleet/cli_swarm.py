"""``edgeloop swarm``: thousands of simulated devices on one event loop (simulators/swarm.py).

Like ``edgeloop simulate``, every device is a real device agent (device_sdk.agent.Agent), but all
of them run on one event loop, for fleet-scale rollouts: every device is its own MQTT connection,
downloads, checks and installs its packages itself; the swarm shares only immutable work (the
TUF verdict per announcement, the loaded runtime per package) and says so in its report. Device
state folders go to ``--device-dir`` (default: tmpfs, /dev/shm, where there is one).
It runs until ``--duration`` passes (exit 0) or it is interrupted (Ctrl-C: exit 130, SIGTERM:
exit 143), then prints what every device ended in; ``--report FILE`` also writes each device's
commit time. With ``--sample-rate R`` every ``--telemetry-s`` each device serves labelled rows of
the shipped digits test split (the inputs ``edgeloop simulate`` serves) and sends the share R of
them, labelled, in its telemetry: the device data ``edgeloop pipeline run`` retrains on. A workspace
with its own broker (``edgeloop broker up``) gets mutual TLS: every device connects with its
own certificate, enrolled on first use as ``edgeloop simulate`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

from edgeloop.cloud.errors import ServiceUnavailable, UserError
from edgeloop.cloud.workspace import Workspace
from edgeloop.fleet._args import DURATION_HELP, duration, duration_or_zero, positive_int
from edgeloop.fleet._output import Output
from edgeloop.fleet._signals import exit_code_for

__all__ = ["add_swarm_command", "reachable", "sample_rate"]


def add_swarm_command(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    help_ = "run thousands of simulated devices (one event loop) against the broker, for fleet-scale rollouts"
    p = sub.add_parser("swarm", help=help_, description=help_)
    common(p)
    p.set_defaults(fn=_swarm)
    p.add_argument("--devices", type=positive_int, default=100, help="how many devices (default 100)")
    p.add_argument("--tier-mix", default="edge-gateway:1", metavar="TIER:SHARE,...",
                   help="tiers and their shares, e.g. edge-gateway:0.7,mcu:0.3 (default: all edge-gateway)")
    p.add_argument("--initial-version", metavar="MODEL_VERSION",
                   help="the model every device starts with, as if factory-installed (default: none)")
    p.add_argument("--fail-pct", type=_pct, default=0.0, help="%% of devices whose health check fails on a new model")
    p.add_argument("--bad-model-pct", type=_pct, default=0.0,
                   help="%% of devices that install fine but fail about 4 requests in 10 on a new model")
    p.add_argument("--latency-ms", type=_non_negative, default=0.0, help="one-way network latency per device")
    p.add_argument("--bandwidth-kbps", type=_non_negative, default=0.0,
                   help="download rate per device, kB/s (default: unlimited)")
    p.add_argument("--drop-pct", type=_pct, default=0.0, help="%% of downloads dropped mid-transfer (retried)")
    p.add_argument("--disconnect-pct", type=_pct, default=0.0,
                   help="%% of connected devices that lose their connection each minute")
    p.add_argument("--install-s", type=duration_or_zero, default=0.05, metavar="DURATION",
                   help="simulated flash time added to each download (the real install runs after it)")
    p.add_argument("--device-dir", type=Path, metavar="DIR",
                   help="where each device's state folder goes (default: /dev/shm if present, else the workspace)")
    p.add_argument("--telemetry-s", type=duration_or_zero, default=0.0, metavar="DURATION",
                   help=f"time between telemetry windows per device: {DURATION_HELP} (default 0: none)")
    p.add_argument("--heartbeat-s", type=duration_or_zero, default=60.0, metavar="DURATION",
                   help=f"status heartbeat period: {DURATION_HELP} (0: none; default 60)")
    p.add_argument("--download-concurrency", type=positive_int, default=64, help="HTTP downloads at once, swarm-wide")
    p.add_argument("--sample-rate", type=sample_rate, default=0.0, metavar="R",
                   help="share (0..1) of served requests each device sends, labelled, in its telemetry (needs "
                        "--telemetry-s; default 0: none)")
    p.add_argument("--connect-timeout", type=duration, default=120.0, metavar="DURATION",
                   help="give up (exit 3) unless every device is connected within this long (default 120 s)")
    p.add_argument("--duration", type=duration, metavar="DURATION",
                   help=f"stop after this long: {DURATION_HELP} (default: until Ctrl-C or SIGTERM)")
    p.add_argument("--prefix", default="swarm", help="device id prefix (ids: PREFIX-TIER-00042)")
    p.add_argument("--seed", type=int, default=0, help="picks which devices are faulty")
    p.add_argument("--report", type=Path, metavar="FILE", help="also write every device's result as JSON to FILE")


def _swarm(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.fleet.broker import control_plane_link
    from edgeloop.simulators.swarm import NetworkProfile, Swarm, SwarmConfig, parse_tier_mix

    ws = Workspace.open(args.workspace).with_mqtt(args.mqtt)
    link = control_plane_link(ws, args.mqtt)      # only where, and whether over TLS
    if args.sample_rate and not args.telemetry_s:
        raise UserError("--sample-rate needs --telemetry-s SECONDS: swarm devices serve requests only that often "
                        "(e.g. --telemetry-s 5)")
    try:
        mix = parse_tier_mix(args.tier_mix)
        network = NetworkProfile(latency_ms=args.latency_ms, bandwidth_kbps=args.bandwidth_kbps,
                                 drop_pct=args.drop_pct, disconnect_pct_per_min=args.disconnect_pct)
        config = SwarmConfig(
            devices=args.devices, mqtt_host=link.host, mqtt_port=link.port, tier_mix=mix,
            image_root=ws.image_repository().trusted_root(), director_root=ws.director_repository().trusted_root(),
            state_dir=ws.root / "swarm", prefix=args.prefix, initial_version=args.initial_version,
            initial_packages=_initial_packages(ws, args.initial_version, mix),
            device_dir=args.device_dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None),
            fail_pct=args.fail_pct, bad_model_pct=args.bad_model_pct, network=network, install_s=args.install_s,
            telemetry_s=args.telemetry_s, heartbeat_s=args.heartbeat_s,
            download_concurrency=args.download_concurrency, seed=args.seed, fleet=ws.fleet,
            tls_dir=ws.root / "devices" if link.tls else None, sample_rate=args.sample_rate,
            stream=_labelled_stream() if args.sample_rate else None)
    except ValueError as e:
        raise UserError(str(e)) from None
    reachable(link.host, link.port)
    if link.tls:
        _identities(ws, config, out)
    _raise_fd_limit(args.devices)
    swarm = Swarm(config)
    import asyncio

    profile = os.environ.get("EDGELOOP_SWARM_PROFILE")   # a cProfile of the whole run, for benchmarks
    if profile:
        import cProfile

        with cProfile.Profile() as prof:
            report, signum = asyncio.run(_run(swarm, args.duration, out, args.connect_timeout))
        prof.dump_stats(profile)
    else:
        report, signum = asyncio.run(_run(swarm, args.duration, out, args.connect_timeout))
    if args.report:
        args.report.write_text(json.dumps(report, sort_keys=True))
    summary = {k: v for k, v in report.items() if k != "per_device"}
    states = ", ".join(f"{n} {s}" for s, n in sorted(report["states"].items()))
    times = "" if report["command_to_commit_p50_s"] is None else \
        f"; command to commit p50 {report['command_to_commit_p50_s']} s, p99 {report['command_to_commit_p99_s']} s"
    summary["stopped_by"] = signal.Signals(signum).name if signum else "duration"
    out.result(summary, f"{report['devices']} devices ({', '.join(f'{n} {t}' for t, n in report['tiers'].items())})"
                        f": {states}{times}; stopped by {summary['stopped_by']}")
    return exit_code_for(signum)


async def _run(swarm: Any, duration: float | None, out: Output,
               connect_timeout: float = 120.0) -> tuple[dict[str, Any], int | None]:
    """Run until ``duration`` or SIGINT/SIGTERM: (the report, the signal that stopped it or None)."""
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    got: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: (got.append(s), stop.set()))
    began = time.time()
    try:
        await swarm.start(connect_timeout)
    except TimeoutError as e:
        await swarm.stop()
        raise ServiceUnavailable(str(e)) from None
    out.info(f"{len(swarm.devices)} devices connected in {time.time() - began:.1f} s; waiting for rollouts "
             f"({'Ctrl-C' if duration is None else f'{duration:.0f} s'} to stop)")
    try:
        await asyncio.wait_for(stop.wait(), duration)
    except asyncio.TimeoutError:
        pass
    report = swarm.report(per_device=True)
    await swarm.stop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    return report, (got[0] if got else None)


def _labelled_stream() -> Any:
    """The rows simulated devices serve when they sample: the shipped digits test split, labelled."""
    from edgeloop.cloud.train.datasets import load_dataset
    from edgeloop.simulators.datastream import DataStream

    _, _, test = load_dataset().split()
    return DataStream(test.x, test.y)


def _initial_packages(ws: Workspace, version: str | None, mix: dict[str, float]) -> dict[str, bytes]:
    """The package of ``version`` for each tier of the mix (what the devices leave the factory
    with). Raises NotFound for a version or tier that has none."""
    if version is None:
        return {}
    from edgeloop.cloud.registry import Registry

    registry = Registry(ws.store_location)
    try:
        packages = {}
        for tier in mix:
            package = registry.package_for(version, tier)
            packages[tier] = Path(registry.artifact_path(package["sha256"])).read_bytes()
        return packages
    finally:
        registry.close()


def _identities(ws: Workspace, config: Any, out: Output) -> None:
    """The workspace runs its own mutual-TLS broker: every simulated device connects as itself,
    with a certificate from the fleet CA (enrolled on first use, tagged simulated=true)."""
    from edgeloop.cloud.fleet_registry import FleetRegistry
    from edgeloop.cloud.registry import Registry
    from edgeloop.fleet.identity import simulated_device_tls
    from edgeloop.simulators.swarm import plan

    registry = Registry(ws.store_location)
    try:
        fleet = FleetRegistry(registry)
        devices = plan(config)
        with out.progress() as progress:
            for i, (device_id, tier) in enumerate(devices):
                simulated_device_tls(ws, fleet, device_id, tier)
                progress("identities", i + 1, len(devices))
    finally:
        registry.close()


def reachable(host: str, port: int) -> None:
    """Raises ServiceUnavailable (exit 3) if nothing accepts TCP connections at host:port."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise ServiceUnavailable(f"cannot reach MQTT broker at {host}:{port}: {e}") from None


def _raise_fd_limit(devices: int) -> None:
    """One socket per device: raise the soft open-files limit up to the hard one if needed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = devices + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            raise UserError(f"{devices} devices need {want} open files; this process may open {hard} "
                            f"(raise it: ulimit -n)")


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number, 0 or more")
    return value


def _pct(text: str) -> float:
    value = _non_negative(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"{text} is not a percentage (0-100)")
    return value


def sample_rate(text: str) -> float:
    """A share of requests, 0 to 1."""
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share of requests: use 0 to 1 (0.2: one in five)")
    return value
