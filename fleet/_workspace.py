"""Opening the workspace (and its registry) a command names; relative times for people."""

from __future__ import annotations

import argparse
import time

from edgeloop.cloud.workspace import Workspace

__all__ = ["ago", "open_registry", "open_workspace"]


def open_workspace(args: argparse.Namespace) -> Workspace:
    return Workspace.open(args.workspace).with_mqtt(args.mqtt)


def open_registry(ws: Workspace):  # noqa: ANN202
    from edgeloop.cloud.registry import Registry
    return Registry(ws.store_location)


def ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"
