"""Cohorts: many participants on Dask, the pooled Parquet dataset, cohort.duckdb, the Python API.

The end-to-end scenario runs the real CLI twice over six generated participants (two
zips, three folders, one damaged zip): once on a Dask scheduler the test starts, once on
the CLI's own `--workers 2` LocalCluster with one participant's next export. Every
number is checked against the same exports through single-person `run all`.
"""

from __future__ import annotations

import doctest
import shutil
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest

from healthdelta import cohort, parquet, warehouse
from healthdelta.errors import HealthDeltaError, UsageError
from healthdelta.layout import OutLayout
from healthdelta.ndjson import STREAMS
from healthdelta.pipeline import PipelineOptions, run_all
from healthdelta.synth import generate_export

from conftest import Cli, assert_one_error_line

ROOT = Path(__file__).resolve().parent.parent
GOOD = ("P01", "P02", "P03", "P04", "P05")
DAMAGED = "P06"
NUMERIC_VIEWS = ("daily_steps", "resting_heart_rate_daily", "sleep_nightly", "body_mass", "workout_summary")


# --------------------------------------------------------------------------- pure rules


def test_participant_id_from_name():
    assert cohort.participant_id_from_name("P01.zip") == "P01"
    assert cohort.participant_id_from_name("P01.ZIP") == "P01"
    assert cohort.participant_id_from_name("s-17") == "s-17"
    assert cohort.participant_id_from_name(".DS_Store") is None


def test_partition_values_are_safe_path_and_sql_text():
    assert parquet.is_partition_value("P01")
    assert parquet.is_partition_value("study.a_1-2")
    for bad in ("", "../x", "a/b", "a=b", "a'b", ".hidden", "a..b", "x" * 65, "Jane Doe"):
        assert not parquet.is_partition_value(bad), bad


def test_discover_directory_and_manifest(tmp_path):
    (tmp_path / "in" / "P02").mkdir(parents=True)
    (tmp_path / "in" / "P01.zip").write_bytes(b"")
    (tmp_path / "in" / "notes.txt").write_text("ignored\n")
    (tmp_path / "in" / ".hidden").mkdir()
    (tmp_path / "in" / "cohort-out").mkdir()
    found = cohort.discover(tmp_path / "in", exclude=tmp_path / "in" / "cohort-out")
    assert [(p.id, p.input.name) for p in found] == [("P01", "P01.zip"), ("P02", "P02")]
    assert "in" not in repr(found[0])  # the input path never reaches a log line

    manifest = tmp_path / "m.csv"
    manifest.write_text("participant_id,path\nB7,in/P02\nA1,in/P01.zip\n")
    assert [(p.id, p.input) for p in cohort.discover(manifest)] == [
        ("A1", tmp_path / "in" / "P01.zip"), ("B7", tmp_path / "in" / "P02")]


@pytest.mark.parametrize("text, message", [
    ("participant_id,path\nA1,x\nA1,y\n", "same participant id"),
    ("participant_id,path\nJane Doe,x\n", "participant ids may hold only"),
    ("id,file\nA1,x\n", "header"),
    ("participant_id,path\n", "header"),
])
def test_bad_manifests_are_usage_errors_without_values(tmp_path, text, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(UsageError, match=message) as info:
        cohort.discover(manifest)
    assert "Jane" not in str(info.value)


def test_public_views_split_the_participant_off_again():
    con = duckdb.connect()
    con.execute("CREATE SCHEMA pool")
    con.execute("CREATE VIEW pool.v AS SELECT * FROM (VALUES ('P01/patient-1', 'P01/k1', 3), ('P02/', 'P02/k2', 4),"
                " (NULL, 'P03/k3', 5)) AS t(canonical_person_id, record_key, n)")
    con.execute(cohort.public_view("v", con.table("pool.v").columns))
    assert con.sql("SELECT * FROM main.v").fetchall() == [
        ("P01", "patient-1", "P01/k1", 3), ("P02", None, "P02/k2", 4), ("P03", None, "P03/k3", 5)]
    con.execute("CREATE VIEW pool.c AS SELECT 1 AS factor")  # constant: nothing to split
    assert cohort.public_view("c", ["factor"]) == "CREATE VIEW main.c AS SELECT * FROM pool.c"


def test_failure_reasons_never_carry_paths_or_values():
    assert cohort.failure_reason(HealthDeltaError("input is not a valid zip")) == "input is not a valid zip"
    assert cohort.failure_reason(FileNotFoundError(2, "No such file or directory", "/private/Jane")) == \
        "No such file or directory"
    assert cohort.failure_reason(ValueError("Jane Doe 1961-04-07")) == "internal error (ValueError)"


def test_default_workers_one_per_two_cores():
    assert [cohort.default_workers(10, cores) for cores in (1, 2, 3, 8, 64)] == [1, 1, 1, 4, 10]
    assert cohort.default_workers(3, 1) == 1


def test_cohort_workers_and_scheduler_exclude_each_other(tmp_path):
    with pytest.raises(UsageError, match="--workers"):
        cohort.run_cohort(tmp_path, tmp_path / "out", workers=2, scheduler="tcp://127.0.0.1:1")


def test_unreachable_or_malformed_scheduler_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "in" / "P01").mkdir(parents=True)
    monkeypatch.setattr(cohort, "CONNECT_TIMEOUT", "1s")
    with pytest.raises(UsageError, match="--scheduler must be an address"):
        cohort.run_cohort(tmp_path / "in", tmp_path / "out", scheduler="nonsense")
    with pytest.raises(HealthDeltaError, match="could not be reached"):
        cohort.run_cohort(tmp_path / "in", tmp_path / "out", scheduler="tcp://127.0.0.1:1")


def test_cli_errors_are_one_line(cli, tmp_path):
    assert assert_one_error_line(cli("cohort", "status", "--out", "nothing-here")) == \
        "error: there is no cohort in that directory; `healthdelta cohort run` makes one"
    (tmp_path / "empty").mkdir()
    assert assert_one_error_line(cli("cohort", "run", "--inputs", "empty", "--out", "o"), 2).startswith(
        "error: the cohort inputs hold no export")
    assert assert_one_error_line(cli("export", "parquet", "--db", "none.duckdb", "--out", "pq")) == \
        "error: the warehouse holds no run yet; `healthdelta run all` loads one"


# --------------------------------------------------------------------------- helpers


def _export(root: Path, seed: int, *, zip: bool = False, base=None):
    if base is not None:
        return generate_export(root, base=base, new_records=40, zip=zip)
    return generate_export(root, seed=seed, records=300, people=1, zip=zip)


def _place(export, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    if export.zip_path is not None:
        shutil.copy(export.zip_path, dest)
    else:
        shutil.copytree(export.export_dir, dest / "apple_health_export")


def _reference(placed: Path, out: Path) -> str:
    """The participant's input through single-person `run all` (share mode, as the cohort).
    The placed copy, not the generator's: a zip's name is part of its fingerprint."""
    return run_all(PipelineOptions(input=placed, layout=OutLayout.create(out), mode="share")).run_id


def _lines(stdout: str) -> dict[str, dict[str, str]]:
    """`participant=ID k=v ...` lines by participant id."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("participant="):
            head, _, rest = line.partition(" status=")
            fields = dict(f.split("=", 1) for f in ("status=" + rest).split(" ") if "=" in f)
            if fields["status"] == "failed":
                fields["reason"] = ("status=" + rest).split(" reason=", 1)[1]
            rows[head.split("=", 1)[1]] = fields
    return rows


def _parquet_count(root: Path, table: str, participant: str, run_id: str = "*") -> int:
    glob = f"{root}/{table}/participant={participant}/run={run_id}/*.parquet"
    return duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()[0][0]


def _table_counts(db: Path, where: str = "") -> dict[str, int]:
    con = warehouse.connect(db, read_only=True)
    try:
        return {s: con.execute(f"SELECT count(*) FROM {s} {where}").fetchall()[0][0] for s in STREAMS}
    finally:
        con.close()


def _all_parquet_text(root: Path) -> str:
    """Every value of every Parquet file as text (the files are compressed: grep sees nothing)."""
    parts = []
    for f in sorted(root.rglob("*.parquet")):
        rel = duckdb.sql(f"SELECT * FROM read_parquet('{f}')")
        parts.append(" ".join(rel.columns))
        parts.extend(repr(row) for row in rel.fetchall())
    return "\n".join(parts)


# --------------------------------------------------------------------------- the scenario


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    import dask
    from distributed import LocalCluster

    base = tmp_path_factory.mktemp("cohort")
    inputs = base / "inputs"
    inputs.mkdir()
    exports = {}
    for i, pid in enumerate(GOOD):
        exports[pid] = _export(base / "gen" / pid, seed=40 + i, zip=pid in ("P01", "P02"))
        _place(exports[pid], inputs / (f"{pid}.zip" if pid in ("P01", "P02") else pid))
    damaged = _export(base / "gen" / DAMAGED, seed=49, zip=True).zip_path.read_bytes()
    (inputs / f"{DAMAGED}.zip").write_bytes(damaged[: len(damaged) // 2])  # cut off mid-archive
    placed = {pid: inputs / (f"{pid}.zip" if pid in ("P01", "P02") else pid) for pid in GOOD}
    refs = {pid: _reference(placed[pid], base / "ref" / pid) for pid in GOOD}

    cli = Cli(base)
    out = base / "out"
    with dask.config.set({"distributed.worker.daemon": False}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        first = cli("cohort", "run", "--inputs", "inputs", "--out", "out", "--scheduler",
                    cluster.scheduler_address, "--progress", "never")

    # P03's next export: the next `cohort run` must process P03 alone, and only its delta.
    nxt = _export(base / "gen" / "P03-next", seed=0, base=exports["P03"])
    _place(nxt, inputs / "P03")
    next_ref = _reference(inputs / "P03", base / "ref" / "P03")
    second = cli("cohort", "run", "--inputs", "inputs", "--out", "out", "--workers", "2", "--progress", "never")
    status = cli("cohort", "status", "--out", "out")
    return SimpleNamespace(base=base, inputs=inputs, out=out, exports={**exports, "P03-next": nxt}, refs=refs,
                           next_ref=next_ref, first=first, second=second, status=status)


@pytest.mark.slow
def test_damaged_participant_fails_alone_and_is_named(scenario):
    proc = scenario.first
    line = assert_one_error_line(proc)
    assert line == f"error: 1 of 6 participant(s) failed: {DAMAGED}"
    rows = _lines(proc.stdout)
    assert rows[DAMAGED]["status"] == "failed" and "zip" in rows[DAMAGED]["reason"]
    assert all(rows[pid]["status"] == "created" and rows[pid]["run_id"] == scenario.refs[pid] for pid in GOOD)
    for text in (proc.stdout, proc.stderr, scenario.second.stdout, scenario.second.stderr):
        assert str(scenario.inputs) not in text and "Traceback" not in text


@pytest.mark.slow
def test_parquet_rows_equal_single_person_run_all(scenario):
    root = scenario.out / "parquet"
    for pid in GOOD:
        ref = _table_counts(scenario.base / "ref" / pid / "warehouse.duckdb")
        assert sum(ref.values()) > 300
        assert {s: _parquet_count(root, s, pid) for s in STREAMS} == ref, pid
    # Nothing of the damaged participant, and no work dir inside any table directory.
    assert not list(root.glob(f"*/participant={DAMAGED}"))
    assert not [p for p in root.rglob("*") if p.name.startswith(".")]


@pytest.mark.slow
def test_next_export_processes_one_participant_and_only_its_delta(scenario):
    rows = _lines(scenario.second.stdout)
    assert rows["P03"]["status"] == "created" and rows["P03"]["run_id"] == scenario.next_ref
    assert rows["P03"]["published_runs"] == "1"
    assert {pid: rows[pid]["status"] for pid in GOOD if pid != "P03"} == dict.fromkeys(
        ("P01", "P02", "P04", "P05"), "no_changes")
    assert all(rows[pid]["published_runs"] == "0" for pid in GOOD if pid != "P03")
    ref_db = scenario.base / "ref" / "P03" / "warehouse.duckdb"
    delta = _table_counts(ref_db, f"WHERE run_id = '{scenario.next_ref}'")
    root = scenario.out / "parquet"
    assert 0 < sum(delta.values()) < 100  # the 40 new records and what came with them, not the export
    assert {s: _parquet_count(root, s, "P03", scenario.next_ref) for s in STREAMS} == delta
    assert int(rows["P03"]["rows_added"]) == sum(delta.values())
    assert {s: _parquet_count(root, s, "P03") for s in STREAMS} == _table_counts(ref_db)


@pytest.mark.slow
def test_pooled_output_holds_no_planted_identifier(scenario):
    text = _all_parquet_text(scenario.out / "parquet").casefold()
    planted = {v for e in scenario.exports.values() for p in e.people for v in p.pii_strings()}
    assert len(planted) > 40
    leaks = sorted(v for v in planted if v.casefold() in text)
    assert not leaks, leaks
    summary = (scenario.out / "cohort.json").read_text().casefold()
    assert not [v for v in planted if v.casefold() in summary]
    assert str(scenario.inputs).casefold() not in text + summary


@pytest.mark.slow
def test_cohort_views_equal_each_participants_own_warehouse(scenario):
    import healthdelta as hd

    seen = dict.fromkeys(NUMERIC_VIEWS, 0)
    with hd.open(scenario.out) as pooled:
        assert pooled.path.name == "cohort.duckdb"
        for name in (*STREAMS, "runs", "record_removals", *warehouse.VIEWS):  # the warehouse's names ...
            if name != "unit_conversions":  # ... each with its participant, but the constant table
                assert "participant_id" in pooled.view(name).columns, name
        for pid in GOOD:
            with hd.open(scenario.out / "participants" / pid) as own:
                for view in NUMERIC_VIEWS:
                    key = ", record_key" if view == "workout_summary" else ""  # qualified in the cohort
                    mine = own.sql(f"SELECT * {'EXCLUDE (record_key)' if key else ''} FROM {view}").fetchall()
                    theirs = pooled.sql(f"SELECT * EXCLUDE (participant_id{key}) FROM {view} "
                                        f"WHERE participant_id = ?", params=[pid]).fetchall()
                    assert sorted(map(repr, mine)) == sorted(map(repr, theirs)), (pid, view)
                    seen[view] += len(mine)
        assert all(seen.values()), seen
        runs = pooled.runs().fetchall()
        assert len(runs) == len(GOOD) + 1  # P03 has two


@pytest.mark.slow
def test_cohort_status(scenario):
    assert scenario.status.returncode == 0, scenario.status.stderr
    lines = scenario.status.stdout.splitlines()
    assert "participants=6" in lines and f"runs={len(GOOD) + 1}" in lines and "failures=1" in lines
    p03 = next(line for line in lines if line.startswith("participant=P03 "))
    total = sum(_table_counts(scenario.base / "ref" / "P03" / "warehouse.duckdb").values())
    assert p03 == f"participant=P03 runs=2 rows={total}"
    assert next(line for line in lines if line.startswith(f"participant={DAMAGED} ")).startswith(
        f"participant={DAMAGED} runs=0 rows=0 last_run=failed reason=")


@pytest.mark.slow
def test_api_doctests(scenario):
    """docs/api.md's examples, on a participant's out dir and on the cohort."""
    globs = {"data": str(scenario.out / "participants" / "P01"), "cohort_out": str(scenario.out)}
    result = doctest.testfile(str(ROOT / "docs" / "api.md"), module_relative=False, globs=globs,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8 and result.failed == 0


# --------------------------------------------------------------------------- a worker dies


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    (base / "inputs").mkdir()
    refs = {}
    for i, pid in enumerate(("K1", "K2", "K3")):
        export = _export(base / "gen" / pid, seed=70 + i, zip=pid == "K2")
        placed = base / "inputs" / (f"{pid}.zip" if pid == "K2" else pid)
        _place(export, placed)
        _reference(placed, base / "ref" / pid)
        refs[pid] = _table_counts(base / "ref" / pid / "warehouse.duckdb")
    return base, refs


def _visible_parquet_ok(root: Path) -> None:
    assert not [p for p in root.rglob("*") if p.name.startswith(".")]
    for f in root.rglob("*.parquet"):
        duckdb.sql(f"SELECT count(*) FROM read_parquet('{f}')").fetchall()  # every file is whole


@pytest.mark.slow
def test_killed_worker_leaves_no_partial_parquet_and_rerun_completes(small_cohort):
    base, refs = small_cohort
    out = base / "out-dies"
    cli = Cli(base)
    # K2's worker is SIGKILLed after three of its tables were renamed into place, on every
    # attempt; Dask gives up after the first death.
    env = {"HEALTHDELTA_TEST_COHORT_FAULT": "K2:parquet:3", "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    proc = cli("cohort", "run", "--inputs", "inputs", "--out", out.name, "--workers", "2", env=env)
    assert assert_one_error_line(proc) == "error: 1 of 3 participant(s) failed: K2"
    assert _lines(proc.stdout)["K2"]["reason"].startswith("its Dask worker died")
    root = out / "parquet"
    _visible_parquet_ok(root)
    assert list(root.glob("observations/participant=K2/run=*"))  # renamed before the kill ...
    assert not list(root.glob("runs/participant=K2/run=*"))  # ... but the run was never published
    with duckdb.connect(str(out / "cohort.duckdb"), read_only=True) as con:
        for s in STREAMS:
            assert con.execute(f"SELECT count(*) FROM {s} WHERE participant_id = 'K2'").fetchall()[0][0] == 0
    # The rerun finds K2's run registered (unchanged export) and publishes it whole.
    again = cli("cohort", "run", "--inputs", "inputs", "--out", out.name, "--workers", "2", check=True)
    rows = _lines(again.stdout)
    assert rows["K2"] == {**rows["K2"], "status": "no_changes", "published_runs": "1"}
    assert rows["K1"]["published_runs"] == "0"
    _visible_parquet_ok(root)
    for pid, ref in refs.items():
        assert {s: _parquet_count(root, s, pid) for s in STREAMS} == ref, pid


@pytest.mark.slow
def test_worker_dying_once_is_retried_within_the_run(small_cohort):
    base, refs = small_cohort
    cli = Cli(base)
    proc = cli("cohort", "run", "--inputs", "inputs", "--out", "out-once", "--workers", "2",
               env={"HEALTHDELTA_TEST_COHORT_FAULT": "K3:parquet:2:once"}, check=True)
    assert (base / "out-once" / ".test-fault-K3").is_file()  # the fault did fire
    assert _lines(proc.stdout)["K3"]["published_runs"] == "1"
    _visible_parquet_ok(base / "out-once" / "parquet")
    for pid, ref in refs.items():
        assert {s: _parquet_count(base / "out-once" / "parquet", s, pid) for s in STREAMS} == ref, pid


# --------------------------------------------------------------------------- export parquet


@pytest.mark.slow
def test_export_parquet_is_read_back_by_duckdb(tmp_path, cli):
    first = _export(tmp_path / "e1", seed=90)
    second = _export(tmp_path / "e2", seed=0, base=first)
    layout = OutLayout.create(tmp_path / "data")
    runs = [run_all(PipelineOptions(input=e.root, layout=layout)).run_id for e in (first, second)]

    one = cli("export", "parquet", "--db", "data/warehouse.duckdb", "--out", "pq", "--run", runs[0][:10],
              check=True)
    assert "runs_written=1" in one.stdout.splitlines()
    both = cli("export", "parquet", "--db", "data/warehouse.duckdb", "--out", "pq", check=True)
    assert "runs_written=1" in both.stdout.splitlines() and "runs_already_written=1" in both.stdout.splitlines()

    pq = tmp_path / "pq"
    assert not [p for p in pq.rglob("*") if p.name.startswith(".tmp")]
    con = warehouse.connect(layout.warehouse, read_only=True)
    try:
        for table in (*STREAMS, "runs", "record_removals"):
            glob = f"{pq}/{table}/run=*/*.parquet"
            got = duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()[0][0]
            assert got == con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0], table
        # Typed columns survive: the same values and types as the warehouse table.
        want = con.execute("SELECT record_key, value, start_date FROM observations ORDER BY record_key").fetchall()
        rel = duckdb.sql(f"SELECT record_key, value, start_date, run FROM read_parquet("
                         f"'{pq}/observations/run=*/*.parquet', hive_partitioning = true) ORDER BY record_key")
        assert [str(t) for t in rel.types[1:3]] == ["DOUBLE", "TIMESTAMP WITH TIME ZONE"]
        got_rows = rel.fetchall()
        assert [r[:3] for r in got_rows] == want
        assert {r[3] for r in got_rows} == set(runs)
    finally:
        con.close()
    # The same warehouse gives the same bytes.
    cli("export", "parquet", "--db", "data/warehouse.duckdb", "--out", "pq2", check=True)
    for f in sorted(pq.rglob("*.parquet")):
        assert f.read_bytes() == (tmp_path / "pq2" / f.relative_to(pq)).read_bytes(), f

    bad = cli("export", "parquet", "--db", "data/warehouse.duckdb", "--out", "pq", "--run", "ffff")
    assert assert_one_error_line(bad) == "error: --run matches no loaded run"


# --------------------------------------------------------------------------- removals, without Dask


def test_removed_and_readded_records_reach_the_pool_as_in_the_own_warehouse(tmp_path):
    """Export 2 drops two step records, export 3 brings them back: the pooled
    `removed_records` and `daily_steps` follow the participant's own warehouse at every step."""
    from conftest import write_mini_export

    import healthdelta as hd

    pool = cohort.CohortLayout(tmp_path / "out")
    layout = pool.participant("M1")
    other = pool.participant("M2")  # the same records under another participant: keys must not mix
    write_mini_export(tmp_path / "m2", records=5)
    run_all(PipelineOptions(input=tmp_path / "m2", layout=other, mode="share"))
    cohort.publish_participant(pool, "M2")
    expected_removed = []
    for step, records in enumerate((5, 3, 5)):
        write_mini_export(tmp_path / f"m1-{step}", records=records)
        run_all(PipelineOptions(input=tmp_path / f"m1-{step}", layout=layout, mode="share"))
        published = cohort.publish_participant(pool, "M1")
        assert [p.status for p in published][-1] == "published"
        assert cohort.build_cohort_db(pool) == pool.db
        with hd.open(layout.out) as own, hd.open(pool.out) as pooled:
            removed = own.sql("SELECT count(*) FROM removed_records").fetchall()[0][0]
            expected_removed.append(removed)
            assert pooled.sql("SELECT participant_id, count(*) FROM removed_records GROUP BY ALL").fetchall() == (
                [("M1", removed)] if removed else [])
            assert sorted(own.sql("SELECT * FROM daily_steps").fetchall()) == sorted(pooled.sql(
                "SELECT * EXCLUDE (participant_id) FROM daily_steps WHERE participant_id = 'M1'").fetchall())
            assert pooled.sql("SELECT count(*) FROM daily_steps WHERE participant_id = 'M2'").fetchall() == [(1,)]
    assert expected_removed == [0, 2, 0]
    readds = duckdb.sql(f"SELECT count(*) FROM read_parquet('{pool.parquet}/record_readds/*/*/*.parquet')")
    assert readds.fetchall() == [(2,)]
    # Publishing again changes nothing.
    assert {p.status for p in cohort.publish_participant(pool, "M1")} == {"already_published"}


# --------------------------------------------------------------------------- exports large enough to parse in a pool


@pytest.mark.slow
def test_a_large_export_parses_in_its_pool_inside_a_dask_worker(tmp_path, cli):
    """Above export.IN_PROCESS_BELOW `run all` starts a process pool: the CLI's workers
    must not be daemonic (a daemonic process may not have children)."""
    from healthdelta import export

    made = generate_export(tmp_path / "gen", seed=3, target_bytes=export.IN_PROCESS_BELOW + (2 << 20))
    (tmp_path / "inputs").mkdir()
    _place(made, tmp_path / "inputs" / "L1")
    proc = cli("cohort", "run", "--inputs", "inputs", "--out", "out", "--workers", "1", check=True)
    assert _lines(proc.stdout)["L1"]["status"] == "created"


@pytest.mark.slow
def test_a_daemonic_external_worker_fails_with_the_fix_in_the_reason(tmp_path, cli):
    import dask
    from distributed import LocalCluster

    (tmp_path / "inputs").mkdir()
    _place(_export(tmp_path / "gen", seed=4), tmp_path / "inputs" / "D1")
    assert dask.config.get("distributed.worker.daemon") is True  # Dask's default, left as it was by cohorts
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        proc = cli("cohort", "run", "--inputs", "inputs", "--out", "out", "--scheduler", cluster.scheduler_address)
    assert assert_one_error_line(proc) == "error: 1 of 1 participant(s) failed: D1"
    assert _lines(proc.stdout)["D1"]["reason"] == cohort.DAEMON_WORKER
