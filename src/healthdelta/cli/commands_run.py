"""`pipeline run`, `run register|list|show` and `ingest`."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import click

from healthdelta import pipeline, registry
from healthdelta.fsutil import json_bytes
from healthdelta.cli.options import (
    cli, global_options, json_option, layout_from, lock_timeout_option, make_progress, notice, out_options,
    self_command,
)


@cli.group("pipeline")
@global_options
def pipeline_group() -> None:
    """Stateful pipeline runs."""


def run_options(f):
    """The flags `pipeline run` and `run all` share."""
    for option in reversed([
        click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
                     help="export.zip, the apple_health_export folder, its parent, or export.xml alone."),
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
        click.option("--allow-older", is_flag=True,
                     help="Accept an export older than the same person's latest run (its delta then "
                          "shows the newer records as removed)."),
        json_option,
        lock_timeout_option,
        global_options,
    ]):
        f = option(f)
    return f


def _options(input_path, out, state, mode, since, expected_run_id, skip_deid, date_shift, keep_routes, note,
             allow_older, lock_timeout, as_json=False) -> pipeline.PipelineOptions:
    return pipeline.PipelineOptions(
        input=input_path, layout=layout_from(out, state), mode=mode, since=since,
        expected_run_id=expected_run_id, skip_deid=skip_deid, note=note, lock_timeout=lock_timeout,
        date_shift=date_shift, keep_routes=keep_routes, allow_older=allow_older,
    )


def _emit(summary: dict, as_json: bool, lines: tuple[str, ...] = ()) -> None:
    """The result as `key=value` lines (preceded by any plain lines), or as one JSON object."""
    if as_json:
        _echo_json(summary)
        return
    for line in lines:
        click.echo(line)
    for key, value in summary.items():
        click.echo(f"{key}={'' if value is None else value}")


def _echo_json(obj: dict) -> None:
    click.echo(json_bytes(obj).decode("utf-8"), nl=False)


def _shown(layout, rel: str) -> str:
    """An artifact path as the user can use it from here: relative to the current directory
    when it is below it, else under `--out` as they typed it."""
    path = layout.out / rel
    here = os.path.relpath(path.absolute())
    return Path(here).as_posix() if not here.startswith("..") else path.as_posix()


def _run_with_progress(ctx, run, opts):
    progress = make_progress(ctx)
    try:
        return run(opts, progress)
    finally:
        progress.close()


@pipeline_group.command("run")
@run_options
@click.pass_context
def pipeline_run(ctx, as_json, **flags):
    """Stage a new export as a run and register it; an unchanged export is a no-op.

    Example: healthdelta pipeline run --input export.zip --out data
    """
    opts = _options(**flags)
    result = _run_with_progress(ctx, pipeline.run_pipeline, opts)
    _print_notices(ctx, result)
    if result.status == "no_changes":
        # The seed's exact output: `no changes detected`, then `run_id=<parent>`.
        summary = {"status": "no_changes", "run_id": result.run_id} if as_json else {"run_id": result.run_id}
        _emit(summary, as_json, ("no changes detected",))
        return
    summary = {"status": "created", "run_id": result.run_id} if as_json else {"run_id": result.run_id}
    for key in ("staging_dir", "run_report", "ndjson_dir", "deid_dir"):
        if getattr(result, key):
            summary[key] = _shown(opts.layout, getattr(result, key))
    _emit(summary, as_json)
    if result.deid_dir:
        _share_notice(ctx, opts.layout, result.run_id)


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
def run_all_cmd(ctx, as_json, **flags):
    """Everything for one new export: pipeline run, NDJSON + delta, warehouse, reports.

    Example: healthdelta run all --input export.zip --out data
    """
    opts = _options(**flags)
    result = _run_with_progress(ctx, pipeline.run_all, opts)
    _print_notices(ctx, result)
    unchanged = result.status == "no_changes"
    summary: dict = {"status": "no_changes" if unchanged else "created", "run_id": result.run_id}
    if not unchanged:
        summary["delta_base_run_id"] = result.delta_base_run_id
    summary.update((name, _shown(opts.layout, rel)) for name, rel in sorted(result.artifacts.items()))
    report = opts.layout.reports / result.run_id / "report.html"
    if report.is_file():  # also for a no-op: the report of the run that already holds this export
        summary["report"] = _shown(opts.layout, opts.layout.rel(report))
    _emit(summary, as_json, ("no changes detected",) if unchanged else ())
    if flags["mode"] == "share" and not unchanged:
        _share_notice(ctx, opts.layout, result.run_id)


def _share_notice(ctx, layout, run_id: str) -> None:
    """Share mode's output tree is not the thing to send: it holds the raw export and the keys."""
    out = _shown(layout, ".")
    notice(ctx, "notice: nothing under --out is meant to be sent as it is (staging/ holds the raw export, "
                "state/ the identity store and its secret); the one file that may leave this machine is the "
                f"bundle: {self_command()} share bundle --run {run_id[:12]} --out-dir {shlex.quote(out)} "
                "--out share.tar.gz")


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
@json_option
@global_options
def run_list(state, as_json):
    """The registered runs, oldest first: whose export each is and what its delta was
    taken against (BASE). `*` marks LAST_RUN; `pruned` runs keep only their small files.

    Example: healthdelta run list --state data/state
    """
    runs = pipeline.list_runs(state)
    if as_json:
        _echo_json({"runs": runs})
        return
    if not runs:
        click.echo("no runs registered")
        return
    rows = [("RUN", "PARENT", "PERSON", "BASE", "CREATED", "FILES", "SIZE", "NOTE")]
    for e in runs:
        fp = e.get("input_fingerprint", {})
        rows.append((
            ("*" if e["is_last"] else " ") + e["run_id"][:12], (e.get("parent_run_id") or "-")[:12],
            e["person"] or "-", _base_column(e), e.get("created_at") or "-",
            str(fp.get("file_count", "-")), _human_bytes(int(fp.get("total_bytes", 0))),
            ("(pruned) " if e.get("pruned") else "") + (e.get("notes") or "").replace("\n", " ")[:40],
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _base_column(entry: dict) -> str:
    if "delta_base_run_id" not in entry:
        return "?"  # registered before lineage was recorded
    return (entry["delta_base_run_id"] or "first")[:12]


@run_group.command("show")
@click.argument("run_id")
@_state_option
@json_option
@global_options
def run_show(run_id, state, as_json):
    """One registry entry as key=value lines; RUN_ID may be a unique prefix.

    Example: healthdelta run show 3fa2 --state data/state
    """
    wanted = registry.read_registry(state).resolve(run_id)["run_id"]
    e = next(r for r in pipeline.list_runs(state) if r["run_id"] == wanted)
    if as_json:
        _echo_json(e)
        return
    fp = e.get("input_fingerprint", {})
    click.echo(f"run_id={e['run_id']}")
    click.echo(f"parent_run_id={e.get('parent_run_id') or ''}")
    click.echo(f"person={e['person'] or ''}")
    click.echo(f"delta_base_run_id={e.get('delta_base_run_id') or ''}")
    click.echo(f"export_date={e.get('export_date') or ''}")
    click.echo(f"created_at={e.get('created_at') or ''}")
    click.echo(f"mode={e.get('mode') or ''}")
    click.echo(f"fingerprint={fp.get('sha256', '')}")
    click.echo(f"file_count={fp.get('file_count', '')}")
    click.echo(f"total_bytes={fp.get('total_bytes', '')}")
    for name, rel in sorted(e.get("artifacts", {}).items()):
        click.echo(f"{name}={rel}")
    click.echo(f"pruned={(e.get('pruned') or {}).get('at', '')}")
    click.echo(f"children={','.join(e['children'])}")
    click.echo(f"is_last={'yes' if e['is_last'] else 'no'}")
    click.echo(f"notes={(e.get('notes') or '').replace(chr(10), ' ')}")


@run_group.command("prune")
@out_options
@click.option("--keep", type=click.IntRange(min=1), required=True,
              help="How many of the newest runs keep everything.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; change nothing.")
@json_option
@lock_timeout_option
@global_options
def run_prune(out, state, keep, dry_run, as_json, lock_timeout):
    """Free the disk space of old runs: their staged export copy, de-identified copy and
    full NDJSON streams go; the registry, delta files, reports and the warehouse (which
    holds every record) stay. Each person's latest run and LAST_RUN are always kept.

    Example: healthdelta run prune --out data --keep 2 --dry-run
    """
    from healthdelta.prune import prune_runs

    result = prune_runs(layout_from(out, state), keep=keep, dry_run=dry_run, lock_timeout=lock_timeout)
    summary = {"dry_run": result.dry_run, "pruned": len(result.pruned), "kept": len(result.kept),
               "freed_bytes": result.bytes_freed}
    if as_json:
        _echo_json({**summary, "pruned_runs": list(result.pruned), "kept_runs": list(result.kept)})
        return
    for rid in result.pruned:
        click.echo(f"{'would prune' if dry_run else 'pruned'} {rid[:12]}")
    click.echo(f"dry_run={'yes' if dry_run else 'no'}")
    click.echo(f"pruned={summary['pruned']}")
    click.echo(f"kept={summary['kept']}")
    click.echo(f"freed={_human_bytes(result.bytes_freed)}")


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
    click.echo(f"next: {self_command()} report show --db {shlex.quote((data / 'warehouse.duckdb').as_posix())}")
