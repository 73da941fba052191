"""Provisioning bundles, on the operator's side: ``edgeloop devices provision``.

One bundle (a folder, or a ``.tar`` of it) holds everything one device needs to trust and
reach its fleet: its certificate and key, the fleet CA, the trusted roots of the image and
director repositories, and a manifest (``edgeloop.provision/1``: fleet id, device id, tier,
broker address, the hash of every file) signed by the fleet CA. The format and the device's
checks are in :mod:`edgeloop.device_sdk.provision`.

Rules:

- Every check runs before anything is written: the workspace has a generated broker (a bundle
  is always mutual TLS) whose server certificate names the address the device will dial, both
  repositories are initialized, and the output does not exist (``force`` replaces it, as one
  rename).
- A device that is not enrolled is enrolled here (:func:`edgeloop.fleet.identity.enroll`, with
  its tags, groups and CSR). Provisioning an enrolled device again re-uses its certificate (the
  registry's, from ``pki/issued/``) and its key if the workspace still holds it in
  ``devices/<id>/device.key``; without the key (a CSR, or a key moved onto the device) the
  bundle carries none. A revoked or expired certificate, or enrolment details that differ from
  the registry's, is refused: a device id is enrolled once.
- ``device.key`` is written with mode 0600, the bundle folder 0700.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeloop.cloud.errors import IntegrityError, UserError
from edgeloop.cloud.fleet_registry import FleetRegistry
from edgeloop.cloud.workspace import Workspace, parse_host_port
from edgeloop.device_sdk import provision as fmt
from edgeloop.fleet.identity import Enrolment, FleetCA, _san, enroll, pki_dir

__all__ = ["ProvisionResult", "provision_device"]


@dataclass(frozen=True)
class ProvisionResult:
    device_id: str
    out: Path
    files: list[str]
    serial: str
    enrolled: bool            # False: the device was enrolled before and its certificate is re-used
    key_included: bool
    broker: str
    fleet: str
    repository_url: str | None


def provision_device(ws: Workspace, fleet: FleetRegistry, req: Enrolment, out: Path, *, force: bool = False,
                     broker: str | None = None, repository_url: str | None = None) -> ProvisionResult:
    """Write ``req.device_id``'s provisioning bundle to ``out`` (a folder, or a file ending in
    ``.tar``), enrolling the device first if it is not. Raises UserError (nothing written) for
    an existing output without ``force``, a workspace without a generated broker, a broker
    certificate that does not name ``broker``'s host, or a device that cannot be provisioned
    again (module rules); IntegrityError if the registry's certificate is missing."""
    out = Path(out).resolve()
    if (out.exists() or out.is_symlink()) and not force:
        raise UserError(f"{out} already exists: pass --force to replace it, or choose another --out")
    if out.exists() and not out.name.endswith(".tar") and not (out / fmt.MANIFEST).exists() and any(out.iterdir()):
        raise UserError(f"{out} is a folder that is not a provisioning bundle: choose another --out")
    host, port = _broker_address(ws, broker)
    roots = ws.image_repository().trusted_root(), ws.director_repository().trusted_root()
    url = repository_url or _serve_url(ws)
    row = fleet.enrolled(req.device_id)
    if row is None:
        result = enroll(ws, fleet, req)
        folder = result.folder
        cert_pem = (folder / fmt.CERT).read_bytes()
        key_pem = (folder / fmt.KEY).read_bytes() if result.key_generated else None
        tier = req.tier
    else:
        cert_pem, key_pem, tier = _existing(ws, fleet, req, row)
    if tier is None:
        raise UserError(f"device {req.device_id!r} has no tier: enrol it with --tier (for example edge-gateway)")
    ca = FleetCA.open(ws)
    files = {fmt.CA: ca.cert_path.read_bytes(), fmt.CERT: cert_pem, fmt.IMAGE_ROOT: roots[0],
             fmt.DIRECTOR_ROOT: roots[1], **({fmt.KEY: key_pem} if key_pem is not None else {})}
    cert = x509.load_pem_x509_certificate(cert_pem)
    manifest = {"schema": fmt.PROVISION_SCHEMA, "fleet": ws.fleet, "device_id": req.device_id, "tier": tier,
                "broker": {"host": host, "port": port, "tls": "mutual"}, "repository_url": url,
                "certificate": {"serial": f"{cert.serial_number:x}", "not_after": cert.not_valid_after_utc.isoformat()},
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "files": {name: fmt.sha256_file(data) for name, data in sorted(files.items())}}
    raw = fmt.manifest_bytes(manifest)
    files.update({fmt.MANIFEST: raw, fmt.SIGNATURE: ca.sign(raw)})
    _write(out, files)
    return ProvisionResult(req.device_id, out, sorted(files), f"{cert.serial_number:x}", row is None,
                           key_pem is not None, f"{host}:{port}", ws.fleet, url)


def _broker_address(ws: Workspace, address: str | None) -> tuple[str, int]:
    info_path = ws.root / "broker" / "broker.json"
    try:
        info = json.loads(info_path.read_text())
        host, port = str(info["host"]), int(info["port"])
    except FileNotFoundError:
        raise UserError("this workspace has no generated broker, and a bundle connects with mutual TLS: "
                        "run edgeloop broker up (or broker config) first") from None
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"malformed {info_path}: {e} (regenerate it: edgeloop broker config)") from None
    if address:
        host, port = parse_host_port(address, "broker address")
    server = pki_dir(ws) / "broker" / "server.crt"
    try:
        names = x509.load_pem_x509_certificate(server.read_bytes()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        raise UserError(f"cannot read the broker's certificate {server}: regenerate it (edgeloop broker config)") \
            from None
    if _san(host) not in names:
        raise UserError(f"the broker's certificate does not name {host!r}, so a device dialling it would refuse "
                        f"the broker: edgeloop broker config --san {host} (then restart the broker)")
    return host, port


def _serve_url(ws: Workspace) -> str | None:
    try:
        url = json.loads((ws.root / "serve.json").read_text())["repository_url"]
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return url if isinstance(url, str) else None


def _existing(ws: Workspace, fleet: FleetRegistry, req: Enrolment, row: dict) -> tuple[bytes, bytes | None, str | None]:
    """(certificate, key or None, tier) of an enrolled device, checked for provisioning again."""
    did = req.device_id
    if row["revoked"]:
        raise UserError(f"device {did!r} is revoked: a revoked id is never provisioned again (enrol the "
                        "replacement under a new id)")
    device = fleet.device(did)
    asked = {"--tier": (req.tier, device["tier"]), "--hardware": (req.hardware, device["hardware"]),
             "--tag": (req.tags or None, device["tags"]), "--group": (list(req.groups) or None, device["groups"])}
    for flag, (given, have) in asked.items():
        if given is not None and given != have:
            raise UserError(f"device {did!r} is already enrolled with {flag} {have!r}: provisioning it again "
                            f"re-uses its enrolment; leave {flag} out (or enrol a new id)")
    if req.csr_pem is not None:
        raise UserError(f"device {did!r} is already enrolled: its certificate is re-used, leave --csr out")
    cert = FleetCA.open(ws).issued(did, row["cert_serial"])
    pem = cert.public_bytes(serialization.Encoding.PEM)
    if fmt.sha256_file(cert.public_bytes(serialization.Encoding.DER)) != row["cert_fingerprint"]:
        raise IntegrityError(f"the issued certificate of {did!r} does not match the registry's fingerprint")
    if cert.not_valid_after_utc.timestamp() < time.time():
        raise UserError(f"device {did!r}'s certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}: enrol it "
                        "under a new id")
    key_path = ws.root / "devices" / did / fmt.KEY
    key = None
    if key_path.exists():
        try:
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), None)
        except (ValueError, TypeError):
            loaded = None
        if loaded is not None and loaded.public_key() == cert.public_key():
            key = key_path.read_bytes()
    return pem, key, device["tier"]


def _write(out: Path, files: dict[str, bytes]) -> None:
    """The bundle as one folder (0700, the key 0600) or tar, in place of ``out`` in one rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.name.endswith(".tar"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o600 if name == fmt.KEY else 0o644, int(time.time())
                tar.addfile(info, io.BytesIO(data))
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))   # mode 0700
    for name, data in files.items():
        fd = os.open(tmp_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if name == fmt.KEY else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp_dir, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
