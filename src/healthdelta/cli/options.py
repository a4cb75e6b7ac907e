"""The click group and the options shared by many commands."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import click

from healthdelta import __version__
from healthdelta.cli.faults import with_fault
from healthdelta.cli.progress import ProgressDisplay, command_plan
from healthdelta.layout import OutLayout


def _remember(ctx: click.Context, param: click.Parameter, value):
    # Global flags may be given before or after the subcommand; the last one wins.
    if value is not None and value is not False:
        ctx.find_root().meta[param.name] = value
    return value


def global_options(f):
    """`--progress`, `--quiet`, `--debug`: accepted on the group and on every command."""
    f = click.option("--progress", type=click.Choice(["auto", "always", "never"]), default=None,
                     expose_value=False, callback=_remember, is_eager=True,
                     help="Progress display on stderr (default auto: bar on a terminal).")(f)
    f = click.option("--quiet", is_flag=True, default=False, expose_value=False, callback=_remember,
                     is_eager=True, help="No progress and no notices on stderr.")(f)
    f = click.option("--debug", is_flag=True, default=False, expose_value=False, callback=_remember,
                     is_eager=True, help="Show a traceback on internal errors.")(f)
    return f


class CommandProgress(ProgressDisplay):
    """The display plus the test-only fault hook, as the one callback stages get."""

    def __init__(self, mode, plan=None) -> None:
        super().__init__(mode, plan=plan)
        self.callback = with_fault(super().__call__)

    def __call__(self, stage: str, advance: int, total: int | None) -> None:
        self.callback(stage, advance, total)


def make_progress(ctx: click.Context) -> CommandProgress:
    meta = ctx.find_root().meta
    mode = "never" if meta.get("quiet") else meta.get("progress", "auto")
    command = ctx.command_path.split(" ", 1)[-1]
    share = ctx.params.get("mode") == "share" and not ctx.params.get("skip_deid")
    return CommandProgress(mode, command_plan(command, share))


def notice(ctx: click.Context, message: str) -> None:
    """An informational line on stderr, silenced by --quiet."""
    if not ctx.find_root().meta.get("quiet"):
        click.echo(message, err=True)


def out_options(f):
    """`--out` (the base output directory) and `--state` (default <out>/state)."""
    f = click.option("--state", "state", type=click.Path(path_type=Path), default=None,
                     help="State directory (default <out>/state).")(f)
    f = click.option("--out", "out", type=click.Path(path_type=Path), default=Path("data"),
                     show_default=True, help="Base output directory.")(f)
    return f


def layout_from(out: Path, state: Path | None) -> OutLayout:
    return OutLayout.create(out, state)


def self_command() -> str:
    """This program as the user can type it from here (shell-quoted), for printed next steps: `healthdelta`
    when that name on PATH is this very program, else the script (or interpreter) that ran,
    relative to the current directory when it is below it (e.g. `.venv/bin/healthdelta`)."""
    script = Path(sys.argv[0])
    on_path = shutil.which("healthdelta")
    if script.name == "healthdelta" and on_path and Path(on_path).resolve() == script.resolve():
        return "healthdelta"
    program = script if script.name == "healthdelta" else Path(sys.executable)
    rel = os.path.relpath(program.absolute())
    shown = shlex.quote(rel if not rel.startswith("..") else program.absolute().as_posix())
    return shown if program is script else f"{shown} -m healthdelta"


def json_option(f):
    """`--json`: the command's result as one JSON object on stdout instead of text."""
    return click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")(f)


def lock_timeout_option(f):
    return click.option("--wait", "lock_timeout", type=click.FloatRange(min=0), default=0.0,
                        show_default=True,
                        help="Seconds to wait for another command holding the state lock.")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="healthdelta")
@global_options
def cli() -> None:
    """HealthDelta: Apple Health exports as a private, versioned, queryable record."""
