"""Provisioning bundles, on the device: read one, verify it, and start an agent from it.

A provisioning bundle (``edgeloop devices provision``, :mod:`edgeloop.fleet.provision`) is one
folder (or a tar of it) holding everything a device needs to trust and reach its fleet::

    manifest.json        edgeloop.provision/1: fleet, device id, tier, broker, file hashes
    manifest.sig         the fleet CA's ECDSA P-256 / SHA-256 signature over manifest.json
    ca.crt               the fleet CA: the broker's certificate must chain to it
    device.crt           this device's certificate (CN = its device id), issued by ca.crt
    device.key           its private key, mode 0600 (absent when the device made its own: a CSR)
    image-root.json      trusted root of the image repository (TUF), version 1
    director-root.json   trusted root of the director repository (TUF), version 1

Rules :func:`load_bundle` enforces, each failure one :class:`BundleError` naming the file and
the fix (never a traceback), before anything is written:

- every file the manifest lists is there (:class:`BundleInvalid`), no larger than
  :data:`MAX_FILE_BYTES`, and has the manifest's sha256 (:class:`BundleTampered`);
- the signature verifies with the bundle's own CA, the certificate was issued by that CA,
  names the manifest's device and matches the key (:class:`BundleTampered`);
- the certificate is valid now (:class:`BundleInvalid`: provision the device again).

The bundle is the device's root of trust: whoever can write it before the device first
starts decides whom it trusts, so it travels over a channel the operator trusts (the
signature catches edits and mix-ups, not a consistent forgery). Revocation is the broker's:
a revoked device's TLS handshake is refused (:func:`probe_broker` says so in one line).

:func:`install_roots` copies the trusted roots into ``<state>/tuf`` only where the device has
none yet, so a root the device has since rotated to (``N.root.json`` walked by python-tuf) is
never replaced by the bundle's version 1; ``<state>/provisioned.json`` records whose state
folder it is, and a bundle for another device or fleet is refused there.

The repository's address is not part of the trust: every announcement names the image and
director repositories it was published from (contracts/messages.py ``Announce``), and the
device verifies whatever it downloads against the roots above. ``repository_url`` in the
manifest is informational (the serve known when the bundle was made, or null).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import ssl
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeloop.contracts import topics
from edgeloop.device_sdk.agent import AgentConfig
from edgeloop.device_sdk.errors import AgentError, TransientError
from edgeloop.device_sdk.storage import atomic_write
from edgeloop.device_sdk.tuf_fetch import provision as provision_roots

__all__ = ["PROVISION_SCHEMA", "Bundle", "BundleError", "BundleInvalid", "BundleTampered", "BrokerRefused",
           "agent_config", "from_bundle", "install_roots", "load_bundle", "manifest_bytes", "probe_broker",
           "unpack_bundle", "MANIFEST", "SIGNATURE", "CA", "CERT", "KEY", "IMAGE_ROOT", "DIRECTOR_ROOT"]

PROVISION_SCHEMA = "edgeloop.provision/1"
STATE_SCHEMA = "edgeloop.provisioned/1"
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
CA, CERT, KEY = "ca.crt", "device.crt", "device.key"
IMAGE_ROOT, DIRECTOR_ROOT = "image-root.json", "director-root.json"
REQUIRED = (CA, CERT, IMAGE_ROOT, DIRECTOR_ROOT)
MAX_FILE_BYTES = 1024 * 1024


class BundleError(AgentError):
    """A provisioning bundle that cannot be used; ``exit_code`` is what a device program exits with."""

    exit_code = 2


class BundleInvalid(BundleError):
    """Missing or malformed, expired, or for another device or fleet: make or pick the right one."""

    exit_code = 2


class BundleTampered(BundleError):
    """A hash, the signature or the certificate chain does not verify: do not use it."""

    exit_code = 4


class BrokerRefused(AgentError):
    """The broker refused this device's certificate in the TLS handshake (revoked, or not the
    fleet's): retrying does not help."""

    exit_code = 4


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: what its manifest says, and where its files are."""

    folder: Path
    fleet: str
    device_id: str
    tier: str
    broker_host: str
    broker_port: int
    repository_url: str | None
    cert_serial: str
    cert_not_after: float
    key: Path | None              # None: the device holds its own key (enrolled with a CSR)

    @property
    def ca(self) -> Path:
        return self.folder / CA

    @property
    def cert(self) -> Path:
        return self.folder / CERT

    @property
    def broker(self) -> str:
        return f"{self.broker_host}:{self.broker_port}"


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The one byte form of a manifest (what is signed and written)."""
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def sha256_file(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- reading and verifying -------------------------------------------------------------------------
def load_bundle(folder: Path, now: float | None = None) -> Bundle:
    """The verified bundle in ``folder``. Raises BundleInvalid or BundleTampered (module rules)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleInvalid(f"{folder} is not a provisioning bundle folder (make one: edgeloop devices provision)")
    raw = _read(folder, MANIFEST)
    manifest = _parse_manifest(raw, folder)
    files: dict[str, bytes] = {}
    for name, digest in manifest["files"].items():
        files[name] = _read(folder, name)
        if sha256_file(files[name]) != digest:
            raise BundleTampered(f"{folder / name} does not match the bundle's manifest (changed after it was "
                                 "made): provision the device again")
    ca = _certificate(files[CA], folder / CA)
    cert = _certificate(files[CERT], folder / CERT)
    _check_signature(ca, raw, _read(folder, SIGNATURE), folder)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise BundleTampered(f"{folder / CERT} was not issued by the bundle's fleet CA {folder / CA}") from None
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [manifest["device_id"]]:
        raise BundleTampered(f"{folder / CERT} is the certificate of {names}, not of {manifest['device_id']!r}")
    if KEY in files:
        _check_key(files[KEY], cert, folder / KEY)
    _check_validity(cert, folder / CERT, now)
    for name in (IMAGE_ROOT, DIRECTOR_ROOT):
        _check_root(files[name], folder / name)
    broker = manifest["broker"]
    return Bundle(folder.resolve(), manifest["fleet"], manifest["device_id"], manifest["tier"], broker["host"],
                  broker["port"], manifest.get("repository_url"), manifest["certificate"]["serial"],
                  cert.not_valid_after_utc.timestamp(), folder.resolve() / KEY if KEY in files else None)


def _read(folder: Path, name: str) -> bytes:
    path = folder / name
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise BundleInvalid(f"the bundle {folder} has no {name} (incomplete copy?): copy the whole bundle "
                            "again") from None
    except OSError as e:
        raise BundleInvalid(f"cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise BundleInvalid(f"{path} is over {MAX_FILE_BYTES} bytes: not part of a provisioning bundle")
    return data


def _parse_manifest(raw: bytes, folder: Path) -> dict[str, Any]:
    where = folder / MANIFEST
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise BundleTampered(f"{where} is not JSON: provision the device again") from None
    if not isinstance(m, dict) or m.get("schema") != PROVISION_SCHEMA:
        schema = m.get("schema") if isinstance(m, dict) else None
        raise BundleInvalid(f"{where} is not an {PROVISION_SCHEMA} manifest (schema {schema!r}): "
                            "use a bundle from this edgeloop's `edgeloop devices provision`")
    broker, files, cert = m.get("broker"), m.get("files"), m.get("certificate")
    ok = (isinstance(m.get("fleet"), str) and topics.valid_fleet(m["fleet"])
          and isinstance(m.get("device_id"), str) and topics.valid_device_id(m["device_id"])
          and isinstance(m.get("tier"), str) and topics.valid_tier(m["tier"])
          and isinstance(broker, dict) and isinstance(broker.get("host"), str) and broker["host"]
          and isinstance(broker.get("port"), int) and 0 < broker["port"] < 65536
          and isinstance(cert, dict) and isinstance(cert.get("serial"), str)
          and isinstance(files, dict) and all(isinstance(v, str) for v in files.values())
          and set(REQUIRED) <= set(files) <= {*REQUIRED, KEY}
          and (m.get("repository_url") is None or isinstance(m["repository_url"], str)))
    if not ok:
        raise BundleTampered(f"{where} is missing fields or has malformed ones: provision the device again")
    return m


def _certificate(data: bytes, path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise BundleInvalid(f"{path} is not a PEM certificate") from None


def _check_signature(ca: x509.Certificate, raw: bytes, signature: bytes, folder: Path) -> None:
    key = ca.public_key()
    try:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        key.verify(signature, raw, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BundleTampered(f"{folder / MANIFEST} is not signed by the bundle's fleet CA (edited, or files "
                             "from two bundles): provision the device again") from None


def _check_key(data: bytes, cert: x509.Certificate, path: Path) -> None:
    try:
        key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError):
        raise BundleInvalid(f"{path} is not an unencrypted PEM private key") from None
    if key.public_key() != cert.public_key():
        raise BundleTampered(f"{path} is not the key of {path.with_name(CERT)}")


def _check_validity(cert: x509.Certificate, path: Path, now: float | None) -> None:
    at = dt.datetime.fromtimestamp(now if now is not None else dt.datetime.now(dt.timezone.utc).timestamp(),
                                   dt.timezone.utc)
    if at > cert.not_valid_after_utc:
        raise BundleInvalid(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}: enrol the device under a new "
                            "id and provision it (edgeloop devices provision)")
    if at < cert.not_valid_before_utc:
        raise BundleInvalid(f"{path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: "
                            "is this device's clock right?")


def _check_root(data: bytes, path: Path) -> None:
    try:
        signed = json.loads(data)["signed"]
        ok = signed["_type"] == "root" and isinstance(signed["version"], int)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise BundleInvalid(f"{path} is not TUF root metadata")


def unpack_bundle(tar_path: Path, dest: Path) -> Path:
    """Extract a bundle tar (only its regular files, by name, nothing outside ``dest``) into
    ``dest``, replacing what an earlier unpack left there. Raises BundleInvalid."""
    names = {MANIFEST, SIGNATURE, *REQUIRED, KEY}
    try:
        with tarfile.open(tar_path) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile() and Path(m.name).name in names}
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=dest.parent))
            for name, member in members.items():
                f = tar.extractfile(member)
                if f is None or member.size > MAX_FILE_BYTES:
                    raise BundleInvalid(f"{tar_path}: {member.name} is not a bundle file")
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if name == KEY else 0o644)
                with os.fdopen(fd, "wb") as out:
                    out.write(f.read())
    except (OSError, tarfile.TarError) as e:
        raise BundleInvalid(f"cannot read the bundle {tar_path}: {e}") from None
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


# -- starting from a bundle ------------------------------------------------------------------------
def install_roots(bundle: Bundle, state_dir: Path) -> bool:
    """Copy the bundle's trusted roots into ``<state_dir>/tuf`` where the device has none (True
    if it had none); rotated roots already there stay. Raises BundleInvalid if the state folder
    was provisioned for another device, fleet or CA."""
    state = Path(state_dir)
    record = {"schema": STATE_SCHEMA, "fleet": bundle.fleet, "device_id": bundle.device_id,
              "ca_sha256": sha256_file(bundle.ca.read_bytes())}
    path = state / "provisioned.json"
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        old = None
    except (OSError, ValueError):
        raise BundleInvalid(f"{path} is unreadable: remove it only if this state folder is {bundle.device_id}'s") \
            from None
    if old is not None and {k: old.get(k) for k in record} != record:
        raise BundleInvalid(f"the state folder {state} belongs to device {old.get('device_id')!r} of fleet "
                            f"{old.get('fleet')!r} (another CA or fleet): use another --state-dir for "
                            f"{bundle.device_id!r} of fleet {bundle.fleet!r}")
    tuf = state / "tuf"
    fresh = not (tuf / "image" / "metadata" / "root.json").exists() or \
        not (tuf / "director" / "metadata" / "root.json").exists()
    provision_roots(tuf, (bundle.folder / IMAGE_ROOT).read_bytes(), (bundle.folder / DIRECTOR_ROOT).read_bytes())
    if old is None:
        atomic_write(path, json.dumps(record, indent=1).encode())
    return fresh


def agent_config(bundle: Bundle, state_dir: Path, key: Path | None = None, **overrides: Any) -> AgentConfig:
    """The :class:`AgentConfig` of the bundle's device (mutual TLS with the bundle's identity;
    ``key`` for a bundle without one), with any other field given in ``overrides``.
    Raises BundleInvalid when there is no key at all."""
    key = key or bundle.key
    if key is None:
        raise BundleInvalid(f"the bundle {bundle.folder} carries no device.key (the device made its own): "
                            "give the device's key (edgeloop-gateway --tls-key FILE)")
    base = AgentConfig(device_id=bundle.device_id, tier=bundle.tier, state_dir=Path(state_dir),
                       mqtt_host=bundle.broker_host, mqtt_port=bundle.broker_port, fleet=bundle.fleet,
                       tls_ca=bundle.ca, tls_cert=bundle.cert, tls_key=Path(key))
    return replace(base, **overrides)


def from_bundle(folder: Path, state_dir: Path, key: Path | None = None, **overrides: Any) -> AgentConfig:
    """Verify the bundle, install its roots into ``state_dir`` and return the agent's config:
    ``Agent(from_bundle(bundle, state)).start()`` is a provisioned device. Raises BundleError."""
    bundle = load_bundle(folder)
    install_roots(bundle, state_dir)
    return agent_config(bundle, state_dir, key, **overrides)


def probe_broker(config: AgentConfig, timeout: float = 5.0) -> None:
    """One TLS handshake and MQTT CONNECT with the device's identity, to tell an unreachable
    broker from one that refuses this device. Raises TransientError (unreachable: retry) or
    BrokerRefused (the handshake or the CONNECT was refused: revoked, or another fleet's)."""
    ctx = ssl.create_default_context(cafile=str(config.tls_ca))
    if config.tls_cert is not None and config.tls_key is not None:
        ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    where = f"{config.mqtt_host}:{config.mqtt_port}"
    try:
        raw = socket.create_connection((config.mqtt_host, config.mqtt_port), timeout=timeout)
    except OSError as e:
        raise TransientError(f"cannot reach the broker at {where}: {e.strerror or e}") from None
    try:
        with ctx.wrap_socket(raw, server_hostname=config.mqtt_host) as tls:
            tls.sendall(_probe_connect(config.device_id))   # TLS 1.3: a refused certificate shows on the first read
            reply = tls.recv(4)
    except ssl.SSLCertVerificationError as e:
        raise BrokerRefused(f"the broker at {where} is not this fleet's ({e.verify_message}): check the "
                            "bundle's broker address") from None
    except ssl.SSLError as e:
        raise BrokerRefused(f"the broker at {where} refused this device's certificate ({e.reason or e}): "
                            "revoked, or not from this fleet's CA") from None
    except OSError as e:
        raise TransientError(f"the broker at {where} closed the connection: {e.strerror or e}") from None
    finally:
        raw.close()
    if len(reply) < 4 or reply[0] != 0x20:
        raise BrokerRefused(f"the broker at {where} refused this device's connection (revoked, or not from "
                            "this fleet's CA)")
    if reply[3] != 0:
        raise BrokerRefused(f"the broker at {where} refused this device (CONNACK code {reply[3]})")


def _probe_connect(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT that keeps the session (clean session 0): messages queued for the
    device stay queued for the agent, which connects right after."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x00\x00\x05" + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body
