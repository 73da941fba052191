"""What the cloud and the device share, and nothing else.

This package is the only code imported by both sides. It depends on the standard library
(and numpy, only inside :mod:`contracts.features`). Each module is one contract, documented
in ``docs/contracts/``:

- :mod:`contracts.topics`    the MQTT topic scheme
- :mod:`contracts.messages`  every MQTT message schema, with bounds and validation
- :mod:`contracts.package`    the package (bundle) file format and its manifest
- :mod:`contracts.features`  the feature contract: preprocessing defined once, applied everywhere
"""

from contracts.errors import ContractError, PayloadTooLarge, SchemaError

__all__ = ["ContractError", "PayloadTooLarge", "SchemaError"]
