"""Reports (CONTRACT §7): files, byte-identical rebuilds, share mode without PII, `report show`."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("duckdb")
pytest.importorskip("plotly")

from test_warehouse import CLI, Runs, make_three_runs  # noqa: E402

from healthdelta import report, warehouse  # noqa: E402
from healthdelta.errors import UsageError  # noqa: E402
from healthdelta.ndjson import STREAMS  # noqa: E402


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> tuple[Path, Runs]:
    runs = make_three_runs(tmp_path_factory)
    path = tmp_path_factory.mktemp("report-db") / "warehouse.duckdb"
    for i in range(3):
        warehouse.load_run(path, runs.ndjson(i), runs.entry(i))
    return path, runs


def read_all(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_report_files_are_written_and_byte_identical_when_rebuilt(db, tmp_path):
    path, runs = db
    first = report.build_report(path, tmp_path / "a")
    report.build_report(path, tmp_path / "b")
    report.build_report(path, tmp_path / "a")  # over an existing report dir
    files = read_all(tmp_path / "a")
    assert sorted(files) == sorted(report.FILES) == sorted(first.files)
    assert files == read_all(tmp_path / "b")
    assert first.run_id == runs.run_ids[2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    html = files["report.html"].decode()
    assert "<script src=" not in html and "<link" not in html  # self-contained
    for chart_id in ("chart-steps", "chart-resting-hr", "chart-sleep-1", "chart-workouts-1", "chart-weight"):
        assert f'id="{chart_id}"' in html


def test_share_mode_report_holds_no_planted_pii(db, tmp_path):
    path, runs = db
    local = read_all(report.build_report(path, tmp_path / "local").out_dir)
    # the local report does show device names: the check below is not vacuous
    assert any(s.encode() in local["coverage_by_source.csv"] for s in runs.pii)
    share = read_all(report.build_report(path, tmp_path / "share", mode="share").out_dir)
    con = warehouse.connect(path, read_only=True)
    try:
        person_ids = [r[0] for r in con.execute("SELECT DISTINCT canonical_person_id FROM records").fetchall()]
    finally:
        con.close()
    for name, content in share.items():
        text = content.decode("utf-8")
        leaked = [s for s in (*runs.pii, *person_ids) if s in text]
        assert not leaked, (name, leaked)
    summary = json.loads(share["summary.json"])
    assert [p["label"] for p in summary["people"]] == [f"Patient {i}" for i in range(1, len(summary["people"]) + 1)]
    assert "notes" not in summary["since_last_run"]


def test_person_labels_share_mapping_and_local_ids(db, tmp_path):
    path, _ = db
    con = warehouse.connect(path, read_only=True)
    try:
        ids = [r[0] for r in con.execute("SELECT DISTINCT canonical_person_id FROM records ORDER BY 1").fetchall()]
        local = report.person_label_map(con, "local", None)
        assert {local[i] for i in ids} == set(ids)
        mapping = {pid: f"Patient {n}" for n, pid in enumerate(reversed(ids), 7)}
        assert report.person_label_map(con, "share", mapping) == mapping
        with pytest.raises(UsageError):
            report.person_label_map(con, "share", {ids[0]: "Jane Doe"})
    finally:
        con.close()


def test_since_last_run_matches_the_delta(db, tmp_path):
    path, runs = db
    for i in (2, 1):
        result = report.build_report(path, tmp_path / f"r{i}", run_id=runs.run_ids[i][:10])
        since = json.loads((result.out_dir / "summary.json").read_text())["since_last_run"]
        delta = json.loads((runs.ndjson(i) / "delta.json").read_text())
        assert since["run_id"] == runs.run_ids[i] and since["parent_run_id"] == runs.run_ids[i - 1]
        assert since["added"] == {s: delta["streams"][s]["added"] for s in STREAMS}
        assert since["removed"] == dict.fromkeys(STREAMS, 0)
        assert sum(t["records"] for t in since["new_by_type"]) == delta["added"]
        assert since["new_first_date"] <= since["new_last_date"]
    with pytest.raises(UsageError):
        report.build_report(path, tmp_path / "bad", run_id="ffffffff")


def test_csv_files_have_headers_and_consistent_totals(db, tmp_path):
    path, runs = db
    out = report.build_report(path, tmp_path / "r").out_dir

    def rows(name):
        return list(csv.DictReader(io.StringIO((out / name).read_text())))

    coverage = rows("coverage_by_person.csv")
    total = sum(runs.lines(2, s) for s in STREAMS)
    assert sum(int(r["records"]) for r in coverage) == total
    assert sum(int(r["records"]) for r in rows("coverage_by_source.csv")) == total
    timeline = rows("timeline_daily_counts.csv")
    assert list(timeline[0]) == ["date", "person", "stream", "records"]
    assert [r["date"] for r in timeline] == sorted(r["date"] for r in timeline)


def test_report_show_and_cli(db, tmp_path):
    path, runs = db
    lines = report.show(path)
    text = "\n".join(lines)
    assert "observations" in text and "last run: " + runs.run_ids[2][:12] in text
    assert f"new records: {sum(runs.lines(2, s, 'added') for s in STREAMS):,}" in text
    proc = subprocess.run([*CLI, "report", "show", "--db", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.splitlines() == lines
    proc = subprocess.run([*CLI, "report", "build", "--db", str(path), "--out", str(tmp_path / "cli"),
                           "--mode", "share"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"report_dir={(tmp_path / 'cli').as_posix()}" in proc.stdout.splitlines()
    assert (tmp_path / "cli" / "report.html").is_file()


def test_people_are_labelled_by_first_appearance(tmp_path):
    from test_warehouse import PHONE, _row, write_run

    def steps(person: str, key: str, day: str, value: int) -> dict:
        row = _row(key, f"{day}T08:00:00", f"{day}T08:10:00", PHONE, value)
        row["canonical_person_id"] = person
        return row

    db = tmp_path / "w.duckdb"
    first = {"observations": [steps("pid-zulu-742", "x", "2024-05-01", 5)]}
    second = {"observations": [steps("pid-alpha-913", "y", "2024-05-02", 7)]}
    warehouse.load_run(db, write_run(tmp_path, "r1", None, first), {"run_id": "r1"})
    warehouse.load_run(db, write_run(tmp_path, "r2", "r1", second), {"run_id": "r2"})
    out = report.build_report(db, tmp_path / "share", mode="share").out_dir
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["label"], p["records"], p["first_date"]) for p in summary["people"]] == [
        ("Patient 1", 1, "2024-05-01"), ("Patient 2", 1, "2024-05-02")]
    assert [(m["person"], m["steps"]["mean_last_30_days"]) for m in summary["metrics"]] == [
        ("Patient 1", 5), ("Patient 2", 7)]
    html = (out / "report.html").read_text()
    assert "pid-zulu-742" not in html and "pid-alpha-913" not in html
    timeline = (out / "timeline_daily_counts.csv").read_text().splitlines()
    assert timeline[1:] == ["2024-05-01,Patient 1,observations,1", "2024-05-02,Patient 2,observations,1"]


def test_summary_numbers_equal_the_views(db, tmp_path):
    path, _ = db
    out = report.build_report(path, tmp_path / "r").out_dir
    metrics = {m["person"]: m for m in json.loads((out / "summary.json").read_text())["metrics"]}
    con = warehouse.connect(path, read_only=True)
    try:
        def view(sql: str) -> dict:
            return {pid: rest for pid, *rest in con.execute(sql).fetchall()}

        steps = view("SELECT canonical_person_id, count(*), max(day)::VARCHAR, round(avg(steps) FILTER "
                     "(WHERE rn <= 30)) FROM (SELECT *, row_number() OVER (PARTITION BY canonical_person_id "
                     "ORDER BY day DESC) AS rn FROM daily_steps) GROUP BY 1")
        sleep = view("SELECT canonical_person_id, count(*), round(avg(asleep_minutes) FILTER (WHERE rn <= 30) / 60, 2) "
                     "FROM (SELECT *, row_number() OVER (PARTITION BY canonical_person_id ORDER BY night DESC) AS rn "
                     "FROM sleep_per_night WHERE asleep_minutes > 0) GROUP BY 1")
        rhr = view("SELECT canonical_person_id, round(arg_max(bpm, day), 1) FROM resting_heart_rate_daily GROUP BY 1")
        weight = view("SELECT canonical_person_id, round(arg_max(kg, day), 1) FROM body_mass_daily GROUP BY 1")
    finally:
        con.close()
    assert steps and sleep and rhr and weight  # the synthetic exports have all four
    for pid, (days, last_day, mean) in steps.items():
        assert metrics[pid]["steps"] == {"days": days, "last_day": last_day, "mean_last_30_days": mean}
    for pid, (nights, mean) in sleep.items():
        assert (metrics[pid]["sleep"]["nights"], metrics[pid]["sleep"]["mean_asleep_hours_last_30_nights"]) == (
            nights, mean)
    for pid, (bpm,) in rhr.items():
        assert metrics[pid]["resting_heart_rate"]["last_bpm"] == bpm
    for pid, (kg,) in weight.items():
        assert metrics[pid]["weight"]["last_kg"] == kg


def test_units_follow_the_export_or_the_flag(db, tmp_path):
    path, _ = db
    con = warehouse.connect(path, read_only=True)
    try:
        system = report.export_units(con)
        written = dict(con.execute("SELECT unit, count(*) FROM observations "
                                   "WHERE type = 'HKQuantityTypeIdentifierBodyMass' GROUP BY 1").fetchall())
    finally:
        con.close()
    assert system == ("us" if written.get("lb", 0) > written.get("kg", 0) else "metric")
    by_system = {}
    for flag in ("metric", "us"):
        out = report.build_report(path, tmp_path / flag, units_system=flag).out_dir
        summary = json.loads((out / "summary.json").read_text())
        assert summary["units"] == flag
        by_system[flag] = {m["person"]: m["weight"] for m in summary["metrics"] if "weight" in m}
        html = (out / "report.html").read_text()
        assert ('"title":{"text":"lb"}' in html) == (flag == "us")
    for person, w in by_system["us"].items():
        assert w["unit"] == "lb" and by_system["metric"][person]["unit"] == "kg"
        # last_kg is rounded to 0.1 kg
        assert w["last"] == pytest.approx(by_system["metric"][person]["last_kg"] / 0.45359237, abs=0.2)
    proc = subprocess.run([*CLI, "report", "show", "--db", str(path), "--units", "us"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "latest values (us units):" in proc.stdout and " lb (" in proc.stdout


def test_local_mode_names_people_as_the_identity_store_knows_them(db, tmp_path):
    path, runs = db
    labels = report.local_person_labels(runs.out / "state" / "identity")
    assert labels and all(name in runs.pii for name in labels.values())
    out = report.build_report(path, tmp_path / "local", person_labels=labels).out_dir
    summary = json.loads((out / "summary.json").read_text())
    con = warehouse.connect(path, read_only=True)
    try:
        people = [r[0] for r in con.execute("SELECT DISTINCT canonical_person_id FROM records").fetchall()]
    finally:
        con.close()
    named = {labels[p] for p in people if p in labels}
    assert named and {p["label"] for p in summary["people"]} >= named
    assert named <= {p for p in runs.pii if p in (out / "report.html").read_text()}


def test_cli_report_build_names_people_from_the_state_dirs_identity_store(db, tmp_path):
    path, runs = db
    names = set(report.local_person_labels(runs.out / "state" / "identity").values())
    proc = subprocess.run([*CLI, "report", "build", "--db", str(path), "--out", str(tmp_path / "r"),
                           "--state", str(runs.out / "state")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not [s for s in runs.pii if s in proc.stdout + proc.stderr]  # names in the file, never on screen
    labels = {p["label"] for p in json.loads((tmp_path / "r" / "summary.json").read_text())["people"]}
    assert labels & names
