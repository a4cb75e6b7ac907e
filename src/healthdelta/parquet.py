"""The warehouse as an open columnar dataset: Hive-partitioned Parquet, one run at a time.

Layout under a dataset root (one directory per table, one partition per run):

    <root>/<table>/[participant=<id>/]run=<run_id>/part-0.parquet

Tables: the stream tables with their warehouse columns and types, `record_removals`
(the removals a run's delta made), `record_readds` (removed records a run brought
back) and `runs` (the run's warehouse row). A partition holds what that run added to
the warehouse, so a partition never changes once written and a run's partition costs
what its delta costs: stream rows whose `run_id` is the run (the records it was first
to bring), its removals, its re-adds.

Crash safety: every partition of a run is written into one work directory and renamed
into place table by table, `runs` last. A run counts as published only when its
`runs` partition exists; readers that join on `runs` (as `cohort.duckdb` does) never
see a half-published run, and publishing it again replaces whatever the interrupted
attempt left. Work directories live outside the table directories, so a glob over a
table never meets a temporary file.

DuckDB writes the files (`COPY ... TO ... (FORMAT PARQUET)`), rows ordered by key so
the same warehouse gives the same rows in the same order.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb

from healthdelta import registry, warehouse
from healthdelta.errors import HealthDeltaError, InputError
from healthdelta.fsutil import StateLock, WorkDir, fsync_dir, remove_orphan_tmp_dirs
from healthdelta.ndjson import STREAMS
from healthdelta.progress import ProgressFn, no_progress

PART_FILE = "part-0.parquet"
TABLES = (*STREAMS, "record_removals", "record_readds", "runs")  # `runs` last: it publishes the run
PROGRESS_STAGE = "parquet"
# Ordering a large run's rows by key must not take the machine (DuckDB's default is 80% of
# RAM, per process, and a cohort runs several): past this it spills into the work dir.
MEMORY_LIMIT = "512MB"

# Partition values become directory names and SQL literals: only these characters.
_PARTITION_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def is_partition_value(text: str) -> bool:
    return bool(_PARTITION_VALUE.fullmatch(text)) and ".." not in text


def _select(table: str, run_id: str) -> str:
    """The rows of `table` that loading `run_id` added, in a fixed order."""
    if table in STREAMS:
        return f"SELECT * FROM {table} WHERE run_id = '{run_id}' ORDER BY record_key"
    if table == "record_removals":
        return (f"SELECT record_key, stream, removed_in_run FROM record_removals "
                f"WHERE removed_in_run = '{run_id}' ORDER BY stream, record_key")
    if table == "record_readds":
        return (f"SELECT record_key, stream, removed_in_run, readded_in_run FROM record_removals "
                f"WHERE readded_in_run = '{run_id}' ORDER BY stream, record_key, removed_in_run")
    return f"SELECT * FROM runs WHERE run_id = '{run_id}'"


def partition_dir(root: Path, table: str, run_id: str, participant: str | None = None) -> Path:
    base = root / table
    if participant is not None:
        base = base / f"participant={participant}"
    return base / f"run={run_id}"


def is_published(root: Path, run_id: str, participant: str | None = None) -> bool:
    return (partition_dir(root, "runs", run_id, participant) / PART_FILE).is_file()


def _sql_path(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


@dataclass(frozen=True)
class PublishResult:
    run_id: str
    status: str  # 'published' or 'already_published'
    rows: dict[str, int]  # per table

    @property
    def stream_rows(self) -> int:
        return sum(n for t, n in self.rows.items() if t in STREAMS)


def publish_run(con: duckdb.DuckDBPyConnection, root: Path, run_id: str, *, work_parent: Path,
                participant: str | None = None, progress: ProgressFn = no_progress) -> PublishResult:
    """Write the partitions of one loaded run under `root`, atomically per partition, `runs` last.

    The caller serialises publishers of the same partitions (a lock); `work_parent`
    must be on the file system of `root` and outside its table directories.
    """
    if not registry.is_run_id(run_id):
        raise InputError("a run id must be 64 lowercase hex characters")
    if participant is not None and not is_partition_value(participant):
        raise InputError("a participant id may hold only letters, digits, '.', '_' and '-' (at most 64)")
    if is_published(root, run_id, participant):
        return PublishResult(run_id=run_id, status="already_published", rows={})
    rows: dict[str, int] = {}
    with WorkDir(work_parent, f"parquet-{run_id[:16]}") as work:
        con.execute(f"SET temp_directory = {_sql_path(work.path / 'spill')}")
        for table in TABLES:
            target = work.path / table / PART_FILE
            target.parent.mkdir()
            try:
                con.execute(f"COPY ({_select(table, run_id)}) TO {_sql_path(target)} (FORMAT PARQUET)")
                rows[table] = con.execute(f"SELECT count(*) FROM read_parquet({_sql_path(target)})").fetchone()[0]
            except duckdb.Error as exc:  # DuckDB's messages quote paths
                raise HealthDeltaError(f"the Parquet files could not be written ({type(exc).__name__})") from exc
            with open(target, "rb") as fh:
                os.fsync(fh.fileno())
        for table in TABLES:  # `runs` last: from its rename on, the run is published
            final = partition_dir(root, table, run_id, participant)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # left by an attempt that died before `runs`: never published
                shutil.rmtree(final)
            os.rename(work.path / table, final)
            fsync_dir(final.parent)
            progress(PROGRESS_STAGE, 1, len(TABLES))
    return PublishResult(run_id=run_id, status="published", rows=rows)


def publish_runs(db_path: Path, root: Path, run_ids: list[str] | None = None, *, work_parent: Path,
                 participant: str | None = None, progress: ProgressFn = no_progress) -> list[PublishResult]:
    """Publish the given loaded runs (default: every loaded run, in load order) that are not yet."""
    loaded = warehouse.loaded_runs(db_path)
    if not loaded:
        raise InputError("the warehouse holds no run yet; `healthdelta run all` loads one")
    wanted = loaded if run_ids is None else run_ids
    missing = [r for r in wanted if r not in loaded]
    if missing:
        raise InputError("that run is not loaded in the warehouse")
    con = warehouse.connect(db_path, read_only=True)
    try:
        con.execute("SET preserve_insertion_order = true")
        con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
        return [publish_run(con, root, run_id, work_parent=work_parent, participant=participant,
                            progress=progress) for run_id in wanted]
    finally:
        con.close()


def export_warehouse(db_path: Path, out: Path, run: str | None = None,
                     progress: ProgressFn = no_progress) -> list[PublishResult]:
    """`export parquet`: a single user's warehouse as `<out>/<table>/run=<run_id>/part-0.parquet`.

    `run` (an id or a unique prefix) limits it to one run; runs already in `out` are kept.
    """
    run_ids = None
    if run is not None:
        matches = [r for r in warehouse.loaded_runs(db_path) if r.startswith(run)]
        if len(matches) != 1:
            raise InputError("--run matches no loaded run" if not matches else "--run is ambiguous; give more of it")
        run_ids = matches
    out.mkdir(parents=True, exist_ok=True)
    # The lock file and work dirs sit beside the table directories, never inside one.
    with StateLock(out):
        remove_orphan_tmp_dirs(out)
        return publish_runs(db_path, out, run_ids, work_parent=out, progress=progress)


def dataset_glob(root: Path, table: str, participants: bool) -> str:
    """The glob readers use: partition directories only, so nothing else is ever read."""
    parts = [str(root / table)] + (["participant=*"] if participants else []) + ["run=*", "*.parquet"]
    return "/".join(parts)
