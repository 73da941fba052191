"""Telemetry ingest throughput: simulated devices -> real Mosquitto -> control plane -> SQLite.

``--devices`` devices (real paho clients, each its own client id, QoS 1), spread over
``--procs`` publisher processes, each send ``--records`` telemetry records with sequence numbers
0.. and a 64-feature summary (the digits baseline's bins and residual sums, about 5.8 KB of
JSON, as real devices send). Each measured run has its own private broker and the same publishers:

- raw: ``mosquitto_sub -q 1`` subscribed to every device's telemetry topic, writing to /dev/null,
  exits after the last record: what the broker and a consumer that does nothing deliver;
- ingest: N control-plane processes (``edgeloop.cloud.ingest.control_plane.ControlPlane``, N from ``--workers``)
  splitting the stream through one MQTT 5 shared subscription, each with manual acks after each
  batch is stored, the ingest checks, batched ``INSERT OR IGNORE`` into SQLite in WAL mode
  (synchronous=NORMAL), and a confirmation to each device after each batch
  (``edgeloop.telemetry_ack/1``), until every record is in the ``telemetry`` table.

``--store postgresql``: the workers store into PostgreSQL instead (a private server started
for the run, tests/pg_server.py, a fresh database per measured run; batched ``insert ... on
conflict do nothing`` through psycopg's pipelined ``executemany``).

Everything (publishers, broker, consumers) shares this machine's cores, so rates move with
whatever else runs: each round measures raw and then every worker count back to back, the ratio
is taken within a round, and the median over ``--repeats`` rounds is reported. Rates are records
over the time from the first publish to the last record received (raw) or stored (ingest).
``ingest_cpu_ms_per_record``: the workers' own CPU time (all threads) per record.

Prints one JSON object as its last line: records, stored, lost, duplicates, records_per_s,
raw_per_s and ratio for the worker count with the best median ratio (``ingest_workers``), and
``by_workers`` with every count's ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeloop.contracts.messages import Telemetry, encode  # noqa: E402

TOPIC = "edgeloop/v2/default/devices/+/telemetry"   # the control plane's fleet: ControlPlane's default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _features() -> dict:
    import numpy as np

    from edgeloop.cloud.train.datasets import load_dataset
    from edgeloop.cloud.package.packaging import baseline_stats
    from edgeloop.device_sdk.telemetry import FeatureSummary
    train = load_dataset().split()[0]
    summary = FeatureSummary(baseline_stats(train.x, np.eye(10)[train.y]))
    summary.record_batch(train.x[:20])
    return summary.to_obj()


def _record(device: str, seq: int, features: dict) -> bytes:
    """One record as the publishers send it: a window of 20 inferences with the feature summary."""
    now = time.time()
    return encode(Telemetry(device_id=device, seq=seq, model_version="digits-mlp:1", window_start=now,
                            window_end=now, count=20, labelled=20, correct=19, predictions=[2] * 10,
                            confidence_hist=[0] * 9 + [20], latency_ms_p50=0.2, latency_ms_max=0.5,
                            features=features))


def publisher(port: int, devices: list[str], records: int, features: dict, start: mp.Event, tag: str) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgeloop.contracts import topics
    clients = []
    for d in devices:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=f"{d}-{tag}")
        c.max_queued_messages_set(0)
        c.connect("127.0.0.1", port)
        c.loop_start()
        clients.append(c)
    start.wait()
    infos = []
    for seq in range(records):
        for d, c in zip(devices, clients):
            infos.append(c.publish(topics.Fleet(topics.DEFAULT_FLEET).telemetry(d), _record(d, seq, features), qos=1))
    for info in infos:
        info.wait_for_publish(120)
    for c in clients:
        c.loop_stop()
        c.disconnect()


def _run_publishers(port: int, args: argparse.Namespace, features: dict, tag: str) -> tuple[list, mp.Event]:
    names = [f"bench-dev-{i:05d}" for i in range(args.devices)]
    start = mp.Event()
    procs = [mp.Process(target=publisher, args=(port, names[i::args.procs], args.records, features, start, tag))
             for i in range(args.procs)]
    for p in procs:
        p.start()
    time.sleep(2.0)                 # every client connected before the clock starts
    return procs, start


def raw_rate(port: int, args: argparse.Namespace, features: dict) -> float:
    total = args.devices * args.records
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", TOPIC,
                            "-C", str(total), "-i", "bench-raw"], stdout=subprocess.DEVNULL)
    time.sleep(1.0)
    procs, start = _run_publishers(port, args, features, "raw")
    t0 = time.time()
    start.set()
    sub.wait(600)
    elapsed = time.time() - t0
    for p in procs:
        p.join(60)
    return total / elapsed


def ingest_worker(port: int, db: str, name: str, ready: mp.Event, stop: mp.Event, out: mp.Queue) -> None:
    """One ingest worker process: a control plane in the shared subscription group."""
    from edgeloop.cloud.ingest.control_plane import ControlPlane
    from edgeloop.cloud.registry import Registry
    registry = Registry(db if "://" in db else Path(db))
    cp = ControlPlane(registry, "127.0.0.1", port, session=name).start(30)
    cpu0 = time.process_time()
    ready.set()
    stop.wait()
    cp.drain(30)
    s = cp.stats
    out.put({"received": s.received, "duplicates": s.telemetry_duplicates, "rejected": s.rejected,
             "store_failures": s.store_failures,
             "cpu_s": time.process_time() - cpu0})
    cp.stop()
    registry.close()


def _stored(db: Path | str) -> int:
    from edgeloop.cloud.registry import Registry
    registry = Registry(db)
    try:
        return registry.telemetry_count()
    finally:
        registry.close()


def ingest_rate(port: int, args: argparse.Namespace, workers_n: int, features: dict, workdir: Path,
                server=None) -> dict:  # noqa: ANN001 - tests.pg_server.PrivatePostgres for --store postgresql
    from edgeloop.cloud.registry import Registry
    db: Path | str = server.fresh_database() if server is not None else workdir / "registry.db"
    Registry(db).close()
    stop, out = mp.Event(), mp.Queue()
    workers = []
    for k in range(workers_n):
        ready = mp.Event()
        w = mp.Process(target=ingest_worker, args=(port, str(db), f"bench-ingest-{k}", ready, stop, out))
        w.start()
        ready.wait(60)
        workers.append(w)
    total = args.devices * args.records
    procs, start = _run_publishers(port, args, features, "ingest")
    t0 = time.time()
    start.set()
    deadline = t0 + 600
    watcher = Registry(db)          # one connection to poll (opening a PostgreSQL store per poll costs its CPU)
    try:
        while watcher.telemetry_count() < total and time.time() < deadline:
            time.sleep(0.02)
    finally:
        watcher.close()
    elapsed = time.time() - t0
    for p in procs:
        p.join(60)
    time.sleep(1.0)                 # anything redelivered late is counted too
    stop.set()
    stats = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(30)
    summed = {k: sum(s[k] for s in stats) for k in stats[0]}
    return {**summed, "stored": _stored(db), "records_per_s": total / elapsed,
            "ingest_cpu_ms_per_record": round(summed["cpu_s"] * 1000 / total, 3),
            "per_worker_received": [s["received"] for s in stats]}


class _Broker:
    """A private Mosquitto per measured run, so no session or shared subscription of one run
    (a worker's persistent session stays in the share group after it leaves) touches the next."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        conf = workdir / f"mosquitto-{self.port}.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_queued_messages 1000000\nmax_inflight_messages 0\n")
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def __enter__(self) -> int:
        return self.port

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--records", type=int, default=50, help="records per device")
    ap.add_argument("--procs", type=int, default=4, help="publisher processes")
    ap.add_argument("--workers", default="1,2",
                    help="ingest worker process counts to measure, comma-separated (one shared subscription)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds of raw + each worker count, back to back; ratios are per round, medians reported")
    ap.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                    help="where the workers store: SQLite (WAL) or a private PostgreSQL")
    args = ap.parse_args()
    server = None
    if args.store == "postgresql":
        from tests.pg_server import PrivatePostgres
        server = PrivatePostgres()
        server.start()
    try:
        run(args, server)
    finally:
        if server is not None:
            server.stop()


def run(args: argparse.Namespace, server) -> None:  # noqa: ANN001
    counts = [int(w) for w in args.workers.split(",")]
    features = _features()
    total = args.devices * args.records
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        workdir = Path(d)
        os.chmod(workdir, 0o755)
        for r in range(args.repeats):
            with _Broker(workdir) as port:
                raw = raw_rate(port, args, features)
            print(f"round {r + 1}: raw (mosquitto_sub) {raw:.0f} records/s", file=sys.stderr)
            for n in counts:
                run_dir = workdir / f"round{r}-workers{n}"
                run_dir.mkdir()
                with _Broker(workdir) as port:
                    ingest = ingest_rate(port, args, n, features, run_dir, server)
                print(f"round {r + 1}: ingest, {n} worker(s): {ingest['records_per_s']:.0f} records/s, "
                      f"ratio {ingest['records_per_s'] / raw:.3f}", file=sys.stderr)
                rounds.append({"round": r, "workers": n, "raw_per_s": raw, **ingest})
    by_workers = {}
    for n in counts:
        runs = [x for x in rounds if x["workers"] == n]
        by_workers[str(n)] = {
            "ratio_median": round(statistics.median(x["records_per_s"] / x["raw_per_s"] for x in runs), 3),
            "ratios": [round(x["records_per_s"] / x["raw_per_s"], 3) for x in runs],
            "records_per_s_median": round(statistics.median(x["records_per_s"] for x in runs)),
            "ingest_cpu_ms_per_record_median": round(statistics.median(x["ingest_cpu_ms_per_record"] for x in runs), 3),
            "lost": sum(total - x["stored"] for x in runs), "duplicates": sum(x["duplicates"] for x in runs)}
    best = max(counts, key=lambda n: by_workers[str(n)]["ratio_median"])
    head = [x for x in rounds if x["workers"] == best]
    print(json.dumps({
        "store": args.store, "devices": args.devices, "publisher_procs": args.procs, "repeats": args.repeats, "ingest_workers": best,
        "records": total, "stored": min(x["stored"] for x in head),
        "lost": sum(total - x["stored"] for x in rounds), "duplicates": sum(x["duplicates"] for x in rounds),
        "rejected": sum(x["rejected"] for x in rounds), "store_failures": sum(x["store_failures"] for x in rounds),
        "payload_bytes": len(_record("bench-dev-00000", 0, features)),
        "records_per_s": by_workers[str(best)]["records_per_s_median"],
        "raw_per_s": round(statistics.median(x["raw_per_s"] for x in head)),
        "ratio": by_workers[str(best)]["ratio_median"], "by_workers": by_workers,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()}}))


if __name__ == "__main__":
    main()
