"""The fleet registry: what the control plane knows about each device beyond its last status.

cloud/registry.py owns the ``devices`` table and writes each device's latest status into it
(state, model version, update, reason, first and last seen). This module adds the fleet's
columns to that table (sqlite-utils ``add_missing_columns``, so older registries gain them
when first opened here), and reads devices back with filters:

    hardware              hardware profile, for example ``rpi4-4gb``
    tags                  JSON object of string tags, ``{"site": "berlin"}``
    groups                JSON list of group names
    target_model_version  the version a rollout wants the device to run
    enrolled_at           when its certificate was issued
    cert_serial           the certificate's serial number, hex
    cert_fingerprint      sha256 of the certificate (DER), hex
    cert_not_after        when the certificate expires
    revoked, revoked_at   1 once its certificate is on the CRL

Rules:

- A device is *enrolled* when it has a certificate serial; enrolling it again is refused.
  A device known only from its status messages (a fleet without TLS) can be enrolled.
- A newly enrolled device, never heard from, has state ``offline`` and no last-seen time.
- *Online* is derived, never stored: the last status is not ``offline`` (the broker
  publishes a device's last will, ``offline``, when its connection drops) and the device was
  heard from within ``online_window_s`` (heartbeats on the status topic refresh last seen),
  so a device whose will was lost still turns offline.
- *Last error* is the device's newest error report.
- Filters combine with AND: a tag filter ``k=v`` matches devices whose tag ``k`` is ``v``; a
  group filter matches members of that group.

Every operation holds the registry's lock, as :class:`~cloud.registry.Registry`'s own do.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from cloud.errors import NotFound, UserError
from cloud.registry import Registry

ONLINE_WINDOW_S = 150.0     # 2.5 default heartbeats (device_sdk AgentConfig.heartbeat_s = 60)

# a typed sample per column, which is how add_missing_columns picks each column's type
_COLUMNS: dict[str, Any] = {"hardware": "", "tags": "", "groups": "", "target_model_version": "",
                            "enrolled_at": 0.0, "cert_serial": "", "cert_fingerprint": "",
                            "cert_not_after": 0.0, "revoked": 0, "revoked_at": 0.0}

__all__ = ["DeviceFilter", "EnrolledDevice", "FleetRegistry", "ONLINE_WINDOW_S"]


@dataclass(frozen=True)
class EnrolledDevice:
    device_id: str
    cert_serial: str
    cert_fingerprint: str
    cert_not_after: float
    tier: str | None = None
    hardware: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceFilter:
    """Which devices to list; None or empty means "any"."""

    tier: str | None = None
    state: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    group: str | None = None
    online: bool | None = None
    revoked: bool | None = None


class FleetRegistry:
    def __init__(self, registry: Registry, online_window_s: float = ONLINE_WINDOW_S) -> None:
        self.registry = registry
        self.db = registry.db
        self._lock = registry._lock          # the registry's own lock: one writer at a time
        self.online_window_s = online_window_s
        with self._lock:
            self.db.table("devices").add_missing_columns([_COLUMNS])
            self.db.table("device_errors").create_index(["device_id", "id"], if_not_exists=True)

    # -- writes -------------------------------------------------------------------------------
    def enroll(self, device: EnrolledDevice) -> None:
        """Record an enrolled device. Raises UserError if it is already enrolled; then nothing changed."""
        values = {"tier": device.tier, "hardware": device.hardware, "tags": json.dumps(device.tags, sort_keys=True),
                  "groups": json.dumps(list(device.groups)), "enrolled_at": time.time(), "revoked": 0,
                  "cert_serial": device.cert_serial, "cert_fingerprint": device.cert_fingerprint,
                  "cert_not_after": device.cert_not_after}
        with self._lock, self.db.conn:       # one transaction: check and write together
            # a device already known from its status keeps its state and tier if none is given
            sets = ", ".join(f"{k} = coalesce(?, {k})" if k == "tier" else f"{k} = ?" for k in values)
            cur = self.db.execute(f"update devices set {sets} where device_id = ? and cert_serial is null",
                                  [*values.values(), device.device_id])
            if cur.rowcount:
                return
            columns = ["device_id", "state", *values]
            try:
                self.db.execute(f"insert into devices ({', '.join(columns)}) values ({', '.join('?' * len(columns))})",
                                [device.device_id, "offline", *values.values()])
            except sqlite3.IntegrityError:
                raise UserError(f"device {device.device_id!r} is already enrolled") from None

    def mark_revoked(self, device_id: str) -> None:
        with self._lock, self.db.conn:
            self.db.execute("update devices set revoked = 1, revoked_at = ? where device_id = ?",
                            [time.time(), device_id])

    def set_target(self, device_ids: Iterable[str], model_version: str | None) -> int:
        """Record the model version a rollout wants these devices to run. Returns how many exist."""
        ids = list(device_ids)
        with self._lock, self.db.conn:
            return sum(self.db.execute("update devices set target_model_version = ? where device_id = ?",
                                       [model_version, d]).rowcount for d in ids)

    # -- reads --------------------------------------------------------------------------------
    def enrolled(self, device_id: str) -> dict[str, Any] | None:
        """The device's certificate fields if it is enrolled, else None."""
        with self._lock:
            rows = list(self.db.query("select device_id, cert_serial, cert_fingerprint, cert_not_after, revoked, "
                                      "revoked_at from devices where device_id = ? and cert_serial is not null",
                                      [device_id]))
        return rows[0] if rows else None

    def devices(self, where: DeviceFilter = DeviceFilter(), now: float | None = None) -> list[dict[str, Any]]:
        """Devices matching ``where``, by device id, with ``online`` and ``last_error`` filled in."""
        since = (time.time() if now is None else now) - self.online_window_s
        sql, args = _select(since, where)
        with self._lock:
            rows = list(self.db.query(sql, args))
        return [_decode(r) for r in rows]

    def device(self, device_id: str) -> dict[str, Any]:
        """One device; raises NotFound."""
        sql, args = _select(time.time() - self.online_window_s, DeviceFilter(), device_id)
        with self._lock:
            rows = list(self.db.query(sql, args))
        if not rows:
            raise NotFound(f"no device {device_id!r} (see: edgeloop devices)")
        return _decode(rows[0])


_ONLINE = "(d.state is not null and d.state != 'offline' and coalesce(d.last_seen, 0) >= ?)"


def _select(since: float, where: DeviceFilter, device_id: str | None = None) -> tuple[str, list[Any]]:
    sql = (f"select d.*, {_ONLINE} as online, "
           "(select e.code || ': ' || e.message from device_errors e where e.device_id = d.device_id "
           "order by e.id desc limit 1) as last_error, "
           "(select coalesce(e.ts, e.received_at) from device_errors e where e.device_id = d.device_id "
           "order by e.id desc limit 1) as last_error_at "
           "from devices d where 1=1")
    args: list[Any] = [since]
    for column, value in (("device_id", device_id), ("tier", where.tier), ("state", where.state)):
        if value:
            sql, args = sql + f" and d.{column} = ?", args + [value]
    for key, value in where.tags.items():
        sql, args = sql + " and exists (select 1 from json_each(d.tags) where key = ? and value = ?)", \
            args + [key, value]
    if where.group:
        sql, args = sql + " and exists (select 1 from json_each(d.groups) where value = ?)", args + [where.group]
    if where.online is not None:
        sql, args = sql + f" and {_ONLINE} = ?", args + [since, int(where.online)]
    if where.revoked is not None:
        sql, args = sql + " and coalesce(d.revoked, 0) = ?", args + [int(where.revoked)]
    return sql + " order by d.device_id", args


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row["tags"] = json.loads(row["tags"]) if row.get("tags") else {}
    row["groups"] = json.loads(row["groups"]) if row.get("groups") else []
    row["online"] = bool(row["online"])
    row["revoked"] = bool(row.get("revoked"))
    row["enrolled"] = row.get("cert_serial") is not None
    return row
