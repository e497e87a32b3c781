"""Every command the READMEs show parses: its options exist and its choices are valid (nothing is run)."""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import click
import pytest

from dali_fl.cli import cli

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "benchmarks/README.md")
# A backticked span that is a command: `dali-fl train --resize-to 224`, `python -m benchmarks.x --y`, `tools/x.py`.
INLINE = re.compile(r"`((?:dali-fl|python -m benchmarks\.\w|(?:python )?(?:benchmarks|tools)/\w+\.py)[^`]*)`")


def _block_commands(text: str) -> list[str]:
    """Command lines in fenced blocks, with backslash continuations joined."""
    commands, block, line = [], False, ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            block, line = not block, ""
            continue
        if not block:
            continue
        line += raw.rstrip().removesuffix("\\")
        if not raw.rstrip().endswith("\\"):
            commands.append(line.strip())
            line = ""
    return commands


def _commands() -> list[tuple[str, str]]:
    """(readme, command) for every command in a fenced block or a backticked span."""
    found = []
    for name in READMES:
        text = (ROOT / name).read_text()
        found += [(name, c) for c in _block_commands(text) if c.startswith(("dali-fl ", "python "))]
        found += [(name, m.group(1)) for m in INLINE.finditer(text)]
    return found


def _tokens(command: str) -> list[str]:
    """The words after dali-fl or python, less comments and `--help`; a placeholder (`...`, `<x>`, `[--x]`) ends it."""
    words = []
    split = shlex.split(command, comments=True)
    for word in split[split[0] in ("dali-fl", "python"):]:
        if "..." in word or "…" in word or word.startswith(("<", "[")) or "|" in word:
            break
        words.append(word)
    return [w for w in words if w != "--help"]  # parses everywhere, and argparse would exit on it


def _check_click(words: list[str]) -> None:
    """Walk the group to the subcommand, then parse its options as click would, without converting values."""
    command: click.Command = cli
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        command = command.get_command(click.Context(command), words.pop(0))
    ctx = click.Context(command, info_name=command.name)
    opts, _, order = command.make_parser(ctx).parse_args(list(words))  # raises on an unknown option
    for param in order:
        value = opts.get(param.name)
        if isinstance(param.type, click.Choice) and value is not None:
            values = value if isinstance(value, (list, tuple)) else [value]
            assert all(v in param.type.choices for v in values), f"{param.name}={value}"


class _Parsed(Exception):
    """Carries the parser a script built out of its main(), before it runs anything."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _script_parser(module: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The argparse parser of a benchmarks/ or tools/ script, taken from its main() as it parses."""
    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    monkeypatch.setattr(sys, "argv", [module])
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    main = importlib.import_module(module).main
    with pytest.raises(_Parsed) as parsed:
        main(*([[]] if main.__code__.co_argcount else []))
    monkeypatch.undo()
    return parsed.value.parser


def _script_module(words: list[str]) -> tuple[str, list[str]]:
    """`-m benchmarks.x args` or `benchmarks/x.py args` -> (module name, args)."""
    if words[0] == "-m":
        return words[1], words[2:]
    path = Path(words[0])
    return (path.stem if path.parts[0] == "tools" else ".".join(path.with_suffix("").parts)), words[1:]


@pytest.mark.parametrize("readme,command", _commands())
def test_readme_command_parses(readme: str, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A README command with a renamed option or a removed choice fails here, not for the user who copies it."""
    words = _tokens(command)
    if command.startswith("dali-fl"):
        _check_click(words)
    else:
        module, args = _script_module(words)
        parser = _script_parser(module, monkeypatch)
        if args:  # a bare name is a mention of the script, not a command line
            parser.parse_args(args)  # exits 2 on an unknown option or a bad choice


def test_readme_commands_are_found() -> None:
    """The extraction sees the commands the test exists for (the README's train and benchmark lines)."""
    found = [c for _, c in _commands()]
    assert any(c.startswith("dali-fl train --store data/cifar10-224 --alg fedlora --gpu 0") for c in found)
    assert any(c.startswith("python -m benchmarks.bench_round --preset fedlora-vit-b16") for c in found)
    assert len(found) > 40
