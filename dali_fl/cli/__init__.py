"""The `dali-fl` command line: a click group whose commands live in sibling modules."""
from __future__ import annotations

import importlib
import logging
import os
import sys

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C

try:
    import click

    from dali_fl.errors import DaliFlError
except KeyboardInterrupt:  # a Ctrl-C in the ~50 ms click takes to import: one line, as in every command
    sys.stderr.write("error: interrupted\n")
    raise SystemExit(EXIT_INTERRUPTED) from None

# Each command's module (they import torch) and the first line of its help, so that `dali-fl --help` and a
# mistyped command answer without importing torch (0.1 s, not 3 s); tests/test_run_guards.py holds them equal.
COMMANDS = {
    "flower": ("flower", "The same federation as a Flower app (needs `pip install 'dali-fl[flower]'`)."),
    "partition": ("partition", "Split STORE's train split across clients and print a summary."),
    "prep": ("prep", "Resize a dataset once and store it as uint8 arrays for training."),
    "train": ("train", "Run a federated FedAvg or FedLoRA simulation on a timm ViT."),
    "verify": ("prep", "Check a store: manifest, shapes, sha256, labels, class counts, values, samples."),
}


class NamedPath(click.Path):
    """click.Path that refuses an empty name: Path("") is the current directory, which nobody means by ''."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value == "":
            self.fail("is empty; give a path", param, ctx)
        return super().convert(value, param, ctx)


def explicit_options(ctx: click.Context) -> set[str]:
    """The options given on the command line (not defaults)."""
    return {k for k in ctx.params if ctx.get_parameter_source(k) not in (click.core.ParameterSource.DEFAULT, None)}


class _Group(click.Group):
    """Click group that turns DaliFlError into a one-line message and exit code 2."""

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        """Parse the group's own options; a usage error there (`dali-fl --bogus train`) is one line too."""
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # bare `dali-fl`: click's help is the answer
        except click.UsageError as err:
            click.echo(f"error: {err.format_message()} (see `dali-fl --help`)", err=True)
            raise click.exceptions.Exit(EXIT_USER_ERROR) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise  # bare `dali-fl flower`: its help is the answer, not an error
        except click.UsageError as err:  # click's own three-line form, made one line like every other error
            command = f" {ctx.invoked_subcommand}" if ctx.invoked_subcommand else ""
            click.echo(f"error: {err.format_message()} (see `dali-fl{command} --help`)", err=True)
            ctx.exit(EXIT_USER_ERROR)
        except DaliFlError as err:
            rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
            click.echo(f"error: {rank}{err}", err=True)
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt as err:  # a command may say how to go on (train: --resume)
            click.echo(f"error: {str(err) or 'interrupted; nothing half-written was kept'}", err=True)
            ctx.exit(EXIT_INTERRUPTED)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str):
        """Import a command's module on first use, so that a Ctrl-C during torch's import is one line too."""
        if cmd_name not in COMMANDS:
            return None
        if cmd_name not in self.commands:
            try:  # each lives in its own module so the parts stay small
                module = importlib.import_module(f"dali_fl.cli.{COMMANDS[cmd_name][0]}")
            except KeyboardInterrupt:
                click.echo("error: interrupted", err=True)
                raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
            for command in module.COMMANDS:
                self.add_command(command)
        return self.commands[cmd_name]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from COMMANDS' help lines, without importing the commands."""
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)  # click's own layout
        with formatter.section("Commands"):
            formatter.write_dl([(name, click.Command(name, help=line).get_short_help_str(limit))
                                for name, (_, line) in sorted(COMMANDS.items())])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """dali-fl: federated learning on a ViT, fed from a pre-resized uint8 store.

    Typical flow: `dali-fl prep` once, `dali-fl verify`, then `dali-fl train`.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dali-fl")


if __name__ == "__main__":
    main()
