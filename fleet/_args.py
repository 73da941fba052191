"""argparse value types the CLI modules share, and choices that load on first use.

Durations have one syntax everywhere (:func:`duration`): ``30s``, ``5m``, ``1h``, ``2d`` or
plain seconds (``90``, ``1.5``); zero, negative and anything else is argparse's one-line error.
"""

from __future__ import annotations

import argparse
import re
from typing import Callable, Iterator, Sequence

__all__ = ["DURATION_HELP", "LazyChoices", "duration", "duration_or_zero", "positive_int"]


def positive_int(text: str) -> int:
    """An integer of at least 1, or argparse's one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


_DURATION = re.compile(r"([-+]?)(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)", re.IGNORECASE)
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_HELP = "30s, 5m, 1h, 2d or seconds"


def duration(text: str) -> float:
    """A positive duration in seconds: ``30s``, ``5m``, ``1h``, ``2d`` or plain seconds
    (``90``, ``1.5``). Raises argparse.ArgumentTypeError for zero, negative or malformed text."""
    seconds = _seconds(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be more than 0, not {text!r} (use {DURATION_HELP})")
    return seconds


def duration_or_zero(text: str) -> float:
    """:func:`duration`, where 0 is allowed (an option whose 0 means "none")."""
    seconds = _seconds(text)
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"a duration cannot be negative: {text!r} (use 0 or {DURATION_HELP})")
    return seconds


def _seconds(text: str) -> float:
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use {DURATION_HELP}, for example 90s or 12h)")
    return float(m.group(1) + m.group(2)) * _UNIT_S[m.group(3).lower()]


class LazyChoices(Sequence[str]):
    """argparse ``choices`` computed on first use, so that building the parser does not import
    the module that owns them (``edgeloop --help`` must not import the API server for
    ``tokens create --role``). Give the argument a ``metavar``: argparse formats one from the
    choices when the argument is added; ``%(choices)s`` in its help names them when shown."""

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load
        self._values: tuple[str, ...] | None = None

    def _all(self) -> tuple[str, ...]:
        if self._values is None:
            self._values = tuple(self._load())
        return self._values

    def __getitem__(self, i):  # noqa: ANN001, ANN204
        return self._all()[i]

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __contains__(self, value: object) -> bool:
        return value in self._all()

    def __repr__(self) -> str:
        return repr(list(self._all()))
