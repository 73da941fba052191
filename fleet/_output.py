"""How the CLI talks: tables, key/value views and progress bars for people, one JSON line for scripts.

Text is printed as it is: plain lines need no Rich (it is imported only for a table or a progress
bar, not at start-up, so ``edgeloop status`` stays fast), and Rich runs with markup, emoji codes
and highlighting off, so user and model text (``[bold]``, ``pipeline:train:``) comes out
literally. Control characters other than tab and newline are dropped from what is printed, so a
device id or a model's name cannot move the terminal's cursor.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["Output", "error_object", "kv_lines", "printable"]


def _console(stderr: bool) -> Console:
    from rich.console import Console

    wide = None if stderr or sys.stdout.isatty() else 200
    return Console(stderr=stderr, highlight=False, markup=False, emoji=False, soft_wrap=True, width=wide)


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._console: Console | None = None
        self._err: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            self._console = _console(stderr=False)
        return self._console

    @property
    def err(self) -> Console:
        """stderr, where an error is one line."""
        if self._err is None:
            self._err = _console(stderr=True)
        return self._err

    def result(self, obj: dict[str, Any], human: str | None = None) -> None:
        """The command's result: one JSON object on the last line with --json, else ``human``."""
        if self.as_json:
            print(json.dumps(obj, sort_keys=True, default=str))
        elif human is not None:
            self.line(human)

    def view(self, obj: Mapping[str, Any], times: Sequence[str] = ()) -> None:
        """One record: its JSON with --json (times stay epoch seconds), else aligned ``key  value``
        lines (:func:`kv_lines`)."""
        if self.as_json:
            print(json.dumps(obj, sort_keys=True, default=str))
            return
        self.line("\n".join(kv_lines(obj, times)))

    def table(self, title: str, columns: Sequence[str], rows: list[Sequence[Any]], obj: Any) -> None:
        if self.as_json:
            print(json.dumps(obj, sort_keys=True, default=str))
            return
        if not rows:
            self.line(f"{title}: none")
            return
        from rich.table import Table

        table = Table(title=printable(title), title_justify="left")
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*["-" if v is None else printable(str(v)) for v in row])
        self.console.print(table)

    def info(self, text: str) -> None:
        if not self.as_json:
            self.line(text)

    def line(self, text: str) -> None:
        """``text`` and a newline on stdout, literally (no markup, no emoji codes)."""
        sys.stdout.write(printable(text) + "\n")
        sys.stdout.flush()

    @contextmanager
    def progress(self) -> Iterator[Any]:
        """Yields ``update(stage, done, total)``; draws bars on a terminal, nothing with --json."""
        if self.as_json or not sys.stderr.isatty():
            yield lambda stage, done, total: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bars = Progress(TextColumn("{task.description:<10}", markup=False), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=self.err, transient=False)
        tasks: dict[str, Any] = {}
        with bars:
            def update(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bars.add_task(stage, total=total)
                bars.update(tasks[stage], completed=done, total=total)
            yield update

    @contextmanager
    def live(self, quiet_s: float = 10.0) -> Iterator[Callable[[str], None]]:
        """Yields ``update(line)``: a status line redrawn in place while this process runs in the
        foreground of a terminal; elsewhere (a pipe, a log file, a background job) each changed
        line is written out, at most once every ``quiet_s`` seconds; nothing with --json."""
        if self.as_json:
            yield lambda line: None
            return
        if not _foreground(sys.stderr):
            last: dict[str, Any] = {"line": None, "at": 0.0}

            def write(line: str) -> None:
                now = time.monotonic()
                if line != last["line"] and now - last["at"] >= quiet_s:
                    self.err.print(_text(line))
                    last.update(line=line, at=now)
            yield write
            return
        from rich.live import Live

        with Live(_text(""), console=self.err, refresh_per_second=4, transient=False) as shown:
            yield lambda line: shown.update(_text(line))


_CONTROL = {c: None for c in (*range(0, 9), *range(11, 32), 127)}     # C0 but tab and newline, and DEL


def printable(text: str) -> str:
    """``text`` without the control characters a terminal would act on."""
    return text.translate(_CONTROL)


def kv_lines(obj: Mapping[str, Any], times: Sequence[str] = (), indent: int = 0) -> list[str]:
    """``obj`` as aligned ``key  value`` lines: nested mappings indented under their key, lists
    of scalars joined with commas, lists of mappings one line per item where it fits (else an
    indented block each), None as ``-``, floats to 6 significant digits. Times (epoch seconds)
    read as ISO 8601 UTC and how long ago (:func:`edgeloop.fleet._workspace.when`): the keys
    named in ``times`` and every key ending in ``_at``, ``_seen``, ``not_after`` or ``not_before``."""
    pad = " " * indent
    width = max((len(str(k)) for k in obj), default=0)
    lines: list[str] = []
    for key, value in obj.items():
        head = f"{pad}{str(key):<{width}}"
        if isinstance(value, Mapping):
            lines += [head.rstrip()] + (kv_lines(value, times, indent + 2) if value else [f"{pad}  -"])
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            lines.append(head.rstrip())
            for item in value:
                lines += _item_lines(item, times, indent + 2)
        else:
            lines.append(f"{head}  {_value(str(key), value, times)}".rstrip())
    return lines


_LINE = 100     # a list item that fits on one line of this many characters is printed on one


def _item_lines(item: Any, times: Sequence[str], indent: int) -> list[str]:
    pad = " " * indent
    if not isinstance(item, Mapping):
        return [f"{pad}- {_scalar(item)}"]
    if all(not isinstance(v, (Mapping, list, tuple)) for v in item.values()):
        one = f"{pad}- " + "  ".join(f"{k} {_value(str(k), v, times)}" for k, v in item.items())
        if len(one) <= _LINE:
            return [one]
    block = kv_lines(item, times, indent + 2)
    return [f"{pad}- {block[0].lstrip()}", *block[1:]] if block else [f"{pad}- -"]


def _is_time(key: str, times: Sequence[str]) -> bool:
    return key in times or key.endswith(("_at", "_seen", "not_after", "not_before"))


def _value(key: str, value: Any, times: Sequence[str]) -> str:
    if _is_time(key, times) and isinstance(value, (int, float)) and not isinstance(value, bool):
        from edgeloop.fleet._workspace import when

        return when(value)
    return _scalar(value)


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.0f}"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(_scalar(v) for v in value) or "-"
    return str(value)


def error_object(message: str, code: int, kind: str) -> str:
    """The one JSON line a failing command prints on stdout with --json."""
    return json.dumps({"error": message, "code": code, "kind": kind}, sort_keys=True)


def _text(line: str) -> Any:
    from rich.text import Text

    return Text(line)


def _foreground(stream: Any) -> bool:
    """Whether ``stream`` is a terminal this process owns now (not a background job's)."""
    try:
        return stream.isatty() and os.tcgetpgrp(stream.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False
