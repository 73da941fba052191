"""Resolve and fetch an update through two TUF repositories (the Uptane split).

The *director* says which package this device's group must install: its targets metadata
lists ``assignments/<group>/<package path>`` with the package's length and hashes. The *image*
repository holds every package. :meth:`UpdateClient.fetch` refreshes both with
``tuf.ngclient`` (each from its own trusted root), requires the director to assign the
announced package to this device's group and the image repository to sign the same length
and hashes, then downloads the package from the image repository through a
:class:`~device_sdk.fetcher.ResumableFetcher` and returns verified bytes.

Bounds, from signed data only (``edgeloop.contracts.metadata_limits.LIMITS``, one table for
the repository and the device): every metadata file is read against the length its parent
signs (the timestamp records the snapshot's, the snapshot ``targets.json``'s) or, unsigned,
its role's cap, so an endless stream is cut there; the package's SIGNED length (both
repositories agreeing) is compared with ``max_bytes`` before a byte of it is downloaded.

Every failure becomes an :class:`UpdateRefused` whose code names what was wrong, or a
:class:`TransientError` (network trouble; the download resumes on the next attempt). Whether a
refusal is remembered or retried is its code's class (``ErrorCode.retryable``,
contracts/codes.py): metadata or package bytes that are cut, endless, garbled or not the signed
ones are transient (a mirror can cause them); what verified metadata says is definitive.

A chain of root versions longer than python-tuf walks in one refresh
(``max_root_rotations``) is walked over several refreshes, each persisting the newest root it
trusted (``root_refreshes`` per fetch, then ``metadata.root_chain``: the next fetch goes on).

Expiry is judged at ``clock()`` (the agent's :class:`~device_sdk.clock.TrustedClock`: the control
plane's signed time once the device has it, within its round-trip bound), not at the device's
wall clock: python-tuf 7 reads the time once, as ``TrustedMetadataSet.reference_time`` when an
Updater is made, and that one attribute is set right after (:func:`_judge_at`).

Device layout (``<state>/tuf``)::

    image/metadata/root.json      trusted image root (provisioned), then newer versions
    director/metadata/root.json   trusted director root (provisioned)
    image/targets/                verified packages
    partial/                      resumable partial downloads
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TypeVar

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.api.serialization import DeserializationError
from tuf.ngclient import Updater, UpdaterConfig

from edgeloop.contracts.codes import ErrorCode
from edgeloop.contracts.metadata_limits import LIMITS, MetadataLimits
from edgeloop.contracts.delta import apply_delta
from edgeloop.contracts.errors import ContractError
from edgeloop.contracts.messages import Announce
from edgeloop.contracts.topics import assignment_path
from edgeloop.device_sdk.errors import TransientError, UpdateRefused
from edgeloop.device_sdk.fetcher import ResumableFetcher
from edgeloop.device_sdk.mqtt_fetcher import MqttBlockFetcher
from tuf.ngclient.fetcher import FetcherInterface
from edgeloop.device_sdk.storage import atomic_write

log = logging.getLogger("edgeloop.agent.update")

__all__ = ["UpdateClient", "provision", "updater_config"]


def updater_config(limits: MetadataLimits = LIMITS) -> UpdaterConfig:
    """python-tuf's bounds from the one table (contracts/metadata_limits.py)."""
    return UpdaterConfig(max_root_rotations=limits.max_root_rotations, root_max_length=limits.root_max_bytes,
                         timestamp_max_length=limits.timestamp_max_bytes,
                         snapshot_max_length=limits.snapshot_max_bytes, targets_max_length=limits.targets_max_bytes)


def provision(tuf_dir: Path, image_root: bytes, director_root: bytes) -> None:
    """Install the trusted roots a device starts from (only those it does not have yet)."""
    for repo, root in (("image", image_root), ("director", director_root)):
        path = tuf_dir / repo / "metadata" / "root.json"
        if not path.exists():
            atomic_write(path, root)
    (tuf_dir / "image" / "targets").mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class Resolved:
    target: TargetFile
    custom: dict


class UpdateClient:
    def __init__(self, tuf_dir: Path, group: str, max_bytes: int, read_timeout_s: float = 30.0,
                 fetcher: FetcherInterface | None = None, clock: Callable[[], float] | None = None,
                 limits: MetadataLimits = LIMITS) -> None:
        """``max_bytes``: the largest package this device takes (its signed length is compared).
        ``fetcher``: how bytes travel (default: HTTP with resume). An MQTT block fetcher
        ignores the announced URLs and uses ``mqtt://image`` and ``mqtt://director``.
        ``clock``: the time metadata expiry is judged at (default: the wall clock)."""
        self.tuf_dir = Path(tuf_dir)
        self.clock = clock
        self.group = group
        self.max_bytes = max_bytes
        self.limits = limits
        self.config = updater_config(limits)
        self.fetcher = fetcher or ResumableFetcher(self.tuf_dir / "partial", read_timeout=read_timeout_s)
        self.over_mqtt = isinstance(self.fetcher, MqttBlockFetcher)
        self._tracked = _Tracked(self.fetcher)   # what python-tuf fetched last: the file a failure is about
        self.last_delivery: str | None = None    # "full" or "delta", for reports and tests
        self._started: tuple[Announce, bytes | None] | None = None

    def start(self, announce: Announce, base: bytes | None) -> None:
        """:class:`edgeloop.device_sdk.ports.UpdateFetcher`: remember what :meth:`result` fetches."""
        self._started = (announce, base)

    def result(self) -> bytes | None:
        """The started fetch, done now (blocking). Raises UpdateRefused or TransientError."""
        if self._started is None:
            raise RuntimeError("UpdateClient.result() without start()")
        (announce, base), self._started = self._started, None
        return self.fetch(announce, base)

    def fetch(self, announce: Announce, base: bytes | None = None) -> bytes:
        """Verified bytes of the announced package. Raises UpdateRefused or TransientError.

        With ``base`` (the package now installed) and a delta announced from it, the delta is
        fetched (verified as its own target) and applied; the result must match the full
        package's signed length and hash, else the full package is downloaded instead.
        """
        try:
            return self._fetch(announce, base)
        except UpdateRefused as e:
            if e.code is ErrorCode.VERIFY_HASH or not e.code.retryable:   # bad bytes are never resumed from
                self.discard_partial()
            raise
        # failures no step above classified
        except tuf_exc.DownloadError as e:
            raise TransientError(f"download failed ({type(e).__name__}): {e}") from e
        except tuf_exc.RepositoryError as e:
            raise UpdateRefused(ErrorCode.VERIFY_METADATA, f"{type(e).__name__}: {e}") from e
        except OSError as e:
            raise TransientError(f"cannot reach the repository: {e}") from e

    def discard_partial(self) -> None:
        shutil.rmtree(self.tuf_dir / "partial", ignore_errors=True)

    def _updater(self, repo: str, base_url: str, with_targets: bool) -> Updater:
        meta = self.tuf_dir / repo / "metadata"
        if not (meta / "root.json").exists():
            raise UpdateRefused(ErrorCode.METADATA_NO_ROOT, f"this device has no trusted {repo} root yet "
                                                            "(not provisioned); retried once it has one")
        base = base_url.rstrip("/")
        updater = Updater(metadata_dir=str(meta), metadata_base_url=f"{base}/metadata/",
                          target_dir=str(self.tuf_dir / repo / "targets") if with_targets else None,
                          target_base_url=f"{base}/targets/" if with_targets else None,
                          fetcher=self._tracked, config=self.config, bootstrap=None)
        if self.clock is not None:
            _judge_at(updater, self.clock())
        return updater

    def _refreshed(self, repo: str, base_url: str, with_targets: bool) -> Updater:
        """A refreshed Updater for one repository, walking a long root chain over several
        refreshes. Raises UpdateRefused (code by what failed) or TransientError."""
        for _ in range(self.limits.root_refreshes):
            before = self._trusted_root_version(repo)
            try:
                updater = self._updater(repo, base_url, with_targets)
                updater.refresh()
            except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
                if self._trusted_root_version(repo) - before < self.limits.max_root_rotations:
                    raise _metadata_refusal(repo, e, self._tracked.last_url) from e
                continue                     # refused under an intermediate root: walk on
            if self._trusted_root_version(repo) - before < self.limits.max_root_rotations:
                return updater
        raise UpdateRefused(ErrorCode.METADATA_ROOT_CHAIN,
                            f"the {repo} root chain continues past version {self._trusted_root_version(repo)} "
                            f"({self.limits.root_refreshes} refreshes of {self.limits.max_root_rotations} "
                            "versions each); the next attempt goes on from there")

    def _trusted_root_version(self, repo: str) -> int:
        """The version of the root this device trusts now (python-tuf persisted it)."""
        try:
            version = json.loads((self.tuf_dir / repo / "metadata" / "root.json").read_bytes())["signed"]["version"]
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        return version if isinstance(version, int) else 0

    def _fetch(self, announce: Announce, base: bytes | None = None) -> bytes:
        director = self._refreshed("director", "mqtt://director" if self.over_mqtt else announce.director,
                                   with_targets=False)
        group = announce.group or self.group
        assigned = self._metadata_step("director", lambda: director.get_targetinfo(assignment_path(group, announce.target)))
        if assigned is None:
            raise UpdateRefused(ErrorCode.VERIFY_DIRECTOR, f"the director does not assign {announce.target} "
                                                   f"to group {group} (stale or forged announcement)")
        custom = assigned.custom or {}
        if custom.get("update_id") != announce.update_id:
            raise UpdateRefused(ErrorCode.VERIFY_DIRECTOR, f"the director assigns update {custom.get('update_id')}, "
                                                   f"not the announced {announce.update_id} (replayed announcement)")
        image = self._refreshed("image", "mqtt://image" if self.over_mqtt else announce.repository,
                                with_targets=True)
        signed = self._metadata_step("image", lambda: image.get_targetinfo(announce.target))
        if signed is None:
            raise UpdateRefused(ErrorCode.VERIFY_DIRECTOR, f"the image repository does not back the director's "
                                                   f"assignment of {announce.target}")
        if (signed.length, signed.hashes) != (assigned.length, assigned.hashes):
            raise UpdateRefused(ErrorCode.VERIFY_DIRECTOR, "the director and the image repository disagree on "
                                                   f"{announce.target}'s length or hashes")
        if signed.length > self.max_bytes:
            raise UpdateRefused(ErrorCode.PACKAGE_TOO_LARGE,
                                f"{announce.target} is signed as {signed.length} bytes, over this device's "
                                f"{self.max_bytes} byte limit (nothing downloaded)")
        if base is not None and announce.delta is not None:
            data = self._via_delta(image, announce.delta, base, signed)
            if data is not None:
                return data
        try:
            path = image.find_cached_target(signed) or image.download_target(signed)
        except (tuf_exc.LengthOrHashMismatchError, tuf_exc.DownloadLengthMismatchError) as e:
            raise UpdateRefused(ErrorCode.VERIFY_HASH, f"package does not match its signed length or hash: {e}") from e
        except tuf_exc.DownloadError as e:
            raise TransientError(f"download failed ({type(e).__name__}): {e}") from e
        except tuf_exc.RepositoryError as e:
            raise UpdateRefused(ErrorCode.VERIFY_HASH, f"{type(e).__name__}: {e}") from e
        self.last_delivery = "full"
        return Path(path).read_bytes()

    def _via_delta(self, image: Updater, delta: dict, base: bytes, full: TargetFile) -> bytes | None:
        if hashlib.sha256(base).hexdigest() != delta["base_sha256"]:
            return None
        try:
            info = image.get_targetinfo(delta["target"])
            if info is None or info.length > self.max_bytes:
                return None
            patch = Path(image.find_cached_target(info) or image.download_target(info)).read_bytes()
            data = apply_delta(base, patch)
        except (ContractError, tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            log.warning("delta %s unusable (%s); downloading the full package", delta["target"], e)
            return None
        if len(data) != full.length or hashlib.sha256(data).hexdigest() != full.hashes.get("sha256"):
            log.warning("delta %s did not reproduce the signed package; downloading it in full", delta["target"])
            return None
        self.last_delivery = "delta"
        return data


    def _metadata_step(self, repo: str, step: Callable[[], _T]) -> _T:
        """Run one metadata step (a lookup that may fetch delegated metadata), failures classified."""
        try:
            return step()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            raise _metadata_refusal(repo, e, self._tracked.last_url) from e


_T = TypeVar("_T")


class _Tracked(FetcherInterface):
    """A fetcher that remembers the URL python-tuf asked for last (it verifies each metadata
    file right after fetching it, so a verification failure is about that file)."""

    def __init__(self, inner: FetcherInterface) -> None:
        self.inner = inner
        self.last_url: str | None = None

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.last_url = url
        return self.inner._fetch(url)

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        self.last_url = url
        with self.inner.download_file(url, max_length) as f:
            yield f

    def download_bytes(self, url: str, max_length: int) -> bytes:
        self.last_url = url
        return self.inner.download_bytes(url, max_length)


def _pinned(url: str | None) -> bool:
    """Whether a metadata file's bytes are pinned by a signed length and hash (snapshot and
    targets are; root versions and the timestamp are not: a mirror can alter them freely)."""
    name = (url or "").rsplit("/", 1)[-1]
    return name.endswith((".snapshot.json", ".targets.json"))


def _metadata_refusal(repo: str, e: Exception, url: str | None) -> UpdateRefused | TransientError:
    """What a failed metadata refresh means: a code by what was wrong, transient or definitive
    by that code's class (contracts/codes.py). Verification failures are definitive only for
    bytes a signed hash pins (they are what the repository signed); for a root version or the
    timestamp, a mirror can cause any of them (garbled or forged: ``metadata.corrupt``; older
    than what the device has: ``metadata.stale``). Expiry is always ``metadata.stale``: the
    repository re-signing (or the device's clock being fixed) cures it."""
    name = (url or "?").rsplit("/", 1)[-1]
    what = f"{repo} {name}: {type(e).__name__}: {e}"
    if isinstance(e, tuf_exc.DownloadLengthMismatchError):
        return UpdateRefused(ErrorCode.METADATA_TOO_LARGE, f"{what} (cut at its signed length or role cap)")
    if isinstance(e, tuf_exc.DownloadError):
        return TransientError(f"cannot fetch {what}")
    if isinstance(e, (tuf_exc.LengthOrHashMismatchError, DeserializationError)):
        return UpdateRefused(ErrorCode.METADATA_CORRUPT, what)
    if isinstance(e, tuf_exc.ExpiredMetadataError):      # re-signing (or a fixed clock) cures it
        return UpdateRefused(ErrorCode.METADATA_STALE, what)
    if _pinned(url):
        return UpdateRefused(ErrorCode.VERIFY_METADATA, what)
    if isinstance(e, tuf_exc.BadVersionNumberError):
        return UpdateRefused(ErrorCode.METADATA_STALE, what)
    return UpdateRefused(ErrorCode.METADATA_CORRUPT, what)


def _judge_at(updater: Updater, t: float) -> None:
    """Make ``updater`` judge expiry at ``t`` (python-tuf 7: the trusted set's ``reference_time``,
    read at every expiry check and set once, when the Updater is made; there is no public hook)."""
    trusted = updater._trusted_set   # noqa: SLF001 - the one narrow patch point, see the module doc
    if not hasattr(trusted, "reference_time"):
        raise RuntimeError("this python-tuf has no TrustedMetadataSet.reference_time: update _judge_at")
    trusted.reference_time = datetime.fromtimestamp(t, timezone.utc)
