"""`duckdb query --format csv|json|parquet [--out FILE]`: outputs read back, least privilege kept."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import duckdb
import pytest

from healthdelta import warehouse
from healthdelta.errors import UsageError

from conftest import assert_one_error_line, kv

ROWS_SQL = "SELECT * FROM planted ORDER BY n"


@pytest.fixture
def db(tmp_path) -> Path:
    """A DuckDB file with planted values of every kind a warehouse query returns."""
    path = tmp_path / "w.duckdb"
    con = duckdb.connect(str(path))
    con.execute("""
        CREATE TABLE planted AS SELECT * FROM (VALUES
          (1, 'Zoë "quoted", line\nbreak', 2.5::DOUBLE, TIMESTAMPTZ '2024-02-01 08:00:00+00', DATE '2024-02-01',
           [1, 2], {'unit': 'count', 'v': 3}, 12.34::DECIMAL(6, 2), true),
          (2, NULL, 'nan'::DOUBLE, NULL, NULL, [], NULL, NULL, NULL),
          (3, '', 'infinity'::DOUBLE, TIMESTAMPTZ '2024-02-02 23:59:59.5+00', DATE '2024-02-02',
           NULL, {'unit': NULL, 'v': NULL}, -1.00::DECIMAL(6, 2), false)
        ) AS t(n, s, d, ts, day, l, st, dec, b)""")
    con.execute("CREATE TABLE many AS SELECT range AS i FROM range(25)")
    con.close()
    return path


def _no_nan(text: str):
    raise AssertionError(f"not JSON: {text}")


EXPECTED = [
    {"n": 1, "s": 'Zoë "quoted", line\nbreak', "d": 2.5, "ts": "2024-02-01T08:00:00+00:00", "day": "2024-02-01",
     "l": [1, 2], "st": {"unit": "count", "v": 3}, "dec": 12.34, "b": True},
    {"n": 2, "s": None, "d": None, "ts": None, "day": None, "l": [], "st": None, "dec": None, "b": None},
    {"n": 3, "s": "", "d": None, "ts": "2024-02-02T23:59:59.500000+00:00", "day": "2024-02-02",
     "l": None, "st": {"unit": None, "v": None}, "dec": -1.0, "b": False},
]


def test_json_is_one_strict_array_of_typed_rows_in_column_order(db):
    out = io.BytesIO()
    assert warehouse.query(db, ROWS_SQL, out, "json") == 3
    text = out.getvalue().decode("utf-8")
    rows = json.loads(text, parse_constant=_no_nan)  # NaN/Infinity would not be JSON
    assert rows == EXPECTED
    assert [list(r) for r in rows][0] == ["n", "s", "d", "ts", "day", "l", "st", "dec", "b"]
    assert text.startswith("[\n{") and text.endswith("}\n]\n") and text.count("\n") == 3 + 2  # "[", a row a line, "]"


def test_json_streams_in_batches_and_empty_results_parse(db, monkeypatch):
    monkeypatch.setattr(warehouse, "QUERY_BATCH_ROWS", 4)
    out = io.StringIO()
    assert warehouse.query(db, "SELECT i FROM many ORDER BY i", out, "json") == 25
    assert json.loads(out.getvalue()) == [{"i": i} for i in range(25)]
    out = io.StringIO()
    assert warehouse.query(db, "SELECT i FROM many WHERE i < 0", out, "json") == 0
    assert json.loads(out.getvalue()) == []


def test_json_refuses_repeated_column_names(db):
    with pytest.raises(UsageError, match="distinct column names"):
        warehouse.query(db, "SELECT 1 AS a, 2 AS a", io.StringIO(), "json")


def test_cli_formats_written_atomically_and_read_back(cli, db, tmp_path):
    res = tmp_path / "results"
    csv_out = kv(cli("duckdb", "query", "--db", str(db), "--sql", ROWS_SQL, "--out", "results/p.csv",
                     check=True).stdout)
    assert csv_out == {"out": "results/p.csv", "rows": "3"}
    assert (res / "p.csv").read_text().splitlines()[0] == "n,s,d,ts,day,l,st,dec,b"
    assert kv(cli("duckdb", "query", "--db", str(db), "--sql", ROWS_SQL, "--format", "json", "--out",
                  "results/p.json", check=True).stdout)["rows"] == "3"
    assert json.loads((res / "p.json").read_text(), parse_constant=_no_nan) == EXPECTED
    stdout = cli("duckdb", "query", "--db", str(db), "--sql", ROWS_SQL, "--format", "json", check=True).stdout
    assert json.loads(stdout, parse_constant=_no_nan) == EXPECTED
    assert kv(cli("duckdb", "query", "--db", str(db), "--sql", ROWS_SQL, "--format", "parquet", "--out",
                  "results/p.parquet", check=True).stdout)["rows"] == "3"
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    back = con.execute(f"SELECT * FROM read_parquet('{res / 'p.parquet'}') ORDER BY n").fetchall()
    want = duckdb.connect(str(db), read_only=True)
    want.execute("SET TimeZone = 'UTC'")
    expected = want.execute(ROWS_SQL).fetchall()
    assert [r[:2] + r[3:] for r in back] == [r[:2] + r[3:] for r in expected]
    assert [r[2] for r in back][0] == 2.5 and math.isnan(back[1][2]) and math.isinf(back[2][2])
    assert sorted(p.name for p in res.iterdir()) == ["p.csv", "p.json", "p.parquet"]  # no temporaries left


def test_cli_failed_query_keeps_the_previous_file(cli, db, tmp_path):
    target = tmp_path / "keep.json"
    target.write_text("previous\n")
    for fmt in ("json", "parquet", "csv"):
        proc = cli("duckdb", "query", "--db", str(db), "--sql", "SELECT CAST(s AS INTEGER) FROM planted",
                   "--format", fmt, "--out", "keep.json")
        line = assert_one_error_line(proc)
        assert "Zo" not in line and "quoted" not in line  # the failing value is not quoted
        assert target.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json", "w.duckdb"]


def test_cli_parquet_needs_out(cli, db):
    line = assert_one_error_line(cli("duckdb", "query", "--db", str(db), "--sql", ROWS_SQL, "--format", "parquet"),
                                 code=2)
    assert "--out" in line


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('{dir}/secret.csv')",          # a file beside the output
    "COPY planted TO '{dir}/copied.csv'",                   # writing elsewhere
    "SELECT * FROM read_parquet('{dir}/*.parquet')",
    "ATTACH '{dir}/other.duckdb' AS other",
    "DELETE FROM planted",                                   # the warehouse stays read-only
    "SET enable_external_access = true",
])
@pytest.mark.parametrize("fmt", ["parquet", "json"])
def test_cli_user_sql_gets_no_file_access(cli, db, tmp_path, sql, fmt):
    (tmp_path / "secret.csv").write_text("name\nMargarethe\n")
    before = db.read_bytes()
    proc = cli("duckdb", "query", "--db", str(db), "--sql", sql.format(dir=tmp_path), "--format", fmt,
               "--out", "x.out")
    line = assert_one_error_line(proc, code=2)
    assert "Margarethe" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.csv", "w.duckdb"]
    assert db.read_bytes() == before
    assert line


def test_json_refuses_integers_beyond_64_bits_and_writes_blobs_as_hex(db):
    with pytest.raises(UsageError, match="64-bit"):
        warehouse.query(db, "SELECT (1::HUGEINT << 100) AS big", io.StringIO(), "json")
    out = io.StringIO()
    warehouse.query(db, "SELECT '\\xAA\\x01'::BLOB AS b, 5::HUGEINT AS h, INTERVAL 3 DAY AS i", out, "json")
    assert json.loads(out.getvalue()) == [{"b": "aa01", "h": 5, "i": "3 days, 0:00:00"}]


def test_cli_parquet_through_a_symlinked_folder(cli, db, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    out = kv(cli("duckdb", "query", "--db", str(db), "--sql", ROWS_SQL, "--format", "parquet", "--out",
                 "link/p.parquet", check=True).stdout)
    assert out["rows"] == "3" and [p.name for p in real.iterdir()] == ["p.parquet"]
