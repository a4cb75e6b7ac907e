"""`run all` and `demo` through the real CLI."""

from __future__ import annotations

import json
import shlex
import subprocess

import duckdb
import pytest

from conftest import assert_one_error_line, kv, stream_bytes
from test_cli_pipeline import snapshot

pytestmark = pytest.mark.slow  # every test here is a full `run all` (or the demo)


def test_run_all_two_exports_then_noop(cli, synth_pair):
    first, second = synth_pair
    a = kv(cli("run", "all", "--input", str(first.zip_path), "--out", "data", check=True).stdout)
    assert a["status"] == "created"
    for key in ("staging_dir", "ndjson_dir", "run_report", "warehouse", "reports_dir"):
        assert a[key].startswith("data/") and (cli.cwd / a[key]).exists(), key
    b = kv(cli("run", "all", "--input", str(second.zip_path), "--out", "data", check=True).stdout)
    data = cli.cwd / "data"
    report = json.loads((data.parent / b["run_report"]).read_text())
    assert report["stages"]["warehouse"]["load_mode"] == "delta"
    assert report["stages"]["warehouse"]["inserted"] == json.loads(
        (data.parent / b["ndjson_dir"] / "delta.json").read_text())["added"]
    con = duckdb.connect(str(data / "warehouse.duckdb"), read_only=True)
    total, distinct = con.execute(
        "SELECT count(*), count(DISTINCT record_key) FROM observations").fetchone()
    assert total == distinct == len(stream_bytes(data.parent / b["ndjson_dir"] / "observations.ndjson").splitlines())
    assert sorted(r[0] for r in con.execute("SELECT run_id FROM runs").fetchall()) == sorted(
        [a["run_id"], b["run_id"]])
    con.close()
    assert (data.parent / b["reports_dir"] / "report.html").stat().st_size > 0

    before = snapshot(data)
    again = cli("run", "all", "--input", str(second.zip_path), "--out", "data", check=True)
    assert again.stdout.splitlines() == ["no changes detected", "status=no_changes", f"run_id={b['run_id']}",
                                         f"report=data/reports/{b['run_id']}/report.html"]
    assert snapshot(data) == before  # no file touched: bytes and mtimes


def test_run_all_failure_in_reports_leaves_registry_and_warehouse(cli, synth_pair):
    first, second = synth_pair
    cli("run", "all", "--input", str(first.zip_path), "--out", "data", check=True)
    data = cli.cwd / "data"
    before = snapshot(data)
    # SIGTERM once the report stage starts: after the warehouse load has committed.
    proc = cli("run", "all", "--input", str(second.zip_path), "--out", "data",
               env={"HEALTHDELTA_TEST_FAULT": "report:1:TERM"})
    assert_one_error_line(proc)
    after = snapshot(data)
    for rel in ("state/runs.json", "state/LAST_RUN"):
        assert after[rel] == before[rel]
    con = duckdb.connect(str(data / "warehouse.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    con.close()
    ok = kv(cli("run", "all", "--input", str(second.zip_path), "--out", "data", check=True).stdout)
    assert ok["status"] == "created"


def test_demo(cli):
    proc = cli("demo", "--out", "demo", check=True)
    out = kv(proc.stdout)
    assert out["export_1_status"] == out["export_2_status"] == "created"
    assert (cli.cwd / out["report"]).is_file()
    # The printed next step runs as printed, from where the demo ran.
    next_step = next(line for line in proc.stdout.splitlines() if line.startswith("next: "))
    shown = subprocess.run(shlex.split(next_step.removeprefix("next: ")), cwd=cli.cwd, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout, shown.stderr
    again = kv(cli("demo", "--out", "demo", check=True).stdout)
    assert again == out  # starts afresh, same run ids: the demo is deterministic
    (cli.cwd / "mine").mkdir()
    (cli.cwd / "mine" / "keep.txt").write_text("x")
    assert_one_error_line(cli("demo", "--out", "mine"), code=2)
    assert (cli.cwd / "mine" / "keep.txt").exists()


def test_unchanged_route_points_are_stored_once(cli, synth_pair):
    """Every export repeats every route: a points file equal to the base run's is one file
    (a hard link), a changed one is written anew, and pruning the base keeps it readable."""
    first, second = synth_pair
    a = kv(cli("run", "all", "--input", str(first.zip_path), "--out", "data", check=True).stdout)
    b = kv(cli("run", "all", "--input", str(second.zip_path), "--out", "data", check=True).stdout)
    old = cli.cwd / a["ndjson_dir"] / "local" / "route_points"
    new = cli.cwd / b["ndjson_dir"] / "local" / "route_points"
    files = sorted(p.name for p in new.iterdir())
    assert files and files == sorted(p.name for p in old.iterdir())
    assert all((new / n).samefile(old / n) for n in files)
    # Built by hand: a changed file in the base must not be linked into a new run.
    from healthdelta.export import _link_unchanged_points

    base, fresh = cli.cwd / "base", cli.cwd / "fresh"
    base.mkdir()
    fresh.mkdir()
    (base / "k1.ndjson").write_bytes(b'{"lat":1}\n')
    (base / "k2.ndjson").write_bytes(b'{"lat":2}\n')
    (fresh / "k1.ndjson").write_bytes(b'{"lat":1}\n')
    (fresh / "k2.ndjson").write_bytes(b'{"lat":3}\n')  # same size, other bytes
    (fresh / "k3.ndjson").write_bytes(b'{"lat":4}\n')  # not in the base
    _link_unchanged_points(fresh, base)
    assert (fresh / "k1.ndjson").samefile(base / "k1.ndjson")
    assert not (fresh / "k2.ndjson").samefile(base / "k2.ndjson") and (fresh / "k2.ndjson").read_bytes() == b'{"lat":3}\n'
    assert sorted(p.name for p in fresh.iterdir()) == ["k1.ndjson", "k2.ndjson", "k3.ndjson"]
    cli("run", "prune", "--keep", "1", "--out", "data", check=True)
    assert not old.exists() and all((new / n).stat().st_size > 0 for n in files)
    assert cli("doctor", "--out", "data", check=True).returncode == 0
