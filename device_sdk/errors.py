"""Errors of the device agent, grouped by recovery action.

::

    AgentError                  base
    ├── UpdateRefused           this update must not be installed: keep the current model,
    │                           report ``code`` (a :class:`edgeloop.contracts.codes.ErrorCode`:
    │                           verify.*, health.*) and do not retry the same update
    ├── TransientError          network or broker trouble: retry later, same update
    │                           (reported as ``transport.download`` once retries run out)
    └── StorageError            the device's own storage failed: ``code`` is ``storage.full``,
                                ``storage.readonly`` or ``storage.write`` (device_sdk/storage.py)
"""

from __future__ import annotations

from edgeloop.contracts.codes import ErrorCode


class AgentError(Exception):
    """Base of deliberate agent errors."""


class UpdateRefused(AgentError):
    """An update failed verification or its health check; the current model stays."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message


class TransientError(AgentError):
    """Network or broker trouble; the same operation may succeed later."""


class StorageError(AgentError):
    """Local storage failed (disk full, read-only, another I/O error): ``code`` says which."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.STORAGE_WRITE) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
