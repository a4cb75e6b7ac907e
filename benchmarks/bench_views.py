"""Benchmark the source-priority views on many step samples: `daily_steps` (sample-level
de-duplication on the UTC time line) and `daily_values`.

    python benchmarks/bench_views.py --samples 2000000 --repeat 3

Writes --samples StepCount samples straight into a fresh warehouse's observations
table (the views read nothing else): half from an Apple Watch, half from an iPhone
that overlaps the Watch partly, a tenth of them shifted into a second time zone,
over --people people. Then times a full read of `daily_steps` and prints the
median wall time, samples per second and the process's peak memory.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from _common import median

from healthdelta import warehouse

WATCH = "<<HKDevice: 0x1>, name:Apple Watch, manufacturer:Apple Inc., model:Watch>"
PHONE = "<<HKDevice: 0x2>, name:iPhone, manufacturer:Apple Inc., model:iPhone>"


def fill(db: Path, samples: int, people: int) -> None:
    con = warehouse.connect(db)
    try:
        con.execute("BEGIN TRANSACTION")
        warehouse._ensure_schema(con)
        # sample i: person (i // 2) % people; every 10 minutes a watch sample (even i, 6 minutes)
        # and a phone sample (odd i, 10 minutes from minute 4): the phone keeps 4 of its 10
        # minutes, so the kept total is the watch's plus 40% of the phone's.
        con.execute(
            """INSERT INTO observations (record_key, schema_version, canonical_person_id, source, run_id, kind,
                   type, value, unit, source_name, device, start_date, end_date, start_date_local, metadata)
               SELECT 'k' || i, 1, 'p' || ((i // 2) % $people), 'healthkit', 'bench', 'Record',
                      'HKQuantityTypeIdentifierStepCount', 100 + (i % 37), 'count',
                      CASE WHEN i % 2 = 0 THEN 'Watch' ELSE 'iPhone' END,
                      CASE WHEN i % 2 = 0 THEN $watch ELSE $phone END,
                      t, t + to_minutes(CAST(CASE WHEN i % 2 = 0 THEN 6 ELSE 10 END AS BIGINT)),
                      strftime(t + INTERVAL (CASE WHEN i % 10 = 9 THEN 2 ELSE -7 END) HOUR, '%Y-%m-%dT%H:%M:%S')
                          || CASE WHEN i % 10 = 9 THEN '+02:00' ELSE '-07:00' END,
                      '{}'
               FROM (SELECT i, TIMESTAMPTZ '2020-01-01 00:00:00+00'
                              + to_minutes(CAST((i // (2 * $people)) * 10 + (i % 2) * 4 AS BIGINT)) AS t
                     FROM range($n) r(i))""",
            {"n": samples, "people": people, "watch": WATCH, "phone": PHONE})
        con.execute("INSERT INTO runs (run_id, load_seq, load_mode, lineage_root, rows_inserted, rows_removed) "
                    "VALUES ('bench', 1, 'full', 'bench', ?, 0)", [samples])
        con.execute("COMMIT")
        con.execute("CHECKPOINT")
    finally:
        con.close()


def expected(db: Path) -> float:
    con = warehouse.connect(db, read_only=True)
    try:
        return con.execute("SELECT sum(value * CASE WHEN source_name = 'Watch' THEN 1 ELSE 0.4 END) "
                           "FROM observations").fetchone()[0]
    finally:
        con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2_000_000)
    ap.add_argument("--people", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory-limit", default=None, help="DuckDB memory_limit, e.g. 1GB (shows it spills, not fails)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "warehouse.duckdb"
        t = time.perf_counter()
        fill(db, args.samples, args.people)
        print(f"{args.samples:,} step samples written in {time.perf_counter() - t:.1f} s")
        con = warehouse.connect(db, read_only=True)
        if args.memory_limit:
            con.execute("SET memory_limit = ?", [args.memory_limit])
        try:
            walls = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                days, steps, naive = con.execute(
                    "SELECT count(*), sum(steps), sum(steps_all_sources) FROM daily_steps").fetchone()
                walls.append(time.perf_counter() - t)
            limit = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
        finally:
            con.close()
        wall = median(walls)
        print(f"daily_steps: {days:,} person-days, {steps:,.0f} steps kept of {naive:,.0f} "
              f"(expected {expected(db):,.0f})")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"median {wall:.2f} s = {args.samples / wall:,.0f} samples/s; peak RSS of the process "
              f"{peak:.0f} MB (DuckDB memory limit {limit})")


if __name__ == "__main__":
    main()
