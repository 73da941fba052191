"""Bounds on TUF metadata: one table that the repository never signs past and the device never
downloads past.

Both sides read :data:`LIMITS`: ``cloud/release/signing.py`` refuses to write a metadata file
larger than its role's cap or a role with more than ``max_keys_per_role`` keys, and
``device_sdk/tuf_fetch.py`` gives the same caps to ``tuf.ngclient``. A cap is only the
fallback for a file whose length nothing signed: the repository's timestamp records the
length and sha256 of the snapshot it points to and the snapshot those of ``targets.json``,
so a stream longer than the signed length is cut there. Only ``root.json`` versions and
``timestamp.json`` are always fetched against their caps.

How the caps are derived (non-compact JSON as ``cloud/release/signing.py`` writes it; an
Ed25519 key entry with its role membership is ~360 B, a signature ~150 B; measured by
``tests/test_signed_bounds.py::test_the_largest_metadata_the_repository_may_sign_fits_its_cap``):

===========  ==========  ================================================================
role         cap         worst case the repository may sign
===========  ==========  ================================================================
root         32 KiB      8 keys for each of the 4 roles, signed by 8 old and 8 new root
                         keys during a root rotation: ~14 KiB, doubled for long versions,
                         expiry strings and future fields
timestamp    4 KiB       one snapshot entry (version, length, sha256), 8 signatures: ~2.2 KiB
snapshot     4 KiB       one ``targets.json`` entry (no delegations), 8 signatures: ~2.2 KiB
targets      4 MiB       ~310 B per target (path, length, sha256, custom): ~13,000 targets;
                         the repository refuses to sign more (prune old targets)
===========  ==========  ================================================================

``max_root_rotations`` is python-tuf's per-refresh bound on root versions walked;
``root_refreshes`` is how many refreshes one fetch takes while a longer chain of root
versions continues (each persists the newest root it trusted, so the next fetch goes on
from there).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MetadataLimits", "LIMITS", "ROLES"]

ROLES = ("root", "timestamp", "snapshot", "targets")


@dataclass(frozen=True)
class MetadataLimits:
    root_max_bytes: int = 32 * 1024
    timestamp_max_bytes: int = 4 * 1024
    snapshot_max_bytes: int = 4 * 1024
    targets_max_bytes: int = 4 * 1024 * 1024
    max_keys_per_role: int = 8
    max_root_rotations: int = 256      # root versions walked per refresh (python-tuf's default)
    root_refreshes: int = 4            # refreshes per fetch while the root chain continues

    def max_bytes(self, role: str) -> int:
        """The cap of one top-level role's metadata file. Raises KeyError for another name."""
        return {"root": self.root_max_bytes, "timestamp": self.timestamp_max_bytes,
                "snapshot": self.snapshot_max_bytes, "targets": self.targets_max_bytes}[role]


LIMITS = MetadataLimits()
