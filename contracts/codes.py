"""The codes a device reports when an update does not install, or a fault on its status topic:
one enum, shared by both sides.

A code travels in ``edgeloop.error/1`` reports and in the install history; its wire value is
stable (``family.reason``). Each code says what the cloud may do about it:

===================  =========  ==============================================================
code                 retry      meaning
===================  =========  ==============================================================
verify.metadata      no         snapshot/targets bytes a signed hash pins fail their signature or threshold
verify.director      no         the director does not assign it, or the repositories disagree
verify.hash          yes        the downloaded package's length or sha256 is not the signed one (a mirror can do it)
verify.package       no         the package's own manifest or files are malformed
verify.mismatch      no         the package is not what the announcement said (model, tier)
verify.tier          no         the command names another tier than the device's
health.load          no         the runtime could not load the model
health.golden        no         golden vectors gave the wrong outputs
health.latency       no         inference is over the package's latency budget
health.unknown       no         rolled back, and the device sent no code (cloud-side default)
transport.download   yes        the package or its metadata could not be fetched: network trouble
agent.internal       yes        the agent failed in a way that is not about this update
storage.write        yes        the device's own storage failed (another I/O error)
storage.full         yes        the device's state folder is full (ENOSPC, EDQUOT)
storage.readonly     yes        the device's state folder is read-only (EROFS, EACCES, EPERM)
clock.skewed         yes        the device's clock is off the control plane's signed time (status fault)
install.unknown      no         failed, and the device sent no code (cloud-side default)
rollback.none        no         a rollout aborted and the device has nothing to roll back to (cloud-side)
package.too_large    no         the package's SIGNED length is over the device's max_package_bytes
metadata.too_large   yes        a metadata file was longer than its signed length or its role's cap
metadata.corrupt     yes        metadata bytes that do not parse, do not match the signed length/hash, or
                                (timestamp, root versions: nothing pins them) are not signed by trusted keys
metadata.stale       yes        expired metadata, or a timestamp or root older than the device's (a lagging
                                mirror, a replay, a repository not re-signed yet, a wrong clock)
metadata.no_root     yes        the device has no trusted root of a repository yet (retried once it has)
metadata.root_chain  yes        more root versions than one fetch walks: the next fetch goes on
===================  =========  ==============================================================

**Refusal classes.** "retry" is also how the device treats a refusal: ``no`` is *definitive*
(the signed metadata says no: wrong tier, repositories disagree, a bad signature over bytes a
signed hash pins, signed length over the limit, an unhealthy model): the update id is
remembered and never tried again. ``yes`` is *transient* (a mirror or the network can cause it:
bytes corrupted or cut in transit, endless streams, an old, expired or forged timestamp or root
version, fetch failures, time-outs, a root chain still being walked): the device tries again after ``AgentConfig.retry_delays_s`` (1, 2, 4, 8,
16 s: six tries in ~31 s), then reports the code with state ``failed`` and forgets it, so the
same update announced again (a re-sent command, the retained announcement after a reconnect)
is tried afresh.

A device that reports no code gets ``health.unknown`` (it rolled back) or ``install.unknown``: the
reason text is never parsed for a code. "retry" is whether sending the *same* update again may succeed; a rollout retries those up to
its ``retries`` bound. No decision is ever taken on a code's spelling: ask :func:`retryable`.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErrorCode", "retryable", "RETRYABLE"]


class ErrorCode(StrEnum):
    VERIFY_METADATA = "verify.metadata"
    VERIFY_DIRECTOR = "verify.director"
    VERIFY_HASH = "verify.hash"
    VERIFY_PACKAGE = "verify.package"
    VERIFY_MISMATCH = "verify.mismatch"
    VERIFY_TIER = "verify.tier"
    HEALTH_LOAD = "health.load"
    HEALTH_GOLDEN = "health.golden"
    HEALTH_LATENCY = "health.latency"
    HEALTH_UNKNOWN = "health.unknown"
    TRANSPORT_DOWNLOAD = "transport.download"
    AGENT_INTERNAL = "agent.internal"
    STORAGE_WRITE = "storage.write"
    STORAGE_FULL = "storage.full"
    STORAGE_READONLY = "storage.readonly"
    CLOCK_SKEWED = "clock.skewed"
    INSTALL_UNKNOWN = "install.unknown"
    ROLLBACK_NONE = "rollback.none"
    # signed bounds and refusal classes (docs/ota.md)
    PACKAGE_TOO_LARGE = "package.too_large"
    METADATA_TOO_LARGE = "metadata.too_large"
    METADATA_CORRUPT = "metadata.corrupt"
    METADATA_STALE = "metadata.stale"
    METADATA_NO_ROOT = "metadata.no_root"
    METADATA_ROOT_CHAIN = "metadata.root_chain"

    @property
    def retryable(self) -> bool:
        """Transient: the same update may succeed later (the device retries it, the cloud may resend it)."""
        return self in RETRYABLE


RETRYABLE: frozenset[ErrorCode] = frozenset({ErrorCode.TRANSPORT_DOWNLOAD, ErrorCode.AGENT_INTERNAL,
                                             ErrorCode.STORAGE_WRITE, ErrorCode.STORAGE_FULL,
                                             ErrorCode.STORAGE_READONLY, ErrorCode.CLOCK_SKEWED,
                                             # refusals a mirror or the network can cause
                                             ErrorCode.VERIFY_HASH, ErrorCode.METADATA_TOO_LARGE,
                                             ErrorCode.METADATA_CORRUPT, ErrorCode.METADATA_STALE,
                                             ErrorCode.METADATA_NO_ROOT,
                                             ErrorCode.METADATA_ROOT_CHAIN})


def retryable(code: str | None) -> bool:
    """Whether the same update may succeed if sent again. An unknown code (from a newer device)
    is not retried: a retry decision the cloud cannot justify is not taken."""
    if code is None:
        return False
    try:
        return ErrorCode(code) in RETRYABLE
    except ValueError:
        return False
