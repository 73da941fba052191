"""Is this file a whole SQLite database? Checked before opening, so a damaged registry is
refused instead of being "repaired" into an empty one (private to cloud.store).

SQLite treats a missing or empty file as a new database, and reads a truncated one until it
reaches a page that is not there. The 100-byte header (https://sqlite.org/fileformat.html)
says enough to refuse both without reading further: the magic string, the page size and, when
it is current (its change counter matches "version-valid-for"), how many pages the file holds.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

from edgeloop.cloud.errors import WorkspaceDamaged

__all__ = ["check_database_file", "opened", "closed"]

# Files this process has an SQLite connection to. Their header is never read again with a plain
# open(): closing any descriptor of a file drops every POSIX lock this process holds on it,
# SQLite's included, and a connection that lost its locks corrupts the database under a
# concurrent writer (https://sqlite.org/howtocorrupt.html, section 2.2). A file already open
# here was checked when it was first opened, and SQLite guards it from then on.
_OPEN: dict[str, int] = {}
_OPEN_LOCK = threading.Lock()


def _key(path: Path) -> str:
    return os.path.realpath(path)


def opened(path: Path) -> None:
    with _OPEN_LOCK:
        _OPEN[_key(path)] = _OPEN.get(_key(path), 0) + 1


def closed(path: Path) -> None:
    with _OPEN_LOCK:
        left = _OPEN.get(_key(path), 0) - 1
        if left > 0:
            _OPEN[_key(path)] = left
        else:
            _OPEN.pop(_key(path), None)

MAGIC = b"SQLite format 3\x00"
HEADER = 100


def check_database_file(path: Path) -> None:
    """Nothing for a missing or empty file (a new database) or one whose header is consistent
    with its size. Raises WorkspaceDamaged for anything else: not a database, or truncated.
    A file this process already has open through SQLite is not read again (see _OPEN)."""
    with _OPEN_LOCK:
        if _key(path) in _OPEN:
            return
    try:
        size = path.stat().st_size
        if size == 0:
            return
        with path.open("rb") as f:
            header = f.read(HEADER)
    except FileNotFoundError:
        return
    except OSError as e:
        raise WorkspaceDamaged(f"cannot read {path}: {e}") from None
    fix = "restore it from a backup (move this file aside first; nothing was changed)"
    if len(header) < HEADER or not header.startswith(MAGIC):
        raise WorkspaceDamaged(f"{path} is not an SQLite database ({size} bytes, no SQLite header): {fix}")
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    change_counter, pages, valid_for = (struct.unpack(">I", header[o:o + 4])[0] for o in (24, 28, 92))
    if page_size < 512 or page_size & (page_size - 1):
        raise WorkspaceDamaged(f"{path} is corrupt (page size {page_size} in its header): {fix}")
    if change_counter == valid_for and pages and size < pages * page_size:
        raise WorkspaceDamaged(f"{path} is truncated: {size} bytes, its header says {pages * page_size}: {fix}")
