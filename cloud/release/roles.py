"""The top-level TUF roles every repository signs with, in the specification's order.

Apart from :mod:`edgeloop.cloud.release.signing` so that the command line can name them (``keys
init --root-keys``) without importing tuf and cryptography at start-up.
"""

from __future__ import annotations

__all__ = ["ROLES"]

ROLES = ("root", "targets", "snapshot", "timestamp")
