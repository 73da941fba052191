"""``edgeloop completion bash|zsh``: a shell completion script made from the argparse tree.

The script is generated from the parser itself (:func:`edgeloop.fleet.cli.build_parser`), so it
completes exactly the commands, actions, options and choices that exist: commands and their
actions with their help, every option of the command or action being typed, the choices of an
option or positional that has them, folders for ``--workspace`` and files for options that take a
path. It is static text: completing runs no Python. Load it with
``source <(edgeloop completion bash)`` (or ``zsh``), or write it where the shell looks for
completions (README.md).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["Node", "Option", "add_completion_command", "bash_script", "tree", "zsh_script"]

SHELLS = ("bash", "zsh")


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    help: str
    takes_value: bool
    choices: tuple[str, ...] = ()
    files: str = ""                 # "dir", "file" or "": what a value of it completes to


@dataclass
class Node:
    """A command (or the program, or an action): its help, options, positional choices, children."""

    name: str
    help: str = ""
    options: list[Option] = field(default_factory=list)
    positional_choices: tuple[str, ...] = ()
    children: dict[str, Node] = field(default_factory=dict)


def tree(parser: argparse.ArgumentParser, name: str = "edgeloop", help_: str = "") -> Node:
    """The completion tree of ``parser``: options and choices of every command and action."""
    node = Node(name, help_)
    positional: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for child, sub in action._name_parser_map.items():
                node.children[child] = tree(sub, child, helps.get(child, ""))
        elif action.option_strings:
            node.options.append(_option(action))
        elif action.choices:
            positional += [str(c) for c in action.choices]
    node.positional_choices = tuple(positional)
    return node


def _option(action: argparse.Action) -> Option:
    takes_value = action.nargs != 0
    dest = action.dest
    files = "dir" if dest in ("workspace", "dest", "device_dir", "export_triton", "export_c") else \
        "file" if takes_value and action.type is Path else ""
    help_ = "" if action.help in (None, argparse.SUPPRESS) else " ".join(str(action.help).split())
    if "%(" in help_:
        help_ = help_.replace("%(default)s", str(action.default)).replace(
            "%(choices)s", ", ".join(map(str, action.choices or ()))).replace("%%", "%")
    return Option(tuple(action.option_strings), help_, takes_value,
                  tuple(str(c) for c in action.choices) if action.choices else (), files)


def _walk(node: Node, path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Node]]:
    yield path, node
    for name, child in node.children.items():
        yield from _walk(child, (*path, name))


def _valued(node: Node) -> str:
    """The options of ``node`` and its actions that take a value (their next word is a value,
    not an action), as one space-delimited string."""
    flags = {f for _, n in _walk(node) for o in n.options if o.takes_value for f in o.flags}
    return " " + " ".join(sorted(flags)) + " "


def _value_cases(root: Node, reply_of: Callable[[Option], str]) -> list[str]:
    """``case "$key|$prev"`` items: what the value of each option completes to. An option with
    the same reply everywhere is one ``*|FLAG`` item, others one item per command or action."""
    replies: dict[str, dict[str, str]] = {}
    flagged: dict[str, int] = {}          # how many commands and actions have the flag, valued or not
    for p, n in _walk(root):
        for o in n.options:
            for flag in o.flags:
                flagged[flag] = flagged.get(flag, 0) + 1
                if o.takes_value:
                    replies.setdefault(flag, {})[" ".join(p)] = reply_of(o)
    items = []
    for flag, where in sorted(replies.items()):
        if len(set(where.values())) == 1 and len(where) == flagged[flag]:
            items.append(f"        *{shlex.quote('|' + flag)}) {next(iter(where.values()))}; return ;;")
        else:
            items += [f"        {shlex.quote(key + '|' + flag)}) {reply}; return ;;" for key, reply in where.items()]
    return items


def _words(node: Node) -> list[str]:
    return [*node.children, *node.positional_choices, *(f for o in node.options for f in o.flags)]


# -- bash ---------------------------------------------------------------------------------------
def bash_script(root: Node) -> str:
    """A bash completion script for ``root`` (``complete -F _edgeloop edgeloop``)."""
    q = shlex.quote
    per_command = [f"                {q(name)}) acts={q(' '.join(n.children))}; valued={q(_valued(n))} ;;"
                   for name, n in root.children.items()]
    words = [f"        {q(' '.join(p))}) words={q(' '.join(_words(n)))} ;;" for p, n in _walk(root)]

    def reply(o: Option) -> str:
        return (f"COMPREPLY=($(compgen -W {q(' '.join(o.choices))} -- \"$cur\"))" if o.choices else
                'COMPREPLY=($(compgen -d -- "$cur"))' if o.files == "dir" else
                'COMPREPLY=($(compgen -f -- "$cur"))' if o.files == "file" else "COMPREPLY=()")

    return "\n".join([
        "# bash completion for edgeloop (made by: edgeloop completion bash)",
        "_edgeloop() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="" cmd="" act="" i w acts="" valued=" " words=""',
        '    [[ $COMP_CWORD -gt 0 ]] && prev="${COMP_WORDS[COMP_CWORD-1]}"',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        w="${COMP_WORDS[i]}"',
        '        if [[ $valued == *" $w "* ]]; then ((i++)); continue; fi',
        '        [[ $w == -* ]] && continue',
        '        if [[ -z $cmd ]]; then',
        "            cmd=$w",
        '            case "$cmd" in',
        *per_command,
        "            esac",
        "        else",
        '            [[ " $acts " == *" $w "* ]] && act=$w',
        "            break",
        "        fi",
        "    done",
        '    local key="$cmd${act:+ $act}"',
        '    case "$key|$prev" in',
        *_value_cases(root, reply),
        "    esac",
        '    case "$key" in',
        *words,
        "    esac",
        '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        "}",
        "complete -F _edgeloop edgeloop",
        ""])


# -- zsh ----------------------------------------------------------------------------------------
def _zsh_item(word: str, help_: str) -> str:
    text = word.replace("\\", "\\\\").replace(":", "\\:")
    return shlex.quote(f"{text}:{help_}" if help_ else text)


def zsh_script(root: Node) -> str:
    """A zsh completion script for ``root`` (``compdef _edgeloop edgeloop``)."""
    q = shlex.quote
    per_command = [f"                {q(name)}) acts=({' '.join(map(q, n.children))}); valued={q(_valued(n))} ;;"
                   for name, n in root.children.items()]
    lists = []
    for p, n in _walk(root):
        subs = " ".join(_zsh_item(c, child.help) for c, child in n.children.items())
        pos = " ".join(map(q, n.positional_choices))
        opts = " ".join(_zsh_item(f, o.help) for o in n.options for f in o.flags)
        lists.append(f"        {q(' '.join(p))}) subs=({subs}); pos=({pos}); opts=({opts}) ;;")

    def reply(o: Option) -> str:
        return (f"compadd -- {' '.join(map(q, o.choices))}" if o.choices else
                "_directories" if o.files == "dir" else "_files" if o.files == "file" else "_message value")

    return "\n".join([
        "#compdef edgeloop",
        "# zsh completion for edgeloop (made by: edgeloop completion zsh)",
        "_edgeloop() {",
        '    local cur="${words[CURRENT]}" prev="${words[CURRENT-1]}" cmd="" act="" w valued=" "',
        "    local -a acts subs pos opts",
        "    local -i i=2",
        "    while (( i < CURRENT )); do",
        '        w="${words[i]}"',
        '        if [[ $valued == *" $w "* ]]; then (( i += 2 )); continue; fi',
        '        if [[ $w == -* ]]; then (( i++ )); continue; fi',
        '        if [[ -z $cmd ]]; then',
        "            cmd=$w",
        '            case "$cmd" in',
        *per_command,
        "            esac",
        "        else",
        '            (( ${acts[(Ie)$w]} )) && act=$w',
        "            break",
        "        fi",
        "        (( i++ ))",
        "    done",
        '    local key="$cmd${act:+ $act}"',
        '    case "$key|$prev" in',
        *_value_cases(root, reply),
        "    esac",
        '    case "$key" in',
        *lists,
        "    esac",
        '    if [[ $cur == -* ]]; then',
        "        _describe -t options option opts",
        "    else",
        "        (( ${#subs} )) && _describe -t commands command subs",
        "        (( ${#pos} )) && compadd -- $pos",
        "        (( ${#subs} + ${#pos} )) || _describe -t options option opts",
        "    fi",
        "}",
        'if [[ $zsh_eval_context[-1] == loadautofunc ]]; then _edgeloop "$@"; else compdef _edgeloop edgeloop; fi',
        ""])


# -- the command --------------------------------------------------------------------------------
def add_completion_command(sub: Any) -> None:
    help_ = "print a shell completion script: source <(edgeloop completion bash)"
    p = sub.add_parser("completion", help=help_, description=help_ + " (or zsh; see README.md)")
    p.add_argument("shell", choices=SHELLS, help="bash or zsh")
    p.set_defaults(fn=_completion, json=False, debug=False, server=None, mqtt=None)


def _completion(args: argparse.Namespace, out: Any) -> int:
    from edgeloop.fleet.cli import build_parser

    root = tree(build_parser())
    out.line(bash_script(root) if args.shell == "bash" else zsh_script(root))
    return 0
