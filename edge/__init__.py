"""The edge-gateway runtime (edge/gateway.py): the device agent plus local inference."""
