"""How the CLI talks: tables and progress bars for people, one JSON line for scripts."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

__all__ = ["Output"]


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        wide = None if sys.stdout.isatty() else 200
        self.console = Console(stderr=False, highlight=False, markup=False, soft_wrap=True, width=wide)
        self.err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)   # an error is one line

    def result(self, obj: dict[str, Any], human: str | None = None) -> None:
        """The command's result: one JSON object on the last line with --json, else ``human``."""
        if self.as_json:
            print(json.dumps(obj, sort_keys=True, default=str))
        elif human is not None:
            self.console.print(human)

    def table(self, title: str, columns: Sequence[str], rows: list[Sequence[Any]], obj: Any) -> None:
        if self.as_json:
            print(json.dumps(obj, sort_keys=True, default=str))
            return
        if not rows:
            self.console.print(f"{title}: none")
            return
        table = Table(title=title, title_justify="left")
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*["-" if v is None else str(v) for v in row])
        self.console.print(table)

    def info(self, text: str) -> None:
        if not self.as_json:
            self.console.print(text)

    @contextmanager
    def progress(self) -> Iterator[Any]:
        """Yields ``update(stage, done, total)``; draws bars on a terminal, nothing with --json."""
        if self.as_json or not sys.stderr.isatty():
            yield lambda stage, done, total: None
            return
        bars = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
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
                    self.err.print(Text(line))
                    last.update(line=line, at=now)
            yield write
            return
        from rich.live import Live

        with Live(Text(""), console=self.err, refresh_per_second=4, transient=False) as shown:
            yield lambda line: shown.update(Text(line))


def _foreground(stream: Any) -> bool:
    """Whether ``stream`` is a terminal this process owns now (not a background job's)."""
    try:
        return stream.isatty() and os.tcgetpgrp(stream.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False
