"""Device identity without a broker: the fleet CA, enrolment (generated key or CSR), refusals
that change nothing, revocation into a signed CRL, the registry's fleet fields and filters,
and the generated broker configuration. Tests are named after the mistake or attack they try."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeloop.cloud.errors import IntegrityError, NotFound, UserError
from edgeloop.cloud.fleet_registry import DeviceFilter, FleetRegistry
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.workspace import Workspace
from edgeloop.fleet import broker, identity
from edgeloop.fleet.identity import Enrolment, FleetCA
from conftest import run_cli  # noqa: E402


@pytest.fixture(autouse=True)
def _passphrase(monkeypatch):
    monkeypatch.setenv("EDGELOOP_KEY_PASSPHRASE", "correct horse")


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.init(tmp_path / "ws")


@pytest.fixture
def fleet(ws):
    registry = Registry(ws.registry_path)
    yield FleetRegistry(registry)
    registry.close()


def csr_for(name: str, key=None) -> tuple[bytes, object]:  # noqa: ANN001
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM), key


def snapshot(ws: Workspace, fleet: FleetRegistry) -> tuple:
    """Everything enrolment may touch: registry rows, issued certificates, the CRL, identity folders."""
    files = sorted(str(p.relative_to(ws.root)) for p in ws.root.rglob("*") if p.is_file()
                   and "registry.db" not in p.name)
    crl = (ws.root / "pki" / "crl.pem").read_bytes() if (ws.root / "pki" / "crl.pem").exists() else None
    return fleet.devices(now=0), files, crl


def test_enrolment_issues_a_client_certificate_for_the_device_id_signed_by_the_fleet_ca(ws, fleet):
    r = identity.enroll(ws, fleet, Enrolment("dev-1", tier="edge-gateway", hardware="rpi4-4gb",
                                             tags={"site": "berlin"}, groups=("canary",)))
    ca = FleetCA.open(ws)
    cert = x509.load_pem_x509_certificate((r.folder / "device.crt").read_bytes())
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key((r.folder / "device.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert stat.S_IMODE(os.stat(r.folder / "device.key").st_mode) == 0o600
    assert (r.folder / "ca.crt").read_bytes() == ca.cert_path.read_bytes()
    row = fleet.device("dev-1")
    assert (row["tier"], row["hardware"], row["tags"], row["groups"]) == ("edge-gateway", "rpi4-4gb",
                                                                         {"site": "berlin"}, ["canary"])
    assert row["cert_serial"] == f"{cert.serial_number:x}" and row["enrolled"] and not row["revoked"]
    assert row["state"] == "offline" and row["last_seen"] is None and not row["online"]


def test_ca_key_is_encrypted_at_rest_and_a_wrong_passphrase_opens_nothing(ws, fleet, monkeypatch):
    identity.enroll(ws, fleet, Enrolment("dev-1"))
    pem = (ws.keys_dir / "fleet-ca.pem").read_bytes()
    assert b"ENCRYPTED" in pem
    assert stat.S_IMODE(os.stat(ws.keys_dir / "fleet-ca.pem").st_mode) == 0o600
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(pem, None)
    monkeypatch.setenv("EDGELOOP_KEY_PASSPHRASE", "wrong")
    before = snapshot(ws, fleet)
    with pytest.raises(IntegrityError, match="EDGELOOP_KEY_PASSPHRASE"):
        identity.enroll(ws, fleet, Enrolment("dev-2"))
    assert snapshot(ws, fleet) == before


def test_swapped_ca_certificate_is_detected(ws, fleet):
    identity.enroll(ws, fleet, Enrolment("dev-1"))
    other = FleetCA.open(Workspace.init(ws.root.parent / "other"))
    (ws.root / "pki" / "ca.crt").write_bytes(other.cert_path.read_bytes())
    with pytest.raises(IntegrityError, match="is not the key of"):
        identity.enroll(ws, fleet, Enrolment("dev-2"))


def test_enrolment_by_csr_keeps_the_private_key_on_the_device(ws, fleet):
    csr, key = csr_for("dev-csr")
    r = identity.enroll(ws, fleet, Enrolment("dev-csr", csr_pem=csr))
    assert not r.key_generated and sorted(p.name for p in r.folder.iterdir()) == ["ca.crt", "device.crt"]
    cert = x509.load_pem_x509_certificate((r.folder / "device.crt").read_bytes())
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    cert.verify_directly_issued_by(FleetCA.open(ws).cert)


def _tampered_csr() -> bytes:
    """A CSR whose signature does not match its key (the requester does not hold the key)."""
    pem, _ = csr_for("dev-x")
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01                               # inside the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("csr, needle", [
    (lambda: csr_for("dev-other")[0], "names 'dev-other'"),
    (lambda: csr_for("edgeloop-control-plane")[0], "names"),
    (_tampered_csr, "signature does not verify"),
    (lambda: csr_for("dev-x", rsa.generate_private_key(65537, 1024))[0], "at least 2048"),
    (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n", "not a PEM"),
    (lambda: b"x" * 20_000, "over"),
], ids=["names-another-device", "names-the-control-plane", "forged-signature", "weak-key", "garbage", "huge"])
def test_bad_csr_is_refused_and_nothing_is_written(ws, fleet, csr, needle):
    identity.enroll(ws, fleet, Enrolment("dev-ok"))
    before = snapshot(ws, fleet)
    with pytest.raises(UserError, match=needle):
        identity.enroll(ws, fleet, Enrolment("dev-x", csr_pem=csr()))
    assert snapshot(ws, fleet) == before


def test_duplicate_enrolment_is_refused_and_changes_nothing(ws, fleet):
    identity.enroll(ws, fleet, Enrolment("dev-1", tier="mcu", tags={"site": "a"}))
    before = snapshot(ws, fleet)
    for out in (None, ws.root / "elsewhere"):          # a fresh identity folder changes nothing either
        with pytest.raises(UserError, match="already enrolled"):
            identity.enroll(ws, fleet, Enrolment("dev-1", tier="edge-gateway", tags={"site": "b"}), out)
        assert snapshot(ws, fleet) == before


def test_re_enrolling_a_revoked_device_id_is_refused(ws, fleet):
    identity.enroll(ws, fleet, Enrolment("dev-1"))
    identity.revoke(ws, fleet, "dev-1")
    before = snapshot(ws, fleet)
    with pytest.raises(UserError, match="already enrolled"):
        identity.enroll(ws, fleet, Enrolment("dev-1"), ws.root / "new-folder")
    assert snapshot(ws, fleet) == before


def test_enrolling_a_device_as_a_fleet_service_is_refused(ws, fleet):
    for name in ("edgeloop-control-plane", "edgeloop-broker", "Edgeloop-anything"):
        with pytest.raises(UserError, match="reserved"):
            identity.enroll(ws, fleet, Enrolment(name))
    assert fleet.devices() == []


def test_overwriting_another_devices_identity_folder_is_refused(ws, fleet):
    first = identity.enroll(ws, fleet, Enrolment("dev-1"))
    before = snapshot(ws, fleet)
    with pytest.raises(UserError, match="already holds"):
        identity.enroll(ws, fleet, Enrolment("dev-2"), first.folder)
    assert snapshot(ws, fleet) == before


def test_device_known_from_its_status_keeps_its_state_when_enrolled(ws, fleet):
    fleet.registry.record_status({"device_id": "legacy-1", "tier": "edge-gateway", "state": "committed",
                                  "model_version": "digits-mlp:2", "update_id": "u1", "reason": None})
    identity.enroll(ws, fleet, Enrolment("legacy-1", tags={"site": "x"}))
    row = fleet.device("legacy-1")
    assert (row["state"], row["tier"], row["model_version"], row["tags"]) == \
        ("committed", "edge-gateway", "digits-mlp:2", {"site": "x"})


def test_revocation_puts_the_serial_on_a_crl_signed_by_the_ca(ws, fleet):
    keep = identity.enroll(ws, fleet, Enrolment("dev-keep"))
    gone = identity.enroll(ws, fleet, Enrolment("dev-gone"))
    ca = FleetCA.open(ws)
    number = ca.crl().extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    r = identity.revoke(ws, fleet, "dev-gone")
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1
    assert {e.serial_number for e in crl} == {int(gone.serial, 16)} != {int(keep.serial, 16)}
    assert not r.already_revoked and fleet.device("dev-gone")["revoked"] and not fleet.device("dev-keep")["revoked"]
    again = identity.revoke(ws, fleet, "dev-gone")
    assert again.already_revoked and ca.crl_path.read_bytes() == crl.public_bytes(serialization.Encoding.PEM)


def test_revoking_a_device_that_was_never_enrolled_is_refused(ws, fleet):
    fleet.registry.record_status({"device_id": "legacy-1", "tier": "mcu", "state": "online"})
    for device_id in ("nobody", "legacy-1"):
        with pytest.raises(NotFound):
            identity.revoke(ws, fleet, device_id)


def test_forged_crl_is_detected(ws, fleet):
    identity.enroll(ws, fleet, Enrolment("dev-1"))
    other = FleetCA.open(Workspace.init(ws.root.parent / "other"))
    (ws.root / "pki" / "crl.pem").write_bytes(other.crl_path.read_bytes())
    with pytest.raises(IntegrityError, match="not signed"):
        identity.revoke(ws, fleet, "dev-1")


def test_online_needs_a_recent_status_that_is_not_the_last_will(ws, fleet):
    for device_id, state in (("d-online", "online"), ("d-committed", "committed"), ("d-will", "offline")):
        fleet.registry.record_status({"device_id": device_id, "tier": "mcu", "state": state})
    online = {d["device_id"] for d in fleet.devices(DeviceFilter(online=True))}
    assert online == {"d-online", "d-committed"}
    assert {d["device_id"] for d in fleet.devices(DeviceFilter(online=False))} == {"d-will"}
    later = time.time() + fleet.online_window_s + 1     # no heartbeat for longer than the window
    assert [d["device_id"] for d in fleet.devices(DeviceFilter(online=True), now=later)] == []


def test_enrolled_device_gets_its_first_seen_time_from_its_first_status(ws, fleet):
    identity.enroll(ws, fleet, Enrolment("dev-first", tier="mcu"))
    assert fleet.device("dev-first")["first_seen"] is None
    before = time.time()
    fleet.registry.record_status({"device_id": "dev-first", "tier": "mcu", "state": "online"})
    first = fleet.device("dev-first")["first_seen"]
    assert first is not None and first >= before
    fleet.registry.record_status({"device_id": "dev-first", "tier": "mcu", "state": "committed"})
    assert fleet.device("dev-first")["first_seen"] == first


def test_last_will_does_not_erase_the_last_known_model_version(ws, fleet):
    fleet.registry.record_status({"device_id": "d-will", "tier": "mcu", "state": "committed",
                                  "model_version": "digits-mlp:4", "update_id": "u4", "reason": None})
    will = {"device_id": "d-will", "tier": "mcu", "state": "offline", "model_version": None, "update_id": None,
            "reason": None}                          # what the agent's last will carries
    fleet.registry.record_status(will)
    row = fleet.device("d-will")
    assert (row["state"], row["model_version"], row["update_id"], row["online"]) == \
        ("offline", "digits-mlp:4", "u4", False)
    fleet.registry.record_status({**will, "state": "committed", "model_version": "digits-mlp:5"})
    assert fleet.device("d-will")["model_version"] == "digits-mlp:5"


def test_last_error_and_target_version_are_shown(ws, fleet):
    fleet.registry.record_status({"device_id": "d1", "tier": "mcu", "state": "failed"})
    fleet.registry.add_device_error({"device_id": "d1", "update_id": "u1", "code": "verify.hash",
                                     "message": "bad hash", "ts": 5.0})
    fleet.registry.add_device_error({"device_id": "d1", "update_id": "u2", "code": "health.golden",
                                     "message": "wrong outputs", "ts": 6.0})
    assert fleet.set_target(["d1", "absent"], "digits-mlp:3") == 1
    row = fleet.device("d1")
    assert (row["last_error"], row["last_error_at"], row["target_model_version"]) == \
        ("health.golden: wrong outputs", 6.0, "digits-mlp:3")


run = run_cli


def test_cli_lists_shows_and_filters_devices_and_keeps_the_old_forms(ws, fleet, capsys):
    w = ["-w", str(ws.root)]
    assert run(["devices", "enroll", "a-1", "--tier", "edge-gateway", "--tag", "site=berlin", "--group", "canary",
                *w], capsys)[0] == 0
    assert run(["devices", "enroll", "b-2", "--tier", "mcu", "--tag", "site=paris", "--tag", "rack=3", *w],
               capsys)[0] == 0
    fleet.registry.record_status({"device_id": "b-2", "tier": "mcu", "state": "online"})
    cases = {("devices",): ["a-1", "b-2"], ("devices", "ls"): ["a-1", "b-2"],
             ("devices", "--tag", "site=berlin"): ["a-1"],
             ("devices", "ls", "--tag", "site=paris", "--tag", "rack=3"): ["b-2"],
             ("devices", "ls", "--tag", "site=paris", "--tag", "rack=4"): [],
             ("devices", "--group", "canary"): ["a-1"], ("devices", "ls", "--online"): ["b-2"],
             ("devices", "--offline"): ["a-1"], ("devices", "--tier", "mcu"): ["b-2"]}
    for argv, expected in cases.items():
        code, out, err = run([*argv, *w, "--json"], capsys)
        assert code == 0, (argv, err)
        assert [d["device_id"] for d in json.loads(out.splitlines()[-1])["devices"]] == expected, argv
    for argv in (["devices", "b-2"], ["devices", "show", "b-2"]):
        code, out, _ = run([*argv, *w, "--json"], capsys)
        shown = json.loads(out.splitlines()[-1])
        assert code == 0 and shown["device_id"] == "b-2" and shown["online"] is True
        assert shown["tags"] == {"rack": "3", "site": "paris"} and shown["enrolled"] is True


@pytest.mark.parametrize("argv, needle", [
    (["devices", "enroll", "dev/1"], "invalid device id"),
    (["devices", "enroll", "dev-1", "--tag", "site"], "invalid tag"),
    (["devices", "enroll", "dev-1", "--tag", "site=a b"], "invalid tag"),
    (["devices", "enroll", "dev-1", "--group", "+"], "invalid group"),
    (["devices", "enroll", "dev-1", "--tier", "Big Tier"], "invalid tier"),
    (["devices", "enroll", "dev-1", "--csr", "/nonexistent.csr"], "cannot read"),
    (["devices", "revoke", "ghost"], "no enrolled device"),
    (["devices", "show", "ghost"], "no device"),
    (["devices", "--tag", "=x"], "invalid tag"),
    (["broker", "config", "--port", "70000"], "invalid port"),
])
def test_cli_mistakes_are_one_line_and_change_nothing(ws, fleet, capsys, argv, needle):
    before = snapshot(ws, fleet)
    code, out, err = run([*argv, "-w", str(ws.root)], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err + out, err
    assert snapshot(ws, fleet) == before


def test_broker_config_lets_devices_touch_only_their_own_topics(ws, fleet, capsys):
    identity.enroll(ws, fleet, Enrolment("dev-1"))
    identity.enroll(ws, fleet, Enrolment("dev-bad"))
    identity.revoke(ws, fleet, "dev-bad")
    code, out, _ = run(["broker", "config", "--port", "18999", "--san", "broker.example", "-w", str(ws.root),
                        "--json"], capsys)
    assert code == 0
    info = json.loads(out.splitlines()[-1])
    conf = Path(info["conf"]).read_text().splitlines()
    for line in ("allow_anonymous false", "require_certificate true", "use_identity_as_username true",
                 f"crlfile {ws.root / 'pki' / 'crl.pem'}", "listener 18999 127.0.0.1"):
        assert line in conf
    assert sum(ln.startswith("listener") for ln in conf) == 1          # no plaintext listener
    acl = Path(info["acl"]).read_text().splitlines()
    rules = [ln for ln in acl if ln and not ln.startswith("#")]
    control_planes = ["edgeloop-control-plane", *(f"edgeloop-control-plane-{w}" for w in ("demo", "publish", "serve"))]
    prefix = f"edgeloop/v2/{ws.fleet}"
    assert rules == ["user dev-bad", "topic deny #", *(x for cn in control_planes for x in
                                                       (f"user {cn}", f"topic readwrite {prefix}/#")),
                     *(f"pattern {a} {t.format(fleet=prefix)}" for a, t in broker.DEVICE_RULES)]
    assert all(ln.split()[2].startswith(prefix + "/") for ln in rules if ln.startswith("pattern"))   # own fleet only
    assert "use_username_as_clientid true" in conf                     # no client-id takeover
    assert all("%u" in t for a, t in broker.DEVICE_RULES if a == "write")   # writes only ever under one's own id
    server = x509.load_pem_x509_certificate((ws.root / "pki" / "broker" / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "broker.example"} <= set(names.get_values_for_type(x509.DNSName))
    cp = x509.load_pem_x509_certificate(Path(info["control_plane_tls"]["cert"]).read_bytes())
    assert cp.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity.CONTROL_PLANE


def test_control_plane_worker_names_cannot_reach_outside_the_reserved_prefix(ws, fleet):
    files = identity.control_plane_tls(ws, "ingest-2")
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edgeloop-control-plane-ingest-2"
    assert identity.control_plane_cns(ws) == ["edgeloop-control-plane", "edgeloop-control-plane-ingest-2"]
    for bad in ("", "../x", "Ingest", "a b", "x" * 33, "dev-1/#"):
        with pytest.raises(UserError):
            identity.control_plane_tls(ws, bad)
    with pytest.raises(UserError, match="not a control-plane identity"):
        broker.acl_text(control_planes=["dev-1"])
