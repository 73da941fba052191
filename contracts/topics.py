"""The MQTT topic scheme, version 2 (docs/contracts/mqtt.md).

Every topic starts with ``edgeloop/v2/<fleet>/``: one broker can carry several fleets (one per
workspace) and none sees another's devices, announcements, telemetry or statuses. A
:class:`Fleet` is the scheme bound to one fleet id; every topic comes from one::

    topics = Fleet("acme")
    topics.status("gw-1")          # edgeloop/v2/acme/devices/gw-1/status
    topics.announce("edge-gateway") # edgeloop/v2/acme/updates/edge-gateway

Devices publish only under their own ``devices/<device_id>/`` prefix of their own fleet and
subscribe only to that fleet's ``updates/<tier>`` and their own ``devices/<device_id>/cmd``,
``.../blocks``, ``.../telemetry/ack`` and ``.../time``, which a per-device broker ACL on the client's identity
can enforce (fleet/broker.py).

Fleet ids are validated like tiers (``[a-z0-9-]``, up to 32, starting alphanumeric); device ids
are 1-64 of ``[A-Za-z0-9_.-]``, starting alphanumeric. A malformed id raises ValueError: no topic
is ever built from one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROOT = "edgeloop/v2"
DEFAULT_FLEET = "default"           # the fleet of a workspace (or device) configured without one
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TIER = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_DEVICE_KINDS = frozenset({"cmd", "status", "telemetry", "errors", "telemetry/ack", "blocks", "blocks/req",
                           "time", "time/req"})

__all__ = [
    "DEFAULT_FLEET",
    "Fleet",
    "ROOT",
    "assignment_path",
    "for_fleet",
    "valid_device_id",
    "valid_fleet",
    "valid_tier",
]


def valid_device_id(device_id: str) -> bool:
    """Device ids are 1-64 characters of ``[A-Za-z0-9_.-]``, starting alphanumeric."""
    return isinstance(device_id, str) and bool(_DEVICE_ID.fullmatch(device_id))


def valid_tier(tier: str) -> bool:
    return isinstance(tier, str) and bool(_TIER.fullmatch(tier))


def valid_fleet(fleet: str) -> bool:
    """Fleet ids follow the tier rule: 1-32 of ``[a-z0-9-]``, starting alphanumeric."""
    return valid_tier(fleet)


def _check_device(device_id: str) -> str:
    if not valid_device_id(device_id):
        raise ValueError(f"invalid device id {device_id!r}: use 1-64 of [A-Za-z0-9_.-]")
    return device_id


@dataclass(frozen=True)
class Fleet:
    """The topic scheme of one fleet. Raises ValueError for a malformed fleet id."""

    name: str

    def __post_init__(self) -> None:
        if not valid_fleet(self.name):
            raise ValueError(f"invalid fleet id {self.name!r}: use 1-32 of [a-z0-9-], starting alphanumeric")

    @property
    def prefix(self) -> str:
        """``edgeloop/v2/<fleet>``: everything of this fleet is under it."""
        return f"{ROOT}/{self.name}"

    def everything(self) -> str:
        """The filter for every topic of this fleet (the control plane's ACL scope)."""
        return f"{self.prefix}/#"

    def _device(self, device_id: str, kind: str) -> str:
        return f"{self.prefix}/devices/{_check_device(device_id)}/{kind}"

    def announce(self, tier: str) -> str:
        """Cloud -> devices of a tier: the current update (retained, QoS 1)."""
        if not valid_tier(tier):
            raise ValueError(f"invalid tier name {tier!r}")
        return f"{self.prefix}/updates/{tier}"

    def announce_all(self) -> str:
        return f"{self.prefix}/updates/+"

    def command(self, device_id: str) -> str:
        """Cloud -> one device: commands (QoS 1, not retained)."""
        return self._device(device_id, "cmd")

    def status(self, device_id: str) -> str:
        """Device -> cloud: the device's current state (retained, QoS 1, also its last will)."""
        return self._device(device_id, "status")

    def telemetry(self, device_id: str) -> str:
        """Device -> cloud: telemetry windows (QoS 1, not retained)."""
        return self._device(device_id, "telemetry")

    def telemetry_ack(self, device_id: str) -> str:
        """Cloud -> device: which telemetry records the ingest has stored (QoS 0, not retained)."""
        return self._device(device_id, "telemetry/ack")

    def errors(self, device_id: str) -> str:
        """Device -> cloud: error reports, one per failure (QoS 1, not retained)."""
        return self._device(device_id, "errors")

    def block_requests(self, device_id: str) -> str:
        """Device -> cloud: requests for repository file blocks (QoS 1)."""
        return self._device(device_id, "blocks/req")

    def blocks(self, device_id: str) -> str:
        """Cloud -> device: the blocks it asked for (QoS 1, binary)."""
        return self._device(device_id, "blocks")

    def time_request(self, device_id: str) -> str:
        """Device -> cloud: a nonce for the control plane to sign the time over (QoS 0)."""
        return self._device(device_id, "time/req")

    def time(self, device_id: str) -> str:
        """Cloud -> device: the signed time answering its nonce (QoS 0, not retained)."""
        return self._device(device_id, "time")

    def time_requests_all(self) -> str:
        return f"{self.prefix}/devices/+/time/req"

    def status_all(self) -> str:
        return f"{self.prefix}/devices/+/status"

    def telemetry_all(self) -> str:
        return f"{self.prefix}/devices/+/telemetry"

    def errors_all(self) -> str:
        return f"{self.prefix}/devices/+/errors"

    def block_requests_all(self) -> str:
        return f"{self.prefix}/devices/+/blocks/req"

    def device_from_topic(self, topic: str) -> str | None:
        """The device id in one of this fleet's ``devices/<id>/<kind>`` topics, or None if the
        topic is not one (another fleet's, another version's, a wildcard, an unknown kind)."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            return None
        device, _, kind = topic[len(head):].partition("/")
        return device if kind in _DEVICE_KINDS and valid_device_id(device) else None


def for_fleet(fleet: str) -> Fleet:
    """The topic scheme of ``fleet``. Raises ValueError for a malformed fleet id."""
    return Fleet(fleet)


def assignment_path(group: str, target: str) -> str:
    """The director repository's target name for "devices of ``group`` install ``target``"."""
    if not valid_device_id(group):
        raise ValueError(f"invalid group name {group!r}")
    return f"assignments/{group}/{target}"
