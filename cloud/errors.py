"""Errors of the cloud side, grouped by what the caller can do about them.

::

    CloudError                 base of everything the cloud side raises on purpose
    ├── UserError              bad input (missing file, wrong name, malformed config): fix and rerun
    │   └── NotFound           a named thing (workspace, model version, device) does not exist
    ├── ServiceUnavailable     the broker or another service cannot be reached: retry later
    ├── IntegrityError         stored data or a signature does not check out: stop and investigate
    └── SchemaTooNew           the database is from a newer edgeloop: upgrade edgeloop to open it

The CLI turns each into one line on stderr and a non-zero exit code: 1 CloudError, 2 UserError
(and NotFound), 3 ServiceUnavailable, 4 IntegrityError, 5 SchemaTooNew (70: an unexpected
internal error).
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
