"""Errors raised while checking data against a contract.

::

    ContractError          the data does not follow a contract: do not retry the same bytes
    ├── SchemaError        wrong JSON, missing field, wrong type or value out of range
    └── PayloadTooLarge    over a documented size bound; refused before parsing
"""


class ContractError(ValueError):
    """Data that does not follow an edgeloop contract."""


class SchemaError(ContractError):
    """A message or manifest is malformed."""


class PayloadTooLarge(ContractError):
    """A payload is over its documented size bound."""
