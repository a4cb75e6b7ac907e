"""`duckdb build|query` and `report build|show`."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from healthdelta import registry, report, sources, units, warehouse
from healthdelta.cli.options import cli, global_options, lock_timeout_option, make_progress, notice
from healthdelta.errors import UsageError
from healthdelta.fsutil import StateLock, WorkDir, json_bytes, publish_file


@cli.group("duckdb")
@global_options
def duckdb_group() -> None:
    """The DuckDB warehouse: load NDJSON runs, query read-only."""


def _state_dir(ndjson_input: Path, state: Path | None) -> Path:
    if state is None:
        out = ndjson_input.parent.parent if (ndjson_input / "delta.json").is_file() else ndjson_input.parent
        state = out / "state"
    return state


def _registry_entries(state: Path) -> dict[str, dict]:
    """Registry entries (created_at, notes, ...) of the runs, when a state dir is at hand."""
    if not (state / "runs.json").is_file():
        return {}
    return registry.read_registry(state).runs


@duckdb_group.command("build")
@click.option("--input", "ndjson_input", required=True, type=click.Path(path_type=Path),
              help="<out>/ndjson (every run in it) or one run directory <out>/ndjson/<run_id>.")
@click.option("--db", "db_path", required=True, type=click.Path(path_type=Path),
              help="The warehouse file, e.g. <out>/warehouse.duckdb; created if missing.")
@click.option("--replace", is_flag=True,
              help="Build a new warehouse from scratch, renamed over the old one once complete.")
@click.option("--state", type=click.Path(path_type=Path), default=None,
              help="State directory whose runs.json describes the runs (default <out>/state, if present).")
@click.option("--source-priority", "priority_path", type=click.Path(path_type=Path), default=None,
              help="JSON file ordering the sources, most trusted first (default <state>/source_priority.json, "
                   "if present; else manual, watch, phone, other).")
@lock_timeout_option
@global_options
@click.pass_context
def duckdb_build(ctx, ndjson_input, db_path, replace, state, priority_path, lock_timeout):
    """Load the NDJSON runs the warehouse lacks (parents first); loading a run twice changes nothing.

    Example: healthdelta duckdb build --input data/ndjson --db data/warehouse.duckdb
    """
    state = _state_dir(ndjson_input, state)
    entries = _registry_entries(state)
    if priority_path is None and (state / sources.FILE_NAME).is_file():
        priority_path = state / sources.FILE_NAME
    priority = sources.read_priority_file(priority_path) if priority_path is not None else None
    # `run all` writes the same warehouse under the state lock: a build (a --replace above
    # all, which renames a new file over it) waits its turn. No state dir: nothing to share.
    lock = StateLock(state, lock_timeout) if state.is_dir() else contextlib.nullcontext()
    progress = make_progress(ctx)
    try:
        with lock:
            result = warehouse.build(ndjson_input, db_path, replace=replace, registry_entries=entries,
                                     progress=progress)
            if priority is not None:
                warehouse.set_source_priority(db_path, priority)
    finally:
        progress.close()
    unknown = sorted({f for r in result.runs for f in r.unknown_fields})
    if unknown:
        notice(ctx, f"warning: the NDJSON has fields this warehouse version does not store: {', '.join(unknown)} "
                    f"(they stay in the NDJSON)")
    click.echo(f"db={db_path.as_posix()}")
    click.echo(f"runs_loaded={result.loaded}")
    click.echo(f"runs_already_loaded={len(result.runs) - result.loaded}")
    click.echo(f"rows_inserted={sum(r.rows_inserted for r in result.runs)}")
    click.echo(f"rows_removed={sum(r.rows_removed for r in result.runs)}")
    if result.unregistered:
        notice(ctx, f"skipped {len(result.unregistered)} NDJSON run dir(s) that are not in the registry")


@duckdb_group.command("query")
@click.option("--db", "db_path", required=True, type=click.Path(path_type=Path), help="The warehouse file.")
@click.option("--sql", required=True, help="One SQL statement; the warehouse is opened read-only.")
@click.option("--format", "fmt", type=click.Choice(warehouse.QUERY_FORMATS), default="csv", show_default=True,
              help="csv: header line, NULL as empty. json: one JSON array, a row object per line. "
                   "parquet: DuckDB's Parquet file (needs --out).")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None,
              help="Write the result to this file (atomically) instead of stdout.")
@global_options
def duckdb_query(db_path, sql, fmt, out_path):
    """Run one SQL statement read-only and write its result as CSV, JSON or Parquet.

    Example: healthdelta duckdb query --db data/warehouse.duckdb --sql "SELECT * FROM daily_steps"
    --format parquet --out steps.parquet
    """
    if out_path is None:
        if fmt == "parquet":
            raise UsageError("--format parquet writes a file: give --out FILE")
        warehouse.query(db_path, sql, sys.stdout.buffer, fmt)
        sys.stdout.buffer.flush()
        return
    if out_path.is_dir():
        raise UsageError("--out must be a file, not a directory")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with WorkDir(out_path.parent, "query") as work:
        result = work.path / "result"
        if fmt == "parquet":
            rows = warehouse.query_parquet(db_path, sql, result)
        else:
            with open(result, "wb") as fh:
                rows = warehouse.query(db_path, sql, fh, fmt)
        publish_file(result, out_path)
    click.echo(f"out={out_path.as_posix()}")
    click.echo(f"rows={rows}")


@cli.group("report")
@global_options
def report_group() -> None:
    """Reports from the warehouse: files for people, a summary for the terminal."""


@report_group.command("build")
@click.option("--db", "db_path", required=True, type=click.Path(path_type=Path), help="The warehouse file.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory receiving the report files (replaced as a whole).")
@click.option("--mode", type=click.Choice(report.MODES), default="local", show_default=True,
              help="share: people as `Patient N`, no names, sources or identifiers.")
@click.option("--run", "run_id", default=None,
              help="Run (id or prefix) for the 'since last run' section (default: the run loaded last).")
@click.option("--labels", "labels_path", type=click.Path(path_type=Path), default=None,
              help="JSON object mapping canonical_person_id to a label (share mode: `Patient N`).")
@click.option("--units", "units_system", type=click.Choice(units.SYSTEMS), default=None,
              help="Units of charts and values (default: those the export is written in, e.g. us for en_US).")
@click.option("--state", type=click.Path(path_type=Path), default=None,
              help="State directory whose identity store names people in local mode (default: the "
                   "warehouse's <out>/state, if present).")
@global_options
@click.pass_context
def report_build(ctx, db_path, out_dir, mode, run_id, labels_path, units_system, state):
    """Write summary.json, summary.md, three coverage/timeline CSVs and a self-contained report.html.

    Example: healthdelta report build --db data/warehouse.duckdb --out data/reports/latest --mode share
    """
    labels = None
    if labels_path is not None:
        try:
            labels = json.loads(labels_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UsageError("--labels must be a readable JSON file") from None
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise UsageError("--labels must hold a JSON object of strings")
    elif mode == "local":
        identity_dir = (state or db_path.parent / "state") / "identity"
        if (identity_dir / "people.json").is_file():
            labels = report.local_person_labels(identity_dir)
    progress = make_progress(ctx)
    try:
        result = report.build_report(db_path, out_dir, mode=mode, run_id=run_id, person_labels=labels,
                                     units_system=units_system, progress=progress)
    finally:
        progress.close()
    click.echo(f"report_dir={out_dir.as_posix()}")
    click.echo(f"mode={result.mode}")
    if result.run_id:
        click.echo(f"run_id={result.run_id}")
    click.echo(f"people={result.people}")
    click.echo(f"files={','.join(result.files)}")


@report_group.command("show")
@click.option("--db", "db_path", required=True, type=click.Path(path_type=Path), help="The warehouse file.")
@click.option("--units", "units_system", type=click.Choice(units.SYSTEMS), default=None,
              help="Units of the values shown (default: those the export is written in).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@global_options
def report_show(db_path, units_system, as_json):
    """Print a short summary: tables and row counts, people, date range, top types, last run's delta.

    Example: healthdelta report show --db data/warehouse.duckdb
    """
    if as_json:
        click.echo(json_bytes(report.show_data(db_path, units_system=units_system)).decode("utf-8"), nl=False)
        return
    for line in report.show(db_path, units_system=units_system):
        click.echo(line)
