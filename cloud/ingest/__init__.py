"""Ingest: the control plane's MQTT session, the telemetry, status and error ingest, and its checks."""
