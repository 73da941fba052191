"""Provisioning a real device (fleet/provision.py, device_sdk/provision.py, edge/gateway.py).

The operator's path from nothing to a gateway serving a published model, on the real
components: the CLI makes the workspace, starts the generated Mosquitto (mutual TLS, a private
port), runs ``serve`` and ``devices provision``; the ``edgeloop-gateway`` process starts from
the bundle alone, installs what ``publish`` announces and answers ``/v1/infer``, and its
console says every step. Then the bundles an operator gets wrong: incomplete, edited, mixed,
expired, revoked, for another fleet or state folder; and provisioning twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import shutil
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509

from conftest import cli_json, free_port, run_cli, wait_for
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.workspace import Workspace
from edgeloop.contracts.messages import Announce
from edgeloop.device_sdk import provision as dp
from edgeloop.device_sdk.ota import Installer
from edgeloop.edge.gateway import console_line, main as gateway_main
from edgeloop.device_sdk.agent import UpdateEvent

pytestmark = pytest.mark.e2e
FLEET = "prov-fleet"
TIER = "edge-gateway"


_cli = cli_json     # edgeloop ARGV --json in this process (tests/conftest.py)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """init -> broker up (private port) -> train -> package, as an operator types them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGELOOP_KEY_PASSPHRASE", "provision-tests")
        root = tmp_path_factory.mktemp("prov")
        ws = str(root / "ws")
        _cli("init", "-w", ws, "--fleet", FLEET)
        _cli("broker", "up", "-w", ws, "--port", str(free_port()))
        try:
            model = _cli("train", "-w", ws, "--epochs", "1")["model_version"]
            _cli("package", "-w", ws, model, "--tier", TIER)
            yield SimpleNamespace(root=root, ws=ws, model=model)
        finally:
            _cli("broker", "down", "-w", ws)


class Console:
    """A process's stdout, line by line, collected on a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines, self._q = proc, [], queue.Queue()
        threading.Thread(target=lambda: [self._q.put(ln.rstrip("\n")) for ln in proc.stdout], daemon=True).start()

    def has(self, text: str) -> bool:
        while not self._q.empty():
            self.lines.append(self._q.get_nowait())
        return any(text in ln for ln in self.lines)


def _infer(url: str, rows: list) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/infer", data=json.dumps({"inputs": rows}).encode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, {}


def _gateway(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = gateway_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _bundle(env, device_id: str, *extra: str) -> Path:
    out = env.root / f"bundle-{device_id}"
    if not out.exists():
        _cli("devices", "provision", device_id, "-w", env.ws, "--tier", TIER, "--out", str(out), *extra)
    return out


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    return copy


# -- the operator's path ------------------------------------------------------------------------------
def test_a_gateway_goes_from_nothing_to_serving_a_published_model_from_its_bundle(env, tmp_path):
    ws = Workspace.open(Path(env.ws))
    serve_file = ws.root / "serve.json"
    serve = subprocess.Popen([sys.executable, "-m", "edgeloop.fleet.cli", "serve", "-w", env.ws, "--duration", "120"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    gateway = None
    try:
        wait_for(lambda: serve_file.exists() or serve.poll() is not None, 30, "serve to start")
        assert serve.poll() is None, serve.communicate()[1]
        made = _cli("devices", "provision", "gw-7", "-w", env.ws, "--tier", TIER, "--tag", "site=lab",
                    "--out", str(tmp_path / "gw-7"))
        assert made["enrolled"] and made["key_included"] and made["fleet"] == FLEET
        manifest = json.loads((tmp_path / "gw-7" / "manifest.json").read_text())
        assert manifest["schema"] == "edgeloop.provision/1" and manifest["device_id"] == "gw-7"
        assert manifest["repository_url"] == json.loads(serve_file.read_text())["repository_url"]
        assert stat.S_IMODE((tmp_path / "gw-7" / "device.key").stat().st_mode) == 0o600
        port = free_port()
        gateway = subprocess.Popen([sys.executable, "-m", "edgeloop.edge.gateway", "--bundle", str(tmp_path / "gw-7"),
                                    "--state-dir", str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        console = Console(gateway)
        wait_for(lambda: console.has("connected") or gateway.poll() is not None, 30, "the gateway to connect")
        assert console.has(f"gw-7 of fleet {FLEET} connected") and console.has("(mutual TLS)"), console.lines
        url = f"http://127.0.0.1:{port}"
        assert _infer(url, [[0.0] * 64])[0] == 503            # no model yet
        published = _cli("publish", "-w", env.ws, env.model, "--tier", TIER)
        wait_for(lambda: _infer(url, [[0.0] * 64])[0] == 200, 60, "the gateway to serve the published model")
        status, body = _infer(url, [[0.0] * 64, [16.0] * 64])
        assert body["model_version"] == env.model and len(body["predictions"]) == 2
        uid = published["update_id"]
        steps = [f"update {uid}: announced {env.model}", f"update {uid}: downloading", f"update {uid}: verifying",
                 f"update {uid}: installing", f"update {uid}: health check",
                 f"update {uid}: committed, now serving {env.model}"]
        wait_for(lambda: console.has(steps[-1]), 10, "the committed line")
        lines = [ln.split("edgeloop-gateway: ", 1)[-1] for ln in console.lines]
        assert [ln for ln in lines if ln.startswith(f"update {uid}")] == steps
        assert (tmp_path / "state" / "tuf" / "director" / "metadata" / "root.json").exists()
        assert ws.director_repository().trusted_root() == (tmp_path / "gw-7" / "director-root.json").read_bytes()
    finally:
        if gateway is not None:
            gateway.terminate()
            assert gateway.wait(30) == 0
            assert console.has("stopped")
        serve.terminate()
        serve.wait(30)


# -- provisioning, twice and wrong -------------------------------------------------------------------
def test_provisioning_twice_reuses_the_certificate_and_never_overwrites_a_bundle(env, tmp_path, capsys):
    first = _cli("devices", "provision", "gw-twice", "-w", env.ws, "--tier", TIER, "--out", str(tmp_path / "a"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    code, _, err = run_cli(["devices", "provision", "gw-twice", "-w", env.ws, "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--force" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before      # untouched
    again = _cli("devices", "provision", "gw-twice", "-w", env.ws, "--out", str(tmp_path / "a"), "--force")
    assert not again["enrolled"] and again["serial"] == first["serial"]
    assert (tmp_path / "a" / "device.key").read_bytes() == before["device.key"]
    assert (tmp_path / "a" / "device.crt").read_bytes() == before["device.crt"]
    tar = _cli("devices", "provision", "gw-twice", "-w", env.ws, "--out", str(tmp_path / "b.tar"))
    assert tar["serial"] == first["serial"] and tar["key_included"]
    # what the registry holds for the device is set once, at enrolment
    code, _, err = run_cli(["devices", "provision", "gw-twice", "-w", env.ws, "--tier", "mobile",
                            "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "already enrolled with --tier 'edge-gateway'" in err and not (tmp_path / "c").exists()


def test_a_bundle_tar_unpacks_into_a_config_the_broker_accepts(env, tmp_path):
    out = tmp_path / "gw-tar.tar"
    _cli("devices", "provision", "gw-tar", "-w", env.ws, "--tier", TIER, "--out", str(out))
    with tarfile_members(out) as names:
        assert names == sorted(["manifest.json", "manifest.sig", "ca.crt", "device.crt", "device.key",
                                "image-root.json", "director-root.json"])
    folder = dp.unpack_bundle(out, tmp_path / "state" / "bundle")
    config = dp.from_bundle(folder, tmp_path / "state")
    assert (config.device_id, config.fleet, config.tier) == ("gw-tar", FLEET, TIER)
    assert stat.S_IMODE((folder / "device.key").stat().st_mode) == 0o600
    dp.probe_broker(config)               # the broker accepts this identity


@contextlib.contextmanager
def tarfile_members(path: Path):
    import tarfile
    with tarfile.open(path) as tar:
        yield sorted(m.name for m in tar.getmembers())


def test_provisioning_a_revoked_device_is_refused_and_its_old_bundle_is_turned_away(env, tmp_path, capsys):
    bundle = _bundle(env, "gw-revoked")
    _cli("devices", "revoke", "gw-revoked", "-w", env.ws)
    code, _, err = run_cli(["devices", "provision", "gw-revoked", "-w", env.ws, "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "revoked" in err and not (tmp_path / "x").exists()
    code, out, err = _gateway("--bundle", str(bundle), "--state-dir", str(tmp_path / "state"),
                              "--listen", f"127.0.0.1:{free_port()}")
    assert code == 4 and err.count("\n") == 1 and "refused this device's certificate" in err
    assert "Traceback" not in err and out == ""


def test_provisioning_without_a_generated_broker_or_for_a_name_its_certificate_lacks_is_refused(env, tmp_path, capsys):
    bare = tmp_path / "bare"
    _cli("init", "-w", str(bare))
    code, _, err = run_cli(["devices", "provision", "gw-1", "-w", str(bare), "--tier", TIER,
                            "--out", str(tmp_path / "b1")], capsys)
    assert code == 2 and "broker up" in err and not (tmp_path / "b1").exists()
    code, _, err = run_cli(["devices", "provision", "gw-far", "-w", env.ws, "--tier", TIER,
                            "--broker", "broker.example.com:8883", "--out", str(tmp_path / "b2")], capsys)
    assert code == 2 and "--san broker.example.com" in err and not (tmp_path / "b2").exists()
    assert Registry(Workspace.open(Path(env.ws)).registry_path).enrolled("gw-far") is None   # nothing enrolled


def test_a_device_whose_key_left_the_workspace_gets_a_bundle_without_one(env, tmp_path):
    bundle = _bundle(env, "gw-own-key")
    key = Path(env.ws) / "devices" / "gw-own-key" / "device.key"
    key.rename(tmp_path / "on-the-device.key")                       # "moved onto the device"
    again = _cli("devices", "provision", "gw-own-key", "-w", env.ws, "--out", str(tmp_path / "nokey"))
    assert not again["key_included"] and not (tmp_path / "nokey" / "device.key").exists()
    code, _, err = _gateway("--bundle", str(tmp_path / "nokey"), "--state-dir", str(tmp_path / "s"))
    assert code == 2 and "--tls-key" in err
    config = dp.agent_config(dp.load_bundle(tmp_path / "nokey"), tmp_path / "s", tmp_path / "on-the-device.key")
    dp.probe_broker(config)
    assert (bundle / "device.key").read_bytes() == (tmp_path / "on-the-device.key").read_bytes()


# -- bad bundles: one line, a documented exit, nothing written ---------------------------------------
@pytest.mark.parametrize("missing", ["director-root.json", "device.crt", "manifest.sig", "manifest.json"])
def test_an_incomplete_bundle_is_refused_naming_the_missing_file(env, tmp_path, missing):
    copy = _copy(_bundle(env, "gw-bad"), tmp_path)
    (copy / missing).unlink()
    code, out, err = _gateway("--bundle", str(copy), "--state-dir", str(tmp_path / "state"))
    assert code == 2 and err.count("\n") == 1 and missing in err and "Traceback" not in err
    assert not (tmp_path / "state" / "tuf").exists()


def _edit_manifest(copy: Path, change) -> None:
    m = json.loads((copy / "manifest.json").read_text())
    change(m)
    (copy / "manifest.json").write_bytes(dp.manifest_bytes(m))


@pytest.mark.parametrize("attack", ["broker_redirected", "device_renamed", "root_swapped", "key_from_another_device",
                                    "manifest_not_json"])
def test_a_tampered_bundle_is_refused_as_an_integrity_failure(env, tmp_path, attack):
    copy = _copy(_bundle(env, "gw-bad"), tmp_path)
    other = _bundle(env, "gw-other")
    if attack == "broker_redirected":
        _edit_manifest(copy, lambda m: m["broker"].update(host="10.6.6.6"))
    elif attack == "device_renamed":
        _edit_manifest(copy, lambda m: m.update(device_id="gw-other"))
    elif attack == "root_swapped":
        (copy / "image-root.json").write_bytes((copy / "director-root.json").read_bytes())
    elif attack == "key_from_another_device":
        for name in ("device.crt", "device.key"):
            shutil.copy(other / name, copy / name)
        _edit_manifest(copy, lambda m: m["files"].update({n: dp.sha256_file((other / n).read_bytes())
                                                          for n in ("device.crt", "device.key")}))
    else:
        (copy / "manifest.json").write_text("{ not json")
    code, out, err = _gateway("--bundle", str(copy), "--state-dir", str(tmp_path / "state"))
    assert code == 4 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "state" / "tuf").exists()


def test_a_bundle_for_another_fleet_device_or_state_folder_is_refused(env, tmp_path):
    bundle, other = _bundle(env, "gw-bad"), _bundle(env, "gw-other")
    code, _, err = _gateway("--bundle", str(bundle), "--state-dir", str(tmp_path / "s"), "--fleet", "acme")
    assert code == 2 and "--fleet acme contradicts the bundle" in err
    code, _, err = _gateway("--bundle", str(bundle), "--state-dir", str(tmp_path / "s"), "--device-id", "gw-9")
    assert code == 2 and "--device-id gw-9" in err
    dp.install_roots(dp.load_bundle(bundle), tmp_path / "s")            # gw-bad's state folder
    code, _, err = _gateway("--bundle", str(other), "--state-dir", str(tmp_path / "s"))
    assert code == 2 and "belongs to device 'gw-bad'" in err
    # a bundle of another workspace (its own CA and fleet), consistent in itself, on this state folder
    foreign_ws = tmp_path / "foreign"
    _cli("init", "-w", str(foreign_ws), "--fleet", "other-fleet")
    _cli("broker", "config", "-w", str(foreign_ws), "--port", str(free_port()))
    _cli("devices", "provision", "gw-bad", "-w", str(foreign_ws), "--tier", TIER, "--out", str(tmp_path / "foreign-b"))
    with pytest.raises(dp.BundleInvalid, match="fleet 'prov-fleet'"):
        dp.from_bundle(tmp_path / "foreign-b", tmp_path / "s")


def test_an_expired_or_not_yet_valid_certificate_is_refused(env):
    bundle = _bundle(env, "gw-bad")
    cert = x509.load_pem_x509_certificate((bundle / "device.crt").read_bytes())
    with pytest.raises(dp.BundleInvalid, match="expired on .*enrol the device under a new id"):
        dp.load_bundle(bundle, now=cert.not_valid_after_utc.timestamp() + 1)
    with pytest.raises(dp.BundleInvalid, match="clock"):
        dp.load_bundle(bundle, now=cert.not_valid_before_utc.timestamp() - 1)
    assert dp.load_bundle(bundle).device_id == "gw-bad"


def test_roots_the_device_rotated_to_are_never_replaced_by_the_bundles(env, tmp_path):
    bundle = dp.load_bundle(_bundle(env, "gw-bad"))
    state = tmp_path / "state"
    assert dp.install_roots(bundle, state) is True
    root = state / "tuf" / "image" / "metadata" / "root.json"
    rotated = json.loads(root.read_text())
    rotated["signed"]["version"] = 2                           # what python-tuf writes after a rotation
    root.write_text(json.dumps(rotated))
    assert dp.install_roots(bundle, state) is False
    assert json.loads(root.read_text())["signed"]["version"] == 2


# -- the install steps, as an observer sees them -----------------------------------------------------
def test_every_install_step_reaches_the_observer_with_the_refusal_code(env, tmp_path):
    registry = Registry(Workspace.open(Path(env.ws)).registry_path)
    pkg = registry.package_for(env.model, TIER)
    data = Path(registry.artifact_path(pkg["sha256"])).read_bytes()
    events: list[UpdateEvent] = []
    installer = Installer(tmp_path / "dev", TIER, 1 << 24)
    installer.observer = lambda state, uid, reason, code: events.append(UpdateEvent(str(state), uid, None, reason, code))

    def announce(uid: str, version: str) -> Announce:
        return Announce(uid, "digits-mlp", version, TIER, pkg["target"], len(data), pkg["sha256"], "http://r",
                        "http://d", time.time())

    installer.install(announce("u-good", env.model), lambda a: data)
    installer.install(announce("u-wrong", "digits-mlp:99"), lambda a: data)   # the bytes are another version
    assert [(e.update_id, e.step) for e in events] == [
        ("u-good", "downloading"), ("u-good", "verifying"), ("u-good", "installing"), ("u-good", "testing"),
        ("u-good", "committed"), ("u-wrong", "downloading"), ("u-wrong", "verifying"), ("u-wrong", "failed")]
    line = console_line(events[-1])
    assert line.startswith("update u-wrong: refused [verify.mismatch]: package is ") and "\n" not in line
    assert console_line(events[3]) == "update u-good: health check"
    registry.close()


def test_the_broker_keeps_the_names_devices_dial_so_their_bundles_can_name_it(env, tmp_path):
    ws = str(tmp_path / "named")
    _cli("init", "-w", ws)
    port = free_port()
    _cli("broker", "config", "-w", ws, "--port", str(port), "--san", "broker.lan")
    _cli("broker", "config", "-w", ws)                  # regenerated, e.g. by `broker up`: the name stays
    made = _cli("devices", "provision", "gw-lan", "-w", ws, "--tier", TIER, "--broker", f"broker.lan:{port}",
                "--out", str(tmp_path / "gw-lan"))
    bundle = dp.load_bundle(tmp_path / "gw-lan")
    assert made["broker"] == bundle.broker == f"broker.lan:{port}" and bundle.repository_url is None


def test_every_step_of_an_update_reaches_the_observer_and_a_broken_one_breaks_nothing(tmp_path):
    from edgeloop.contracts.messages import encode
    from edgeloop.contracts.topics import Fleet
    from edgeloop.device_sdk.agent import Agent, AgentConfig

    agent = Agent(AgentConfig(device_id="gw-obs", tier=TIER, state_dir=tmp_path / "s", fleet=FLEET,
                              max_package_bytes=1000))          # never connected: nothing leaves it
    events: list[UpdateEvent] = []
    agent.observe(events.append)
    agent.observe(lambda e: 1 / 0)                              # a broken observer breaks nothing
    big = Announce("u-big", "digits-mlp", "digits-mlp:3", TIER, "t", 10_000, "0" * 64, "http://r", "http://d",
                   time.time())
    agent.handle(Fleet(FLEET).announce(TIER), encode(big))
    # the announcement's length is not signed and decides nothing (the fetcher compares the signed
    # one, tests/test_signed_bounds.py): the observer hears the update announced, then its download
    assert [(e.step, e.update_id) for e in events][:2] == [("announced", "u-big"), ("downloading", "u-big")]
    assert console_line(events[0]).startswith("update u-big: ")


def test_the_gateway_refuses_a_bundle_whose_certificate_expired_in_one_line(env, tmp_path, monkeypatch):
    """A bundle consistent in every other way (signed by the fleet CA), its certificate expired."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
    from edgeloop.fleet.identity import FleetCA

    monkeypatch.setenv("EDGELOOP_KEY_PASSPHRASE", "provision-tests")
    copy = _copy(_bundle(env, "gw-bad"), tmp_path)
    ca = FleetCA.open(Workspace.open(Path(env.ws)))
    key = serialization.load_pem_private_key((copy / "device.key").read_bytes(), None)
    now = dt.datetime.now(dt.timezone.utc)
    expired = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-bad")]))
               .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=2)).not_valid_after(now - dt.timedelta(days=1))
               .sign(ca._key, hashes.SHA256()))
    (copy / "device.crt").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    _edit_manifest(copy, lambda m: m["files"].update({"device.crt": dp.sha256_file((copy / "device.crt").read_bytes())}))
    (copy / "manifest.sig").write_bytes(ca.sign((copy / "manifest.json").read_bytes()))
    code, out, err = _gateway("--bundle", str(copy), "--state-dir", str(tmp_path / "state"))
    assert code == 2 and err.count("\n") == 1 and "expired on" in err and "Traceback" not in err, err
    assert not (tmp_path / "state" / "tuf").exists()


def test_a_gateway_whose_broker_is_unreachable_says_so_and_exits_3(env, tmp_path):
    code, out, err = _gateway("--bundle", str(_bundle(env, "gw-bad")), "--state-dir", str(tmp_path / "state"),
                              "--mqtt", f"127.0.0.1:{free_port()}")
    assert code == 3 and err.count("\n") == 1 and "cannot reach the broker" in err and "Traceback" not in err
