"""Errors of the cloud side, grouped by what the caller can do about them.

::

    CloudError                 base of everything the cloud side raises on purpose
    ├── UserError              bad input (missing file, wrong name, malformed config): fix and rerun
    │   ├── NotFound           a named thing (workspace, model version, device) does not exist
    │   └── AlreadyServing     another `edgeloop serve` holds the workspace: stop it or use it
    ├── ServiceUnavailable     the broker or another service cannot be reached: retry later
    ├── IntegrityError         stored data or a signature does not check out: stop and investigate
    │   ├── WorkspaceDamaged   a part of the workspace is missing or corrupt (registry, keys, roots)
    │   │   └── KeysMissing    a role has fewer signing keys on this machine than its threshold
    │   └── LineageBroken      a device's lineage names an update, package or run not recorded
    └── SchemaTooNew           the database is from a newer edgeloop: upgrade edgeloop to open it

    KeyboardInterrupt
    └── Interrupted            SIGTERM turned into an interrupt (a command stops as on Ctrl-C)

The CLI turns each into one line on stderr and a non-zero exit code: 1 CloudError, 2 UserError
(and NotFound, AlreadyServing), 3 ServiceUnavailable, 4 IntegrityError (and its subclasses),
5 SchemaTooNew, 130 an interrupt (70: an unexpected internal error).
"""


class CloudError(Exception):
    """Base class of deliberate cloud-side errors."""

    exit_code = 1


class UserError(CloudError):
    """The input is wrong; retrying the same thing will fail the same way."""

    exit_code = 2


class NotFound(UserError):
    """A named object does not exist."""


class ServiceUnavailable(CloudError):
    """A service the command needs (MQTT broker, HTTP) is unreachable."""

    exit_code = 3


class IntegrityError(CloudError):
    """Stored data, a hash or a signature does not verify."""

    exit_code = 4


class SchemaTooNew(CloudError):
    """The workspace's database was written by a newer edgeloop: upgrade edgeloop to open it."""

    exit_code = 5


class AlreadyServing(UserError):
    """Another ``edgeloop serve`` holds this workspace's lock (one control plane per workspace)."""


class WorkspaceDamaged(IntegrityError):
    """A part of the workspace is missing or corrupt: nothing was created or changed in its place."""


class KeysMissing(WorkspaceDamaged):
    """A repository role has fewer signing keys on this machine than its threshold."""


class LineageBroken(IntegrityError):
    """A device's recorded lineage names an update, package, model version, run or data set that
    this workspace does not record."""


class Interrupted(KeyboardInterrupt):
    """A signal other than SIGINT (SIGTERM) stopping a command the way Ctrl-C does."""

    def __init__(self, signal_name: str = "SIGTERM") -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
