"""Cohorts: one export per participant, processed on Dask, pooled as Parquet.

Per participant the task is exactly `run all` (`pipeline.run_all`) with the participant's
own state under `<out>/participants/<id>/` (registry, identity store, NDJSON lineage,
warehouse), so the participant's next export is incremental and an unchanged one is a
no-op; then the runs its warehouse holds and the pooled dataset lacks are published as
Parquet partitions (`parquet.publish_run`). Tasks share nothing but the output file
system, so Dask may run them anywhere and run one again after its worker died: a
retried task finds its registered run, publishes what is missing and replaces any
partition an interrupted attempt left.

Output tree:

    <out>/participants/<id>/...                   one `run all` out dir per participant
    <out>/parquet/<table>/participant=<id>/run=<run_id>/part-0.parquet
    <out>/cohort.duckdb                           views over the Parquet dataset
    <out>/cohort.json                             the last `cohort run`: each participant's outcome

`cohort.duckdb` offers the single-person warehouse's tables and views under the same
names, with a `participant_id` column, over published runs only. A participant's
record keys and person ids are only unique within the participant, so its record keys
read `<participant_id>/<record_key>` there and every view groups by participant first.

The participant id (the name of its folder, zip or manifest row) is the only link
between the pooled rows and a participant; it is the study's pseudonym and is shown in
summaries, so it must not be a name. Share mode (the default) de-identifies every
export before its rows reach the pool.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import duckdb

from healthdelta import parquet, pipeline, registry, warehouse
from healthdelta.errors import HealthDeltaError, InputError, StateError, UsageError
from healthdelta.fsutil import StateLock, atomic_write_json, fsync_dir, remove_orphan_tmp_dirs
from healthdelta.layout import OutLayout
from healthdelta.ndjson import STREAMS
from healthdelta.progress import ProgressFn, no_progress

Mode = Literal["local", "share"]
Status = Literal["created", "no_changes", "failed"]
SUMMARY_SCHEMA_VERSION = 1
PROGRESS_STAGE = "participants"
CONNECT_TIMEOUT = "30s"  # to reach an existing scheduler
# `run all` parses large exports in a process pool, which a daemonic process may not start.
DAEMON_WORKER = ("the Dask worker runs as a daemon process, which cannot start the parse workers; "
                 "start the workers with DASK_DISTRIBUTED__WORKER__DAEMON=False")

# participant id -> the progress callback its task reports to, called inside the worker
# (picklable: Dask ships it). The CLI's test-only fault hook is one.
TaskProgress = Callable[[str], ProgressFn]


@dataclass(frozen=True)
class CohortLayout:
    out: Path

    @property
    def participants(self) -> Path:
        return self.out / "participants"

    @property
    def parquet(self) -> Path:
        return self.out / "parquet"

    @property
    def db(self) -> Path:
        return self.out / "cohort.duckdb"

    @property
    def summary(self) -> Path:
        return self.out / "cohort.json"

    def participant(self, participant_id: str) -> OutLayout:
        return OutLayout.create(self.participants / participant_id)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Participant:
    id: str
    input: Path = field(repr=False)  # never in a log line or a Dask task repr


def participant_id_from_name(name: str) -> str | None:
    """`P01.zip` / `P01` -> `P01`; None for what is not an export entry (hidden, other files)."""
    if name.startswith("."):
        return None
    return name[:-4] if name.lower().endswith(".zip") else name


def _check_ids(participants: list[Participant]) -> list[Participant]:
    ids = [p.id for p in participants]
    if not all(parquet.is_partition_value(i) for i in ids):
        raise UsageError("participant ids may hold only letters, digits, '.', '_' and '-' (at most 64), "
                         "starting with a letter or digit")
    if len(set(ids)) != len(ids):
        raise UsageError("two inputs have the same participant id")
    if not participants:
        raise UsageError("the cohort inputs hold no export (a <participant_id>.zip or folder per participant)")
    return sorted(participants, key=lambda p: p.id)


def discover(inputs: Path, exclude: Path | None = None) -> list[Participant]:
    """The participants of `inputs`: a directory of `<id>.zip` / `<id>/` exports, or a CSV
    manifest with the columns `participant_id,path` (relative paths are taken from the
    manifest's directory). Paths are made absolute: workers do not share our working directory.
    `exclude` (the cohort's output directory, which may sit among the inputs) is skipped."""
    inputs = inputs.absolute()
    if inputs.is_file():
        return _check_ids(_read_manifest(inputs))
    if not inputs.is_dir():
        raise UsageError("--inputs must be a directory of exports or a CSV manifest")
    found = []
    for entry in sorted(inputs.iterdir()):
        pid = participant_id_from_name(entry.name)
        if pid is None or entry == exclude or not (
                entry.is_dir() or (entry.is_file() and entry.name.lower().endswith(".zip"))):
            continue
        found.append(Participant(pid, entry))
    return _check_ids(found)


def _read_manifest(path: Path) -> list[Participant]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        raise UsageError("the cohort manifest could not be read as UTF-8 CSV") from None
    if not rows or not {"participant_id", "path"} <= set(rows[0]):
        raise UsageError("the cohort manifest needs the header `participant_id,path` and one row per participant")
    return [Participant((r["participant_id"] or "").strip(), path.parent / (r["path"] or "").strip())
            for r in rows]


# --------------------------------------------------------------------------- one participant


@dataclass(frozen=True)
class ParticipantResult:
    participant: str
    status: Status
    run_id: str | None = None
    published_runs: int = 0
    rows_added: int = 0  # stream rows the runs published now brought
    reason: str | None = None  # why it failed: a message without paths or values
    seconds: float = 0.0


def failure_reason(exc: BaseException) -> str:
    """A message that is safe to show: ours are written that way, others are named by type only."""
    if isinstance(exc, HealthDeltaError):
        return str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or "input/output error"  # the filename may be a private path
    return f"internal error ({type(exc).__name__})"


def process_participant(participant: Participant, out: str, mode: Mode,
                        task_progress: TaskProgress | None = None) -> ParticipantResult:
    """The Dask task: `run all` for one participant, then publish its unpublished runs.

    Never raises: a bad export fails its participant alone, and an exception would make
    Dask log the task's arguments.
    """
    started = time.monotonic()
    progress = task_progress(participant.id) if task_progress is not None else no_progress
    cohort = CohortLayout(Path(out))
    layout = cohort.participant(participant.id)
    try:
        if multiprocessing.current_process().daemon:
            raise StateError(DAEMON_WORKER)
        result = pipeline.run_all(pipeline.PipelineOptions(input=participant.input, layout=layout, mode=mode),
                                  progress)
        published = publish_participant(cohort, participant.id, progress)
    except Exception as exc:  # noqa: BLE001 - every failure becomes this participant's reason
        return ParticipantResult(participant.id, "failed", reason=failure_reason(exc),
                                 seconds=time.monotonic() - started)
    return ParticipantResult(
        # `already_registered` (an earlier export again) adds nothing either.
        participant.id, "created" if result.status == "created" else "no_changes", run_id=result.run_id,
        published_runs=sum(1 for p in published if p.status == "published"),
        rows_added=sum(p.stream_rows for p in published), seconds=time.monotonic() - started,
    )


def publish_participant(cohort: CohortLayout, participant_id: str,
                        progress: ProgressFn = no_progress) -> list[parquet.PublishResult]:
    """Publish the participant's registered runs that the pooled dataset lacks, oldest first."""
    layout = cohort.participant(participant_id)
    # The participant's state lock: nobody else publishes or loads this participant meanwhile.
    with StateLock(layout.state):
        remove_orphan_tmp_dirs(layout.out)  # work dirs of a publisher that died
        registered = registry.read_registry(layout.state).runs
        runs = [r for r in warehouse.loaded_runs(layout.warehouse) if r in registered]
        if not runs:
            return []
        return parquet.publish_runs(layout.warehouse, cohort.parquet, runs, work_parent=layout.out,
                                    participant=participant_id, progress=progress)


# --------------------------------------------------------------------------- the cohort


@dataclass(frozen=True)
class CohortResult:
    results: tuple[ParticipantResult, ...]
    db: Path | None  # None when no participant has a published run yet

    @property
    def failed(self) -> tuple[ParticipantResult, ...]:
        return tuple(r for r in self.results if r.status == "failed")

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status == status)


def run_cohort(inputs: Path, out: Path, *, mode: Mode = "share", workers: int | None = None,
               scheduler: str | None = None, task_progress: TaskProgress | None = None,
               progress: ProgressFn = no_progress) -> CohortResult:
    """`cohort run`: every participant of `inputs` as one Dask task, then `cohort.duckdb`.

    Without `scheduler`, a `LocalCluster` of `workers` single-threaded processes on this
    machine; with it, the tasks go to that existing cluster, whose workers must see
    `out` (and the inputs) at the same paths.
    """
    if scheduler is not None and workers is not None:
        raise UsageError("--workers sizes the local cluster; with --scheduler the cluster decides")
    if workers is not None and workers < 1:
        raise UsageError("--workers must be at least 1")
    cohort = CohortLayout(out.absolute())
    participants = discover(inputs, exclude=cohort.out)
    cohort.participants.mkdir(parents=True, exist_ok=True)
    with StateLock(cohort.out):
        remove_orphan_tmp_dirs(cohort.out)
        results = _run_on_dask(participants, cohort, mode, workers, scheduler, task_progress, progress)
        db = build_cohort_db(cohort)
        atomic_write_json(cohort.summary, summary(results, mode))
    return CohortResult(results=results, db=db)


def default_workers(participants: int, cores: int | None = None) -> int:
    """One worker per two cores (a task parses with two processes), at most one per participant."""
    return max(1, min(participants, (cores or os.cpu_count() or 2) // 2))


def _run_on_dask(participants: list[Participant], cohort: CohortLayout, mode: Mode, workers: int | None,
                 scheduler: str | None, task_progress: TaskProgress | None,
                 progress: ProgressFn) -> tuple[ParticipantResult, ...]:
    import dask
    import distributed  # noqa: F401 - loads its config defaults, which the `set` below must not pre-empt

    # Local workers must not be daemonic (see DAEMON_WORKER). The nanny reads this each time
    # it (re)starts a worker, so it is set for the cluster's whole life, and no longer.
    with dask.config.set({"distributed.worker.daemon": False}):
        return _run_on_cluster(participants, cohort, mode, workers, scheduler, task_progress, progress)


def _run_on_cluster(participants: list[Participant], cohort: CohortLayout, mode: Mode, workers: int | None,
                    scheduler: str | None, task_progress: TaskProgress | None,
                    progress: ProgressFn) -> tuple[ParticipantResult, ...]:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    try:
        if scheduler is None:
            # Dask's own log lines stay off stderr: the outcome of every task is in our result.
            cluster = LocalCluster(n_workers=workers or default_workers(len(participants)),
                                   threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=logging.CRITICAL)
            client = Client(cluster)
        else:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT)
    except ValueError:
        raise UsageError("--scheduler must be an address such as tcp://host:8786") from None
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise StateError("the Dask scheduler could not be reached" if scheduler else
                         "the local Dask cluster could not be started") from exc
    try:
        # Keys unique per cohort run: two cohorts on one cluster may share participant ids.
        run_token = uuid.uuid4().hex[:12]
        futures = client.map(process_participant, participants, out=str(cohort.out), mode=mode,
                             task_progress=task_progress, pure=False,
                             key=[f"participant-{p.id}-{run_token}" for p in participants])
        by_key = {f.key: p.id for f, p in zip(futures, participants)}
        results = []
        for future in as_completed(futures):
            results.append(_outcome(future, by_key[future.key]))
            progress(PROGRESS_STAGE, 1, len(futures))
        return tuple(sorted(results, key=lambda r: r.participant))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _outcome(future, participant_id: str) -> ParticipantResult:
    from distributed import KilledWorker

    try:
        return future.result()
    except KilledWorker:
        return ParticipantResult(participant_id, "failed",
                                 reason="its Dask worker died on every attempt (out of memory?)")
    except Exception as exc:  # noqa: BLE001 - the cluster lost the task; the participant fails alone
        return ParticipantResult(participant_id, "failed", reason=f"the task was lost ({type(exc).__name__})")


def summary(results: tuple[ParticipantResult, ...], mode: Mode) -> dict:
    """`cohort.json`: deterministic apart from the timings."""
    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "mode": mode,
        "participants": {r.participant: {k: v for k, v in asdict(r).items() if k != "participant"}
                         for r in results},
        "failed": [r.participant for r in results if r.status == "failed"],
    }


# --------------------------------------------------------------------------- cohort.duckdb

# The warehouse's views are created unchanged in the schema `pool`, over base views whose
# person ids and record keys are qualified by participant (`P01/patient-1`): person ids
# such as `patient-1` repeat across participants, so every view then groups by
# participant without its SQL being rewritten. `main` holds one view per name that splits
# the participant off again, so rows read as in the participant's own warehouse.
POOL = "pool"


def public_view(name: str, columns: list[str]) -> str:
    """`main.<name>` over `pool.<name>`: `participant_id` first, person ids as the
    participant's own warehouse has them, record keys left qualified (they are only
    unique within a participant)."""
    sources = []
    if "canonical_person_id" in columns:
        sources.append("split_part(q.canonical_person_id, '/', 1)")
    if "record_key" in columns:
        sources.append("split_part(q.record_key, '/', 1)")
    if "participant_id" in columns or not sources:
        return f"CREATE VIEW main.{name} AS SELECT * FROM {POOL}.{name}"
    participant = sources[0] if len(sources) == 1 else f"COALESCE({', '.join(sources)})"
    replace = ""
    if "canonical_person_id" in columns:
        replace = (" REPLACE (NULLIF(substr(q.canonical_person_id, strpos(q.canonical_person_id, '/') + 1), '') "
                   "AS canonical_person_id)")
    return f"CREATE VIEW main.{name} AS SELECT {participant} AS participant_id, q.*{replace} FROM {POOL}.{name} AS q"


def _reader(root: Path, table: str) -> str:
    glob = parquet.dataset_glob(root, table, participants=True).replace("'", "''")
    return (f"read_parquet('{glob}', hive_partitioning = true, union_by_name = true, "
            f"hive_types = {{'participant': 'VARCHAR', 'run': 'VARCHAR'}})")


def _published(alias: str) -> str:
    return (f"EXISTS (SELECT 1 FROM runs AS p WHERE p.participant_id = {alias}.participant "
            f"AND p.run_id = {alias}.run)")


def base_views(root: Path) -> list[str]:
    """The warehouse's tables as views over the dataset, in the current schema: published
    runs only; record keys and person ids qualified by participant."""
    ddl = [f"CREATE VIEW runs AS SELECT r.* EXCLUDE (participant, run), r.participant AS participant_id "
           f"FROM {_reader(root, 'runs')} AS r"]
    ddl += [f"CREATE VIEW {s} AS SELECT s.* EXCLUDE (participant, run, record_key) "
            f"REPLACE (s.participant || '/' || COALESCE(s.canonical_person_id, '') AS canonical_person_id), "
            f"s.participant || '/' || s.record_key AS record_key "
            f"FROM {_reader(root, s)} AS s WHERE {_published('s')}" for s in STREAMS]
    ddl.append(
        f"CREATE VIEW record_removals AS "
        f"SELECT m.participant || '/' || m.record_key AS record_key, m.stream, m.removed_in_run, "
        f"a.readded_in_run "
        f"FROM {_reader(root, 'record_removals')} AS m "
        f"LEFT JOIN (SELECT * FROM {_reader(root, 'record_readds')} AS a WHERE {_published('a')}) AS a "
        f"ON a.participant = m.participant AND a.record_key = m.record_key AND a.stream = m.stream "
        f"AND a.removed_in_run = m.removed_in_run "
        f"WHERE {_published('m')}")
    return ddl


def build_cohort_db(cohort: CohortLayout) -> Path | None:
    """(Re)write `cohort.duckdb` beside the dataset, renamed into place when complete."""
    if not any(cohort.parquet.glob("runs/participant=*/run=*/" + parquet.PART_FILE)):
        return None
    tmp = cohort.db.with_name(f".tmp-{cohort.db.name}-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"CREATE SCHEMA {POOL}")
        con.execute(f"SET schema = '{POOL}'")
        for ddl in base_views(cohort.parquet):
            con.execute(ddl)
        # Participants' own source orders stay in their own warehouses: the pool ranks
        # sources by the default order (docs/runbook_cohort.md).
        warehouse.ensure_source_priority(con)
        for ddl in (*warehouse._MACROS, *warehouse.VIEWS.values()):  # the warehouse's own, unchanged
            con.execute(ddl)
        con.execute("SET schema = 'main'")
        for name in (*STREAMS, "runs", "record_removals", *warehouse.VIEWS):
            con.execute(public_view(name, con.table(f"{POOL}.{name}").columns))
        con.execute("CHECKPOINT")
    except duckdb.Error as exc:
        raise HealthDeltaError(f"cohort.duckdb could not be built ({type(exc).__name__})") from exc
    finally:
        con.close()
    os.replace(tmp, cohort.db)
    fsync_dir(cohort.out)
    return cohort.db


def cohort_status(out: Path) -> dict:
    """`cohort status`: participants, published runs and rows (from `cohort.duckdb`), last failures."""
    from healthdelta import api

    cohort = CohortLayout(out)
    if not cohort.participants.is_dir():
        raise InputError("there is no cohort in that directory; `healthdelta cohort run` makes one")
    last = json.loads(cohort.summary.read_text(encoding="utf-8")) if cohort.summary.is_file() else {}
    # A participant whose first export failed has no directory (a failed run leaves none).
    people = {p.name for p in cohort.participants.iterdir() if parquet.is_partition_value(p.name)}
    per: dict[str, dict] = {p: {"runs": 0, "rows": 0} for p in sorted(people | set(last.get("participants", {})))}
    if cohort.db.is_file():
        with api.open(cohort.db) as wh:
            for pid, runs in wh.sql("SELECT participant_id, count(*) FROM runs GROUP BY ALL").fetchall():
                per.setdefault(pid, {"runs": 0, "rows": 0})["runs"] = runs
            union = " UNION ALL ".join(f"SELECT participant_id FROM {s}" for s in STREAMS)
            for pid, rows in wh.sql(f"SELECT participant_id, count(*) FROM ({union}) GROUP BY ALL").fetchall():
                per[pid]["rows"] = rows
    failures = {pid: last["participants"][pid].get("reason") for pid in last.get("failed", [])}
    return {"participants": per, "failures": failures, "mode": last.get("mode")}
