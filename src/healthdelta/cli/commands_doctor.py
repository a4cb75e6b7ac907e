"""`doctor`: consistency checks of an output tree; `--repair` removes orphans."""

from __future__ import annotations

import click

from healthdelta import doctor
from healthdelta.cli.options import cli, global_options, layout_from, lock_timeout_option, make_progress, out_options


@cli.command("doctor")
@out_options
@click.option("--repair", is_flag=True,
              help="Remove orphans (`.tmp-*` leftovers, unregistered run dirs); never registered data.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON document instead of lines.")
@lock_timeout_option
@global_options
@click.pass_context
def doctor_cmd(ctx, out, state, repair, as_json, lock_timeout):
    """Check the registry, LAST_RUN, staged files (sha256), artifacts, identity store and warehouse.

    Prints one line per finding (`ok ...`, `WARN ...`, `SKIP ...` or `ERROR <code> <where>`),
    then `errors=N`; exits 1 when something is wrong. Paths are relative to --out.

    Example: healthdelta doctor --out data --repair
    """
    progress = make_progress(ctx)
    try:
        result = doctor.run_doctor(layout_from(out, state), repair=repair, lock_timeout=lock_timeout,
                                   progress=progress)
    finally:
        progress.close()
    if as_json:
        click.echo(doctor.as_json(result))
    else:
        for subject in result.removed:
            click.echo(f"removed {subject}")
        for finding in result.findings:
            click.echo(str(finding))
        click.echo(f"errors={result.errors}")
    if result.errors:
        raise click.exceptions.Exit(1)
