"""Benchmark `cohort run`: participants per minute with 1 and 2 Dask workers, and peak RSS.

    python benchmarks/bench_cohort.py --participants 8 --size-mb 10

Generates --participants synthetic exports (zips, about --size-mb of export.xml each,
one seed per participant), then measures:
- `cohort run --workers 1` and `--workers 2` into fresh output dirs (wall time of the
  whole command: cluster start, every participant, Parquet, cohort.duckdb), as
  participants per minute and the speed-up of 2 workers over 1;
- the per-participant task time Dask workers report in cohort.json (median), and the
  input bytes per participant, which docs/scale.md's cost model starts from;
- the peak RSS of one participant: `run all --mode share` on one export as its own
  process (what a worker needs per task), and the largest process of the 2-worker
  cohort run (wait4's maxrss covers the CLI and its worker processes).
- a rerun with nothing changed (every participant a no-op);
- the cost model's slope: `run all --mode share` alone on one export of --size-mb and one
  of --large-mb: wall and CPU seconds (the child and its parse pool) per MB of export.xml,
  then `export parquet` of that warehouse (the other half of a cohort task): time, peak RSS
  and Parquet bytes.
The page cache is warm (the exports were just written): CPU and copy cost, not disk reads.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from _common import fresh, median, run_cli

from healthdelta.synth import generate_export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--participants", type=int, default=8)
    ap.add_argument("--size-mb", type=int, default=10, help="target size of each export.xml in MB")
    ap.add_argument("--large-mb", type=int, default=100, help="export.xml MB of the cost-model export")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/cohort"))
    args = ap.parse_args()

    work = args.workdir.resolve()
    inputs = work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for i in range(args.participants):
        zip_path = inputs / f"P{i:03d}.zip"
        if not zip_path.exists():
            made = generate_export(fresh(work / "gen" / f"P{i:03d}"), seed=1000 + i,
                                   target_bytes=args.size_mb * 1_000_000, zip=True, keep_folder=False)
            os.replace(made.zip_path, zip_path)
    zips = sorted(inputs.glob("*.zip"))[: args.participants]
    zip_mb = sum(z.stat().st_size for z in zips) / len(zips) / 1e6
    print(f"cores: {os.cpu_count()}; participants: {len(zips)}; export.xml ~{args.size_mb} MB each, "
          f"zip {zip_mb:.1f} MB each")

    large = work / "gen" / "large" / "export.zip"
    if not large.exists():
        generate_export(fresh(large.parent), seed=999, target_bytes=args.large_mb * 1_000_000, zip=True,
                        keep_folder=False)
    for mb, zip_path in ((args.size_mb, zips[0]), (args.large_mb, large)):
        single = run_cli(["run", "all", "--mode", "share", "--input", str(zip_path),
                          "--out", str(fresh(work / "single"))], work)
        print(f"one participant alone (`run all --mode share`, export.xml ~{mb} MB, zip "
              f"{zip_path.stat().st_size / 1e6:.1f} MB): {single.wall_s:.1f} s wall, {single.cpu_s:.1f} s CPU "
              f"({single.cpu_s / mb:.3f} CPU s/MB), peak RSS {single.peak_rss_mib:.0f} MiB")
        pq = run_cli(["export", "parquet", "--db", str(work / "single" / "warehouse.duckdb"),
                      "--out", str(fresh(work / "single-parquet"))], work)
        size = sum(p.stat().st_size for p in (work / "single-parquet").rglob("*.parquet"))
        print(f"  its Parquet (`export parquet`, what a cohort task publishes): {pq.wall_s:.1f} s wall, "
              f"peak RSS {pq.peak_rss_mib:.0f} MiB, {size / 1e6:.1f} MB")

    rates = {}
    for workers in (1, 2):
        out = work / f"out-{workers}"
        fresh(out)
        m = run_cli(["cohort", "run", "--inputs", str(inputs), "--out", str(out), "--workers", str(workers)], work)
        summary = json.loads((out / "cohort.json").read_text())
        tasks = [p["seconds"] for p in summary["participants"].values()]
        rates[workers] = len(zips) / m.wall_s * 60
        print(f"--workers {workers}: {m.wall_s:.1f} s wall, {rates[workers]:.1f} participants/min, "
              f"task median {median(tasks):.1f} s, largest process peak RSS {m.peak_rss_mib:.0f} MiB")
    print(f"speed-up 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")
    again = run_cli(["cohort", "run", "--inputs", str(inputs), "--out", str(work / "out-2"), "--workers", "2"], work)
    print(f"rerun, nothing changed (--workers 2): {again.wall_s:.1f} s")
    parquet = sum(p.stat().st_size for p in (work / "out-2" / "parquet").rglob("*.parquet"))
    print(f"pooled Parquet: {parquet / 1e6:.1f} MB ({parquet / len(zips) / 1e6:.2f} MB per participant)")


if __name__ == "__main__":
    main()
