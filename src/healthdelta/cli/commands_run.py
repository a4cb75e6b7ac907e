"""`pipeline run`, `run register|list|show` and `ingest`."""

from __future__ import annotations

from pathlib import Path

import click

from healthdelta import pipeline, registry
from healthdelta.cli.options import (
    cli, global_options, layout_from, lock_timeout_option, make_progress, notice, out_options,
)


@cli.group("pipeline")
@global_options
def pipeline_group() -> None:
    """Stateful pipeline runs."""


def run_options(f):
    """The flags `pipeline run` and `run all` share."""
    for option in reversed([
        click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
                     help="export.zip, the apple_health_export folder, or its parent."),
        out_options,
        click.option("--mode", type=click.Choice(["local", "share"]), default="local", show_default=True),
        click.option("--since", default="last", show_default=True, help="Parent run: `last` or a run id."),
        click.option("--run-id", "expected_run_id", default=None, help="Fail unless the new run gets this id."),
        click.option("--skip-deid", is_flag=True, help="Do not run the de-identification stage."),
        click.option("--date-shift", is_flag=True,
                     help="Share mode: move every date of a person by one secret per-person offset."),
        click.option("--keep-routes", type=click.Choice(["drop", "coarse"]), default="drop", show_default=True,
                     help="Share mode: drop GPS tracks, or keep them coarsened to about 1 km."),
        click.option("--note", default=None, help="Free-text note stored in the registry (local only)."),
        lock_timeout_option,
        global_options,
    ]):
        f = option(f)
    return f


def _options(input_path, out, state, mode, since, expected_run_id, skip_deid, date_shift, keep_routes, note,
             lock_timeout) -> pipeline.PipelineOptions:
    return pipeline.PipelineOptions(
        input=input_path, layout=layout_from(out, state), mode=mode, since=since,
        expected_run_id=expected_run_id, skip_deid=skip_deid, note=note, lock_timeout=lock_timeout,
        date_shift=date_shift, keep_routes=keep_routes,
    )


def _run_with_progress(ctx, run, opts):
    progress = make_progress(ctx)
    try:
        return run(opts, progress)
    finally:
        progress.close()


@pipeline_group.command("run")
@run_options
@click.pass_context
def pipeline_run(ctx, **flags):
    """Stage a new export as a run and register it; an unchanged export is a no-op.

    Example: healthdelta pipeline run --input export.zip --out data
    """
    result = _run_with_progress(ctx, pipeline.run_pipeline, _options(**flags))
    _print_notices(ctx, result)
    if result.status == "no_changes":
        click.echo("no changes detected")
        click.echo(f"run_id={result.run_id}")
        return
    click.echo(f"run_id={result.run_id}")
    click.echo(f"staging_dir={result.staging_dir}")
    click.echo(f"run_report={result.run_report}")
    if result.ndjson_dir:
        click.echo(f"ndjson_dir={result.ndjson_dir}")
    if result.deid_dir:
        click.echo(f"deid_dir={result.deid_dir}")
        _share_notice(ctx, result.run_id)


def _print_notices(ctx, result) -> None:
    if result.cleaned:
        notice(ctx, f"removed {len(result.cleaned)} leftover temporary dir(s) of an interrupted run")
    if result.identity_provisional_reason:
        notice(ctx, "notice: the owner of this export could not be resolved safely "
                    f"({result.identity_provisional_reason}); its rows carry a provisional per-run person id")
    if result.status == "already_registered":
        notice(ctx, "this run is already registered; nothing to do")


@cli.group("run")
@global_options
def run_group() -> None:
    """The run registry."""


@run_group.command("all")
@run_options
@click.pass_context
def run_all_cmd(ctx, **flags):
    """Everything for one new export: pipeline run, NDJSON + delta, warehouse, reports.

    Example: healthdelta run all --input export.zip --out data
    """
    result = _run_with_progress(ctx, pipeline.run_all, _options(**flags))
    _print_notices(ctx, result)
    status = "no_changes" if result.status == "no_changes" else "created"
    if result.status == "no_changes":
        click.echo("no changes detected")
    click.echo(f"status={status}")
    click.echo(f"run_id={result.run_id}")
    for name, rel in sorted(result.artifacts.items()):
        click.echo(f"{name}={rel}")
    if flags["mode"] == "share" and result.status != "no_changes":
        _share_notice(ctx, result.run_id)


def _share_notice(ctx, run_id: str) -> None:
    """Share mode's output tree is not the thing to send: it holds the raw export and the keys."""
    notice(ctx, "notice: nothing under --out is meant to be sent as it is (staging/ holds the raw export, "
                "state/ the identity store and its secret); the one file that may leave this machine is the "
                f"bundle: healthdelta share bundle --run {run_id[:12]} --out share.tar.gz")


@run_group.command("register")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path),
              help="A staged run directory, <out>/staging/<run_id>.")
@click.option("--state", type=click.Path(path_type=Path), default=None,
              help="State directory (default <out>/state of the run's <out>).")
@click.option("--note", default=None)
@lock_timeout_option
@global_options
def run_register(run_dir, state, note, lock_timeout):
    """Register an existing staged run and move LAST_RUN to it (idempotent).

    Example: healthdelta run register --run data/staging/<run_id>
    """
    entry = pipeline.register_existing(run_dir, state, note, lock_timeout)
    click.echo(f"run_id={entry['run_id']}")


def _state_option(f):
    return click.option("--state", type=click.Path(path_type=Path), default=Path("data/state"),
                        show_default=True, help="State directory.")(f)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@run_group.command("list")
@_state_option
@global_options
def run_list(state):
    """The registered runs, oldest first.

    Example: healthdelta run list --state data/state
    """
    reg = registry.read_registry(state)
    last = registry.read_last_run(state)
    rows = [("RUN", "PARENT", "CREATED", "FILES", "SIZE", "NOTE")]
    for e in reg.ordered():
        fp = e.get("input_fingerprint", {})
        marker = "*" if e["run_id"] == last else " "
        rows.append((
            marker + e["run_id"][:12], (e.get("parent_run_id") or "-")[:12], e.get("created_at") or "-",
            str(fp.get("file_count", "-")), _human_bytes(int(fp.get("total_bytes", 0))),
            (e.get("notes") or "").replace("\n", " ")[:40],
        ))
    if len(rows) == 1:
        click.echo("no runs registered")
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@run_group.command("show")
@click.argument("run_id")
@_state_option
@global_options
def run_show(run_id, state):
    """One registry entry as key=value lines; RUN_ID may be a unique prefix.

    Example: healthdelta run show 3fa2 --state data/state
    """
    reg = registry.read_registry(state)
    e = reg.resolve(run_id)
    fp = e.get("input_fingerprint", {})
    click.echo(f"run_id={e['run_id']}")
    click.echo(f"parent_run_id={e.get('parent_run_id') or ''}")
    click.echo(f"created_at={e.get('created_at') or ''}")
    click.echo(f"mode={e.get('mode') or ''}")
    click.echo(f"fingerprint={fp.get('sha256', '')}")
    click.echo(f"file_count={fp.get('file_count', '')}")
    click.echo(f"total_bytes={fp.get('total_bytes', '')}")
    for name, rel in sorted(e.get("artifacts", {}).items()):
        click.echo(f"{name}={rel}")
    click.echo(f"children={','.join(reg.children(e['run_id']))}")
    click.echo(f"is_last={'yes' if registry.read_last_run(state) == e['run_id'] else 'no'}")
    click.echo(f"notes={(e.get('notes') or '').replace(chr(10), ' ')}")


@cli.command("ingest")
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/staging"), show_default=True,
              help="Staging directory; the run lands in <out>/<run_id>.")
@global_options
@click.pass_context
def ingest_cmd(ctx, input_path, out):
    """Stage an export without registering it (see `run register`).

    Example: healthdelta ingest --input export.zip --out data/staging
    """
    progress = make_progress(ctx)
    try:
        run_id, staged = pipeline.ingest_only(input_path, out, progress)
    finally:
        progress.close()
    click.echo(f"run_id={run_id}")
    click.echo(f"staging_dir={(out / staged.name).as_posix()}")


@cli.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True,
              help="Directory for the generated exports and the demo's data.")
@global_options
@click.pass_context
def demo_cmd(ctx, out):
    """Generate a synthetic export and its next export, and `run all` on both.

    Example: healthdelta demo --out demo-out
    """
    from healthdelta.demo import run_demo

    progress = make_progress(ctx)
    try:
        result = run_demo(out, progress)
    finally:
        progress.close()
    data = out / "data"
    for i, run in enumerate(result.runs, 1):
        click.echo(f"export_{i}_status={'no_changes' if run.status == 'no_changes' else 'created'}")
        click.echo(f"export_{i}_run_id={run.run_id}")
    last = result.runs[-1]
    if "reports_dir" in last.artifacts:
        click.echo(f"report={(data / last.artifacts['reports_dir'] / 'report.html').as_posix()}")
    click.echo(f"data_dir={data.as_posix()}")
    click.echo(f"next: healthdelta report show --db {(data / 'warehouse.duckdb').as_posix()}")
