"""The control plane: training, export, packaging, signing, registry, ingest.

Cloud code may import :mod:`contracts`. Of the device side it imports only
:mod:`device_sdk.runtime` and :mod:`device_sdk.errors`, to measure and health-check packages with
the exact runtime classes devices run (tests/test_layout.py enforces this). Device code never
imports cloud code.
"""
