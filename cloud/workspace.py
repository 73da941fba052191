"""The workspace: one folder holding everything a control plane keeps (docs/contracts/workspace.md).

::

    <workspace>/
      edgeloop.toml        settings (broker address, HTTP port, fleet id: the namespace of its MQTT topics,
                           and optionally ``store = "postgresql://..."``: the store on PostgreSQL)
      registry.db          the store (cloud.store, schema-versioned SQLite) unless ``store`` names another
      keys/                Ed25519 signing keys, PKCS#8 PEM encrypted at rest, mode 0600
      repository/          the image repository (TUF): every package, signed (keys can live offline)
        metadata/          1.root.json, N.root.json, timestamp.json, N.snapshot.json, N.targets.json
        targets/           packages, named <sha256>.<name> (consistent snapshots)
      director/metadata/   the director repository (TUF): which package each device group installs
      artifacts/           content-addressed blobs: <sha256[:2]>/<sha256>
      fleet/               state folders of simulated devices

Opening a workspace checks that it is whole (:meth:`Workspace.check`) and refuses, with one
line naming what is missing and how to get it back (WorkspaceDamaged, exit code 4), rather than
letting a command recreate it empty: a missing or empty ``registry.db`` beside data (keys,
signed repositories, artifacts, runs), a repository's trusted root, the director's signing
keys (they sign online), or the key passphrase file the keys were encrypted with. A registry that is not a whole SQLite database
is refused the same way when it is opened (cloud.store). Only ``edgeloop init
--recreate-registry`` starts an empty registry beside existing data.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from edgeloop.cloud.errors import KeysMissing, NotFound, UserError, WorkspaceDamaged
from edgeloop.contracts.topics import DEFAULT_FLEET, valid_fleet

CONFIG_NAME = "edgeloop.toml"
DEFAULT_MQTT = "127.0.0.1:1883"
WORKSPACE_VERSION = 1
PASSPHRASE_ENV = "EDGELOOP_KEY_PASSPHRASE"     # as cloud.release.signing reads it
# folders whose content means the workspace has been used: a registry must sit beside them
DATA_FOLDERS = ("keys", "repository/metadata", "repository/targets", "director/metadata", "artifacts", "runs")
STORE_SCHEMES = ("postgresql://", "postgres://")
# what every host of one fleet shares (Workspace.add_host links them): keys, signed repositories,
# artifacts, the release lock, broker identities and the share group, device folders, runs
SHARED = ("keys", "repository", "director", "artifacts", "runs", "data", "broker", "pki", "devices", "fleet",
          "swarm", "tiers", ".release.lock")

__all__ = ["Workspace", "parse_host_port", "DEFAULT_MQTT"]


def valid_host(name: str) -> bool:
    """A host name as ``add_host`` takes it: the same shape as a fleet id (it names MQTT sessions)."""
    return valid_fleet(name)


def parse_host_port(text: str, what: str = "address", allow_zero: bool = False) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 if allow_zero else 1) <= int(port) < 65536:
        raise UserError(f"invalid {what} {text!r}: expected HOST:PORT")
    return host, int(port)


@dataclass(frozen=True)
class Workspace:
    root: Path
    mqtt_host: str
    mqtt_port: int
    http_host: str
    http_port: int          # 0: pick a free port when the control plane starts
    fleet: str
    store: str | None = None    # a postgresql:// URL; None: the SQLite file at registry_path
    host: str | None = None     # this folder's host name when several hosts serve one fleet (add_host)
    public_url: str | None = None   # the repository URL devices download from, when a load balancer
                                    # fronts every host's repository server (None: each serve's own)

    @property
    def registry_path(self) -> Path:
        return self.root / "registry.db"

    @property
    def store_location(self) -> Path | str:
        """Where the store lives: the ``store`` URL, else the SQLite file :attr:`registry_path`."""
        return self.store or self.registry_path

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def repository_dir(self) -> Path:
        return self.root / "repository"

    @property
    def director_dir(self) -> Path:
        return self.root / "director"

    def image_repository(self):  # noqa: ANN201 - cloud.release.signing.Repository, imported lazily
        from edgeloop.cloud.release.signing import Repository
        return Repository(self.repository_dir, self.keys_dir / "image")

    def director_repository(self):  # noqa: ANN201
        from edgeloop.cloud.release.signing import Repository
        return Repository(self.director_dir, self.keys_dir / "director")

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def fleet_dir(self) -> Path:
        return self.root / "fleet"

    @property
    def topics(self):  # noqa: ANN201 - contracts.topics.Fleet
        """The MQTT topic scheme of this workspace's fleet (contracts/topics.py)."""
        from edgeloop.contracts.topics import Fleet
        return Fleet(self.fleet)

    @classmethod
    def init(cls, root: Path, mqtt: str = DEFAULT_MQTT, http: str = "127.0.0.1:0",
             fleet: str | None = None) -> Workspace:
        """Create a workspace (or return the existing one unchanged). ``fleet``: its fleet id
        (default: ``fleet-`` + 12 random hex digits, so two workspaces on one broker never share
        topics). Raises UserError for a malformed address or fleet id, WorkspaceDamaged for an
        existing workspace that is not whole (nothing is recreated)."""
        root = Path(root).resolve()
        if (root / CONFIG_NAME).exists():
            return cls.open(root)
        fleet = fleet if fleet is not None else f"fleet-{secrets.token_hex(6)}"
        if not valid_fleet(fleet):
            raise UserError(f"invalid fleet id {fleet!r}: use 1-32 of [a-z0-9-], starting with a letter or digit")
        if root.exists() and not root.is_dir():
            raise UserError(f"workspace path {root} exists and is not a folder")
        mqtt_host, mqtt_port = parse_host_port(mqtt, "broker address")
        http_host, http_port = parse_host_port(http, "HTTP address", allow_zero=True)
        for sub in ("keys", "repository/metadata", "repository/targets", "director/metadata", "artifacts", "fleet"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "keys", 0o700)
        text = (f"# edgeloop workspace\nversion = {WORKSPACE_VERSION}\nfleet = \"{fleet}\"\n\n"
                f"[mqtt]\nhost = \"{mqtt_host}\"\nport = {mqtt_port}\n\n"
                f"[http]\nhost = \"{http_host}\"\nport = {http_port}\n")
        (root / CONFIG_NAME).write_text(text)
        return cls.open(root)

    @classmethod
    def open(cls, root: Path, check: bool = True) -> Workspace:
        """The workspace at ``root``. Raises NotFound (none there), UserError (a malformed
        config) or, with ``check``, WorkspaceDamaged (:meth:`check`)."""
        root = Path(root).resolve()   # the registry stores absolute paths: any working directory works
        path = root / CONFIG_NAME
        if not path.exists():
            raise NotFound(f"no edgeloop workspace at {root} (run: edgeloop init --workspace {root})")
        try:
            cfg = tomllib.loads(path.read_text())
            ws = cls(root=root, mqtt_host=str(cfg["mqtt"]["host"]), mqtt_port=int(cfg["mqtt"]["port"]),
                     http_host=str(cfg["http"]["host"]), http_port=int(cfg["http"]["port"]),
                     fleet=str(cfg.get("fleet", DEFAULT_FLEET)))   # written before fleet ids: "default"
        except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"malformed workspace config {path}: {e}") from None
        store = cfg.get("store")
        if store is not None:
            if not isinstance(store, str) or not store.startswith(STORE_SCHEMES):
                raise UserError(f"malformed workspace config {path}: store is not a PostgreSQL URL "
                                "(use postgresql://USER@HOST:PORT/DATABASE, or remove it for the SQLite file)")
            ws = replace(ws, store=store)
        host, public_url = cfg.get("host"), cfg["http"].get("public_url")
        if host is not None and not (isinstance(host, str) and valid_host(host)):
            raise UserError(f"malformed workspace config {path}: invalid host name {host!r} "
                            "(use 1-32 of [a-z0-9-], starting with a letter or digit)")
        if public_url is not None and not (isinstance(public_url, str) and public_url.startswith(("http://", "https://"))):
            raise UserError(f"malformed workspace config {path}: http.public_url {public_url!r} is not an http(s) URL")
        ws = replace(ws, host=host, public_url=public_url)
        if not valid_fleet(ws.fleet):
            raise UserError(f"malformed workspace config {path}: invalid fleet id {ws.fleet!r} "
                            "(use 1-32 of [a-z0-9-], starting with a letter or digit)")
        if check:
            ws.check()
        return ws

    # -- is it whole? --------------------------------------------------------------------------
    def check(self, registry: bool = True) -> None:
        """Raises WorkspaceDamaged naming everything of the workspace that is missing or corrupt
        (see the module docstring; ``registry=False``: all but the registry); changes nothing."""
        problems = (self._registry_problems() if registry else []) + self._repository_problems()
        if problems:
            cls = KeysMissing if all(p.startswith("missing signing key") for p in problems) else WorkspaceDamaged
            raise cls(f"workspace {self.root} is damaged: " + "; ".join(problems))

    def data_present(self) -> list[str]:
        """The folders of :data:`DATA_FOLDERS` that hold at least one file."""
        return [f"{sub}/" for sub in DATA_FOLDERS if _holds_a_file(self.root / sub)]

    def _registry_problems(self) -> list[str]:
        """Missing or empty beside data. A file that is not a whole database is refused by the
        store when it is opened (cloud/store/_file.py), not here: no store import at start-up.
        A workspace whose store is a PostgreSQL database has no file to check here."""
        if self.store is not None:
            return []
        path = self.registry_path
        if not path.exists() or path.stat().st_size == 0:
            data = self.data_present()
            if not data:
                return []            # a new workspace: its registry is created on first use
            return [f"{path.name} is {'missing' if not path.exists() else 'empty'} beside "
                    f"{', '.join(data)}: restore it from a backup, or start an empty registry that keeps "
                    f"the keys and repositories (models, runs and devices recorded in it are lost): "
                    f"edgeloop init -w {self.root} --recreate-registry"]
        return []

    def _repository_problems(self) -> list[str]:
        problems = []
        for name, repo_dir in (("image", self.repository_dir), ("director", self.director_dir)):
            keys = self.keys_dir / name
            root = repo_dir / "metadata" / "1.root.json"
            if not root.exists() and (_holds_a_file(repo_dir / "metadata") or _holds_a_file(keys)):
                problems.append(f"the {name} repository's trusted root {root.relative_to(self.root)} is missing "
                                "(devices are provisioned with it): restore it from a backup")
        if self.director_repository_initialized():
            problems += self._missing_director_keys()
        if not os.environ.get(PASSPHRASE_ENV):    # a new passphrase would be made, and decrypt nothing
            for folder, pattern in (("image", "*/*.pem"), ("director", "*/*.pem"), ("", "fleet-ca.pem")):
                keys = self.keys_dir / folder
                if any(keys.glob(pattern)) and not (keys / ".passphrase").exists():
                    where = (keys / ".passphrase").relative_to(self.root)
                    problems.append(f"{where} is missing (the keys beside it are encrypted with it): restore it "
                                    f"from a backup, or set {PASSPHRASE_ENV} to the passphrase they were made with")
        return problems

    def director_repository_initialized(self) -> bool:
        return (self.director_dir / "metadata" / "1.root.json").exists()

    def _missing_director_keys(self) -> list[str]:
        """The director signs online (rollouts, publish): every role needs its threshold of keys here."""
        import json

        meta = self.director_dir / "metadata"
        roots = sorted(meta.glob("*.root.json"), key=lambda p: int(p.name.split(".")[0]) if
                       p.name.split(".")[0].isdigit() else 0)
        try:
            roles = json.loads(roots[-1].read_text())["signed"]["roles"]
        except (OSError, ValueError, KeyError, IndexError) as e:
            return [f"the director's root metadata {roots[-1] if roots else meta} is unreadable ({e}): "
                    "restore it from a backup"]
        short = []
        for role, spec in sorted(roles.items()):
            have = sum((self.keys_dir / "director" / role / f"{k}.pem").exists() for k in spec["keyids"])
            if have < spec["threshold"]:
                short.append(f"keys/director/{role}/ ({have} of {spec['threshold']})")
        if not short:
            return []
        return [f"missing signing keys: {', '.join(short)}: the director signs online; restore them from a backup"]

    # -- several hosts, one fleet (docs/multihost.md) -----------------------------------------------
    def add_host(self, root: Path, name: str, http: str = "127.0.0.1:0") -> Workspace:
        """Make ``root`` the workspace folder of another host serving this fleet: its own
        ``edgeloop.toml`` (this one's fleet, broker, store and public URL; ``host = name``; its
        own HTTP address) and its own serve lock, and links to this folder's keys, signed
        repositories, artifacts and the other shared folders (:data:`SHARED`), so every host
        signs into the same repositories under one release lock. This folder must be reachable
        at the same path on every host (a shared mount). Raises UserError for a workspace whose
        store is its SQLite file (one host only), a bad name, or a ``root`` that exists, and
        ServiceUnavailable for a store it cannot reach, before anything is made."""
        if self.store is None:
            raise UserError(f"workspace {self.root} keeps its store in {self.registry_path.name}, which one host "
                            "serves: set store = \"postgresql://...\" in its edgeloop.toml first (docs/store.md)")
        if not valid_host(name):
            raise UserError(f"invalid host name {name!r}: use 1-32 of [a-z0-9-], starting with a letter or digit")
        root = Path(root).resolve()
        if root.exists():
            raise UserError(f"{root} exists: a new host's folder must not (pick another path)")
        http_host, http_port = parse_host_port(http, "HTTP address", allow_zero=True)
        from edgeloop.cloud.registry import Registry
        Registry(self.store).close()         # unreachable, or a refused login: raised before anything is made
        for sub in SHARED:                   # made here first, so what is added later is shared too
            target = self.root / sub
            if sub.startswith("."):
                target.touch(exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
        root.mkdir(parents=True)
        for sub in SHARED:
            (root / sub).symlink_to(self.root / sub)
        public = f"public_url = \"{self.public_url}\"\n" if self.public_url else ""
        (root / CONFIG_NAME).write_text(
            f"# edgeloop workspace: host {name} of {self.root}\nversion = {WORKSPACE_VERSION}\nfleet = \"{self.fleet}\"\n"
            f"host = \"{name}\"\nstore = \"{self.store}\"\n\n[mqtt]\nhost = \"{self.mqtt_host}\"\nport = {self.mqtt_port}\n\n"
            f"[http]\nhost = \"{http_host}\"\nport = {http_port}\n{public}")
        return Workspace.open(root)

    def with_mqtt(self, address: str | None) -> Workspace:
        """A copy pointing at another broker (for one command, not saved)."""
        if not address:
            return self
        host, port = parse_host_port(address, "broker address")
        return replace(self, mqtt_host=host, mqtt_port=port)


def _holds_a_file(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))
