"""Device identity: the fleet's certificate authority, enrolment and revocation.

Every client of the fleet's broker proves who it is with an x509 certificate issued by this
CA (mutual TLS). The broker takes the certificate's common name (CN) as the client's
username, and its ACL (:mod:`edgeloop.fleet.broker`) grants a device only its own topics.

Rules:

- One CA per workspace, EC P-256. Its private key is PKCS#8 PEM encrypted with
  ``EDGELOOP_KEY_PASSPHRASE`` (the passphrase of the update signing keys, cloud/release/signing.py),
  kept in ``<workspace>/keys/fleet-ca.pem`` (mode 0600); it is never written anywhere else.
- A device certificate's CN is its device id. Ids starting with ``edgeloop-`` are reserved
  for the fleet's own services (the control plane, the broker) and never issued to a device,
  so no device can hold the control plane's rights.
- A device id is enrolled once. Enrolling it again, even after revocation, is refused: a new
  identity needs a new id, so old certificates and records are never confused with it.
- With a CSR the device made its own key: the CA checks the request's signature (proof that
  the requester holds the key), its key type, and that its subject names this device or no
  one, then issues the certificate; no private key exists outside the device.
- Revocation puts the certificate's serial on the CRL, re-signed by the CA with the next CRL
  number. The broker reads the CRL when it starts and when it reloads (:mod:`edgeloop.fleet.broker`).
- Nothing is written before every check has passed; files are written atomically, private
  keys with mode 0600.

Layout::

    <workspace>/keys/fleet-ca.pem              the CA's private key (encrypted)
    <workspace>/pki/ca.crt                     the CA certificate: what every client trusts
    <workspace>/pki/crl.pem                    the certificate revocation list
    <workspace>/pki/issued/<id>-<serial>.crt   every certificate issued (audit)
    <workspace>/pki/broker/server.{crt,key}    the broker's TLS server identity
    <workspace>/pki/control-plane/client.{crt,key}   the control plane's default client identity
    <workspace>/pki/control-plane/worker-<name>.{crt,key}   one per control-plane process (serve, publish, ...)
    <workspace>/pki/https/server.{crt,key}     the HTTPS identity of the API and the repository server
    <workspace>/devices/<id>/                  default identity folder: device.crt, device.key, ca.crt
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeloop.cloud.errors import IntegrityError, NotFound, UserError
from edgeloop.cloud.fleet_registry import EnrolledDevice, FleetRegistry
from edgeloop.cloud.release.signing import PASSPHRASE_ENV, Keyring, atomic_write
from edgeloop.cloud.workspace import Workspace
from edgeloop.contracts import topics

RESERVED_PREFIX = "edgeloop-"
CONTROL_PLANE = "edgeloop-control-plane"     # the control plane's CN: the ACL's wider rights
BROKER = "edgeloop-broker"                   # the broker's server certificate CN
HTTPS = "edgeloop-https"                     # the API's and the repository server's certificate CN
CA_DAYS = 3650
DEVICE_DAYS = 1095
SERVICE_DAYS = 825
RENEW_BEFORE_DAYS = 30
MAX_CSR_BYTES = 16 * 1024
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TAG_VALUE = re.compile(r"^[A-Za-z0-9_.:/@+-]{1,128}$")
_HARDWARE = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")

__all__ = ["BROKER", "CONTROL_PLANE", "Enrolment", "EnrolResult", "FleetCA", "Issued", "RevokeResult",
           "TlsFiles", "agent_tls", "https_tls", "control_plane_cn", "control_plane_cns", "control_plane_tls", "enroll", "enrolment_from", "ensure_services", "parse_tags",
           "pki_dir", "revoke", "simulated_device_tls"]


@dataclass(frozen=True)
class Issued:
    """A certificate the CA issued; ``key_pem`` is None when the requester kept its own key."""

    cert_pem: bytes
    key_pem: bytes | None
    serial: int
    fingerprint: str          # sha256 of the DER certificate, hex
    not_after: float          # Unix time


@dataclass(frozen=True)
class TlsFiles:
    """What a client needs for mutual TLS: the CA to trust, its certificate and its key."""

    ca: Path
    cert: Path
    key: Path


def pki_dir(ws: Workspace) -> Path:
    return ws.root / "pki"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Atomically, and never readable by anyone else, not even between write and chmod."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


class FleetCA:
    """The workspace's certificate authority. :meth:`open` creates it on first use."""

    def __init__(self, pki: Path, keys_dir: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.pki, self.keys_dir = pki, keys_dir
        self._key, self.cert = key, cert

    @property
    def cert_path(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def crl_path(self) -> Path:
        return self.pki / "crl.pem"

    @classmethod
    def open(cls, ws: Workspace) -> FleetCA:
        """The workspace's CA, created (key, certificate, empty CRL) if it has none.
        Raises IntegrityError if the key cannot be decrypted or does not match the certificate."""
        pki, keys_dir = pki_dir(ws), ws.keys_dir
        key_path, cert_path = keys_dir / "fleet-ca.pem", pki / "ca.crt"
        passphrase = Keyring(keys_dir)._passphrase()   # one passphrase for every workspace key
        if not key_path.exists():
            return cls._create(ws, key_path, cert_path, passphrase)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), passphrase)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise IntegrityError(f"cannot decrypt the fleet CA key {key_path}: wrong {PASSPHRASE_ENV}? ({e})") from None
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as e:
            raise IntegrityError(f"cannot read the fleet CA certificate {cert_path}: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise IntegrityError(f"{key_path} is not the key of {cert_path}")
        return cls(pki, keys_dir, key, cert)

    @classmethod
    def _create(cls, ws: Workspace, key_path: Path, cert_path: Path, passphrase: bytes) -> FleetCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeloop"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"edgeloop fleet CA ({ws.fleet})")])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(passphrase))
        _write_private(key_path, encrypted)
        os.chmod(key_path.parent, 0o700)
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(cert_path.parent, key_path.parent, key, cert)
        ca._write_crl([], 1)
        return ca

    # -- issuing ------------------------------------------------------------------------------
    def issue_device(self, device_id: str, csr_pem: bytes | None = None, days: int = DEVICE_DAYS) -> Issued:
        """A client certificate with CN ``device_id``: for a new P-256 key, or for the key in
        ``csr_pem``. Raises UserError for an invalid or reserved id, or an unacceptable CSR."""
        check_device_id(device_id)
        if csr_pem is None:
            key = ec.generate_private_key(ec.SECP256R1())
            return self._issue(device_id, key.public_key(), days, client=True, key_pem=_key_pem(key))
        return self._issue(device_id, _csr_public_key(csr_pem, device_id), days, client=True)

    def issue_service(self, name: str, server_hosts: Sequence[str] = (), days: int = SERVICE_DAYS) -> Issued:
        """A certificate for one of the fleet's services (CN ``name``, new key): a TLS server
        certificate for ``server_hosts`` if given, else a client certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        return self._issue(name, key.public_key(), days, client=not server_hosts, key_pem=_key_pem(key),
                           hosts=server_hosts)

    def _issue(self, cn: str, public_key: CertificatePublicKeyTypes, days: int, client: bool,
               key_pem: bytes | None = None, hosts: Sequence[str] = ()) -> Issued:
        now = _now()
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(self.cert.subject).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=False, crl_sign=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                   .add_extension(self._authority_key_id(), critical=False))
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        pem = cert.public_bytes(serialization.Encoding.PEM)
        atomic_write(self.pki / "issued" / f"{cn}-{cert.serial_number:x}.crt", pem)
        return Issued(pem, key_pem, cert.serial_number, _fingerprint(cert), cert.not_valid_after_utc.timestamp())

    def sign(self, data: bytes) -> bytes:
        """An ECDSA P-256 / SHA-256 signature (DER) by the CA's key over ``data``: what a device
        verifies a provisioning manifest with, using ``ca.crt`` (device_sdk/provision.py)."""
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def issued(self, cn: str, serial: str) -> x509.Certificate:
        """A certificate this CA issued to ``cn`` (serial in hex), from the audit folder.
        Raises IntegrityError if it is missing or not this CA's."""
        path = self.pki / "issued" / f"{cn}-{serial}.crt"
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            cert.verify_directly_issued_by(self.cert)
        except (OSError, ValueError, TypeError, InvalidSignature) as e:
            raise IntegrityError(f"the certificate {path} that the registry names is missing or not this CA's: "
                                 f"{e}") from None
        return cert

    def _authority_key_id(self) -> x509.AuthorityKeyIdentifier:
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    # -- revocation ---------------------------------------------------------------------------
    def crl(self) -> x509.CertificateRevocationList:
        """The current CRL; raises IntegrityError if it is not signed by this CA."""
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        if not crl.is_signature_valid(self.cert.public_key()):  # type: ignore[arg-type]
            raise IntegrityError(f"{self.crl_path} is not signed by the fleet CA")
        return crl

    def revoked_serials(self) -> set[int]:
        return {r.serial_number for r in self.crl()}

    def revoke(self, serial: int) -> bool:
        """Put ``serial`` on the CRL. False if it was already there (nothing written)."""
        current = self.crl()
        if current.get_revoked_certificate_by_serial_number(serial) is not None:
            return False
        number = current.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        self._write_crl([*current, _revoked(serial)], number + 1)
        return True

    def _write_crl(self, entries: list[x509.RevokedCertificate], number: int) -> None:
        # next_update is the CA's own expiry: OpenSSL refuses every client once a CRL expires,
        # and this CRL lives on the broker's disk, where a stale copy cannot be substituted.
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(_now()).next_update(self.cert.not_valid_after_utc)
                   .add_extension(x509.CRLNumber(number), critical=False)
                   .add_extension(self._authority_key_id(), critical=False))
        for entry in entries:
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(self._key, hashes.SHA256())
        atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))


def _revoked(serial: int) -> x509.RevokedCertificate:
    return x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_now()).build()


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _csr_public_key(csr_pem: bytes, device_id: str) -> CertificatePublicKeyTypes:
    """The public key of a CSR that proves possession of its key and names only ``device_id``."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise UserError(f"the certificate signing request is over {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise UserError(f"not a PEM certificate signing request: {e}") from None
    if not csr.is_signature_valid:
        raise UserError("the certificate signing request's signature does not verify "
                        "(it was not made with the key it carries)")
    names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names and names != [device_id]:
        raise UserError(f"the certificate signing request names {names[0]!r}, not {device_id!r}")
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ("secp256r1", "secp384r1"):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key
    raise UserError("the certificate signing request's key must be EC P-256/P-384 or RSA of at least 2048 bits")


def check_device_id(device_id: str) -> None:
    """Raises UserError for an id that is not a valid device id, or that is reserved."""
    if not topics.valid_device_id(device_id):
        raise UserError(f"invalid device id {device_id!r}: use 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
    if device_id.lower().startswith(RESERVED_PREFIX):
        raise UserError(f"device ids starting with {RESERVED_PREFIX!r} are reserved for the fleet's services")


# -- service identities ---------------------------------------------------------------------------
def _needs_renewal(cert_path: Path, ca: FleetCA, hosts: Sequence[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (FileNotFoundError, ValueError):
        return True
    if cert.issuer != ca.cert.subject or \
            cert.not_valid_after_utc - _now() < dt.timedelta(days=RENEW_BEFORE_DAYS):
        return True
    if not hosts:
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san) != {_san(h) for h in hosts}


def _ensure(ca: FleetCA, stem: Path, name: str, hosts: Sequence[str] = ()) -> None:
    cert_path = stem.with_suffix(".crt")
    if _needs_renewal(cert_path, ca, hosts):
        issued = ca.issue_service(name, hosts)
        assert issued.key_pem is not None
        _write_private(stem.with_suffix(".key"), issued.key_pem)
        atomic_write(cert_path, issued.cert_pem)


def ensure_services(ws: Workspace, server_hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> FleetCA:
    """Make sure the broker's server certificate (naming exactly ``server_hosts``) and the
    control plane's client certificate exist, are from this CA and are not about to expire;
    reissue them if not."""
    ca = FleetCA.open(ws)
    _ensure(ca, pki_dir(ws) / "broker" / "server", BROKER, tuple(server_hosts))
    _ensure(ca, pki_dir(ws) / "control-plane" / "client", CONTROL_PLANE)
    return ca


def https_tls(ws: Workspace, server_hosts: Sequence[str]) -> tuple[Path, Path]:
    """(certificate, key) of the HTTPS server identity of the API and the repository server,
    naming exactly ``server_hosts`` (wildcard addresses left out), issued by the fleet CA and
    reissued when due or when the names change. Clients verify it against ``pki/ca.crt``."""
    hosts = tuple(dict.fromkeys(h for h in server_hosts if h and h not in ("0.0.0.0", "::")))
    stem = pki_dir(ws) / "https" / "server"
    _ensure(FleetCA.open(ws), stem, HTTPS, hosts or ("127.0.0.1", "localhost"))
    return stem.with_suffix(".crt"), stem.with_suffix(".key")


_WORKER = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def control_plane_cn(worker: str | None = None) -> str:
    """The certificate CN of a control-plane process: ``edgeloop-control-plane`` for the default
    identity, ``edgeloop-control-plane-<worker>`` for a named one. Raises UserError."""
    if worker is None:
        return CONTROL_PLANE
    if not _WORKER.fullmatch(worker):
        raise UserError(f"invalid control-plane worker name {worker!r}: use 1-32 of [a-z0-9-], starting alphanumeric")
    return f"{CONTROL_PLANE}-{worker}"


def control_plane_tls(ws: Workspace, worker: str | None = None) -> TlsFiles:
    """A control-plane client identity (issued on first use, renewed when due). The broker makes
    a client's certificate CN its client id (``use_username_as_clientid``), so two connections
    with one identity close each other: every control-plane process that connects at the same
    time as another needs its own ``worker`` name. The broker's ACL grants the control plane's
    rights to every identity in ``<workspace>/pki/control-plane/`` (:func:`control_plane_cns`)."""
    folder = pki_dir(ws) / "control-plane"
    stem = folder / ("client" if worker is None else f"worker-{worker}")
    _ensure(FleetCA.open(ws), stem, control_plane_cn(worker))
    return TlsFiles(pki_dir(ws) / "ca.crt", stem.with_suffix(".crt"), stem.with_suffix(".key"))


def control_plane_cns(ws: Workspace) -> list[str]:
    """The CNs of every control-plane identity issued in this workspace (the default one first)."""
    folder = pki_dir(ws) / "control-plane"
    workers = sorted(p.name[len("worker-"):-len(".crt")] for p in folder.glob("worker-*.crt"))
    return [CONTROL_PLANE, *(control_plane_cn(w) for w in workers if _WORKER.fullmatch(w))]


# -- enrolment and revocation ---------------------------------------------------------------------
@dataclass(frozen=True)
class Enrolment:
    """What an operator says about a new device."""

    device_id: str
    tier: str | None = None
    hardware: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    groups: tuple[str, ...] = ()
    csr_pem: bytes | None = None      # the device made its key; else one is generated here


@dataclass(frozen=True)
class EnrolResult:
    device_id: str
    folder: Path              # the identity folder: device.crt, ca.crt (and device.key)
    files: list[str]
    serial: str               # hex
    fingerprint: str
    not_after: float
    key_generated: bool


@dataclass(frozen=True)
class RevokeResult:
    device_id: str
    serial: str
    already_revoked: bool


def parse_tags(items: Sequence[str]) -> dict[str, str]:
    """``["site=berlin", "rack=3"]`` -> ``{"site": "berlin", "rack": "3"}``. Raises UserError."""
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _TAG_KEY.fullmatch(key) or not _TAG_VALUE.fullmatch(value):
            raise UserError(f"invalid tag {item!r}: expected KEY=VALUE (key [A-Za-z0-9_.-], "
                            "value [A-Za-z0-9_.:/@+-], no spaces)")
        if key in tags and tags[key] != value:
            raise UserError(f"tag {key!r} given twice with different values")
        tags[key] = value
    return tags


def enrolment_from(device_id: str, tier: str | None = None, hardware: str | None = None, tags: Sequence[str] = (),
                   groups: Sequence[str] = (), csr: Path | None = None) -> Enrolment:
    """An :class:`Enrolment` from command-line values (``tags`` as KEY=VALUE, ``csr`` a PEM file).
    Raises UserError for a malformed tag or a CSR file that cannot be read."""
    csr_pem = None
    if csr is not None:
        try:
            with open(csr, "rb") as f:
                csr_pem = f.read(MAX_CSR_BYTES + 1)
        except OSError as e:
            raise UserError(f"cannot read the certificate signing request {csr}: {e.strerror}") from None
    return Enrolment(device_id, tier, hardware, parse_tags(tags), tuple(dict.fromkeys(groups)), csr_pem)


def _check_request(req: Enrolment) -> None:
    check_device_id(req.device_id)
    if req.tier is not None and not topics.valid_tier(req.tier):
        raise UserError(f"invalid tier {req.tier!r}: use [a-z0-9-], up to 32 characters")
    if req.hardware is not None and not _HARDWARE.fullmatch(req.hardware):
        raise UserError(f"invalid hardware profile {req.hardware!r}: use 1-64 of [A-Za-z0-9_.:+-]")
    for group in req.groups:
        if not topics.valid_device_id(group):
            raise UserError(f"invalid group name {group!r}: use 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
    if req.csr_pem is not None:
        _csr_public_key(req.csr_pem, req.device_id)


def enroll(ws: Workspace, fleet: FleetRegistry, req: Enrolment, out_dir: Path | None = None) -> EnrolResult:
    """Issue ``req.device_id`` its certificate, register it, and write its identity folder to
    ``out_dir`` (default ``<workspace>/devices/<id>``): ``device.crt``, ``ca.crt``, and ``device.key`` unless
    the device sent a CSR. Raises UserError, before anything is written, for bad input, an id
    already enrolled (revoked or not), or an identity folder that already holds a certificate."""
    _check_request(req)
    if fleet.enrolled(req.device_id) is not None:
        raise UserError(f"device {req.device_id!r} is already enrolled; a device id is enrolled once "
                        f"(to replace a lost or compromised device: edgeloop devices revoke {req.device_id}, "
                        "then enrol the replacement under a new id)")
    folder = Path(out_dir) if out_dir else ws.root / "devices" / req.device_id
    if (folder / "device.crt").exists() or (folder / "device.key").exists():
        raise UserError(f"{folder} already holds a device certificate or key: choose another --out")
    ca = FleetCA.open(ws)
    issued = ca.issue_device(req.device_id, req.csr_pem)
    fleet.enroll(EnrolledDevice(device_id=req.device_id, tier=req.tier, hardware=req.hardware, tags=req.tags,
                                groups=req.groups, cert_serial=f"{issued.serial:x}",
                                cert_fingerprint=issued.fingerprint, cert_not_after=issued.not_after))
    files = _write_identity(folder, issued, ca)
    return EnrolResult(req.device_id, folder, files, f"{issued.serial:x}", issued.fingerprint, issued.not_after,
                       issued.key_pem is not None)


def _write_identity(folder: Path, issued: Issued, ca: FleetCA) -> list[str]:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(folder / "device.crt", issued.cert_pem)
    atomic_write(folder / "ca.crt", ca.cert_path.read_bytes())
    files = ["device.crt", "ca.crt"]
    if issued.key_pem is not None:
        _write_private(folder / "device.key", issued.key_pem)
        files.append("device.key")
    return files


def revoke(ws: Workspace, fleet: FleetRegistry, device_id: str) -> RevokeResult:
    """Put the device's certificate on the CRL and mark it revoked in the registry. Revoking a
    revoked device changes nothing. Raises NotFound for a device that was never enrolled.
    The broker learns of it when it reloads (:func:`edgeloop.fleet.broker.apply_revocations`)."""
    row = fleet.enrolled(device_id)
    if row is None:
        raise NotFound(f"no enrolled device {device_id!r} (see: edgeloop devices)")
    serial = row["cert_serial"]
    added = FleetCA.open(ws).revoke(int(serial, 16))
    already = bool(row["revoked"]) and not added
    if not row["revoked"]:
        fleet.mark_revoked(device_id)
    return RevokeResult(device_id, serial, already)


# -- simulated devices ------------------------------------------------------------------------------
def simulated_device_tls(ws: Workspace, fleet: FleetRegistry, device_id: str, tier: str | None = None) -> TlsFiles:
    """The identity of a simulated device, kept in its default folder ``<workspace>/devices/<id>``:
    enrolled on first use (a real certificate from the fleet CA, like any device's), reused after.
    Raises UserError if the device is enrolled but its key is not in that folder (it was
    enrolled for real hardware, which holds its key)."""
    folder = ws.root / "devices" / device_id
    if fleet.enrolled(device_id) is None:
        enroll(ws, fleet, Enrolment(device_id, tier=tier, tags={"simulated": "true"}))
    files = TlsFiles(folder / "ca.crt", folder / "device.crt", folder / "device.key")
    if not all(p.exists() for p in (files.ca, files.cert, files.key)):
        raise UserError(f"device {device_id!r} is enrolled, but its identity is not in {folder}: "
                        "simulate it under another --prefix")
    return files


def agent_tls(files: TlsFiles) -> dict[str, Path]:
    """AgentConfig fields for mutual TLS with ``files``."""
    return {"tls_ca": files.ca, "tls_cert": files.cert, "tls_key": files.key}
