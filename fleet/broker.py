"""The fleet's broker: a Mosquitto configuration generated from the workspace, and its process.

Rules the generated configuration enforces (Mosquitto 2.0, mosquitto.conf(5)):

- Only clients holding a certificate from the fleet CA connect: one TLS listener with
  ``require_certificate true`` and the CA's ``crlfile``; no plaintext listener, no anonymous
  access. The certificate's CN is the client's username (``use_identity_as_username``).
- A device (username = its device id) may publish only to its own fleet's
  ``edgeloop/v2/<fleet>/devices/<id>/`` ``status``, ``telemetry``, ``errors`` and
  ``blocks/req`` and ``time/req``, and receive only its own ``cmd``, ``blocks``, ``telemetry/ack``
  and ``time`` and its
  fleet's ``edgeloop/v2/<fleet>/updates/#``: ACL ``pattern`` lines on ``%u`` with the
  workspace's fleet id written in (``Workspace.fleet``), so nothing of another fleet on the
  same broker is reachable. Mosquitto
  2.0's ACL file does not refuse subscriptions (a SUBACK grants even ``#``); it checks every
  message against the receiver's ``read`` rules when it delivers it, and every publish
  (and last will) against the sender's ``write`` rules, dropping what fails.
- The control plane's identities (``edgeloop-control-plane`` and one
  ``edgeloop-control-plane-<worker>`` per process: serve, publish, demo, ...) read and write
  everything under their fleet's ``edgeloop/v2/<fleet>/``; that covers their shared subscriptions, because
  Mosquitto checks each delivery against the message's own topic.
- A client's id is its username, i.e. its certificate CN (``use_username_as_clientid``): a
  device that connects claiming another device's client id gets its own id instead, so it can
  neither disconnect the other device nor resume its session. Two connections with the same
  certificate close each other, which is why every control-plane process has its own identity.
- A revoked device id gets ``topic deny #``: it can neither publish nor receive, even on a
  connection opened before it was revoked (the CRL only stops new connections).
- The configuration and ACL are regenerated, never edited by hand. :func:`apply_revocations`
  rewrites the ACL and sends the running broker SIGHUP, on which Mosquitto 2.0.11 re-reads
  ``acl_file`` and ``crlfile`` (tests/test_broker_acl.py proves both).
- The control plane's ingest workers share the stream in a shared-subscription group whose
  name is a per-workspace secret (:func:`share_group`, 128 random bits in
  ``<workspace>/broker/share-group``, mode 0600). Mosquitto 2.0 cannot refuse a device's
  SUBSCRIBE to ``$share/<group>/...``, and a message the broker routes to a group member that
  may not read it is dropped, so a device that could name the group could swallow part of the
  stream; it cannot name a group it cannot guess.

Files (``<workspace>/broker/``): ``mosquitto.conf``, ``acl``, ``broker.json`` (the address),
``mosquitto.pid``, ``mosquitto.log``, ``data/`` (persistence), ``share-group`` (the secret).
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence
from urllib.parse import urlparse

from edgeloop.cloud.errors import ServiceUnavailable, UserError
from edgeloop.cloud.fleet_registry import DeviceFilter, FleetRegistry
from edgeloop.cloud.release.signing import atomic_write
from edgeloop.cloud.workspace import Workspace, parse_host_port
from edgeloop.contracts import topics
from edgeloop.fleet.identity import (TlsFiles, control_plane_cn, control_plane_cns, control_plane_tls, ensure_services,
                                     https_tls, pki_dir)

if TYPE_CHECKING:
    from edgeloop.cloud.services import StackOptions

DEFAULT_PORT = 8883
DEFAULT_BIND = "127.0.0.1"
START_TIMEOUT_S = 10.0

# what a device may do, on its own topics of its own fleet only (%u: the username, its
# certificate's CN; {fleet}: the fleet's topic prefix, edgeloop/v2/<fleet>)
DEVICE_RULES = (
    ("write", "{fleet}/devices/%u/status"),
    ("write", "{fleet}/devices/%u/telemetry"),
    ("write", "{fleet}/devices/%u/errors"),
    ("write", "{fleet}/devices/%u/blocks/req"),
    ("write", "{fleet}/devices/%u/time/req"),
    ("read", "{fleet}/devices/%u/cmd"),
    ("read", "{fleet}/devices/%u/blocks"),
    ("read", "{fleet}/devices/%u/telemetry/ack"),
    ("read", "{fleet}/devices/%u/time"),
    ("read", "{fleet}/updates/#"),
)

__all__ = ["BrokerConfig", "BrokerStatus", "DEFAULT_PORT", "MqttLink", "acl_text", "apply_revocations",
           "config_text", "control_plane_link", "describe", "running_pid", "share_group", "stack_options", "start",
           "server_tls", "status", "stop", "write_config"]
SHARE_GROUP_PREFIX = "edgeloop-ingest-"
STANDARD_WORKERS = ("serve", "publish", "demo")    # control-plane identities issued with the configuration


@dataclass(frozen=True)
class BrokerConfig:
    """Where the generated files are and what the listener serves."""

    conf: Path
    acl: Path
    host: str
    port: int
    tls: TlsFiles               # the control plane's client identity, for ControlPlane(tls_*=...)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class BrokerStatus:
    pid: int
    address: str
    conf: Path
    log: Path
    already_running: bool


def broker_dir(ws: Workspace) -> Path:
    return ws.root / "broker"


def share_group(ws: Workspace) -> str:
    """The workspace's secret shared-subscription group for ingest workers, created on first use
    (``edgeloop-ingest-`` + 32 hex digits). Every control-plane process of the workspace reads
    the same file, so they split the stream between them: processes (hosts) starting at once
    each write a name of their own, but only the first one lands (a hard link, which fails on an
    existing file) and every one of them returns the name that did. A malformed file is replaced."""
    path = broker_dir(ws) / "share-group"
    try:
        found = path.read_text().strip()
    except FileNotFoundError:
        found = None
    if found and found.startswith(SHARE_GROUP_PREFIX) and all(c not in found for c in "/+#"):
        return found
    name = SHARE_GROUP_PREFIX + secrets.token_hex(16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".share-group.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
    if found is not None:             # a malformed file: replaced
        os.replace(tmp, path)
        return name
    try:
        os.link(tmp, path)            # the first process's name, whole, or nothing
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_text().strip()


@dataclass(frozen=True)
class MqttLink:
    """How one of the workspace's own processes reaches the broker: over mutual TLS as the
    control plane when the workspace has a generated broker (``broker/broker.json``), else
    plain TCP to the workspace's MQTT address."""

    host: str
    port: int
    tls: TlsFiles | None

    def control_plane_kwargs(self) -> dict[str, object]:
        """Keyword arguments for cloud.ingest.control_plane.ControlPlane (no TLS ones for plain TCP)."""
        if self.tls is None:
            return {}
        return {"tls_ca": self.tls.ca, "tls_cert": self.tls.cert, "tls_key": self.tls.key}


def control_plane_link(ws: Workspace, address: str | None = None, worker: str | None = None) -> MqttLink:
    """Where and how a control-plane process connects. ``address`` (HOST:PORT, for example the
    CLI's ``--mqtt``) overrides the broker's own address. ``worker``: the process's own identity
    (:func:`edgeloop.fleet.identity.control_plane_tls`); a new one is added to the ACL and a running
    broker reloads it. Raises UserError for a malformed broker.json or worker name."""
    info_path = broker_dir(ws) / "broker.json"
    if not info_path.exists():
        host, port = parse_host_port(address, "broker address") if address else (ws.mqtt_host, ws.mqtt_port)
        return MqttLink(host, port, None)
    try:
        info = json.loads(info_path.read_text())
        host, port = (parse_host_port(address, "broker address") if address
                      else (str(info["host"]), int(info["port"])))
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"malformed {info_path}: {e} (regenerate it: edgeloop broker config)") from None
    known = control_plane_cn(worker) in control_plane_cns(ws)
    tls = control_plane_tls(ws, worker)
    if not known:
        _reload_acl(ws)
    return MqttLink(host, port, tls)


def stack_options(ws: Workspace, address: str | None = None, worker: str = "serve", *, ingest_workers: int = 1,
                  session: str | None = None, api: tuple[str, int] | None = None, shared: bool = True,
                  rollouts: bool = True) -> StackOptions:
    """The service stack's options for one of the workspace's processes (``serve``, ``demo``, ...):
    its broker link (mutual TLS as ``worker`` when the workspace has a generated broker, further
    ingest workers as ``<worker>-2``, ...), the workspace's secret share group, HTTPS for the
    repository and the API with a certificate from the fleet CA when the workspace has a generated
    broker (:func:`server_tls`), and what else the caller asks for. The one place serve and the
    demos get these from (cloud/services.py).
    Raises UserError for a bad address, worker name or worker count."""
    from edgeloop.cloud.services import StackOptions

    if ingest_workers < 1:
        raise UserError(f"invalid number of ingest workers {ingest_workers}: use 1 or more")
    links = [control_plane_link(ws, address, worker if i == 0 else f"{worker}-{i + 1}") for i in range(ingest_workers)]
    return StackOptions(broker=links[0], workers=tuple(links[1:]), share_group=share_group(ws), shared=shared,
                        session=session, api=api, rollouts=rollouts, server_tls=server_tls(ws, api),
                        public_url=ws.public_url)


def server_tls(ws: Workspace, api: tuple[str, int] | None = None):  # noqa: ANN201 - cloud.services.ServerTls | None
    """The HTTPS identity of the workspace's repository server and API when it has a generated
    broker (``broker/broker.json``, the same condition as mutual TLS to the broker), else None
    (plain HTTP). Its names: loopback, the broker's extra hostnames, the addresses served, and
    the host of the workspace's ``http.public_url`` (docs/multihost.md)."""
    from edgeloop.cloud.services import ServerTls

    if not (broker_dir(ws) / "broker.json").exists():
        return None
    public = urlparse(ws.public_url).hostname if ws.public_url else None    # a TLS-passthrough balancer's name
    hosts = ["127.0.0.1", "localhost", *_last_hostnames(ws), ws.http_host, *([api[0]] if api else []),
             *([public] if public else [])]
    cert, key = https_tls(ws, hosts)
    return ServerTls(cert, key)


def _reload_acl(ws: Workspace) -> None:
    from edgeloop.cloud.registry import Registry

    registry = Registry(ws.store_location)
    try:
        if apply_revocations(ws, FleetRegistry(registry)) == "reloaded":
            time.sleep(0.2)               # Mosquitto re-reads the ACL on its next loop turn
    finally:
        registry.close()


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not found:
        raise ServiceUnavailable("mosquitto is not installed (Debian: apt-get install mosquitto)")
    return found


# -- configuration ----------------------------------------------------------------------------------
def acl_text(revoked: Sequence[str] = (), control_planes: Sequence[str] = (control_plane_cn(),),
             fleet: str = topics.DEFAULT_FLEET) -> str:
    """The ACL file of fleet ``fleet``: revoked identities first, then the control plane's
    identities (CNs), then the device patterns. Raises UserError for an id it will not write."""
    if not topics.valid_fleet(fleet):
        raise UserError(f"invalid fleet id {fleet!r} in the workspace config")
    scheme = topics.Fleet(fleet)
    lines = ["# edgeloop broker ACL, generated by `edgeloop broker config`: regenerate, do not edit.",
             "# Usernames are certificate CNs (use_identity_as_username).", ""]
    for device_id in sorted(revoked):
        if not topics.valid_device_id(device_id):     # never write a line we did not validate
            raise UserError(f"invalid device id {device_id!r} in the registry")
        lines += ["# revoked: no access, also on a connection opened before the revocation",
                  f"user {device_id}", "topic deny #", ""]
    lines += [f"# the control plane: everything under {scheme.prefix}/ (deliveries to its shared",
              "# subscriptions are checked against the message's topic, so they need no $share rule)",
              "# (one identity per control-plane process: a client id is its username here)"]
    for cn in control_planes:
        if not cn.startswith(control_plane_cn()):    # never grant these rights to a device id
            raise UserError(f"{cn!r} is not a control-plane identity")
        lines += [f"user {cn}", f"topic readwrite {scheme.everything()}", ""]
    lines += [f"# every device of fleet {fleet}, on its own topics only (%u = its certificate CN = its device id);",
              "# the updates line has no %u: every device may read every tier's announcement of its fleet"]
    lines += [f"pattern {access} {topic.format(fleet=scheme.prefix)}" for access, topic in DEVICE_RULES]
    return "\n".join(lines) + "\n"


def config_text(ws: Workspace, acl: Path, port: int, bind: str = DEFAULT_BIND) -> str:
    """mosquitto.conf for the workspace: one mutual-TLS listener, the ACL, persistence, a log."""
    pki, folder = pki_dir(ws), broker_dir(ws)
    return "\n".join([
        f"# edgeloop broker for workspace {ws.root}, generated by `edgeloop broker config`: regenerate, do not edit.",
        # the broker runs as whoever starts it (Mosquitto started as root would otherwise switch to
        # the `mosquitto` user, who cannot read the workspace's 0600 keys)
        f"user {pwd.getpwuid(os.getuid()).pw_name}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {acl}",
        "persistence true",
        f"persistence_location {folder / 'data'}/",
        f"log_dest file {folder / 'mosquitto.log'}",
        "connection_messages true",
        "max_queued_messages 10000",
        "",
        f"listener {port} {bind}",
        f"cafile {pki / 'ca.crt'}",
        f"certfile {pki / 'broker' / 'server.crt'}",
        f"keyfile {pki / 'broker' / 'server.key'}",
        f"crlfile {pki / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        # the client id is the username, so no identity can take over another's connection or session
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        ""])


def _revoked_ids(fleet: FleetRegistry) -> list[str]:
    return [d["device_id"] for d in fleet.devices(DeviceFilter(revoked=True))]


def write_config(ws: Workspace, fleet: FleetRegistry, port: int | None = None, out: Path | None = None,
                 bind: str = DEFAULT_BIND, hostnames: Sequence[str] = ()) -> BrokerConfig:
    """Write mosquitto.conf (to ``out``, default ``<workspace>/broker/mosquitto.conf``) and its
    ACL beside it (``<stem>.acl``, or ``acl`` for the default), issuing the broker's and the
    control plane's certificates if they are missing or due. ``port``: default the last one
    configured, else 8883; ``hostnames`` (the server certificate's extra names): default the
    last ones given. Raises UserError for a bad port or address."""
    port = _pick_port(ws, port)
    hostnames = tuple(hostnames) or _last_hostnames(ws)
    if not 1 <= port < 65536:
        raise UserError(f"invalid port {port}: use 1-65535")
    hosts = ["127.0.0.1", "localhost", *(h for h in (bind, *hostnames) if h not in ("0.0.0.0", "::"))]
    ensure_services(ws, tuple(dict.fromkeys(hosts)))
    folder = broker_dir(ws)
    conf = Path(out).resolve() if out else folder / "mosquitto.conf"
    acl = conf.with_suffix(".acl") if out else folder / "acl"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for worker in STANDARD_WORKERS:
        control_plane_tls(ws, worker)
    atomic_write(acl, acl_text(_revoked_ids(fleet), control_plane_cns(ws), ws.fleet).encode())
    atomic_write(conf, config_text(ws, acl, port, bind).encode())
    connect_host = "127.0.0.1" if bind in ("0.0.0.0", "::") else bind
    atomic_write(folder / "broker.json", json.dumps({"host": connect_host, "port": port, "conf": str(conf),
                                                     "acl": str(acl), "hostnames": list(hostnames)},
                                                    indent=1).encode())
    return BrokerConfig(conf, acl, connect_host, port, control_plane_tls(ws))


def _last_hostnames(ws: Workspace) -> tuple[str, ...]:
    try:
        names = json.loads((broker_dir(ws) / "broker.json").read_text()).get("hostnames", [])
    except (FileNotFoundError, ValueError, AttributeError):
        return ()
    return tuple(n for n in names if isinstance(n, str)) if isinstance(names, list) else ()


def _pick_port(ws: Workspace, port: int | None) -> int:
    if port is not None:
        return port
    try:
        return int(json.loads((broker_dir(ws) / "broker.json").read_text())["port"])
    except (FileNotFoundError, KeyError, ValueError):
        return DEFAULT_PORT


# -- the process ------------------------------------------------------------------------------------
def running_pid(ws: Workspace) -> int | None:
    """The pid of this workspace's running broker, or None. A pid file naming a process that is
    gone, or that is not mosquitto with this workspace's config, counts as no broker."""
    pid_file = broker_dir(ws) / "mosquitto.pid"
    try:
        info = json.loads(pid_file.read_text())
        pid = int(info["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, KeyError, ValueError, ProcessLookupError):
        return None
    if not any(part.endswith(b"mosquitto") for part in cmdline) or info["conf"].encode() not in cmdline:
        return None
    return pid


def status(ws: Workspace) -> dict[str, object]:
    """``{"pid", "address", "conf"}`` of this workspace's broker; pid None when it is not running."""
    try:
        info = json.loads((broker_dir(ws) / "broker.json").read_text())
    except (FileNotFoundError, ValueError):
        info = {}
    address = f"{info['host']}:{info['port']}" if "host" in info else None
    return {"pid": running_pid(ws), "address": address, "conf": info.get("conf")}


def start(ws: Workspace, fleet: FleetRegistry, port: int | None = None, bind: str = DEFAULT_BIND,
          hostnames: Sequence[str] = ()) -> BrokerStatus:
    """Start Mosquitto in the background with a freshly generated configuration, and wait until
    it accepts connections. A broker already running for this workspace is left as it is.
    Raises ServiceUnavailable if Mosquitto exits or does not listen within 10 s."""
    folder = broker_dir(ws)
    log = folder / "mosquitto.log"
    pid = running_pid(ws)
    if pid is not None:
        info = json.loads((folder / "broker.json").read_text())
        return BrokerStatus(pid, f"{info['host']}:{info['port']}", Path(info["conf"]), log, True)
    cfg = write_config(ws, fleet, port, bind=bind, hostnames=hostnames)
    with open(folder / "stderr.log", "ab") as err:
        proc = subprocess.Popen([mosquitto_binary(), "-c", str(cfg.conf)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    atomic_write(folder / "mosquitto.pid", json.dumps({"pid": proc.pid, "conf": str(cfg.conf)}).encode())
    _wait_listening(proc, cfg, folder)
    return BrokerStatus(proc.pid, cfg.address, cfg.conf, log, False)


def _wait_listening(proc: subprocess.Popen, cfg: BrokerConfig, folder: Path) -> None:
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            socket.create_connection((cfg.host, cfg.port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    if proc.poll() is None:
        proc.terminate()
        proc.wait(5)
    tail = (folder / "stderr.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    raise ServiceUnavailable(f"mosquitto did not start on {cfg.address}: {tail[0]} "
                             f"(see {folder / 'mosquitto.log'})")


def stop(ws: Workspace, timeout: float = 10.0) -> int | None:
    """Stop this workspace's broker (SIGTERM, then SIGKILL after ``timeout``). Returns its pid,
    or None if none was running."""
    pid = running_pid(ws)
    (broker_dir(ws) / "mosquitto.pid").unlink(missing_ok=True)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline and Path(f"/proc/{pid}").exists() and not _is_zombie(pid):
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists() and not _is_zombie(pid):
        os.kill(pid, signal.SIGKILL)
    return pid


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def apply_revocations(ws: Workspace, fleet: FleetRegistry) -> str:
    """Rewrite the ACL from the registry's revoked devices and make a running broker re-read it
    and the CRL (SIGHUP). Returns ``"reloaded"`` or ``"not running"`` (the next start reads both)."""
    info_path = broker_dir(ws) / "broker.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        atomic_write(Path(info["acl"]), acl_text(_revoked_ids(fleet), control_plane_cns(ws), ws.fleet).encode())
    pid = running_pid(ws)
    if pid is None:
        return "not running"
    os.kill(pid, signal.SIGHUP)
    return "reloaded"


def describe(cfg: BrokerConfig) -> dict[str, object]:
    """A JSON-ready summary of a configuration."""
    return {"conf": str(cfg.conf), "acl": str(cfg.acl), "address": cfg.address,
            "control_plane_tls": {k: str(v) for k, v in asdict(cfg.tls).items()}}
