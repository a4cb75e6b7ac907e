"""The `healthdelta` command line: the only layer that prints or exits.

Commands read options, call one library function and print its result; every
error reaches `main`, which prints one `error: ...` line: no traceback, no input
path, no data value.
"""

from __future__ import annotations

import signal
import sys
import traceback

import click

from healthdelta.cli.options import cli
from healthdelta.cli import (  # noqa: F401  (registers the commands)
    commands_cohort, commands_doctor, commands_export, commands_identity, commands_run, commands_warehouse,
)
from healthdelta.errors import HealthDeltaError


def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C so work dirs get removed
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    signal.signal(signal.SIGTERM, _terminate)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C/SIGINT must still
    # unwind a run cleanly, so install Python's handler explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = cli.main(args=args, prog_name="healthdelta", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:  # usage errors: bad flags, missing options
        _fail(exc.format_message(), 2)
    except HealthDeltaError as exc:
        _fail(str(exc), exc.exit_code, debug)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _fail("interrupted; nothing was registered", 1)
    except OSError as exc:
        # strerror only: the filename of an OSError may be a private input path.
        _fail(f"{exc.strerror or 'input/output error'}", 1, debug)
    except Exception:
        _fail("internal error (rerun with --debug for details)", 1, debug)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int, debug: bool = False) -> None:
    if debug:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
