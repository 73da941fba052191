"""The child side of the power-loss test: install an update, and die where told.

Kept in its own module so a forkserver can import it before forking trials.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from edgeloop.contracts.messages import Announce
from edgeloop.device_sdk.ota import Installer


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def chunked_fetch(package: Path, partial: Path, kill_at_chunk: int | None, chunk: int = 2048):
    """Download ``package`` in chunks, persisting each to ``partial`` first (as the resumable
    fetcher does), resuming from what the partial file already holds."""
    def fetch(announce: Announce) -> bytes:
        data = package.read_bytes()
        have = partial.stat().st_size if partial.exists() else 0
        with open(partial, "ab") as f:
            for i, start in enumerate(range(have, len(data), chunk)):
                if kill_at_chunk is not None and i == kill_at_chunk:
                    die()
                f.write(data[start:start + chunk])
                f.flush()
                os.fsync(f.fileno())
        out = partial.read_bytes()
        partial.unlink()
        return out
    return fetch


def run(device: str, tier: str, announce: dict, package: str, kill_at_transition: int | None,
        kill_at_chunk: int | None, started: float) -> None:
    root = Path(device)
    seen = [0]

    def on_state(state, update_id) -> None:
        if kill_at_transition is not None and seen[0] == kill_at_transition:
            die()             # right after the state was persisted
        seen[0] += 1

    installer = Installer(root, tier, 1 << 22, on_state=on_state)
    resume = installer.recover()
    target = resume or Announce.from_obj(announce)
    installer.install(target, chunked_fetch(Path(package), root / "partial.bin", kill_at_chunk))
    os._exit(0)
