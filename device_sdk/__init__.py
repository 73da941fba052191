"""The device agent: MQTT, OTA verify/install, runtimes, telemetry.

Device code imports :mod:`contracts` and third-party device libraries only; it never imports
:mod:`cloud` or :mod:`fleet` (a test enforces this).
"""

from edgeloop.device_sdk.agent import Agent, AgentConfig

__all__ = ["Agent", "AgentConfig"]
