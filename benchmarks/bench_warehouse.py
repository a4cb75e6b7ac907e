"""Benchmark the warehouse load and the reports: first export, then the next export (+1%).

    python benchmarks/bench_warehouse.py --records 1000000 --new-pct 1 --repeat 3

Generates a synthetic export of --records HealthKit Records and the export that
follows it with --new-pct percent more, runs `pipeline run` on both (the NDJSON the
warehouse loads; not timed), then --repeat times into a fresh warehouse: loads the
first run, builds its reports, loads the second run, builds its reports. Prints
medians of wall time and process CPU time, the load's rows/s, and the next export's
cost as a ratio of the first (issue 5 target: load >= 500k rows/s, next export <= 10%
of the first load). DuckDB uses every core; the machine's core count is printed
because rows/s scales with it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

from _common import fresh, median, run_cli

from healthdelta import report, synth, warehouse
from healthdelta.ndjson import STREAMS


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000, help="HealthKit Records in the first export")
    ap.add_argument("--new-pct", type=float, default=1.0, help="records the next export adds, in percent")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/warehouse"))
    ap.add_argument("--keep", action="store_true", help="keep the generated exports and NDJSON")
    args = ap.parse_args()

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    stamp = work / "prepared.json"
    wanted = {"records": args.records, "new_pct": args.new_pct}
    if not stamp.is_file() or json.loads(stamp.read_text()).get("wanted") != wanted:
        for d in ("e1", "e2", "out"):
            shutil.rmtree(work / d, ignore_errors=True)
        stamp.unlink(missing_ok=True)
        first = synth.generate_export(work / "e1", seed=5, records=args.records)
        synth.generate_export(work / "e2", base=first, new_records=int(args.records * args.new_pct / 100))
        run_ids = []
        for name in ("e1", "e2"):
            m = run_cli(["pipeline", "run", "--input", str(work / name), "--out", str(out)], work)
            run_ids.append(dict(line.split("=", 1) for line in m.stdout.splitlines() if "=" in line)["run_id"])
        stamp.write_text(json.dumps({"wanted": wanted, "run_ids": run_ids}))
    run_ids = json.loads(stamp.read_text())["run_ids"]
    entries = json.loads((out / "state" / "runs.json").read_text())["runs"]
    dirs = [out / "ndjson" / r for r in run_ids]
    rows = [sum(sum(1 for _ in open(d / "added" / f"{s}.ndjson", "rb")) for s in STREAMS) for d in dirs]
    size = [sum((d / "added" / f"{s}.ndjson").stat().st_size for s in STREAMS) for d in dirs]
    print(f"machine: {os.cpu_count()} cores; DuckDB threads default to all of them")
    print(f"first export: {rows[0]:,} rows, {size[0] / 1e6:.0f} MB NDJSON; "
          f"next export: +{rows[1]:,} rows ({size[1] / 1e6:.1f} MB of added/)")

    m: dict[str, list[float]] = {k: [] for k in (
        "load1", "load1_cpu", "rep1", "load2", "load2_cpu", "rep2")}
    db_mb = 0.0
    for _ in range(args.repeat):
        bench = fresh(work / "db")
        db = bench / "warehouse.duckdb"
        r1, wall, cpu = timed(warehouse.load_run, db, dirs[0], entries[run_ids[0]])
        assert r1.rows_inserted == rows[0], (r1.rows_inserted, rows[0])
        m["load1"].append(wall)
        m["load1_cpu"].append(cpu)
        m["rep1"].append(timed(report.build_report, db, bench / "reports" / "1")[1])
        r2, wall, cpu = timed(warehouse.load_run, db, dirs[1], entries[run_ids[1]])
        assert r2.rows_inserted == rows[1] and r2.load_mode == "delta"
        m["load2"].append(wall)
        m["load2_cpu"].append(cpu)
        m["rep2"].append(timed(report.build_report, db, bench / "reports" / "2")[1])
        db_mb = db.stat().st_size / 1e6

    md = {k: median(v) for k, v in m.items()}
    print(f"first load          median {md['load1']:7.2f} s  ({rows[0] / md['load1']:,.0f} rows/s; "
          f"CPU {md['load1_cpu']:.2f} s = {rows[0] / md['load1_cpu']:,.0f} rows per CPU-second)  "
          f"target >= 500,000 rows/s")
    print(f"first reports       median {md['rep1']:7.2f} s")
    print(f"next load (+{args.new_pct:g}%)    median {md['load2']:7.2f} s  ratio {md['load2'] / md['load1']:5.3f} "
          f"of the first load (target <= 0.10)")
    print(f"next reports        median {md['rep2']:7.2f} s")
    total1, total2 = md["load1"] + md["rep1"], md["load2"] + md["rep2"]
    print(f"load + reports      first {total1:.2f} s, next {total2:.2f} s, ratio {total2 / total1:5.3f}")
    print(f"warehouse size      {db_mb:.0f} MB")
    if not args.keep:
        for d in ("e1", "e2", "db"):
            shutil.rmtree(work / d, ignore_errors=True)


if __name__ == "__main__":
    main()
