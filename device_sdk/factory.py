"""The real parts of an agent, built from its config (what ``Agent(AgentConfig(...))`` gets).

Each function builds one :mod:`edgeloop.device_sdk.ports` part; a caller that swaps one part (a test, the
swarm) passes its own to :class:`~device_sdk.agent.Agent` and gets these for the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from edgeloop.contracts import topics
from edgeloop.contracts.messages import DeviceState, Status, encode
from edgeloop.device_sdk.fetcher import ResumableFetcher
from edgeloop.device_sdk.mqtt import MqttLink
from edgeloop.device_sdk.mqtt_fetcher import MqttBlockFetcher
from edgeloop.device_sdk.outbox import Outbox, OutboxConfig
from edgeloop.device_sdk.telemetry import SequenceCounter
from edgeloop.device_sdk.tuf_fetch import UpdateClient

if TYPE_CHECKING:
    from edgeloop.device_sdk.agent import AgentConfig
    from edgeloop.device_sdk.ports import Link

__all__ = ["link", "fetcher", "memory_outbox", "outbox", "sequence"]


def link(config: AgentConfig) -> MqttLink:
    """paho over TCP (TLS with ``tls_ca``), last will ``offline``; its network thread unless
    ``config.network_thread`` is false."""
    offline = Status(config.device_id, DeviceState.OFFLINE, config.tier)
    return MqttLink(config.device_id, config.mqtt_host, config.mqtt_port,
                    will=(topics.Fleet(config.fleet).status(config.device_id), encode(offline)), queue_max=config.inbox_max,
                    tls_ca=config.tls_ca, tls_cert=config.tls_cert, tls_key=config.tls_key,
                    threaded=config.network_thread)


def fetcher(config: AgentConfig, link: Link, clock: Callable[[], float] | None = None) -> UpdateClient:
    """python-tuf over two repositories, judging expiry at ``clock()`` (the agent's trusted
    clock); package bytes over HTTP(S) (resumable; an https repository must chain to
    ``config.tls_ca``, the fleet CA the broker's certificate chains to) or MQTT blocks."""
    root = Path(config.state_dir)
    partial = root / "tuf" / "partial"
    if config.transport == "mqtt":
        chosen: MqttBlockFetcher | ResumableFetcher = MqttBlockFetcher(
            link, config.device_id, partial, timeout_s=config.download_timeout_s, fleet=topics.Fleet(config.fleet))
    else:
        chosen = ResumableFetcher(partial, read_timeout=config.download_timeout_s, ca_file=config.tls_ca)
    return UpdateClient(root / "tuf", config.group or config.tier, config.max_package_bytes,
                        read_timeout_s=config.download_timeout_s, fetcher=chosen, clock=clock)


def outbox(config: AgentConfig) -> Outbox:
    """SQLite (WAL) at ``<state>/outbox.db``, bounded by the config. Raises StorageError."""
    return Outbox(Path(config.state_dir) / "outbox.db", OutboxConfig(config.outbox_max_bytes, config.outbox_max_age_s))


def memory_outbox(config: AgentConfig) -> Outbox:
    """The same outbox in memory (lost on exit): for a disk that will not open the real one."""
    return Outbox(Path(":memory:"), OutboxConfig(config.outbox_max_bytes, config.outbox_max_age_s))


def sequence(config: AgentConfig) -> SequenceCounter:
    return SequenceCounter(Path(config.state_dir) / "telemetry.json")
