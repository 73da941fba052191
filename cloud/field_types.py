"""Type checks of untrusted values (API bodies, pipeline files) against a dataclass's fields,
before the dataclass is built: a wrong type is one UserError naming the field, never a
TypeError from deep inside a comparison later."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from edgeloop.cloud.errors import UserError

__all__ = ["check_field_types"]

_ACCEPTS: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                                         "None": (type(None),)}


def check_field_types(cls: type, values: dict[str, Any], what: str) -> None:
    """Raises UserError for an unknown field or a value of the wrong type (a bool is not a
    number; numbers must be finite). Fields whose annotation is not made of str, int, float,
    bool and None are not checked."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown {what} field(s): {', '.join(unknown)}")
    for name, value in values.items():
        annotation = known[name].type if isinstance(known[name].type, str) else getattr(known[name].type, "__name__", "")
        parts = [p.strip() for p in annotation.split("|")]
        if not parts or any(p not in _ACCEPTS for p in parts):
            continue
        accepted = tuple(t for p in parts for t in _ACCEPTS[p])
        numeric = any(p in ("int", "float") for p in parts)
        if isinstance(value, bool) and "bool" not in parts or not isinstance(value, accepted):
            raise UserError(f"{what} field {name} must be {' or '.join(parts)}, not {type(value).__name__}")
        if numeric and isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{what} field {name} must be a finite number")
        if numeric and isinstance(value, int) and abs(value) > 2 ** 53:
            raise UserError(f"{what} field {name} is out of range")
