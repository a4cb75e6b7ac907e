"""Benchmark the workout-route GPX parser: fast path against the lxml path.

    python benchmarks/bench_gpx.py                    # routes of a ~50 MB synthetic export
    python benchmarks/bench_gpx.py --size-mb 200 --repeat 5
    python benchmarks/bench_gpx.py --routes path/to/workout-routes

Generates a synthetic export (its `workout-routes/*.gpx` are in Apple's layout, one
point per second), then parses every route file with `iter_gpx` as the export stage
does (each file's points written to a points file of its own, rows consumed), once
forced onto the lxml path and once as `iter_gpx` runs by default (the fast path, with
its fallback to lxml for files it does not take). Prints, for each, the median MB/s
over --repeat runs by wall clock and by this process's CPU time (steadier on a busy
machine), the ratio, how many files the fast path took, and checks that both gave the
same rows, points files and report counters. The page cache is warm (the files were
just written or read). Never collected by pytest (benchmarks/ is outside `testpaths`).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from _common import median  # noqa: E402

from healthdelta.parse.gpx import _iter_gpx, _read_fast  # noqa: E402
from healthdelta.parse.report import ParseReport  # noqa: E402
from healthdelta.synth import generate_export  # noqa: E402


def parse_all(files: list[Path], points_dir: Path, *, force_slow: bool) -> tuple[float, float, str]:
    """(wall s, CPU s, digest of every row, points file and counter) for one pass."""
    digest = hashlib.sha256()
    report = ParseReport()
    wall, cpu = time.perf_counter(), time.process_time()
    for i, path in enumerate(files):
        with open(points_dir / f"{i}.ndjson", "wb") as points_out:
            for stream, row in _iter_gpx(
                path, report, source_file=path.name, points_out=points_out, force_slow=force_slow
            ):
                digest.update(repr((stream, sorted(row.items()))).encode())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for i in range(len(files)):
        digest.update(hashlib.sha256((points_dir / f"{i}.ndjson").read_bytes()).digest())
    digest.update(repr(report.as_dict()).encode())
    return wall, cpu, digest.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=50, help="size of the synthetic export (routes are ~40%%)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--routes", type=Path, help="a folder of .gpx files instead of a synthetic export")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-gpx-") as tmp:
        if args.routes:
            files = sorted(args.routes.glob("*.gpx"))
        else:
            print(f"generating a ~{args.size_mb} MB synthetic export ...", file=sys.stderr)
            generate_export(Path(tmp) / "export", seed=args.seed, target_bytes=args.size_mb * 1_000_000)
            files = sorted((Path(tmp) / "export").rglob("workout-routes/*.gpx"))
        if not files:
            raise SystemExit("no .gpx files to parse")
        size = sum(p.stat().st_size for p in files)
        points_dir = Path(tmp) / "points"
        points_dir.mkdir()
        fast_files = sum(_read_fast(p, ParseReport(), p.name, None) is not None for p in files)
        print(f"{len(files)} route files, {size / 1e6:.1f} MB, fast path takes {fast_files}")

        results: dict[str, list[tuple[float, float, str]]] = {"lxml path": [], "iter_gpx": []}
        for _ in range(args.repeat):  # interleaved, so a busy machine slows both alike
            results["lxml path"].append(parse_all(files, points_dir, force_slow=True))
            results["iter_gpx"].append(parse_all(files, points_dir, force_slow=False))
        speed: dict[str, tuple[float, float]] = {}
        for name, runs in results.items():
            wall = size / 1e6 / median([r[0] for r in runs])
            cpu = size / 1e6 / median([r[1] for r in runs])
            speed[name] = (wall, cpu)
            print(f"{name:10}  {wall:7.1f} MB/s wall  {cpu:7.1f} MB/s cpu   (median of {len(runs)})")
        (slow_wall, slow_cpu), (fast_wall, fast_cpu) = speed["lxml path"], speed["iter_gpx"]
        print(f"ratio       {fast_wall / slow_wall:7.1f}x wall       {fast_cpu / slow_cpu:7.1f}x cpu")
        digests = {r[2] for runs in results.values() for r in runs}
        print("same rows, points and counters:", "yes" if len(digests) == 1 else "NO")
        if len(digests) != 1:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
