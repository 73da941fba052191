"""The fleet registry: what the control plane knows about each device beyond its last status.

The store (cloud.store) owns the ``devices`` table and writes each device's latest status into
it (state, model version, update, reason, first and last seen). This module enrols devices,
revokes them, records rollout targets, and reads devices back with filters, through the
store's operations; the fleet's columns of that table:

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

Every operation is one store operation (atomic, thread-safe).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from edgeloop.cloud.errors import NotFound
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.store import DeviceFilter

ONLINE_WINDOW_S = 150.0     # 2.5 default heartbeats (device_sdk AgentConfig.heartbeat_s = 60)

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


class FleetRegistry:
    def __init__(self, registry: Registry, online_window_s: float = ONLINE_WINDOW_S) -> None:
        self.registry = registry
        self.online_window_s = online_window_s

    # -- writes -------------------------------------------------------------------------------
    def enroll(self, device: EnrolledDevice) -> None:
        """Record an enrolled device. Raises UserError if it is already enrolled; then nothing changed."""
        self.registry.enroll_device(device.device_id, {
            "tier": device.tier, "hardware": device.hardware, "tags": json.dumps(device.tags, sort_keys=True),
            "groups": json.dumps(list(device.groups)), "enrolled_at": time.time(), "revoked": 0,
            "cert_serial": device.cert_serial, "cert_fingerprint": device.cert_fingerprint,
            "cert_not_after": device.cert_not_after})

    def mark_revoked(self, device_id: str) -> None:
        self.registry.mark_revoked(device_id)

    def set_target(self, device_ids: Iterable[str], model_version: str | None) -> int:
        """Record the model version a rollout wants these devices to run. Returns how many exist."""
        return self.registry.set_target(device_ids, model_version)

    # -- reads --------------------------------------------------------------------------------
    def enrolled(self, device_id: str) -> dict[str, Any] | None:
        """The device's certificate fields if it is enrolled, else None."""
        return self.registry.enrolled(device_id)

    def devices(self, where: DeviceFilter = DeviceFilter(), now: float | None = None) -> list[dict[str, Any]]:
        """Devices matching ``where``, by device id, with ``online`` and ``last_error`` filled in."""
        return self.registry.fleet_devices(where, (time.time() if now is None else now) - self.online_window_s)

    def device(self, device_id: str) -> dict[str, Any]:
        """One device; raises NotFound."""
        rows = self.registry.fleet_devices(DeviceFilter(), time.time() - self.online_window_s, device_id)
        if not rows:
            raise NotFound(f"no device {device_id!r} (see: edgeloop devices)")
        return rows[0]
