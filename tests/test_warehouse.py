"""The DuckDB warehouse (CONTRACT §6): counts, append-only loads, idempotency, rollback,
crash safety, the steps/sleep rules, read-only CSV queries."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

duckdb = pytest.importorskip("duckdb")

from conftest import stream_bytes, stream_path  # noqa: E402
from healthdelta import streamfile, synth, warehouse  # noqa: E402
from healthdelta.errors import HealthDeltaError, StateError, UsageError  # noqa: E402
from healthdelta.ndjson import STREAMS  # noqa: E402

# `duckdb`/`report` commands are registered by importing their module; until the CLI's
# import line names it, the subprocess imports it itself.
CLI = [sys.executable, "-c",
       "import healthdelta.cli.commands_warehouse; from healthdelta.cli import main; main()"]


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Runs:
    out: Path  # <out> of the pipeline: state/, ndjson/
    run_ids: tuple[str, ...]  # oldest first
    pii: tuple[str, ...]  # every planted PII string of every person of the exports

    def ndjson(self, i: int) -> Path:
        return self.out / "ndjson" / self.run_ids[i]

    def entry(self, i: int) -> dict:
        return json.loads((self.out / "state" / "runs.json").read_text())["runs"][self.run_ids[i]]

    def lines(self, i: int, stream: str, sub: str = "") -> int:
        return len(stream_bytes(self.ndjson(i) / sub / f"{stream}.ndjson").splitlines())


def make_three_runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Three successive synthetic exports (base, +40 records, +40 records) through `pipeline run`.

    Built once per session (both test_warehouse and test_report use it): the directory
    name is fixed and a marker says it is complete.
    """
    root = tmp_path_factory.getbasetemp() / "warehouse-three-runs"
    marker = root / "runs.json"
    if not marker.is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        first = synth.generate_export(root / "e1", seed=11, records=1200, people=2, ambiguous_person=True)
        second = synth.generate_export(root / "e2", base=first, new_records=40)
        third = synth.generate_export(root / "e3", base=second, new_records=40)
        run_ids = []
        for export in (first, second, third):
            proc = subprocess.run(
                [sys.executable, "-m", "healthdelta", "--progress", "never", "pipeline", "run",
                 "--input", str(export.root), "--out", str(root / "out")],
                capture_output=True, text=True, check=True)
            run_ids.append(dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)["run_id"])
        pii = sorted({s for person in first.people for s in person.pii_strings()})
        marker.write_text(json.dumps({"run_ids": run_ids, "pii": pii}))
    doc = json.loads(marker.read_text())
    return Runs(out=root / "out", run_ids=tuple(doc["run_ids"]), pii=tuple(doc["pii"]))


@pytest.fixture(scope="session")
def three_runs(tmp_path_factory) -> Runs:
    return make_three_runs(tmp_path_factory)


def load(db: Path, runs: Runs, *indexes: int) -> list[warehouse.LoadResult]:
    return [warehouse.load_run(db, runs.ndjson(i), runs.entry(i)) for i in indexes]


def snapshot(db: Path) -> dict:
    """Row counts and a content hash of every table (order-independent)."""
    con = warehouse.connect(db, read_only=True)
    try:
        out = {}
        for table in (*STREAMS, "runs", "record_removals"):
            count, digest = con.execute(
                f"SELECT count(*), COALESCE(sum(hash(t::VARCHAR)), 0) FROM {table} AS t").fetchone()
            out[table] = (count, int(digest))
        return out
    finally:
        con.close()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- loading


def test_row_counts_equal_ndjson_counts(tmp_path, three_runs):
    db = tmp_path / "w.duckdb"
    [result] = load(db, three_runs, 0)
    assert result.status == "loaded" and result.load_mode == "delta"
    assert result.unknown_fields == ()
    counts = snapshot(db)
    for stream in STREAMS:
        assert counts[stream][0] == three_runs.lines(0, stream) == result.inserted[stream], stream


def test_three_exports_total_is_first_plus_new_without_duplicates(tmp_path, three_runs):
    db = tmp_path / "w.duckdb"
    results = load(db, three_runs, 0, 1, 2)
    assert [r.load_mode for r in results] == ["delta", "delta", "delta"]
    con = warehouse.connect(db, read_only=True)
    try:
        for stream in STREAMS:
            count, distinct = con.execute(f"SELECT count(*), count(DISTINCT record_key) FROM {stream}").fetchone()
            first = three_runs.lines(0, stream)
            new = three_runs.lines(1, stream, "added") + three_runs.lines(2, stream, "added")
            assert count == distinct == first + new == three_runs.lines(2, stream), stream
        # first_seen_run is the run whose delta added the record
        per_run = dict(con.execute("SELECT first_seen_run, count(*) FROM record_history GROUP BY 1").fetchall())
        for i, run_id in enumerate(three_runs.run_ids):
            assert per_run[run_id] == sum(three_runs.lines(i, s, "added") for s in STREAMS)
        last = set(con.execute("SELECT DISTINCT last_seen_run FROM record_history").fetchall())
        assert last == {(three_runs.run_ids[2],)}
        assert con.execute("SELECT list(load_seq ORDER BY load_seq) FROM runs").fetchone()[0] == [1, 2, 3]
    finally:
        con.close()


def test_loading_a_run_twice_changes_nothing(tmp_path, three_runs):
    db = tmp_path / "w.duckdb"
    load(db, three_runs, 0, 1)
    before, before_bytes = snapshot(db), file_digest(db)
    again = load(db, three_runs, 1, 0)
    assert [r.status for r in again] == ["already_loaded", "already_loaded"]
    assert snapshot(db) == before
    assert file_digest(db) == before_bytes


def test_run_without_its_parent_loads_in_full_and_later_runs_never_duplicate(tmp_path, three_runs):
    db = tmp_path / "w.duckdb"
    [second] = load(db, three_runs, 1)  # parent not in the warehouse: whole streams, anti-joined
    assert second.load_mode == "full"
    assert sum(second.inserted.values()) == sum(three_runs.lines(1, s) for s in STREAMS)
    [first] = load(db, three_runs, 0)  # everything it has is already there
    assert first.rows_inserted == 0
    [third] = load(db, three_runs, 2)
    assert third.load_mode == "delta"
    counts = snapshot(db)
    for stream in STREAMS:
        assert counts[stream][0] == three_runs.lines(2, stream)


@pytest.mark.slow
def test_build_orders_parents_first_and_skips_loaded_runs(tmp_path, three_runs):
    db = tmp_path / "w.duckdb"
    entries = json.loads((three_runs.out / "state" / "runs.json").read_text())["runs"]
    partial = {k: v for k, v in entries.items() if k != three_runs.run_ids[2]}
    result = warehouse.build(three_runs.out / "ndjson", db, registry_entries=partial)
    assert result.unregistered == (three_runs.run_ids[2],) and result.loaded == 2  # not trusted
    result = warehouse.build(three_runs.out / "ndjson", db, registry_entries=entries)
    assert [r.status for r in result.runs] == ["already_loaded", "already_loaded", "loaded"]
    again = warehouse.build(three_runs.out / "ndjson", db, registry_entries=entries)
    assert again.loaded == 0
    replaced = warehouse.build(three_runs.out / "ndjson", db, replace=True)
    assert replaced.loaded == 3
    assert {k: v[0] for k, v in snapshot(db).items()} == {
        **{s: three_runs.lines(2, s) for s in STREAMS}, "runs": 3, "record_removals": 0}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_failed_load_leaves_the_previous_warehouse_unchanged(tmp_path, three_runs):
    db = tmp_path / "w.duckdb"
    load(db, three_runs, 0)
    before = snapshot(db)
    broken = tmp_path / "ndjson" / three_runs.run_ids[1]
    shutil.copytree(three_runs.ndjson(1), broken)
    # observations load first and succeed; the corrupt line sits in the last stream.
    routes = broken / "added" / "routes.ndjson"
    with streamfile.StreamWriter(stream_path(routes)) as fh:
        fh.write(stream_bytes(routes) + b'{"record_key": "x", "event_time": \n')
    with pytest.raises(HealthDeltaError) as info:
        warehouse.load_run(db, broken, three_runs.entry(1))
    assert str(tmp_path) not in str(info.value) and "record_key" not in str(info.value)
    assert snapshot(db) == before
    [ok] = load(db, three_runs, 1)  # the warehouse is still usable
    assert ok.status == "loaded"


@pytest.mark.slow
def test_killed_load_leaves_the_previous_warehouse_unchanged(tmp_path, three_runs):
    db = tmp_path / "w.duckdb"
    load(db, three_runs, 0)
    before = snapshot(db)
    env = {**os.environ, "HEALTHDELTA_TEST_FAULT": "loading:1:KILL"}  # after the first stream's insert
    proc = subprocess.run([*CLI, "--progress", "never", "duckdb", "build", "--input", str(three_runs.ndjson(1)),
                           "--db", str(db)], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert snapshot(db) == before
    assert load(db, three_runs, 1)[0].status == "loaded"


def test_schema_stores_every_ndjson_field(three_runs):
    """A parser that starts writing a new field must get a column (or a `details` entry)."""
    for i in range(3):
        for stream in STREAMS:
            seen: set[str] = set()
            for line in stream_bytes(three_runs.ndjson(i) / f"{stream}.ndjson").splitlines():
                seen |= json.loads(line).keys()
            assert seen <= set(warehouse.stream_fields(stream)), (stream, seen - set(warehouse.stream_fields(stream)))


def test_connections_pin_utc_and_time_columns_are_typed(tmp_path, three_runs):
    db = tmp_path / "w.duckdb"
    load(db, three_runs, 0)
    con = warehouse.connect(db, read_only=True)
    try:
        assert con.execute("SELECT current_setting('TimeZone')").fetchone()[0] == "UTC"
        types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                                 "WHERE table_name = 'observations'").fetchall())
        assert types["event_time"] == "TIMESTAMP WITH TIME ZONE"
        assert types["value"] == "DOUBLE" and types["metadata"] == "JSON"
        row = con.execute("SELECT strftime(start_date, '%Y-%m-%dT%H:%M:%SZ'), start_date_local, utc_offset_min, "
                          "local_date::VARCHAR FROM observations WHERE source = 'healthkit' "
                          "AND start_date_local LIKE '%-0_:00' LIMIT 1").fetchone()
        utc, local, offset, day = row
        assert offset in (-420, -480) and day == local[:10]
    finally:
        con.close()


# --------------------------------------------------------------------------- hand-built runs


def _row(key: str, start: str, end: str, device: str, value, type_="HKQuantityTypeIdentifierStepCount",
         source_name: str = "Phone", offset: str = "-07:00", run_id: str = "r1") -> dict:
    """A HealthKit Record row; `start`/`end` are local wall times 'YYYY-MM-DDTHH:MM:SS'."""
    from datetime import datetime, timedelta

    def utc(local: str) -> str:
        sign = -1 if offset[0] == "-" else 1
        delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])) * sign
        return (datetime.fromisoformat(local) - delta).strftime("%Y-%m-%dT%H:%M:%SZ")

    return {
        "record_key": hashlib.sha256(key.encode()).hexdigest(), "schema_version": 1,
        "canonical_person_id": "p_test", "source": "healthkit", "source_file": "export.xml",
        "run_id": run_id, "kind": "Record", "event_time": utc(start), "type": type_, "value": value,
        "unit": "count" if isinstance(value, (int, float)) else None, "source_name": source_name,
        "source_version": "1", "device": device, "start_date": utc(start), "start_date_local": start + offset,
        "end_date": utc(end), "end_date_local": end + offset, "creation_date": utc(end),
        "creation_date_local": end + offset, "metadata": {}, "hrv_beats": None, "extra": {},
    }


WATCH = "<<HKDevice: 0x1>, name:Apple Watch, manufacturer:Apple Inc., model:Watch, hardware:Watch6,1>"
PHONE = "<<HKDevice: 0x2>, name:iPhone, manufacturer:Apple Inc., model:iPhone, hardware:iPhone12,1>"


def write_run(root: Path, run_id: str, parent: str | None, added: dict[str, list[dict]],
              removed: dict[str, list[dict]] | None = None) -> Path:
    d = root / run_id
    for sub in ("added", "removed"):
        (d / sub).mkdir(parents=True)
    for stream in STREAMS:
        for sub, rows in (("added", added.get(stream, [])), ("removed", (removed or {}).get(stream, []))):
            (d / sub / f"{stream}.ndjson").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        (d / f"{stream}.ndjson").write_text("")  # full streams are not read in delta mode
    (d / "delta.json").write_text(json.dumps({"run_id": run_id, "parent_run_id": parent}))
    return d


def test_daily_steps_do_not_double_count_watch_and_phone(tmp_path):
    rows = [
        # 08h: phone and watch count the same walk; the watch wins
        _row("a", "2024-05-01T08:00:00", "2024-05-01T08:10:00", PHONE, 100, source_name="Jane’s iPhone"),
        _row("b", "2024-05-01T08:02:00", "2024-05-01T08:09:00", WATCH, 90, source_name="Jane’s Apple Watch"),
        # 10h: only the phone
        _row("c", "2024-05-01T10:00:00", "2024-05-01T10:05:00", PHONE, 50, source_name="Jane’s iPhone"),
        # 11h: two watch samples and a phone sample
        _row("d", "2024-05-01T11:00:00", "2024-05-01T11:04:00", WATCH, 30, source_name="Jane’s Apple Watch"),
        _row("e", "2024-05-01T11:20:00", "2024-05-01T11:24:00", WATCH, 20, source_name="Jane’s Apple Watch"),
        _row("f", "2024-05-01T11:00:00", "2024-05-01T11:30:00", PHONE, 60, source_name="Jane’s iPhone"),
        # 23h local is already the next day in UTC: still 1 May
        _row("g", "2024-05-01T23:30:00", "2024-05-01T23:40:00", PHONE, 7, source_name="Jane’s iPhone"),
        # another day, phone only
        _row("h", "2024-05-02T09:00:00", "2024-05-02T09:10:00", PHONE, 1000, source_name="Jane’s iPhone"),
    ]
    db = tmp_path / "w.duckdb"
    warehouse.load_run(db, write_run(tmp_path, "r1", None, {"observations": rows}), {"run_id": "r1"})
    con = warehouse.connect(db, read_only=True)
    try:
        got = con.execute("SELECT day::VARCHAR, steps, steps_all_sources, watch_steps, phone_steps "
                          "FROM daily_steps ORDER BY day").fetchall()
    finally:
        con.close()
    # 08h: the phone keeps the 3 of its 10 minutes the watch did not cover (30 steps);
    # 11h: the phone keeps 22 of its 30 minutes (44 steps) beside the watch's 30 + 20
    assert got == [("2024-05-01", 90 + 30 + 50 + 30 + 20 + 44 + 7, 357, 140, 30 + 50 + 44 + 7),
                   ("2024-05-02", 1000, 1000, 0, 1000)]


def test_sleep_nights_and_overlapping_sources(tmp_path):
    sleep = "HKCategoryTypeIdentifierSleepAnalysis"
    core, in_bed = "HKCategoryValueSleepAnalysisAsleepCore", "HKCategoryValueSleepAnalysisInBed"
    rows = [
        # one night split by midnight: both parts belong to the night ending on 2 May
        _row("s1", "2024-05-01T23:00:00", "2024-05-01T23:30:00", WATCH, core, sleep, "W"),
        _row("s2", "2024-05-01T23:30:00", "2024-05-02T06:00:00", WATCH, core, sleep, "W"),
        # phone and watch both write InBed: only the watch's counts
        _row("s3", "2024-05-01T22:50:00", "2024-05-02T06:10:00", PHONE, in_bed, sleep, "P"),
        _row("s4", "2024-05-01T22:55:00", "2024-05-02T06:05:00", WATCH, in_bed, sleep, "W"),
    ]
    db = tmp_path / "w.duckdb"
    warehouse.load_run(db, write_run(tmp_path, "r1", None, {"observations": rows}), {"run_id": "r1"})
    con = warehouse.connect(db, read_only=True)
    try:
        got = con.execute("SELECT night::VARCHAR, stage, minutes, device_class FROM sleep_nightly "
                          "ORDER BY night, stage").fetchall()
    finally:
        con.close()
    assert got == [("2024-05-02", "Core", 420.0, "watch"), ("2024-05-02", "In bed", 430.0, "watch")]


def test_removed_records_stay_listed_and_leave_the_views(tmp_path):
    rows = [_row(k, f"2024-05-01T0{i}:00:00", f"2024-05-01T0{i}:05:00", PHONE, 10) for i, k in enumerate("abc")]
    db = tmp_path / "w.duckdb"
    warehouse.load_run(db, write_run(tmp_path, "r1", None, {"observations": rows}), {"run_id": "r1"})
    r2 = warehouse.load_run(db, write_run(tmp_path, "r2", "r1", {}, {"observations": rows[:1]}), {"run_id": "r2"})
    assert r2.removed == {**dict.fromkeys(STREAMS, 0), "observations": 1}
    con = warehouse.connect(db, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM observations").fetchone()[0] == 3  # append-only
        assert con.execute("SELECT steps FROM daily_steps").fetchone()[0] == 20
        history = con.execute("SELECT first_seen_run, last_seen_run, removed_in_run FROM record_history "
                              "ORDER BY removed_in_run NULLS LAST").fetchall()
        assert history == [("r1", "r1", "r2"), ("r1", "r2", None), ("r1", "r2", None)]
    finally:
        con.close()
    # the record comes back in r3: no second row, no longer removed
    warehouse.load_run(db, write_run(tmp_path, "r3", "r2", {"observations": rows[:1]}), {"run_id": "r3"})
    con = warehouse.connect(db, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM observations").fetchone()[0] == 3
        assert con.execute("SELECT count(*) FROM removed_records").fetchone()[0] == 0
        assert con.execute("SELECT removed_in_run, readded_in_run FROM record_removals").fetchall() == [("r2", "r3")]
        assert con.execute("SELECT steps FROM daily_steps").fetchone()[0] == 30
    finally:
        con.close()
    # unloading takes back exactly one run's load, newest first
    with pytest.raises(StateError):
        warehouse.unload_run(db, "r2")
    assert warehouse.unload_run(db, "r3") is True
    con = warehouse.connect(db, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM removed_records").fetchone()[0] == 1
        assert con.execute("SELECT steps FROM daily_steps").fetchone()[0] == 20
    finally:
        con.close()
    assert warehouse.unload_run(db, "r3") is False
    assert warehouse.loaded_runs(db) == ["r1", "r2"]


def _known_keys_of(db: Path, load_mode: str, delta_parent: str | None) -> str:
    con = warehouse.connect(db, read_only=True)
    try:
        return warehouse._known_keys(con, load_mode, delta_parent)
    finally:
        con.close()


def test_anti_join_is_against_the_keys_a_row_could_collide_with(tmp_path):
    """None in an empty warehouse, the removed keys after a chain of delta loads, else the table."""
    rows = [_row(k, f"2024-05-01T0{i}:00:00", f"2024-05-01T0{i}:05:00", PHONE, 10) for i, k in enumerate("abcd")]
    db = tmp_path / "w.duckdb"
    warehouse.set_source_priority(db, ["manual", "watch", "phone", "other"])  # tables, no run
    assert _known_keys_of(db, "delta", None) == "none"
    warehouse.load_run(db, write_run(tmp_path, "r1", None, {"observations": rows[:2]}), {"run_id": "r1"})
    warehouse.load_run(db, write_run(tmp_path, "r2", "r1", {"observations": rows[2:3]}), {"run_id": "r2"})
    assert _known_keys_of(db, "delta", "r2") == "removed"
    assert _known_keys_of(db, "delta", "r1") == "table"  # a sibling of r2 may add what r2 added
    assert _known_keys_of(db, "delta", None) == "table"  # a second chain
    assert _known_keys_of(db, "full", "elsewhere") == "table"
    # r3 is r2's sibling: its added/ holds r2's row again, which must not be inserted twice
    r3 = warehouse.load_run(db, write_run(tmp_path, "r3", "r1", {"observations": rows[2:]}), {"run_id": "r3"})
    assert r3.inserted["observations"] == 1
    assert _known_keys_of(db, "delta", "r3") == "table"  # the loaded runs are a tree now
    con = warehouse.connect(db, read_only=True)
    try:
        assert con.execute("SELECT count(*), count(DISTINCT record_key) FROM observations").fetchone() == (4, 4)
    finally:
        con.close()


def test_a_chain_with_a_run_taken_out_between_is_checked_against_the_table(tmp_path):
    """x brings b first, r2 then skips b; once x is taken out, b is in r2's stream but not in
    the table, so r3's removal of b must not be listed."""
    a, b = (_row(k, f"2024-05-01T0{i}:00:00", f"2024-05-01T0{i}:05:00", PHONE, 10) for i, k in enumerate("ab"))
    db = tmp_path / "w.duckdb"
    warehouse.load_run(db, write_run(tmp_path, "r1", None, {"observations": [a]}), {"run_id": "r1"})
    warehouse.load_run(db, write_run(tmp_path, "x", None, {"observations": [b]}), {"run_id": "x"})
    r2 = warehouse.load_run(db, write_run(tmp_path, "r2", "r1", {"observations": [b]}), {"run_id": "r2"})
    assert r2.inserted["observations"] == 0
    assert warehouse.unload_run(db, "x")
    assert warehouse.loaded_runs(db) == ["r1", "r2"]
    assert _known_keys_of(db, "delta", "r2") == "table"
    r3 = warehouse.load_run(db, write_run(tmp_path, "r3", "r2", {}, {"observations": [a, b]}), {"run_id": "r3"})
    assert r3.removed["observations"] == 1
    con = warehouse.connect(db, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM record_removals").fetchone()[0] == 1
    finally:
        con.close()


def _chain_with_removals(root: Path) -> list[Path]:
    """r1 brings a..d; r2 removes a and b; r3 brings b back with e; r4 removes c, brings a back."""
    rows = {k: _row(k, f"2024-05-01T0{i}:00:00", f"2024-05-01T0{i}:05:00", PHONE, 10 + i)
            for i, k in enumerate("abcde")}
    obs = lambda keys: {"observations": [rows[k] for k in keys]}  # noqa: E731
    return [write_run(root, "r1", None, obs("abcd")), write_run(root, "r2", "r1", {}, obs("ab")),
            write_run(root, "r3", "r2", obs("be")), write_run(root, "r4", "r3", obs("a"), obs("c"))]


def test_chain_loads_give_the_tables_of_the_full_anti_join(tmp_path, three_runs, monkeypatch):
    """The anti-join narrowed to the removed keys changes nothing in what is stored."""
    def load_all(db: Path) -> dict:
        for d in _chain_with_removals(tmp_path / db.stem):
            warehouse.load_run(db, d, {"run_id": d.name})
        load(db, three_runs, 0, 1, 2)
        return snapshot(db)

    fast = load_all(tmp_path / "fast.duckdb")
    monkeypatch.setattr(warehouse, "_known_keys", lambda *args: "table")
    assert load_all(tmp_path / "full.duckdb") == fast
    con = warehouse.connect(tmp_path / "fast.duckdb", read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM observations WHERE canonical_person_id = 'p_test'").fetchone()[0] == 5
        assert con.execute("SELECT removed_in_run, readded_in_run FROM record_removals "
                           "ORDER BY removed_in_run, readded_in_run").fetchall() == [
            ("r2", "r3"), ("r2", "r4"), ("r4", None)]
    finally:
        con.close()


def test_failed_chain_load_with_a_re_added_record_changes_nothing(tmp_path):
    db = tmp_path / "w.duckdb"
    r1, r2, r3, _ = _chain_with_removals(tmp_path / "runs")
    for d in (r1, r2):
        warehouse.load_run(db, d, {"run_id": d.name})
    before = snapshot(db)
    added = r3 / "added" / "observations.ndjson"
    good = added.read_bytes()
    added.write_bytes(good + b'{"record_key": "x", "event_time": \n')
    with pytest.raises(HealthDeltaError):
        warehouse.load_run(db, r3, {"run_id": "r3"})
    assert snapshot(db) == before
    added.write_bytes(good)
    assert warehouse.load_run(db, r3, {"run_id": "r3"}).inserted["observations"] == 1  # e; b is back, not new


def test_unload_run_restores_the_previous_warehouse(tmp_path, three_runs):
    db = tmp_path / "w.duckdb"
    assert warehouse.loaded_runs(db) == []
    load(db, three_runs, 0, 1)
    before = snapshot(db)
    load(db, three_runs, 2)
    assert warehouse.loaded_runs(db) == list(three_runs.run_ids)
    assert warehouse.unload_run(db, three_runs.run_ids[2])
    assert snapshot(db) == before
    assert load(db, three_runs, 2)[0].rows_inserted == sum(three_runs.lines(2, s, "added") for s in STREAMS)


# --------------------------------------------------------------------------- query


@pytest.fixture
def loaded_db(tmp_path, three_runs) -> Path:
    db = tmp_path / "w.duckdb"
    load(db, three_runs, 0, 1, 2)
    return db


def test_query_streams_csv_in_batches(loaded_db, monkeypatch, three_runs):
    monkeypatch.setattr(warehouse, "QUERY_BATCH_ROWS", 7)
    out = io.StringIO()
    n = warehouse.query(loaded_db, "SELECT record_key, event_time, value FROM observations ORDER BY record_key;", out)
    lines = out.getvalue().splitlines()
    assert n == three_runs.lines(2, "observations") == len(lines) - 1
    assert lines[0] == "record_key,event_time,value"
    assert lines[1].split(",")[1].endswith("+00")  # TIMESTAMPTZ rendered by DuckDB, in UTC
    binary = io.BytesIO()
    assert warehouse.query(loaded_db, "SELECT 1 AS a, NULL AS b, [1, 2] AS c", binary) == 1
    assert binary.getvalue() == b'a,b,c\n1,,"[1, 2]"\n'


def test_query_is_read_only(loaded_db):
    before = snapshot(loaded_db)
    with pytest.raises(UsageError):
        warehouse.query(loaded_db, "DELETE FROM observations", io.StringIO())
    with pytest.raises(UsageError):
        warehouse.query(loaded_db, "SELECT 1; SELECT 2", io.StringIO())
    assert snapshot(loaded_db) == before


@pytest.mark.slow
def test_cli_build_and_query(tmp_path, three_runs):
    db = tmp_path / "w.duckdb"
    proc = subprocess.run([*CLI, "duckdb", "build", "--input", str(three_runs.out / "ndjson"), "--db", str(db)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    kv = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert kv["runs_loaded"] == "3" and kv["rows_removed"] == "0"
    proc = subprocess.run([*CLI, "duckdb", "query", "--db", str(db), "--sql",
                           "SELECT run_id, load_seq FROM runs ORDER BY load_seq"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == ["run_id,load_seq"] + [f"{r},{i}" for i, r in enumerate(three_runs.run_ids, 1)]
    csv_path = tmp_path / "out" / "steps.csv"
    proc = subprocess.run([*CLI, "duckdb", "query", "--db", str(db), "--sql", "SELECT * FROM daily_steps",
                           "--out", str(csv_path)], capture_output=True, text=True)
    assert proc.returncode == 0 and csv_path.read_text().startswith("canonical_person_id,day,steps,")
    proc = subprocess.run([*CLI, "duckdb", "query", "--db", str(tmp_path / "missing.duckdb"), "--sql", "SELECT 1"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert str(tmp_path) not in proc.stderr


def test_duckdb_resources_are_bounded(tmp_path, monkeypatch):
    """DuckDB gets a memory limit (not 80% of RAM) and spills beside the warehouse, inside <out>."""
    db = tmp_path / "out" / "warehouse.duckdb"
    db.parent.mkdir()
    con = warehouse.connect(db)
    limit = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    spill = con.execute("SELECT current_setting('temp_directory')").fetchone()[0]
    con.close()
    assert limit == "244.1 MiB"  # 256 MB, as DuckDB prints it
    assert spill == str(db) + ".tmp"
    monkeypatch.setenv(warehouse.MEMORY_LIMIT_ENV, "1GB")
    con = warehouse.connect(db)
    assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] == "953.6 MiB"  # 1 GB
    con.close()
    monkeypatch.setenv(warehouse.MEMORY_LIMIT_ENV, "lots; DROP TABLE runs")
    with pytest.raises(UsageError):
        warehouse.connect(db)


def test_cli_build_waits_for_the_state_lock(tmp_path, three_runs):
    """`run all` writes the warehouse under the state lock: `duckdb build --replace` (which
    renames a new file over it) must not run beside it."""
    from healthdelta.fsutil import StateLock

    db = tmp_path / "w.duckdb"
    build = [*CLI, "duckdb", "build", "--input", str(three_runs.out / "ndjson"), "--db", str(db), "--replace"]
    with StateLock(three_runs.out / "state"):
        proc = subprocess.run(build, capture_output=True, text=True)
    assert proc.returncode == 1 and not db.exists()
    assert proc.stderr == "error: another healthdelta command is using this state directory; " \
                          "try again when it has finished\n"
    assert subprocess.run(build, capture_output=True, text=True).returncode == 0 and db.is_file()
