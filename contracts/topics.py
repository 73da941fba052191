"""The MQTT topic scheme, version 1 (docs/contracts/mqtt.md).

Every topic starts with ``edgeloop/v1/``. Devices publish only under their own
``devices/<device_id>/`` prefix and subscribe only to ``updates/<tier>`` and their own
``devices/<device_id>/cmd``, ``.../blocks`` and ``.../telemetry/ack``, which is what a per-device broker ACL on the client's identity
can enforce.
"""

from __future__ import annotations

import re

ROOT = "edgeloop/v1"
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TIER = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")

__all__ = [
    "ROOT",
    "announce",
    "assignment_path",
    "block_requests",
    "block_requests_all",
    "blocks",
    "announce_all",
    "command",
    "device_from_topic",
    "errors",
    "errors_all",
    "status",
    "status_all",
    "telemetry",
    "telemetry_ack",
    "telemetry_all",
    "valid_device_id",
    "valid_tier",
]


def valid_device_id(device_id: str) -> bool:
    """Device ids are 1-64 characters of ``[A-Za-z0-9_.-]``, starting alphanumeric."""
    return isinstance(device_id, str) and bool(_DEVICE_ID.fullmatch(device_id))


def valid_tier(tier: str) -> bool:
    return isinstance(tier, str) and bool(_TIER.fullmatch(tier))


def _check_device(device_id: str) -> str:
    if not valid_device_id(device_id):
        raise ValueError(f"invalid device id {device_id!r}: use 1-64 of [A-Za-z0-9_.-]")
    return device_id


def announce(tier: str) -> str:
    """Cloud -> devices of a tier: the current update (retained, QoS 1)."""
    if not valid_tier(tier):
        raise ValueError(f"invalid tier name {tier!r}")
    return f"{ROOT}/updates/{tier}"


def announce_all() -> str:
    return f"{ROOT}/updates/+"


def command(device_id: str) -> str:
    """Cloud -> one device: commands (QoS 1, not retained)."""
    return f"{ROOT}/devices/{_check_device(device_id)}/cmd"


def status(device_id: str) -> str:
    """Device -> cloud: the device's current state (retained, QoS 1, also its last will)."""
    return f"{ROOT}/devices/{_check_device(device_id)}/status"


def telemetry(device_id: str) -> str:
    """Device -> cloud: telemetry windows (QoS 1, not retained)."""
    return f"{ROOT}/devices/{_check_device(device_id)}/telemetry"


def telemetry_ack(device_id: str) -> str:
    """Cloud -> device: which telemetry records the ingest has stored (QoS 0, not retained)."""
    return f"{ROOT}/devices/{_check_device(device_id)}/telemetry/ack"


def errors(device_id: str) -> str:
    """Device -> cloud: error reports, one per failure (QoS 1, not retained)."""
    return f"{ROOT}/devices/{_check_device(device_id)}/errors"


def status_all() -> str:
    return f"{ROOT}/devices/+/status"


def telemetry_all() -> str:
    return f"{ROOT}/devices/+/telemetry"


def errors_all() -> str:
    return f"{ROOT}/devices/+/errors"


def device_from_topic(topic: str) -> str | None:
    """The device id in a ``devices/<id>/...`` topic, or None if the topic is not one."""
    parts = topic.split("/")
    if len(parts) in (5, 6) and f"{parts[0]}/{parts[1]}" == ROOT and parts[2] == "devices":
        return parts[3] if valid_device_id(parts[3]) else None
    return None


def assignment_path(group: str, target: str) -> str:
    """The director repository's target name for "devices of ``group`` install ``target``"."""
    if not valid_device_id(group):
        raise ValueError(f"invalid group name {group!r}")
    return f"assignments/{group}/{target}"


def block_requests(device_id: str) -> str:
    """Device -> cloud: requests for repository file blocks (QoS 1)."""
    return f"{ROOT}/devices/{_check_device(device_id)}/blocks/req"


def block_requests_all() -> str:
    return f"{ROOT}/devices/+/blocks/req"


def blocks(device_id: str) -> str:
    """Cloud -> device: the blocks it asked for (QoS 1, binary)."""
    return f"{ROOT}/devices/{_check_device(device_id)}/blocks"
