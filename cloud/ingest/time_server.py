"""The control plane's time server: signed time for devices whose clocks may be wrong.

A device sends ``edgeloop.time_request/1`` (its id and a fresh nonce) on
``devices/<id>/time/req``; :meth:`TimeServer.answer` returns ``edgeloop.time/1``: the id, the
nonce and this machine's time, signed over :func:`~contracts.messages.time_signing_bytes` by the
director's ``timestamp`` keys. Devices check it against the director root they trust
(device_sdk/clock.py), as Uptane's time server is checked. The timestamp keys are the director's
online keys already (the rollout controller signs with them), so this adds no key to keep; after
a rotation of them (a new director root version) the server signs with the new keys, which devices
learn from the new root on their next refresh.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Protocol

from edgeloop.contracts.messages import SignedTime, TimeRequest, time_signing_bytes

if TYPE_CHECKING:
    from edgeloop.cloud.release.signing import Repository

__all__ = ["TimeServer"]


class _Signature(Protocol):
    keyid: str
    signature: str


class _Signer(Protocol):          # securesystemslib's Signer, as far as this needs it
    def sign(self, payload: bytes) -> _Signature: ...


class TimeServer:
    def __init__(self, signers: list[_Signer], clock: Callable[[], float] = time.time,
                 director: Repository | None = None) -> None:
        """``signers``: the director's timestamp keys (at least its threshold of them);
        ``director``: reload them from it whenever its root version changes."""
        self.signers = signers
        self.clock = clock
        self.answered = 0
        self._director = director
        self._root_version = _root_version(director) if director is not None else 0

    @classmethod
    def for_director(cls, director: Repository) -> TimeServer | None:
        """The time server signing with ``director``'s timestamp keys; None for a director that
        is not initialised yet. Raises UserError when fewer than its threshold of keys are here."""
        if not director.initialized:
            return None
        return cls(director.role_signers("timestamp"), director=director)

    def answer(self, request: TimeRequest) -> SignedTime:
        """The signed time for ``request``'s nonce. Raises UserError if a rotated director's new
        timestamp keys are not on this machine."""
        if self._director is not None:
            version = _root_version(self._director)
            if version != self._root_version:
                self.signers, self._root_version = self._director.role_signers("timestamp"), version
        t = round(self.clock(), 6)
        data = time_signing_bytes(request.device_id, request.nonce, t)
        sigs = [s.sign(data) for s in self.signers]
        self.answered += 1
        return SignedTime(request.device_id, request.nonce, t, [{"keyid": g.keyid, "sig": g.signature} for g in sigs])


def _root_version(director: Repository) -> int:
    """The director's newest root version (``N.root.json``), without reading any key."""
    return max((int(p.name.split(".")[0]) for p in director.meta_dir.glob("*.root.json")), default=0)
