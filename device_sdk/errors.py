"""Errors of the device agent, grouped by recovery action.

::

    AgentError                  base
    ├── UpdateRefused           this update must not be installed: keep the current model,
    │                           report ``code`` and do not retry the same update
    │   codes: verify.metadata  TUF metadata failed (signature, expiry, rollback, freeze)
    │          verify.hash      the downloaded package's length or sha256 is wrong
    │          verify.package   the package's own manifest or files are malformed
    │          verify.mismatch  the package is not what the announcement said (model, tier)
    │          health.load      the runtime could not load the model
    │          health.golden    golden vectors gave the wrong outputs
    │          health.latency   inference is over the package's latency budget
    ├── TransientError          network or broker trouble: retry later, same update
    └── StorageError            the device's own storage failed: stop and report
"""


class AgentError(Exception):
    """Base of deliberate agent errors."""


class UpdateRefused(AgentError):
    """An update failed verification or its health check; the current model stays."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class TransientError(AgentError):
    """Network or broker trouble; the same operation may succeed later."""


class StorageError(AgentError):
    """Local storage failed (disk full, permissions)."""
