"""The generated broker configuration on a real Mosquitto, attacked with real clients: paho
(MQTT 5) and the mosquitto_pub / mosquitto_sub command-line clients.

Negative checks do not sleep for a timeout and hope: after each attempt the same client sends
a message it *is* allowed to, and the test waits for that one. MQTT keeps one publisher's
messages in order for each subscriber, so had the forbidden message gone through, it would
have arrived first. A control-plane client subscribed to everything watches.
"""

from __future__ import annotations

import json
import queue
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeloop.cloud.ingest.control_plane import ControlPlane
from edgeloop.cloud.fleet_registry import FleetRegistry
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.workspace import Workspace
from conftest import free_port, wait_for
from edgeloop.contracts.topics import Fleet
from edgeloop.contracts.messages import ErrorReport, encode
from edgeloop.device_sdk.agent import Agent, AgentConfig
from edgeloop.device_sdk.tuf_fetch import provision
from edgeloop.fleet import broker, identity
from edgeloop.fleet.cli import main
from edgeloop.fleet.identity import Enrolment, FleetCA, TlsFiles

pytestmark = pytest.mark.e2e
DEVICES = ("dev-a", "dev-b", "dev-c", "dev-revoked", "dev-agent")
TIER = "edge-gateway"
FLEET = "acl-fleet"                 # the workspace's fleet id: every topic below is under edgeloop/v2/acl-fleet/
topics = Fleet(FLEET)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGELOOP_KEY_PASSPHRASE", "acl-tests")
        root = tmp_path_factory.mktemp("acl")
        ws = Workspace.init(root / "ws", fleet=FLEET)
        registry = Registry(ws.registry_path)
        fleet = FleetRegistry(registry)
        tls = {d: _tls(identity.enroll(ws, fleet, Enrolment(d, tier=TIER)).folder) for d in DEVICES}
        csr_key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-csr")]))
               .sign(csr_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        folder = identity.enroll(ws, fleet, Enrolment("dev-csr", csr_pem=csr)).folder
        (folder / "device.key").write_bytes(csr_key.private_bytes(       # "on the device"
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        tls["dev-csr"] = _tls(folder)
        # control-plane processes connected at the same time need identities of their own (the client id
        # is the certificate CN); issued before the broker starts, so its ACL has them from the start
        sender_tls, ingest_tls = identity.control_plane_tls(ws, "sender"), identity.control_plane_tls(ws, "ingest-t")
        status = broker.start(ws, fleet, port=free_port())
        host, port = status.address.rsplit(":", 1)
        e = SimpleNamespace(address=status.address, ws=ws, fleet=fleet, registry=registry, host=host, port=int(port), tls=tls, root=root,
                            cp_tls=identity.control_plane_tls(ws), sender_tls=sender_tls, ingest_tls=ingest_tls)
        e.watcher = Client(e, e.cp_tls).connect_or_fail()
        e.watcher.subscribe("edgeloop/#")
        try:
            yield e
        finally:
            e.watcher.close()
            broker.stop(ws)
            registry.close()


def _tls(folder: Path) -> TlsFiles:
    return TlsFiles(folder / "ca.crt", folder / "device.crt", folder / "device.key")


class Client:
    """A paho MQTT 5 client that records what it receives and what the broker acknowledged."""

    def __init__(self, env, tls: TlsFiles | None, client_id: str | None = None,  # noqa: ANN001
                 will: str | None = None, ca_only: bool = False) -> None:
        self.env = env
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv5)
        if tls is not None:
            self.c.tls_set(ca_certs=str(tls.ca), certfile=None if ca_only else str(tls.cert),
                           keyfile=None if ca_only else str(tls.key), cert_reqs=ssl.CERT_REQUIRED)
        if will:
            self.c.will_set(will, b"forged will", qos=1, retain=True)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.acks: dict[int, str] = {}
        self.answered, self.ok, self.subscribed = threading.Event(), False, threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a: self.answered.set()
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, str(rc))

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self.ok = not reason_code.is_failure
        self.answered.set()

    def connect(self, clean_start: bool = True, session_s: int = 0, timeout: float = 5.0) -> bool:
        """True once the broker accepted the connection; False if it refused (any way)."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_s
        try:
            self.c.connect(self.env.host, self.env.port, keepalive=5, clean_start=clean_start, properties=props)
        except OSError:                     # ssl.SSLError included: refused during the handshake
            return False
        self.c.loop_start()
        self.answered.wait(timeout)
        if not self.ok:
            self.close()
        return self.ok

    def connect_or_fail(self, **kw) -> Client:  # noqa: ANN003
        assert self.connect(**kw), "the broker refused a client it should accept"
        return self

    def subscribe(self, *filters: str) -> None:
        self.subscribed.clear()
        self.c.subscribe([(f, 1) for f in filters])
        assert self.subscribed.wait(5)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> str:
        """The broker's answer to a QoS 1 publish: "Success" or "Not authorized"."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        wait_for(lambda: info.mid in self.acks, 5, "PUBACK")
        return self.acks[info.mid]

    def until(self, payload: bytes, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        """Everything received up to and including ``payload``."""
        got, deadline = [], time.time() + timeout
        while time.time() < deadline:
            try:
                got.append(self.messages.get(timeout=max(0.0, deadline - time.time())))
            except queue.Empty:
                break
            if got[-1][1] == payload:
                return got
        raise AssertionError(f"{payload!r} never arrived; got {got}")

    def drain(self) -> list[tuple[str, bytes]]:
        got = []
        while not self.messages.empty():
            got.append(self.messages.get_nowait())
        return got

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def device(env, name: str, **kw) -> Client:  # noqa: ANN001, ANN003
    return Client(env, env.tls[name], **kw).connect_or_fail()


def marker() -> bytes:
    return f"marker-{uuid.uuid4().hex[:8]}".encode()


def cli_args(env, tls: TlsFiles, *, ca_only: bool = False) -> list[str]:  # noqa: ANN001
    args = ["-h", env.host, "-p", str(env.port), "-V", "mqttv5", "--cafile", str(tls.ca)]
    return args if ca_only else args + ["--cert", str(tls.cert), "--key", str(tls.key)]


def mosquitto_pub(env, tls: TlsFiles, topic: str, message: bytes,  # noqa: ANN001
                  *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mosquitto_pub", *cli_args(env, tls), "-q", "1", "-t", topic, "-m", message.decode(),
                           *extra], capture_output=True, text=True, timeout=15)


class Sub:
    """mosquitto_sub in the background; ``ready()`` once the broker acknowledged the subscription."""

    def __init__(self, env, tls: TlsFiles, *filters: str, count: int = 1,  # noqa: ANN001
                 ca_only: bool = False) -> None:
        # stdbuf: line-buffered, so the SUBACK line arrives while mosquitto_sub still runs
        argv = ["stdbuf", "-oL", "mosquitto_sub", *cli_args(env, tls, ca_only=ca_only), "-d", "-v",
                "-C", str(count), "-W", "10", *(a for f in filters for a in ("-t", f))]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(ln) for ln in self.proc.stdout], daemon=True).start()
        self.seen: list[str] = []

    def ready(self, timeout: float = 5.0) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            try:
                self.seen.append(self.lines.get(timeout=0.1))
            except queue.Empty:
                continue
            if "received SUBACK" in self.seen[-1]:
                return True
        return False

    def output(self) -> str:
        self.proc.wait(15)
        time.sleep(0.05)
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return "".join(self.seen)


def cp_sends(env, *messages: tuple[str, bytes]) -> None:  # noqa: ANN001
    cp = Client(env, env.sender_tls).connect_or_fail()
    try:
        for topic, payload in messages:
            assert cp.publish(topic, payload) == "Success"
    finally:
        cp.close()


# -- what a device may do ------------------------------------------------------------------------
def test_device_publishes_its_own_telemetry_and_receives_its_own_commands(env):
    a = device(env, "dev-a")
    a.subscribe(topics.command("dev-a"))
    try:
        for topic in (topics.telemetry("dev-a"), topics.status("dev-a"), topics.errors("dev-a")):
            m = marker()
            assert a.publish(topic, m) == "Success"
            assert env.watcher.until(m)[-1] == (topic, m)
        m = marker()
        cp_sends(env, (topics.command("dev-a"), m))
        assert a.until(m) == [(topics.command("dev-a"), m)]
    finally:
        a.close()


def test_device_made_by_csr_connects_with_the_key_that_never_left_it(env):
    m = marker()
    out = mosquitto_pub(env, env.tls["dev-csr"], topics.telemetry("dev-csr"), m)
    assert out.returncode == 0 and "Not authorized" not in out.stderr, out.stderr
    assert env.watcher.until(m)[-1] == (topics.telemetry("dev-csr"), m)


# -- reading what is not yours -------------------------------------------------------------------
def test_device_cannot_read_another_devices_commands(env):
    # one connection per identity (the client id is the certificate CN): paho as dev-b, mosquitto_sub as dev-c
    thief = device(env, "dev-b")
    thief.subscribe(topics.command("dev-a"), f"{topics.prefix}/devices/+/cmd", "#", topics.command("dev-b"))
    sub = Sub(env, env.tls["dev-c"], topics.command("dev-a"), f"{topics.prefix}/devices/+/cmd", "#")
    try:
        assert sub.ready()
        secret, m = b"secret-for-dev-a", marker()
        cp_sends(env, (topics.command("dev-a"), secret), (topics.command("dev-b"), m), (topics.command("dev-c"), m))
        got = thief.until(m)
        assert all(payload != secret for _, payload in got) and (topics.command("dev-b"), m) in got
        text = sub.output()                     # -C 1: mosquitto_sub exits with the first message it gets
        assert secret.decode() not in text and f"{topics.command('dev-c')} {m.decode()}" in text
    finally:
        thief.close()
        sub.proc.kill()


def test_device_reads_its_own_telemetry_confirmations_and_no_one_elses(env):
    a, b = device(env, "dev-a"), device(env, "dev-b")
    a.subscribe(topics.telemetry_ack("dev-a"))
    b.subscribe(topics.telemetry_ack("dev-a"), f"{topics.prefix}/devices/+/telemetry/ack", topics.telemetry_ack("dev-b"))
    try:
        secret, m = b"confirmation-for-dev-a", marker()
        cp_sends(env, (topics.telemetry_ack("dev-a"), secret), (topics.telemetry_ack("dev-b"), m))
        assert a.until(secret) == [(topics.telemetry_ack("dev-a"), secret)]
        assert b.until(m) == [(topics.telemetry_ack("dev-b"), m)]
    finally:
        a.close()
        b.close()


def test_device_cannot_read_other_devices_telemetry_even_from_the_ingest_share_group(env):
    thief = device(env, "dev-b")
    thief.subscribe(f"$share/edgeloop-ingest/{topics.telemetry_all()}", f"{topics.prefix}/devices/+/telemetry",
                    topics.command("dev-b"))
    a = device(env, "dev-a")
    try:
        sent = [a.publish(topics.telemetry("dev-a"), f"t{i}".encode()) for i in range(6)]
        assert sent == ["Success"] * 6          # acknowledged, so routed before the marker below
        m = marker()
        cp_sends(env, (topics.command("dev-b"), m))
        assert [t for t, _ in thief.until(m) if "telemetry" in t] == []
    finally:
        thief.close()
        a.close()


def test_device_joining_the_guessable_share_group_cannot_swallow_telemetry(env):
    group = broker.share_group(env.ws)
    assert group == broker.share_group(env.ws) != broker.share_group(Workspace.init(env.root / "other-ws"))
    assert group.startswith("edgeloop-ingest-") and len(group) == len("edgeloop-ingest-") + 32
    assert (env.ws.root / "broker" / "share-group").stat().st_mode & 0o077 == 0
    cp_tls = env.ingest_tls
    cp = ControlPlane(env.registry, env.host, env.port, tls_ca=cp_tls.ca, tls_cert=cp_tls.cert, tls_key=cp_tls.key,
                      share_group=group, fleet=FLEET).start()
    thief = device(env, "dev-b")
    c = device(env, "dev-c")
    try:                                          # the names a device could guess: the old fixed one, and ours
        thief.subscribe(*(f"$share/{g}/{t}" for g in ("edgeloop-ingest", "edgeloop-ingest-0", "ingest",
                                                                f"edgeloop-ingest-{FLEET}")
                          for t in (topics.telemetry_all(), topics.telemetry("dev-c"))))
        for i in range(10):                       # not telemetry a device would send: each counts as malformed
            assert c.publish(topics.telemetry("dev-c"), f"t{i}".encode()) == "Success"
        wait_for(lambda: cp.stats.malformed >= 10, 10, "all 10 messages at the control plane")
        cp.drain()
        assert cp.stats.malformed == 10
    finally:
        cp.stop()
        for client in (thief, c):
            client.close()


# -- speaking for another device -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["telemetry", "status", "errors", "blocks/req"])
def test_device_cannot_publish_as_another_device(env, kind):
    victim = f"{topics.prefix}/devices/dev-a/{kind}"
    env.watcher.drain()
    b = device(env, "dev-b")
    try:
        assert b.publish(victim, b"forged by paho", retain=kind == "status") == "Not authorized"
        out = mosquitto_pub(env, env.tls["dev-c"], victim, b"forged by mosquitto_pub", "-r")  # dev-b is connected
        assert "Not authorized" in out.stderr
        m = marker()
        assert b.publish(topics.telemetry("dev-b"), m) == "Success"
        assert [p for t, p in env.watcher.until(m) if t == victim] == []
    finally:
        b.close()
    late = Client(env, env.sender_tls).connect_or_fail()          # nothing forged was retained either
    try:
        late.subscribe(victim)
        time.sleep(0.3)
        assert [p for _, p in late.drain() if b"forged" in p] == []
    finally:
        late.close()


@pytest.mark.parametrize("kind", ["telemetry", "status", "errors", "blocks/req"])
def test_device_cannot_publish_into_another_fleets_prefix(env, kind):
    other = Fleet("other-fleet")                 # another workspace's fleet on the same broker
    forged = [f"{other.prefix}/devices/dev-b/{kind}",              # its own id, the other fleet
              f"edgeloop/v1/devices/dev-b/{kind}",                   # the old, fleet-less scheme
              f"edgeloop/v2/devices/dev-b/{kind}"]                   # no fleet segment at all
    b = device(env, "dev-b")
    peek = Client(env, env.sender_tls).connect_or_fail()
    try:
        for topic in forged:
            assert b.publish(topic, b"forged by paho", retain=kind == "status") == "Not authorized", topic
        assert "Not authorized" in mosquitto_pub(env, env.tls["dev-c"], forged[0], b"forged", "-r").stderr
        assert b.publish(other.announce(TIER), b"forged announce", retain=True) == "Not authorized"
        # nor can this workspace's control plane speak into the other fleet
        assert peek.publish(other.command("dev-b"), b"forged command") == "Not authorized"
        assert peek.publish(other.announce(TIER), b"forged announce", retain=True) == "Not authorized"
        m = marker()
        assert b.publish(topics.telemetry("dev-b"), m) == "Success"      # its own fleet's prefix still works
        assert env.watcher.until(m)[-1] == (topics.telemetry("dev-b"), m)
    finally:
        b.close()
        peek.close()


def test_device_cannot_announce_an_update_to_the_fleet(env):
    b = device(env, "dev-b")
    try:
        assert b.publish(topics.announce(TIER), b"forged announce", retain=True) == "Not authorized"
        assert "Not authorized" in mosquitto_pub(env, env.tls["dev-b"], topics.announce(TIER), b"forged", "-r").stderr
    finally:
        b.close()
    c = device(env, "dev-c")
    try:
        c.subscribe(topics.announce_all())
        time.sleep(0.3)
        assert c.drain() == []
    finally:
        c.close()


def test_device_cannot_leave_a_last_will_in_another_devices_name(env):
    env.watcher.drain()
    forger = device(env, "dev-b", will=topics.status("dev-a"))
    honest = device(env, "dev-c", will=topics.status("dev-c"))
    for client in (forger, honest):               # vanish without DISCONNECT: the broker sends the wills
        client.c.loop_stop()
        client.c.socket().shutdown(socket.SHUT_RDWR)
        client.c.socket().close()
    got = env.watcher.until(b"forged will")       # the honest will; then give the forged one time to show
    time.sleep(0.3)
    got += env.watcher.drain()
    assert [t for t, p in got if p == b"forged will"] == [topics.status("dev-c")]
    c = device(env, "dev-c")                      # clear dev-c's retained will: not a status message
    c.publish(topics.status("dev-c"), b"", retain=True)
    c.close()


def test_device_taking_over_another_devices_client_id_reads_none_of_its_commands(env):
    victim = Client(env, env.tls["dev-a"], client_id="dev-a-session").connect_or_fail(clean_start=True,
                                                                                      session_s=300)
    victim.subscribe(topics.command("dev-a"))
    victim.close()                                # the session (and its subscription) stays on the broker
    thief = Client(env, env.tls["dev-b"], client_id="dev-a-session").connect_or_fail(clean_start=False,
                                                                                     session_s=0)
    try:
        thief.subscribe(topics.command("dev-b"))
        m = marker()
        cp_sends(env, (topics.command("dev-a"), b"secret-for-dev-a"), (topics.command("dev-b"), m))
        assert [p for _, p in thief.until(m)] == [m]
    finally:
        thief.close()


def test_device_claiming_another_devices_client_id_cannot_disconnect_it(env):
    victim = Client(env, env.tls["dev-a"], client_id="dev-a").connect_or_fail()
    victim.subscribe(topics.command("dev-a"))
    dropped = threading.Event()
    victim.c.on_disconnect = lambda *a: dropped.set()
    thief = Client(env, env.tls["dev-b"], client_id="dev-a").connect_or_fail(clean_start=False, session_s=300)
    out = mosquitto_pub(env, env.tls["dev-c"], topics.telemetry("dev-c"), b"x", "-i", "dev-a")
    try:
        assert out.returncode == 0, out.stderr
        thief.subscribe(topics.command("dev-b"))
        m_a, m_b = marker(), marker()
        cp_sends(env, (topics.command("dev-a"), m_a), (topics.command("dev-b"), m_b))
        assert victim.until(m_a) == [(topics.command("dev-a"), m_a)]          # still connected, still served
        assert [p for _, p in thief.until(m_b)] == [m_b]
        assert not dropped.is_set()
        log = (env.ws.root / "broker" / "mosquitto.log").read_text()
        assert "as dev-b " in log and "as dev-c " in log                      # the broker renamed both thieves
    finally:
        thief.close()
        victim.close()


def test_several_control_plane_workers_split_the_ingest_stream(env):
    group = broker.share_group(env.ws)
    links = [broker.control_plane_link(env.ws, env.address, w) for w in ("ingest-a", "ingest-b")]   # new: ACL reload
    acl = (env.ws.root / "broker" / "acl").read_text()
    assert "user edgeloop-control-plane-ingest-a" in acl and "user edgeloop-control-plane-ingest-b" in acl
    cps = [ControlPlane(env.registry, link.host, link.port, share_group=group, fleet=FLEET,
                        **link.control_plane_kwargs()).start()
           for link in links]
    c = device(env, "dev-c")
    try:
        for i in range(20):
            assert c.publish(topics.telemetry("dev-c"), f"w{i}".encode()) == "Success"
        wait_for(lambda: sum(cp.stats.malformed for cp in cps) >= 20, 10, "all 20 messages at the workers")
        for cp in cps:
            cp.drain()
        assert sum(cp.stats.malformed for cp in cps) == 20 and all(cp.stats.malformed > 0 for cp in cps)
        assert all(cp._connected.is_set() for cp in cps)          # neither closed the other's connection
    finally:
        c.close()
        for cp in cps:
            cp.stop()


# -- who may connect at all ----------------------------------------------------------------------
def test_client_without_a_certificate_is_refused(env):
    assert not Client(env, env.tls["dev-a"], ca_only=True).connect()
    sub = Sub(env, env.tls["dev-a"], "#", ca_only=True)
    assert not sub.ready() and sub.proc.wait(15) != 0


def test_plaintext_client_is_refused(env):
    assert not Client(env, None).connect(timeout=3)
    out = subprocess.run(["mosquitto_sub", "-h", env.host, "-p", str(env.port), "-t", "#", "-C", "1", "-W", "1"],
                         capture_output=True, text=True, timeout=15)   # no CONNACK ever comes: -W ends it
    assert out.returncode != 0 and out.stdout == ""


def test_client_with_a_certificate_from_another_ca_is_refused(env):
    rogue_ws = Workspace.init(env.root / "rogue")
    rogue = FleetCA.open(rogue_ws)
    issued = rogue.issue_device("dev-a")               # the right name, the wrong issuer
    folder = env.root / "rogue-identity"
    folder.mkdir()
    (folder / "device.crt").write_bytes(issued.cert_pem)
    (folder / "device.key").write_bytes(issued.key_pem)
    (folder / "ca.crt").write_bytes(env.tls["dev-a"].ca.read_bytes())   # it trusts the real broker
    forged = _tls(folder)
    assert not Client(env, forged).connect()
    assert mosquitto_pub(env, forged, topics.telemetry("dev-a"), b"forged").returncode != 0


def test_revoked_device_is_refused_and_cut_off_once_the_broker_reloads(env, capsys):
    old = device(env, "dev-revoked")                  # connected before the revocation
    old.subscribe(topics.command("dev-revoked"))
    m = marker()
    assert old.publish(topics.telemetry("dev-revoked"), m) == "Success"
    env.watcher.until(m)
    assert main(["devices", "revoke", "dev-revoked", "-w", str(env.ws.root), "--json"]) == 0
    assert '"broker": "reloaded"' in capsys.readouterr().out
    # (no new connection as dev-revoked until the old one is checked: one identity, one connection)
    wait_for(lambda: old.publish(topics.telemetry("dev-revoked"), b"after") == "Not authorized", 10,
             "the broker to re-read its ACL")
    try:
        m = marker()
        a = device(env, "dev-a")
        a.subscribe(topics.command("dev-a"))
        cp_sends(env, (topics.command("dev-revoked"), b"cmd after revocation"), (topics.command("dev-a"), m))
        a.until(m)
        a.close()
        time.sleep(0.2)
        assert old.drain() == []
    finally:
        old.close()
    assert not Client(env, env.tls["dev-revoked"]).connect()      # the CRL was re-read with the ACL
    assert mosquitto_pub(env, env.tls["dev-revoked"], topics.telemetry("dev-revoked"), b"x").returncode != 0
    device(env, "dev-a").close()                     # everyone else still connects


# -- end to end: the real agent and control plane over mutual TLS ---------------------------------
def test_agent_over_mutual_tls_reports_to_a_tls_control_plane(env, tmp_path):
    repo, director = env.ws.image_repository(), env.ws.director_repository()
    repo.init()
    director.init()
    cp_tls = env.ingest_tls
    cp = ControlPlane(env.registry, env.host, env.port, tls_ca=cp_tls.ca, tls_cert=cp_tls.cert,
                      tls_key=cp_tls.key, fleet=FLEET).start()
    files = env.tls["dev-agent"]
    state = tmp_path / "dev-agent"
    provision(state / "tuf", repo.trusted_root(), director.trusted_root())
    agent = Agent(AgentConfig(device_id="dev-agent", tier=TIER, state_dir=state, mqtt_host=env.host,
                              mqtt_port=env.port, fleet=FLEET, heartbeat_s=0.2, tls_ca=files.ca, tls_cert=files.cert,
                              tls_key=files.key))
    fleet = FleetRegistry(env.registry)
    try:
        agent.start()
        wait_for(lambda: fleet.device("dev-agent")["online"], 10, "the agent's status in the registry")
        first = fleet.device("dev-agent")["last_seen"]

        def heartbeat() -> bool:
            agent.step(0.05)
            return fleet.device("dev-agent")["last_seen"] > first
        wait_for(heartbeat, 10, "a heartbeat to refresh last seen")
        agent._publish_error(None, "test.tls", "error report through the shared subscription")
        wait_for(lambda: fleet.device("dev-agent")["last_error"] == "test.tls: error report through the shared "
                 "subscription", 10, "the error report")
        agent.stop()
        wait_for(lambda: not fleet.device("dev-agent")["online"], 10, "offline after stop")
        assert cp.stats.malformed == 0
    finally:
        cp.stop()


def test_demo_over_mutual_tls_enrolls_each_simulated_device_and_connects_it_as_itself(env, capsys):
    # the workspace has a generated broker (broker.json): the CLI's control plane and devices use mutual TLS
    code = main(["demo", "-w", str(env.ws.root), "--devices", "3", "--samples", "20", "--epochs", "3",
                 "--prefix", "tlsdemo", "--timeout", "120", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert (result["devices"], result["updated"], result["failed"]) == (3, 3, 0)
    ids = [f"tlsdemo-{TIER}-{i:05d}" for i in range(3)]
    log = (env.ws.root / "broker" / "mosquitto.log").read_text()
    for device_id in ids:
        enrolled = env.fleet.enrolled(device_id)
        assert enrolled is not None and not enrolled["revoked"]
        assert f"u'{device_id}'" in log                 # the broker saw the device's own certificate CN
        assert env.fleet.device(device_id)["model_version"] == result["model_version"]
    assert "u'edgeloop-control-plane-demo'" in log
    again = main(["demo", "-w", str(env.ws.root), "--devices", "1", "--samples", "20", "--epochs", "3",
                  "--prefix", "tlsdemo", "--timeout", "120", "--json"])       # the same ids: identities reused
    assert again == 0, capsys.readouterr().err
    code = main(["publish", result["model_version"], "--tier", TIER, "--repository-url",
                 "http://127.0.0.1:9/repository", "-w", str(env.ws.root), "--json"])     # signs and announces over TLS
    assert code == 0, capsys.readouterr().err
    published = json.loads(capsys.readouterr().out.splitlines()[-1])
    try:
        assert "as edgeloop-control-plane-publish " in (env.ws.root / "broker" / "mosquitto.log").read_text()
        c = device(env, "dev-c")
        c.subscribe(topics.announce(TIER))
        topic, payload = c.messages.get(timeout=5)               # the retained announcement, as a device reads it
        c.close()
        assert topic == topics.announce(TIER) and json.loads(payload)["update_id"] == published["update_id"]
    finally:
        clear = Client(env, env.sender_tls).connect_or_fail()    # no dead announcement left for later tests
        clear.publish(topics.announce(TIER), b"", retain=True)
        clear.close()


def test_serve_ingests_over_mutual_tls_and_serves_the_api(env, capsys):
    from edgeloop.cloud.api.server import TokenStore

    secret = TokenStore(env.registry).create("serve-test", "viewer")[1]
    serve_file = env.ws.root / "serve.json"
    serve_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "edgeloop.fleet.cli", "serve", "-w", str(env.ws.root), "--duration", "60",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: serve_file.exists() or proc.poll() is not None, 30, "serve to start")
        assert proc.poll() is None, proc.communicate()[1]
        api_url = json.loads(serve_file.read_text())["api_url"]
        assert api_url.startswith("https://")          # a broker configuration: HTTPS from the fleet CA
        # the client trusts the workspace's fleet CA (-w); tests/test_https.py has the refusals
        assert main(["devices", "-w", str(env.ws.root), "--server", api_url, "--token", secret, "--json"]) == 0
        listed = {d["device_id"] for d in json.loads(capsys.readouterr().out.splitlines()[-1])["devices"]}
        assert {"dev-a", "dev-b"} <= listed
        log = env.ws.root / "broker" / "mosquitto.log"
        wait_for(lambda: "as edgeloop-control-plane-serve " in log.read_text(), 10, "serve's TLS session")
        m = marker().decode()
        a = device(env, "dev-a")
        try:
            report = encode(ErrorReport("dev-a", "test.serve", m, ts=time.time()))
            assert a.publish(topics.errors("dev-a"), report) == "Success"
        finally:
            a.close()
        wait_for(lambda: any(e["message"] == m for e in env.registry.device_errors("dev-a")), 15,
                 "serve to store the error report it ingested over TLS")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    stats = json.loads(out.splitlines()[-1])
    assert stats["api_url"] == api_url and stats["errors"] >= 1


def test_simulate_over_mutual_tls_connects_each_device_with_its_own_certificate(env, capsys):
    env.ws.image_repository().init()                 # the devices are provisioned with its roots
    env.ws.director_repository().init()
    code = main(["simulate", "-w", str(env.ws.root), "--devices", "2", "--duration", "2", "--prefix", "tlssim",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["devices"] == 2
    log = (env.ws.root / "broker" / "mosquitto.log").read_text()
    for device_id in (f"tlssim-{TIER}-00000", f"tlssim-{TIER}-00001"):
        assert env.fleet.enrolled(device_id) is not None and env.fleet.device(device_id)["tags"] == {"simulated": "true"}
        assert f"as {device_id} " in log and f"u'{device_id}'" in log
