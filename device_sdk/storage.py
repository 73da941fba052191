"""Crash-safe files on the device.

Every file the agent writes goes through :func:`atomic_write`: a temporary file in the same
folder, fsync, ``os.replace``, then fsync of the folder, so a power cut leaves either the old
or the new file, never a torn one. A write that fails raises :class:`StorageError` whose
``code`` names the fault (:func:`fault_code`): ``storage.full`` (ENOSPC, EDQUOT),
``storage.readonly`` (EROFS, EACCES, EPERM) or ``storage.write``; the agent keeps serving and
reports it (docs/ota.md, "Faults").
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

from edgeloop.contracts.codes import ErrorCode
from edgeloop.device_sdk.errors import StorageError

__all__ = ["atomic_write", "fault_code", "read_json", "write_json", "JsonFile"]

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def fault_code(error: BaseException) -> ErrorCode:
    """What a failed write says about the disk: ``storage.full``, ``storage.readonly`` or
    ``storage.write``, for an OSError or a StorageError (the outbox classifies SQLite's own)."""
    if isinstance(error, StorageError):
        return error.code
    if isinstance(error, OSError):
        return ErrorCode.STORAGE_FULL if error.errno in _FULL else \
            ErrorCode.STORAGE_READONLY if error.errno in _READONLY else ErrorCode.STORAGE_WRITE
    return ErrorCode.STORAGE_WRITE


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary beside it, fsync, rename, fsync the folder).
    The temporary is the writer's own (process and thread in its name): two processes writing
    one file at once (swarms sharing trusted metadata) each rename their own, the last wins."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:       # the first write into this folder
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, "wb")
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        with contextlib.suppress(OSError):     # a full disk keeps no half-written temporary
            tmp.unlink()
        raise StorageError(f"cannot write {path}: {e}", fault_code(e)) from e


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())   # compact: the C encoder


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return default
    except (OSError, json.JSONDecodeError) as e:
        raise StorageError(f"cannot read {path}: {e}") from e


class JsonFile:
    """One JSON document in one file, saved atomically (the agent's ``state.json``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        """The document, or None if there is none yet. Raises StorageError."""
        data = read_json(self.path)
        return data if isinstance(data, dict) else None

    def save(self, state: dict[str, Any]) -> None:
        """Raises StorageError (``storage.full``, ``storage.readonly``, ``storage.write``)."""
        write_json(self.path, state)
