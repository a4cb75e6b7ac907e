"""Benchmark `pipeline run` (first run and no-op run) against sha256 of the same files.

    python benchmarks/bench_pipeline.py --size-mb 1024 --repeat 3

Generates a synthetic export of about --size-mb of export.xml (plus the other parts),
then in the same process run measures, --repeat times each: sha256 of every input
file once (the baseline); `ingest` (staging alone: copy-while-hashing, manifest);
a first `pipeline run` into a fresh output dir (staging plus the NDJSON stage, which
parses everything); and the no-op second run. Prints medians, ratios to the baseline
and the peak RSS of the `healthdelta` child process. Issue 2 targets: no-op <= 1.5x,
first run's staging <= 3x, peak RSS < 200 MB. The page cache is warm for all of them
(the export was just written), so the comparison is CPU and copy cost, not disk reads.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from _common import fresh, median, run_cli, sha256_tree

from healthdelta.synth import generate_export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="target size of export.xml in MB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/pipeline"))
    ap.add_argument("--keep", action="store_true", help="keep the generated export")
    args = ap.parse_args()

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    export_root = work / "export"
    if not (export_root / "apple_health_export" / "export.xml").exists():
        fresh(export_root)
        generate_export(export_root, seed=1, target_bytes=args.size_mb * 1_000_000)
    total = sum(p.stat().st_size for p in export_root.rglob("*") if p.is_file())
    print(f"input: {total / 1e6:.0f} MB in {sum(1 for p in export_root.rglob('*') if p.is_file())} files")

    sha256_tree(export_root)  # warm the page cache so every measurement below reads from it
    baseline, staging, first, noop, rss_stage, rss_first, rss_noop = [], [], [], [], [], [], []
    for _ in range(args.repeat):
        baseline.append(sha256_tree(export_root))
        out = fresh(work / "out")
        m = run_cli(["ingest", "--input", str(export_root), "--out", str(out / "staging")], work)
        staging.append(m.wall_s)
        rss_stage.append(m.peak_rss_mib)
        out = fresh(work / "out")
        m = run_cli(["pipeline", "run", "--input", str(export_root), "--out", str(out)], work)
        first.append(m.wall_s)
        rss_first.append(m.peak_rss_mib)
        m = run_cli(["pipeline", "run", "--input", str(export_root), "--out", str(out)], work)
        assert m.stdout.startswith("no changes detected"), m.stdout
        noop.append(m.wall_s)
        rss_noop.append(m.peak_rss_mib)
        shutil.rmtree(out)

    b = median(baseline)
    print(f"sha256 baseline       median {b:7.2f} s  ({total / 1e6 / b:6.0f} MB/s)")
    print(f"ingest (staging only) median {median(staging):7.2f} s  ratio {median(staging) / b:4.2f}x  "
          f"(target <= 3x)  peak RSS {max(rss_stage):.0f} MiB")
    print(f"pipeline run (first)  median {median(first):7.2f} s  ratio {median(first) / b:4.2f}x  "
          f"(staging + NDJSON of everything)  peak RSS {max(rss_first):.0f} MiB")
    print(f"pipeline run (no-op)  median {median(noop):7.2f} s  ratio {median(noop) / b:4.2f}x  "
          f"(target <= 1.5x)  peak RSS {max(rss_noop):.0f} MiB  (target < 200 MB)")
    if not args.keep:
        shutil.rmtree(export_root)


if __name__ == "__main__":
    main()
