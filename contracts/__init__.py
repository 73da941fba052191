"""What the cloud and the device share, and nothing else.

This package is the only code imported by both sides. It depends on the standard library
(and numpy, only inside :mod:`edgeloop.contracts.features`). Each module is one contract, documented
in ``docs/contracts/``:

- :mod:`edgeloop.contracts.topics`    the MQTT topic scheme
- :mod:`edgeloop.contracts.messages`  every MQTT message schema, with bounds and validation
- :mod:`edgeloop.contracts.package`    the package (bundle) file format and its manifest
- :mod:`edgeloop.contracts.features`  the feature contract: preprocessing defined once, applied everywhere
"""

from edgeloop.contracts.errors import ContractError, PayloadTooLarge, SchemaError

__all__ = ["ContractError", "PayloadTooLarge", "SchemaError"]
