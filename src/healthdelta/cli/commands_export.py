"""`export ndjson|validate|profile|parquet`."""

from __future__ import annotations

from pathlib import Path

import click

from healthdelta import parquet, pipeline, profile, validate
from healthdelta.cli.options import cli, global_options, make_progress
from healthdelta.errors import UsageError
from healthdelta.fsutil import atomic_write_json


@cli.group("export")
@global_options
def export_group() -> None:
    """Canonical NDJSON: write, validate, profile."""


@export_group.command("ndjson")
@click.option("--input", "run_dir", required=True, type=click.Path(path_type=Path),
              help="A staged run directory, <out>/staging/<run_id>, or a stored NDJSON run, "
                   "<out>/ndjson/<run_id> (its files are written plain).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/ndjson"), show_default=True,
              help="Receives <run_id>/; the delta is taken against <out>/<parent_run_id>/ if present.")
@click.option("--mode", type=click.Choice(["local", "share"]), default="local", show_default=True,
              help="local only here: share-mode NDJSON is written by `pipeline run --mode share`, "
                   "which de-identifies the export first.")
@global_options
@click.pass_context
def export_ndjson(ctx, run_dir, out, mode):
    """Write the plain canonical NDJSON streams, key index and delta of one run.

    From a staged run the streams are computed; from a stored NDJSON run (kept compressed
    as <stream>.ndjson.zst) they are written out as plain <stream>.ndjson.

    Example: healthdelta export ndjson --input data/staging/<run_id> --out exported
    """
    if mode == "share":
        raise UsageError("`export ndjson` writes local-mode NDJSON; share-mode NDJSON comes from "
                         "`pipeline run --mode share` (or `run all --mode share`), which de-identifies first")
    progress = make_progress(ctx)
    try:
        result = pipeline.export_ndjson(run_dir, out, progress)
    finally:
        progress.close()
    click.echo(f"run_id={result.run_id}")
    click.echo(f"ndjson_dir={(out / result.run_id).as_posix()}")
    click.echo(f"rows={sum(result.counts.values())}")
    click.echo(f"added={sum(d['added'] for d in result.delta.values())}")
    click.echo(f"removed={sum(d['removed'] for d in result.delta.values())}")


@export_group.command("validate")
@click.option("--input", "ndjson_dir", required=True, type=click.Path(path_type=Path),
              help="An NDJSON run directory, <out>/ndjson/<run_id> (plain or .zst stream files).")
@click.option("--banned-token", "tokens", multiple=True,
              help="Text that must not appear, whatever its case, accents or apostrophes (repeatable).")
@click.option("--banned-regex", "regexes", multiple=True, help="Pattern that must not match (repeatable).")
@global_options
def export_validate(ndjson_dir, tokens, regexes):
    """Check schema, order, encoding and banned content; prints `ok` or ERROR lines.

    Example: healthdelta export validate --input data/ndjson/<run_id> --banned-token "Jane Doe"
    """
    import re

    for r in regexes:
        try:
            re.compile(r)
        except re.error:
            raise UsageError("--banned-regex is not a valid regular expression") from None
    errors = 0
    for finding in validate.validate_dir(ndjson_dir, tuple(tokens), tuple(regexes)):
        click.echo(str(finding))
        errors += 1
    if errors:
        click.echo(f"errors={errors}")
        raise click.exceptions.Exit(1)
    click.echo("ok")


@export_group.command("profile")
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="export.zip, the apple_health_export folder, its parent, or export.xml alone.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for profile.json.")
@global_options
@click.pass_context
def export_profile(ctx, input_path, out):
    """Share-safe profile of an export: counts by type and extension, sizes; no values or dates.

    Example: healthdelta export profile --input export.zip --out profile/
    """
    progress = make_progress(ctx)
    try:
        prof = profile.profile_export(input_path, out, progress)
    finally:
        progress.close()
    atomic_write_json(out / "profile.json", prof)
    click.echo(f"profile={(out / 'profile.json').as_posix()}")
    click.echo(f"files={prof['files']['count']}")
    click.echo(f"rows={sum(prof['rows_by_stream'].values())}")


@export_group.command("parquet")
@click.option("--db", "db_path", type=click.Path(path_type=Path), default=Path("data/warehouse.duckdb"),
              show_default=True, help="The warehouse file.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Dataset directory: <out>/<table>/run=<run_id>/part-0.parquet.")
@click.option("--run", "run_id", default=None, help="Only this run (id or unique prefix); default every loaded run.")
@global_options
@click.pass_context
def export_parquet(ctx, db_path, out, run_id):
    """Write the warehouse as Hive-partitioned Parquet, one partition per run and table (runs written before are kept).

    Example: healthdelta export parquet --db data/warehouse.duckdb --out data/parquet
    """
    progress = make_progress(ctx)
    try:
        results = parquet.export_warehouse(db_path, out, run_id, progress)
    finally:
        progress.close()
    click.echo(f"parquet={out.as_posix()}")
    click.echo(f"runs_written={sum(1 for r in results if r.status == 'published')}")
    click.echo(f"runs_already_written={sum(1 for r in results if r.status == 'already_published')}")
    click.echo(f"rows={sum(r.stream_rows for r in results)}")
