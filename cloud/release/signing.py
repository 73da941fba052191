"""Signed update repositories in the TUF format, made with python-tuf.

A :class:`Repository` holds the four top-level roles (root, targets, snapshot, timestamp),
each with its own Ed25519 keys and signature threshold (for example targets signed 2-of-3),
consistent snapshots on. Devices are provisioned with version 1 of root metadata and follow
every root version after it (``tuf.ngclient`` walks ``N.root.json``), which is how key
rotation reaches them: :meth:`Repository.rotate` replaces a role's keys in a new root
version, signed by the old *and* the new root keys, then re-signs the rotated role.

edgeloop runs two repositories in the Uptane split (docs/ota.md): the *image* repository
(every package; its keys can live offline) and the *director* (which package each device
group must install, signed online by the rollout controller).

Keys are PKCS#8 PEM files encrypted with ``EDGELOOP_KEY_PASSPHRASE`` (without it a random
passphrase is kept in ``<keys>/.passphrase``, which protects nothing against someone who can
read the workspace: set the variable in production), one folder per role:
``<keys>/<role>/<keyid>.pem``. A role whose keys are not all present signs with those that
are; fewer than its threshold is refused before anything is written.

Files written under ``<repository>/metadata``: ``N.root.json`` for every root version,
``N.targets.json``, ``N.snapshot.json`` and ``timestamp.json``, each atomically.

Bounds (``edgeloop.contracts.metadata_limits.LIMITS``, the table devices download against): the
timestamp records the length and sha256 of the snapshot it names and the snapshot those of
``targets.json``, so a device cuts any longer stream at the signed size; no metadata file over
its role's cap is ever written (:class:`~cloud.errors.UserError`, nothing changed), and no role
has more than ``max_keys_per_role`` keys.
"""

from __future__ import annotations

import copy
import hashlib
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from edgeloop.contracts.metadata_limits import LIMITS
from edgeloop.cloud.errors import IntegrityError, KeysMissing, UserError
from edgeloop.cloud.release.roles import ROLES

EXPIRY = {"root": timedelta(days=365), "targets": timedelta(days=90),
          "snapshot": timedelta(days=7), "timestamp": timedelta(days=1)}
PASSPHRASE_ENV = "EDGELOOP_KEY_PASSPHRASE"

__all__ = ["Repository", "RoleKeys", "ROLES", "Keyring"]


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _expiry(role: str, lifetime: timedelta | None = None) -> datetime:
    return (datetime.now(timezone.utc) + (lifetime or EXPIRY[role])).replace(microsecond=0)


@dataclass(frozen=True)
class RoleKeys:
    """How many keys a role has and how many must sign."""

    keys: int = 1
    threshold: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= self.keys:
            raise UserError(f"a threshold of {self.threshold} needs between 1 and {self.keys} keys")
        if self.keys > LIMITS.max_keys_per_role:
            raise UserError(f"{self.keys} keys for one role is over the limit of {LIMITS.max_keys_per_role} "
                            "(contracts/metadata_limits.py: devices bound root metadata by it)")


class Keyring:
    """Encrypted Ed25519 keys, one folder per role."""

    def __init__(self, keys_dir: Path) -> None:
        self.dir = Path(keys_dir)

    def _passphrase(self) -> bytes:
        env = os.environ.get(PASSPHRASE_ENV)
        if env:
            return env.encode()
        path = self.dir / ".passphrase"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        return path.read_text().strip().encode()

    def create(self, role: str) -> CryptoSigner:
        key = Ed25519PrivateKey.generate()
        signer = CryptoSigner(key, SSlibKey.from_crypto(key.public_key()))
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(self._passphrase()))
        folder = self.dir / role
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        fd = os.open(folder / f"{signer.public_key.keyid}.pem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return signer

    def load(self, role: str, keyid: str) -> CryptoSigner | None:
        """The signer for one key, or None if that private key is not on this machine."""
        path = self.dir / role / f"{keyid}.pem"
        if not path.exists():
            return None
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), self._passphrase())
        except (ValueError, TypeError) as e:
            raise IntegrityError(f"cannot decrypt {path}: wrong {PASSPHRASE_ENV}? ({e})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IntegrityError(f"{path} is not an Ed25519 key")
        return CryptoSigner(key, SSlibKey.from_crypto(key.public_key()))

    def retire(self, role: str, keyid: str) -> None:
        """Move a rotated-out key aside (kept for audit, never used to sign again)."""
        path = self.dir / role / f"{keyid}.pem"
        if path.exists():
            retired = self.dir / "retired" / role
            retired.mkdir(parents=True, exist_ok=True)
            os.replace(path, retired / path.name)


class Repository:
    """One TUF repository: metadata under ``metadata/``, packages under ``targets/``."""

    def __init__(self, repository_dir: Path, keys_dir: Path) -> None:
        self.dir = Path(repository_dir)
        self.meta_dir = self.dir / "metadata"
        self.targets_dir = self.dir / "targets"
        self.keys = Keyring(Path(keys_dir))
        self._serializer = JSONSerializer(compact=False)

    # -- set-up -------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return (self.meta_dir / "1.root.json").exists()

    def init(self, layout: dict[str, RoleKeys] | None = None) -> None:
        """Create keys and version 1 of every role. Does nothing if already initialized."""
        if self.initialized:
            return
        layout = {role: (layout or {}).get(role, RoleKeys()) for role in ROLES}
        root = Root(expires=_expiry("root"), consistent_snapshot=True)
        for role in ROLES:
            for _ in range(layout[role].keys):
                root.add_key(self.keys.create(role).public_key, role)
            root.roles[role].threshold = layout[role].threshold
        self._write(Metadata(root), "root", root)
        self._write(Metadata(Targets(expires=_expiry("targets"))), "targets", root)
        self._resnapshot(root)

    def trusted_root(self) -> bytes:
        """The bytes a device is provisioned with: version 1 of root metadata."""
        try:
            return (self.meta_dir / "1.root.json").read_bytes()
        except FileNotFoundError:
            raise UserError(f"the repository at {self.dir} is not initialized (run: edgeloop init)") from None

    # -- publishing ---------------------------------------------------------------------
    def add_target(self, target_path: str, data: bytes, custom: dict[str, Any] | None = None,
                   store: bool = True) -> TargetFile:
        """Sign ``data`` as ``target_path``: new targets, snapshot and timestamp versions.

        ``store=False`` signs the target's length and hashes without keeping its bytes here
        (the director names packages that the image repository stores).
        """
        self._require_init()
        target = TargetFile.from_data(target_path, data, ["sha256"])
        if custom:
            target.unrecognized_fields["custom"] = custom
        if store:
            atomic_write(self._stored_path(target_path, target.hashes["sha256"]), data)
        return self.set_targets({target_path: target})

    def set_targets(self, changes: dict[str, TargetFile | None], replace: bool = False) -> TargetFile | None:
        """Add (or with None remove) targets; ``replace`` drops every target not named."""
        self._require_init()
        targets = self._load("targets")
        if replace:
            targets.signed.targets.clear()
        last = None
        for path, target in changes.items():
            if target is None:
                targets.signed.targets.pop(path, None)
            else:
                targets.signed.targets[path] = last = target
        targets.signed.version += 1
        targets.signed.expires = _expiry("targets")
        root = self._load("root").signed
        self._write(targets, "targets", root)
        self._resnapshot(root)
        return last

    def targets(self) -> dict[str, TargetFile]:
        return dict(self._load("targets").signed.targets)

    def target_file(self, target_path: str) -> Path:
        """Where the stored bytes of a signed target are."""
        target = self._load("targets").signed.targets.get(target_path)
        if target is None:
            raise UserError(f"no signed target {target_path!r}")
        return self._stored_path(target_path, target.hashes["sha256"])

    def refresh_timestamp(self, lifetime: timedelta | None = None) -> None:
        """Re-sign timestamp with a new expiry (the control plane does this at least daily)."""
        timestamp = self._load("timestamp")
        timestamp.signed.version += 1
        timestamp.signed.expires = _expiry("timestamp", lifetime)
        self._write(timestamp, "timestamp", self._load("root").signed)

    # -- keys ---------------------------------------------------------------------------
    def rotate(self, role: str, layout: RoleKeys | None = None) -> int:
        """Replace every key of ``role`` with new ones; returns the new root version.

        The new root is signed by the old root keys and, for a root rotation, the new ones
        too, so a device holding the old root can verify its way to the new one.
        """
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        self._require_init()
        md = self._load("root")
        root = md.signed
        old_root = copy.deepcopy(root)   # to_dict() shares lists with the live object
        old_ids = list(root.roles[role].keyids)
        layout = layout or RoleKeys(len(old_ids), root.roles[role].threshold)
        for keyid in old_ids:
            root.revoke_key(keyid, role)
        for _ in range(layout.keys):
            root.add_key(self.keys.create(role).public_key, role)
        root.roles[role].threshold = layout.threshold
        root.version += 1
        root.expires = _expiry("root")
        self._write(md, "root", root, also_signed_by=old_root)
        for keyid in old_ids:
            self.keys.retire(role, keyid)
        if role == "targets":
            self.set_targets({})
        elif role in ("snapshot", "timestamp"):
            self._resnapshot(root)
        return root.version

    def key_report(self) -> dict[str, Any]:
        root = self._load("root").signed
        report: dict[str, Any] = {"root_version": root.version, "roles": {}}
        for role in ROLES:
            md = self._load(role)
            ids = root.roles[role].keyids
            report["roles"][role] = {
                "threshold": root.roles[role].threshold, "keyids": list(ids),
                "keys_here": sum((self.keys.dir / role / f"{k}.pem").exists() for k in ids),
                "version": md.signed.version, "expires": md.signed.expires.isoformat()}
        return report

    # -- internals ----------------------------------------------------------------------
    def role_signers(self, role: str) -> list[CryptoSigner]:
        """The keys of ``role`` in the current root that are on this machine (at least its
        threshold; the time server signs with the director's timestamp keys). Raises UserError."""
        self._require_init()
        return self._signers(role, self._load("root").signed)

    def _require_init(self) -> None:
        if not self.initialized:
            raise UserError(f"the repository at {self.dir} is not initialized (run: edgeloop init)")

    def _stored_path(self, target_path: str, digest: str) -> Path:
        parent, _, name = target_path.rpartition("/")
        return self.targets_dir / parent / f"{digest}.{name}"

    def _resnapshot(self, root: Root) -> None:
        targets_path = self._current_path("targets")
        targets_version = int(targets_path.name.split(".")[0])
        exists = (self.meta_dir / "timestamp.json").exists()
        snapshot = self._load("snapshot") if exists else Metadata(Snapshot(expires=_expiry("snapshot")))
        if exists:
            snapshot.signed.version += 1
            snapshot.signed.expires = _expiry("snapshot")
        snapshot.signed.meta["targets.json"] = _meta_file(targets_version, targets_path.read_bytes())
        snapshot_bytes = self._write(snapshot, "snapshot", root)
        timestamp = self._load("timestamp") if exists else Metadata(Timestamp(expires=_expiry("timestamp")))
        if exists:
            timestamp.signed.version += 1
            timestamp.signed.expires = _expiry("timestamp")
        timestamp.signed.snapshot_meta = _meta_file(snapshot.signed.version, snapshot_bytes)
        self._write(timestamp, "timestamp", root)

    def _current_path(self, role: str) -> Path:
        if role == "timestamp":
            return self.meta_dir / "timestamp.json"
        versions = [int(p.name.split(".")[0]) for p in self.meta_dir.glob(f"*.{role}.json")]
        if not versions:
            raise UserError(f"no {role} metadata in {self.meta_dir}")
        return self.meta_dir / f"{max(versions)}.{role}.json"

    def _load(self, role: str) -> Metadata:
        return Metadata.from_file(str(self._current_path(role)))

    def _signers(self, role: str, root: Root) -> list[CryptoSigner]:
        ids = root.roles[role].keyids
        signers = [s for s in (self.keys.load(role, k) for k in ids) if s is not None]
        if len(signers) < root.roles[role].threshold:
            raise KeysMissing(f"missing signing keys: role {role} needs {root.roles[role].threshold} "
                              f"signature(s) but only {len(signers)} of its keys are on this machine "
                              f"({self.keys.dir / role}): restore them from a backup (nothing was signed)")
        return signers

    def _write(self, md: Metadata, role: str, root: Root, also_signed_by: Root | None = None) -> bytes:
        """Sign and write one metadata file; returns its bytes. Raises UserError, writing nothing,
        for a file over its role's cap (devices would refuse it)."""
        md.signatures.clear()
        signers = self._signers(role, root)
        if also_signed_by is not None:   # a new root is also signed by the previous root's keys
            signers += self._signers("root", also_signed_by)
        for signer in {s.public_key.keyid: s for s in signers}.values():
            md.sign(signer, append=True)
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        data = md.to_bytes(self._serializer)
        cap = LIMITS.max_bytes(role)
        if len(data) > cap:
            raise UserError(f"{role} metadata of {len(data)} bytes is over its {cap} byte cap "
                            f"(contracts/metadata_limits.py); devices would refuse it"
                            + ("; remove targets nothing assigns any more" if role == "targets" else ""))
        atomic_write(self.meta_dir / name, data)
        return data


def _meta_file(version: int, data: bytes) -> MetaFile:
    """What a timestamp or snapshot signs about the file it points to: version, length and sha256."""
    return MetaFile(version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()})
