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
"""

from __future__ import annotations

import os
import secrets
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from edgeloop.cloud.errors import NotFound, UserError
from edgeloop.contracts.topics import DEFAULT_FLEET, valid_fleet

CONFIG_NAME = "edgeloop.toml"
DEFAULT_MQTT = "127.0.0.1:1883"
WORKSPACE_VERSION = 1
STORE_SCHEMES = ("postgresql://", "postgres://")

__all__ = ["Workspace", "parse_host_port", "DEFAULT_MQTT"]


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
        topics). Raises UserError for a malformed address or fleet id."""
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
    def open(cls, root: Path) -> Workspace:
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
        if not valid_fleet(ws.fleet):
            raise UserError(f"malformed workspace config {path}: invalid fleet id {ws.fleet!r} "
                            "(use 1-32 of [a-z0-9-], starting with a letter or digit)")
        return ws

    def with_mqtt(self, address: str | None) -> Workspace:
        """A copy pointing at another broker (for one command, not saved)."""
        if not address:
            return self
        host, port = parse_host_port(address, "broker address")
        return replace(self, mqtt_host=host, mqtt_port=port)
