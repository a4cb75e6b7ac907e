"""Benchmark the warehouse load, the baseline and the current code in one run: first export, then the next.

    python benchmarks/bench_warehouse.py --size-mb 136 --repeat 3
    python benchmarks/bench_warehouse.py --size-mb 1024 --repeat 3 --baseline main

Generates a synthetic export (export.xml of about --size-mb MB, or --records HealthKit
Records) and the export that follows it with --new-pct percent more records, runs
`pipeline run` on both (the NDJSON the warehouse loads; not timed), then --repeat times,
for each code path in a child process of its own and into a fresh warehouse: loads the
first run (empty warehouse), then the second (a delta load of its `added/`). The two
paths alternate in order between repeats, since the machine may be shared.

The baseline is `src/healthdelta/warehouse.py` as of --baseline (a git revision, default
the merge-base of HEAD and main) imported from git as a module of its own; everything
else is this checkout's, so the two paths read the same NDJSON with the same DuckDB.
Prints medians of wall time, process CPU time, rows/s and peak RSS per path, the ratio
new/old, the load average before and after, and whether both paths left equal tables.
With --reports, also times `report build` after each load of the current path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import fresh, median, run_cli

from healthdelta import report, streamfile, synth, warehouse
from healthdelta.ndjson import STREAMS

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("old", "new")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def baseline_module(rev: str, work: Path):
    """warehouse.py as of `rev`, importable beside the current one."""
    text = subprocess.run(["git", "show", f"{rev}:src/healthdelta/warehouse.py"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    path = work / "warehouse_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("healthdelta_warehouse_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def count_rows(folder: Path) -> tuple[int, int]:
    """(rows, compressed bytes) of a run folder's streams."""
    rows = size = 0
    for stream in STREAMS:
        path = streamfile.find(folder, stream)
        size += path.stat().st_size
        with streamfile.open_read(path) as fh:
            rows += sum(1 for _ in fh)
    return rows, size


def table_digest(db: Path) -> dict[str, list[int]]:
    """Row count and an order-independent content hash of every table the load writes."""
    con = warehouse.connect(db, read_only=True)
    try:
        return {t: list(con.execute(f"SELECT count(*), COALESCE(sum(hash(x::VARCHAR)), 0) FROM {t} AS x").fetchone())
                for t in (*STREAMS, "record_removals")}
    finally:
        con.close()


def child(args: argparse.Namespace) -> None:
    """One repeat of one path: both loads into a fresh warehouse; prints its figures as JSON."""
    work = args.workdir.resolve()
    prepared = json.loads((work / "prepared.json").read_text())
    out = work / "out"
    entries = json.loads((out / "state" / "runs.json").read_text())["runs"]
    dirs = [out / "ndjson" / r for r in prepared["run_ids"]]
    module = baseline_module(args.baseline_rev, work) if args.child == "old" else warehouse
    bench = fresh(work / f"db-{args.child}")
    db = bench / "warehouse.duckdb"
    figures: dict[str, float] = {}
    for i, (d, run_id) in enumerate(zip(dirs, prepared["run_ids"]), 1):
        result, figures[f"load{i}"], figures[f"load{i}_cpu"] = timed(module.load_run, db, d, entries[run_id])
        assert result.rows_inserted == prepared["rows"][i - 1] and result.load_mode == "delta", result
        if args.reports and args.child == "new":
            figures[f"rep{i}"] = timed(report.build_report, db, bench / "reports" / str(i))[1]
    figures["db_mb"] = db.stat().st_size / 1e6
    if args.digest:
        figures["digest"] = table_digest(db)
    print(json.dumps(figures))


def run_child(args: argparse.Namespace, path: str, digest: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--workdir", str(args.workdir),
           "--baseline-rev", args.baseline_rev] + (["--reports"] if args.reports else []) + \
          (["--digest"] if digest else [])
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=Path(__file__).parent, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"benchmark child failed: {err.read().strip()}")
        figures = json.loads(out.read())
    figures["peak_rss_mb"] = usage.ru_maxrss / 1024
    return figures


def prepare(args: argparse.Namespace, work: Path) -> dict:
    out = work / "out"
    stamp = work / "prepared.json"
    wanted = {"records": args.records, "size_mb": args.size_mb, "new_pct": args.new_pct}
    if stamp.is_file() and json.loads(stamp.read_text()).get("wanted") == wanted:
        return json.loads(stamp.read_text())
    for d in ("e1", "e2", "out"):
        shutil.rmtree(work / d, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    if args.records:
        first = synth.generate_export(work / "e1", seed=5, records=args.records)
    else:
        first = synth.generate_export(work / "e1", seed=5, target_bytes=args.size_mb * 1_000_000)
    synth.generate_export(work / "e2", base=first, new_records=max(1, int(first.counts["records"] * args.new_pct / 100)))
    xml_mb = (work / "e1" / "apple_health_export" / "export.xml").stat().st_size / 1e6
    run_ids = []
    for name in ("e1", "e2"):
        m = run_cli(["pipeline", "run", "--input", str(work / name), "--out", str(out)], work)
        run_ids.append(dict(line.split("=", 1) for line in m.stdout.splitlines() if "=" in line)["run_id"])
    counted = [count_rows(out / "ndjson" / r / "added") for r in run_ids]
    doc = {"wanted": wanted, "run_ids": run_ids, "xml_mb": xml_mb,
           "rows": [c[0] for c in counted], "zst_bytes": [c[1] for c in counted]}
    stamp.write_text(json.dumps(doc))
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=136, help="size of the first export.xml in MB")
    ap.add_argument("--records", type=int, default=0, help="HealthKit Records in the first export (instead of --size-mb)")
    ap.add_argument("--new-pct", type=float, default=1.0, help="records the next export adds, in percent")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="git revision of the old warehouse.py (default: merge-base with main)")
    ap.add_argument("--reports", action="store_true", help="also time report build after each load (current path)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/warehouse"))
    ap.add_argument("--keep", action="store_true", help="keep the generated exports and warehouses")
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-rev", help=argparse.SUPPRESS)
    ap.add_argument("--digest", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.workdir = work
    args.baseline_rev = args.baseline or subprocess.run(
        ["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    doc = prepare(args, work)
    rows = doc["rows"]
    con = warehouse.connect(work / "settings.duckdb")
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    con.close()
    (work / "settings.duckdb").unlink(missing_ok=True)
    print(f"machine: {os.cpu_count()} cores, DuckDB threads setting {threads}, memory limit {warehouse.memory_limit()}; "
          f"baseline warehouse.py at {args.baseline_rev[:12]}")
    print(f"first export: export.xml {doc['xml_mb']:.0f} MB, {rows[0]:,} rows, {doc['zst_bytes'][0] / 1e6:.1f} MB "
          f".ndjson.zst; next export: +{rows[1]:,} rows ({doc['zst_bytes'][1] / 1e6:.2f} MB of added/)")
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {p: [] for p in PATHS}
    for i in range(args.repeat):
        for path in (PATHS if i % 2 == 0 else PATHS[::-1]):
            runs[path].append(run_child(args, path, digest=i == args.repeat - 1))
    load_after = os.getloadavg()

    md = {p: {k: median([r[k] for r in runs[p]]) for k in runs[p][0] if k != "digest"} for p in PATHS}
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; medians of {args.repeat}:")
    for i, label in ((1, "first load (empty warehouse)"), (2, "next load (delta, added/)")):
        for p in PATHS:
            m = md[p]
            print(f"  {label:30s} {p}  {m[f'load{i}']:7.3f} s  {rows[i - 1] / m[f'load{i}']:>11,.0f} rows/s  "
                  f"CPU {m[f'load{i}_cpu']:6.2f} s")
        print(f"  {'':30s} new/old wall ratio {md['new'][f'load{i}'] / md['old'][f'load{i}']:.3f}")
    for p in PATHS:
        print(f"  peak RSS {p} {md[p]['peak_rss_mb']:.0f} MB, warehouse {md[p]['db_mb']:.0f} MB")
    if args.reports:
        print(f"  report build after the first load {md['new']['rep1']:.2f} s, after the next {md['new']['rep2']:.2f} s")
    same = runs["old"][-1]["digest"] == runs["new"][-1]["digest"]
    print(f"tables equal (count and content hash of every stream table and record_removals): {same}")
    if not args.keep:  # the NDJSON under out/ stays for the next run with the same export
        for d in ("e1", "e2", "db-old", "db-new"):
            shutil.rmtree(work / d, ignore_errors=True)
    if not same:
        raise SystemExit("the two code paths left different tables")


if __name__ == "__main__":
    main()
