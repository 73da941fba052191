"""The edge-gateway runtime: the device agent, plus local inference for the devices behind it.

A gateway runs one :class:`edgeloop.device_sdk.agent.Agent` (OTA updates, telemetry, store-and-forward,
exactly as on any device) and serves the model the agent has installed to sensors and
controllers on its local network, over plain HTTP/JSON (stdlib only, no extra dependency)::

    POST /v1/infer   {"inputs": [[raw features], ...], "labels": [int | null, ...]?}
                     -> 200 {"model_version", "predictions": [int], "confidences": [float]}
    GET  /v1/health  -> 200 {"device_id", "tier", "model_version", "installing", "outbox"}

Every request goes through the agent, so it is in the gateway's telemetry (inputs summarised
for drift, predictions, latency, and accuracy where ``labels`` are given), and an update
switches models between two requests, never during one. Requests are served one at a time
(an interpreter is not assumed to be thread-safe). Errors are one JSON line: 400 for a bad
request (not JSON, wrong shape, wrong number of features, too many rows), 503 while no model
is installed yet.

Run it from a provisioning bundle (``edgeloop devices provision gw-7 --tier edge-gateway --out gw-7``,
device_sdk/provision.py): ``edgeloop-gateway --bundle gw-7 --state-dir /var/lib/edgeloop --listen
0.0.0.0:8480``; on first start the bundle's trusted roots are copied into the state folder (never
over roots the device has rotated to since). Or from explicit flags: ``--device-id gw-7 --tier
edge-gateway --fleet acme --mqtt broker:8883 --tls-ca ca.pem --tls-cert gw-7.pem --tls-key gw-7.key``
(the trusted roots then already in ``<state>/tuf``).

The console gets one line per step of every update (announced, downloading, verifying,
installing, health check, then committed, refused or rolled back with the reason code, or
postponed), from :meth:`Agent.observe`. A bad start is one line on stderr and an exit code:
2 bad flags or an unusable bundle (a missing file, expired, another device's or fleet's),
3 broker unreachable, 4 a bundle that fails verification or a broker that refuses this
device's certificate (revoked).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from edgeloop.contracts.tasks import TaskKind
from edgeloop.contracts.topics import DEFAULT_FLEET
from edgeloop.device_sdk.agent import Agent, AgentConfig, UpdateEvent
from edgeloop.device_sdk.errors import TransientError
from edgeloop.device_sdk.provision import (BrokerRefused, BundleError, BundleInvalid, agent_config, install_roots,
                                           load_bundle, probe_broker, unpack_bundle)

log = logging.getLogger("edgeloop.gateway")

__all__ = ["GatewayServer", "console_line", "main", "MAX_ROWS", "MAX_BODY_BYTES"]

MAX_ROWS = 256                  # inputs per request
MAX_BODY_BYTES = 4 * 1024 * 1024


class RequestError(Exception):
    """A bad request: its message is the one line the client gets (HTTP 400)."""


class GatewayServer:
    """Local inference for an agent's installed model; :meth:`start` serves on a thread."""

    def __init__(self, agent: Agent, host: str = "127.0.0.1", port: int = 8480) -> None:
        self.agent = agent
        self._infer_lock = threading.Lock()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                if self.path != "/v1/infer":
                    return self._reply(404, {"error": f"no such endpoint: POST {self.path}"})
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    if not 0 < length <= MAX_BODY_BYTES:
                        raise RequestError(f"the body must be 1 to {MAX_BODY_BYTES} bytes of JSON")
                    status, body = gateway.infer(self.rfile.read(length))
                except RequestError as e:
                    status, body = 400, {"error": str(e)}
                self._reply(status, body)

            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/v1/health":
                    return self._reply(404, {"error": f"no such endpoint: GET {self.path}"})
                self._reply(200, gateway.health())

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body, separators=(",", ":")).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("%s %s", self.address_string(), fmt % args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> GatewayServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="edgeloop-gateway", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def health(self) -> dict[str, Any]:
        return {"device_id": self.agent.device_id, "tier": self.agent.config.tier,
                "model_version": self.agent.model_version, "installing": self.agent.installing,
                "outbox": len(self.agent.outbox)}

    def infer(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """One request's (status, JSON body). Raises RequestError for a bad request."""
        inputs, labels = _parse(body)
        runtime = self.agent.runtime
        if runtime is None:
            return 503, {"error": "no model is installed yet on this gateway"}
        width = runtime.manifest.features.n_features
        if inputs.shape[1] != width:
            raise RequestError(f"each input needs {width} features, got {inputs.shape[1]}")
        if runtime.manifest.task.kind is not TaskKind.REGRESSION and not all(
                v is None or (float(v).is_integer() and v >= 0) for v in labels):
            raise RequestError('"labels" must give one non-negative integer or null per input for a '
                               f'{runtime.manifest.task.kind.value} model')
        predictions, confidences = [], []
        with self._infer_lock:
            version = self.agent.model_version
            for row, label in zip(inputs, labels):
                result = self.agent.infer(row[None, :], label)
                if result is None:
                    return 503, {"error": "inference failed or no model is installed (see the gateway's log)"}
                predictions.append(result[0])
                confidences.append(round(result[1], 6))
        return 200, {"model_version": version, "predictions": predictions, "confidences": confidences}


def _parse(body: bytes) -> tuple[np.ndarray, list[float | None]]:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise RequestError("the body is not JSON") from None
    rows = obj.get("inputs") if isinstance(obj, dict) else None
    if not isinstance(rows, list) or not 0 < len(rows) <= MAX_ROWS:
        raise RequestError(f'"inputs" must list 1 to {MAX_ROWS} inputs')
    if not all(isinstance(r, list) and r and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in r) for r in rows) or len({len(r) for r in rows}) != 1:
        raise RequestError('"inputs" must be lists of numbers, all the same length')
    labels = obj.get("labels")
    if labels is None:
        labels = [None] * len(rows)
    elif not isinstance(labels, list) or len(labels) != len(rows) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
            for v in labels):
        raise RequestError('"labels" must give one number (a class index, or a regression target) or null per input')
    x = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(x).all():
        raise RequestError('"inputs" must be finite numbers')
    return x, labels


EXIT_BAD_INPUT, EXIT_UNREACHABLE, EXIT_INTEGRITY = 2, 3, 4

_STEPS = {"announced": "announced", "downloading": "downloading", "verifying": "verifying",
          "installing": "installing", "testing": "health check", "committed": "committed",
          "failed": "refused", "rolled_back": "rolled back", "idle": "postponed"}


def console_line(event: UpdateEvent, serving: str | None = None) -> str:
    """The console's line for one step of an update (``serving``: the model now serving)."""
    line = f"update {event.update_id}: {_STEPS.get(event.step, event.step)}"
    if event.step == "announced" and event.model_version:
        line += f" {event.model_version}"
    if event.step == "committed" and serving:
        line += f", now serving {serving}"
    if event.code:
        line += f" [{event.code}]"
    if event.reason:
        line += f": {event.reason}"
    return line


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgeloop-gateway", description=__doc__.splitlines()[0],
                                 epilog="exit codes: 0 stopped, 2 bad flags or an unusable bundle (missing file, "
                                        "expired, another device's or fleet's), 3 broker unreachable, 4 bundle "
                                        "failed verification or the broker refused this device's certificate "
                                        "(revoked)")
    ap.add_argument("--bundle", type=Path, metavar="DIR|FILE.tar",
                    help="start from a provisioning bundle (edgeloop devices provision): identity, fleet, broker "
                         "and trusted roots; the flags below then only override or must agree")
    ap.add_argument("--device-id", help="required without --bundle")
    ap.add_argument("--tier", help="default edge-gateway, or the bundle's")
    ap.add_argument("--state-dir", type=Path, required=True, help="where the agent keeps its slots and outbox")
    ap.add_argument("--mqtt", metavar="HOST:PORT", help="broker address (default 127.0.0.1:1883, or the bundle's)")
    ap.add_argument("--fleet", metavar="FLEET_ID",
                    help="the fleet id of the workspace that runs this device (its edgeloop.toml `fleet`)")
    ap.add_argument("--tls-ca", type=Path)
    ap.add_argument("--tls-cert", type=Path)
    ap.add_argument("--tls-key", type=Path, help="with --bundle: the device's own key, for a bundle without one")
    ap.add_argument("--listen", default="127.0.0.1:8480", metavar="HOST:PORT", help="local inference address")
    return ap


def _config(args: argparse.Namespace) -> AgentConfig:
    """The agent's config from the flags, or from the bundle. Raises ValueError or BundleError."""
    mqtt = _address(args.mqtt, "--mqtt") if args.mqtt else None
    if args.bundle is None:
        if not args.device_id:
            raise ValueError("give --bundle DIR (edgeloop devices provision), or --device-id with the broker flags")
        host, port = mqtt or ("127.0.0.1", 1883)
        return AgentConfig(device_id=args.device_id, tier=args.tier or "edge-gateway", state_dir=args.state_dir,
                           mqtt_host=host, mqtt_port=port, fleet=args.fleet or DEFAULT_FLEET, tls_ca=args.tls_ca,
                           tls_cert=args.tls_cert, tls_key=args.tls_key)
    if args.tls_ca or args.tls_cert:
        raise ValueError("--tls-ca and --tls-cert come from the bundle: leave them out (or the bundle)")
    folder = args.bundle
    if folder.is_file():
        folder = unpack_bundle(folder, args.state_dir / "bundle")
    bundle = load_bundle(folder)
    for flag, given, have in (("--device-id", args.device_id, bundle.device_id), ("--fleet", args.fleet, bundle.fleet),
                              ("--tier", args.tier, bundle.tier)):
        if given is not None and given != have:
            raise BundleInvalid(f"{flag} {given} contradicts the bundle ({flag} {have}): leave {flag} out, "
                                "or use the bundle made for it")
    install_roots(bundle, args.state_dir)
    overrides = {"mqtt_host": mqtt[0], "mqtt_port": mqtt[1]} if mqtt else {}
    return agent_config(bundle, args.state_dir, args.tls_key, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        host, port = _address(args.listen, "--listen")
        config = _config(args)
        if config.tls_ca is not None:
            probe_broker(config)      # an unreachable broker and a refused certificate, told apart
        agent = Agent(config)
        agent.observe(lambda e: _say(console_line(e, agent.model_version)))
        agent.start()
    except (BundleError, BrokerRefused) as e:
        return _fail(str(e), e.exit_code)
    except TransientError as e:
        return _fail(f"{e} (is the broker up?)", EXIT_UNREACHABLE)
    except (ValueError, OSError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    try:
        server = GatewayServer(agent, host, port).start()
    except OSError as e:
        agent.stop(drain_s=0)
        return _fail(f"cannot listen on {args.listen}: {e.strerror or e}", EXIT_BAD_INPUT)
    _say(f"{config.device_id} of fleet {config.fleet} connected to {config.mqtt_host}:{config.mqtt_port}"
         f"{' (mutual TLS)' if config.tls_cert else ''}; serving {agent.model_version or 'no model yet'} on "
         f"{server.url}")
    # a signal is only noted and the loop ends between two steps: a KeyboardInterrupt raised at
    # any bytecode could leave one of the agent's locks held and hang the stop below
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    try:
        while not stopping:
            agent.step(0.5)
    finally:
        server.stop()
        agent.stop()
    _say("stopped")
    return 0


def _say(line: str) -> None:
    print(f"edgeloop-gateway: {line}", flush=True)


def _fail(message: str, code: int) -> int:
    print(f"edgeloop-gateway: error: {message}", file=sys.stderr, flush=True)
    return code


def _address(text: str, flag: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} needs HOST:PORT, not {text!r}")
    return host, int(port)


if __name__ == "__main__":
    sys.exit(main())
