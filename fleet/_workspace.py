"""Opening the workspace (and its registry) a command names; times for people.

Every time the CLI shows a person is :func:`when` (ISO 8601 UTC and how long ago) or, in a
narrow table column, :func:`ago`; ``--json`` keeps the epoch seconds.
"""

from __future__ import annotations

import argparse
import time

from edgeloop.cloud.workspace import Workspace

__all__ = ["ago", "iso", "open_registry", "open_workspace", "when"]


def open_workspace(args: argparse.Namespace) -> Workspace:
    return Workspace.open(args.workspace).with_mqtt(args.mqtt)


def open_registry(ws: Workspace):  # noqa: ANN202
    from edgeloop.cloud.registry import Registry
    return Registry(ws.store_location)


def iso(ts: float | None) -> str:
    """Epoch seconds as ISO 8601 UTC to the second (``2026-12-03T13:40:05Z``); ``-`` for none."""
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def ago(ts: float | None, now: float | None = None) -> str:
    """How long ago ``ts`` was (``45 s ago``, ``3 min ago``, ``5 h ago``, ``2 d ago``), or how
    far ahead (``in 3 min``); ``-`` for none."""
    if ts is None:
        return "-"
    delta = (time.time() if now is None else now) - ts
    s = abs(delta)
    span = f"{int(s)} s" if s < 120 else f"{round(s / 60)} min" if s < 7200 else f"{round(s / 3600)} h" \
        if s < 172800 else f"{round(s / 86400)} d"
    return f"{span} ago" if delta >= 0 else f"in {span}"


def when(ts: float | None, now: float | None = None) -> str:
    """``2026-12-03T13:40:05Z (3 min ago)``; ``-`` for none."""
    return "-" if ts is None else f"{iso(ts)} ({ago(ts, now)})"
