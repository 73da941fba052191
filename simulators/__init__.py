"""Simulated devices, networks, faults and data streams for tests and demos.

Simulated devices run the real :class:`edgeloop.device_sdk.Agent` against a real broker; only the
hardware and the inputs are simulated.
"""
