"""One control plane per workspace: ``edgeloop serve`` holds an exclusive lock for its lifetime.

::

    <workspace>/serve.lock   flock(LOCK_EX), held by the serving process for its whole life; the
                             kernel releases it when that process ends, however it ends (kill -9
                             too). Never removed: removing a lock file lets two processes each
                             lock a file of the same name.
    <workspace>/serve.json   who serves: pid, api_url, repository_url, fleet, started_at. Written
                             (atomically) only by the lock's holder once its services are up, and
                             removed only by it when it stops.

A second ``serve`` is refused (:class:`~cloud.errors.AlreadyServing`, exit code 2) with one line
naming the first. The folder is per host (docs/multihost.md): on a PostgreSQL store several hosts
serve one fleet, each from its own folder, and :class:`SessionLock` refuses a serve whose MQTT
session name another host's serve already runs as (a folder copied rather than made with
``init --join``), since the two would take the session from each other. A ``serve.json`` whose lock nobody holds is stale (its serve was killed):
readers (:func:`serving`) treat it as no control plane, and the next ``serve`` replaces it.
Readers probe with a shared lock held for microseconds; ``serve`` retries its exclusive lock for
up to :data:`ACQUIRE_S` seconds so that a probe is never mistaken for a running control plane.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from edgeloop.cloud.errors import AlreadyServing, ServiceUnavailable, UserError

__all__ = ["ACQUIRE_S", "LOCK_FILE", "SERVE_FILE", "ServeInfo", "ServeLock", "SessionLock", "serving", "serving_url"]

SERVE_FILE = "serve.json"
LOCK_FILE = "serve.lock"
ACQUIRE_S = 1.0
NO_SERVE = "no control plane is serving this workspace"
NO_SERVE_FIX = "start one: edgeloop serve, or pass --repository-url"


@dataclass(frozen=True)
class ServeInfo:
    """What ``serve.json`` says."""

    pid: int
    repository_url: str
    api_url: str | None = None
    fleet: str | None = None
    started_at: float | None = None

    @classmethod
    def read(cls, path: Path) -> ServeInfo | None:
        """The file's content; None when it is missing or not a serve.json."""
        try:
            obj: dict[str, Any] = json.loads(path.read_text())
            return cls(pid=int(obj["pid"]), repository_url=str(obj["repository_url"]), api_url=obj.get("api_url"),
                       fleet=obj.get("fleet"), started_at=obj.get("started_at"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        started = (datetime.fromtimestamp(self.started_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                   if self.started_at else "at an unknown time")
        return (f"pid {self.pid}, API {self.api_url or '-'}, repository {self.repository_url}, "
                f"started {started}")


def _lock_held(lock_path: Path) -> bool:
    """Whether some process holds the serve lock (probed with a shared lock, released at once)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)      # closing releases the probe's shared lock
    return False


def serving(root: Path) -> ServeInfo:
    """The control plane serving the workspace at ``root``. Raises UserError when none is (a
    stale serve.json named in the message), ServiceUnavailable while one is still starting."""
    info = ServeInfo.read(root / SERVE_FILE)
    if _lock_held(root / LOCK_FILE):
        if info is None:
            raise ServiceUnavailable(f"a control plane is starting on this workspace (see {root / LOCK_FILE}): "
                                     "retry in a moment")
        return info
    if (root / SERVE_FILE).exists():
        left = f"pid {info.pid}" if info else "an unreadable file"
        raise UserError(f"{NO_SERVE}: {root / SERVE_FILE} is stale ({left}; that serve is gone) ({NO_SERVE_FIX}; "
                        "the new serve replaces the file)")
    raise UserError(f"{NO_SERVE} ({NO_SERVE_FIX})")


def serving_url(root: Path) -> str:
    """The repository URL of the control plane serving ``root``; raises as :func:`serving`."""
    return serving(root).repository_url


class ServeLock:
    """The workspace's serve lock, held from :meth:`acquire` to :meth:`release` (or the end of
    the process). Use as a context manager around everything ``serve`` runs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.lock_path = self.root / LOCK_FILE
        self.info_path = self.root / SERVE_FILE
        self._fd: int | None = None
        self._info: ServeInfo | None = None
        self.replaced: ServeInfo | None = None     # the stale serve.json found on acquiring, if any

    def acquire(self, wait_s: float = ACQUIRE_S) -> ServeLock:
        """Take the lock, and remove a stale serve.json. Raises AlreadyServing naming the holder."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise AlreadyServing(self._holder_line()) from None
                time.sleep(0.05)
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "locked_at": time.time()}).encode())
        if self.info_path.exists():           # nobody held the lock: whatever is there is stale
            self.replaced = ServeInfo.read(self.info_path)
            self.info_path.unlink()
        return self

    def _holder_line(self) -> str:
        info = ServeInfo.read(self.info_path)
        if info is not None:
            who = info.describe()
        else:
            try:
                who = f"pid {int(json.loads(self.lock_path.read_text())['pid'])}, still starting"
            except (OSError, ValueError, KeyError, TypeError):
                who = "pid unknown, still starting"
        return (f"another edgeloop serve is serving {self.root} ({who}): one control plane per workspace; "
                "stop it first (Ctrl-C, or kill -TERM its pid), or use it")

    def publish(self, repository_url: str, api_url: str | None, fleet: str | None) -> ServeInfo:
        """Write serve.json (atomically) for this process. Only the lock's holder may."""
        if self._fd is None:
            raise RuntimeError("publish needs the serve lock: call acquire first")
        info = ServeInfo(os.getpid(), repository_url, api_url, fleet, time.time())
        tmp = self.info_path.with_name(f".{SERVE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(info)))
        os.replace(tmp, self.info_path)
        self._info = info
        return info

    def release(self) -> None:
        """Remove serve.json if this process wrote it, then let go of the lock. Safe to call twice."""
        if self._fd is None:
            return
        try:
            if self._info is not None and ServeInfo.read(self.info_path) == self._info:
                self.info_path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            self._info = None

    def __enter__(self) -> ServeLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class SessionLock:
    """One serve per ingest session name across the hosts of a store: held (a lock of the
    database session of a store connection of its own, :meth:`~cloud.store.interface.Store.hold`)
    from ``__enter__`` to ``__exit__``; the database gives it back when the serve ends, however
    it ends. A workspace whose store is its SQLite file needs none (its folder's lock is enough)."""

    def __init__(self, ws: Any, session: str, worker: str) -> None:
        self.ws, self.session, self.worker = ws, session, worker
        self._store: Any = None

    def __enter__(self) -> SessionLock:
        if self.ws.store is None:
            return self
        from edgeloop.cloud.registry import Registry

        store = Registry(self.ws.store_location)
        if not store.hold(f"serve-session/{self.session}"):
            store.close()
            raise AlreadyServing(f"another host's edgeloop serve runs as {self.worker!r} (MQTT session {self.session}) "
                                 f"on this store: the two would take the session from each other; give this one its "
                                 f"own name (edgeloop serve --worker NAME, or make the host with edgeloop init --join)")
        self._store = store
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
