"""The argparse plumbing every ``edgeloop`` command module shares: the parser class (one-line
errors), the options every command takes, command groups with actions."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

DEFAULT_WORKSPACE = "edgeloop-workspace"

__all__ = ["DEFAULT_WORKSPACE", "Parser", "ShowByDefault", "UsageError", "VersionAction", "action", "common",
           "group"]


class UsageError(SystemExit):
    """A command line argparse refused (exit 2); ``message`` is the line's text after ``error:``."""

    kind = "UsageError"

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


class Parser(argparse.ArgumentParser):
    _width: int | None = None       # the terminal's, read once per process, not per argument added

    def _get_formatter(self) -> argparse.HelpFormatter:
        if Parser._width is None:
            import shutil
            Parser._width = shutil.get_terminal_size().columns - 2
        return self.formatter_class(prog=self.prog, width=Parser._width)  # type: ignore[call-arg]

    def error(self, message: str) -> NoReturn:
        text = f"{message} (see: {self.prog} --help)"
        sys.stderr.write(f"{self.prog}: error: {text}\n")
        raise UsageError(text)


class VersionAction(argparse.Action):
    """``--version``: the installed version, read only when asked for (importlib.metadata is slow
    to import, and every command would pay for it)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:  # noqa: ANN003
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help=kwargs.get("help", "print the installed version and exit"))

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> NoReturn:
        from edgeloop import __version__

        sys.stdout.write(f"{parser.prog} {__version__}\n")
        parser.exit(0)


def common(p: argparse.ArgumentParser, inherit: bool = False) -> None:
    """The options every command takes. ``inherit``: an action under a command group (``models
    ls``), whose unset options must not overwrite what was given before the action."""
    def d(value):  # noqa: ANN001, ANN202
        return argparse.SUPPRESS if inherit else value
    p.add_argument("--workspace", "-w", type=Path,
                   default=d(Path(os.environ.get("EDGELOOP_WORKSPACE", DEFAULT_WORKSPACE))),
                   help="workspace folder (default: $EDGELOOP_WORKSPACE or ./edgeloop-workspace)")
    p.add_argument("--json", action="store_true", default=d(False), help="print one JSON object as the last line")
    p.add_argument("--mqtt", metavar="HOST:PORT", default=d(None),
                   help="MQTT broker for this command (default: the workspace's)")
    p.add_argument("--debug", action="store_true", default=d(False), help="log verbosely and show tracebacks")
    p.add_argument("--server", metavar="URL", default=d(None),
                   help="a remote control plane's API (devices, models, rollout); needs --token or $EDGELOOP_TOKEN")
    p.add_argument("--token", default=d(None), help="API token for --server (default: $EDGELOOP_TOKEN)")
    p.add_argument("--ca", metavar="FILE", default=d(None),
                   help="CA an https --server's certificate must chain to (default: $EDGELOOP_CA, else the "
                        "workspace's fleet CA pki/ca.crt)")


def group(sub, name: str, help_: str, default_fn) -> argparse._SubParsersAction:  # noqa: ANN001
    """A command with actions (``models ls``); the bare command runs ``default_fn``."""
    p = sub.add_parser(name, help=help_, description=help_)
    common(p)
    p.set_defaults(fn=default_fn)
    return p.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)


def action(group, name: str, help_: str, fn) -> argparse.ArgumentParser:  # noqa: ANN001
    p = group.add_parser(name, help=help_, description=help_)
    common(p, inherit=True)
    p.set_defaults(fn=fn)
    return p


class _AnyName(dict):
    def __contains__(self, key: object) -> bool:
        return True


class ShowByDefault(argparse._SubParsersAction):
    """Actions of ``edgeloop devices``: a first word that names no action is a device id, so
    ``devices DEVICE`` stays ``devices show DEVICE``."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.choices = _AnyName()       # argparse checks the first word against choices first

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        if values[0] not in self._name_parser_map:
            values = ["show", *values]
        super().__call__(parser, namespace, values, option_string)
