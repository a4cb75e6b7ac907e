"""Benchmark de-identification (share mode) of a large export: MB/s and peak RSS.

    python benchmarks/bench_deid.py --size-mb 1024 --repeat 1

Generates a synthetic export with about --size-mb of export.xml (planted PII, two
people and a namesake), stages it (`healthdelta ingest`), builds the identity store,
then runs `healthdelta deid` as a child process (default options, then with
--date-shift) and prints wall time, throughput over export.xml and over all staged
bytes, and the child's peak RSS. Issue 4 targets: >= 30 MB/s on a ~1 GB export.xml,
peak RSS <= 300 MB. The page cache is warm (the export was just written).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import fresh, median

from healthdelta.synth import generate_export

# Runs the CLI with the identity/deid/share commands imported, wired or not.
_CLI = "import sys; from healthdelta.cli import commands_identity, main; main(sys.argv[1:])"


def run(args: list[str], cwd: Path) -> tuple[float, float, str]:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _CLI, "--progress", "never", *args], cwd=cwd,
                                stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"benchmark command failed: {err.read().strip()}")
        return wall, usage.ru_maxrss / 1024, out.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="target size of export.xml in MB")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/deid"))
    args = ap.parse_args()

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    export_root = work / "export"
    if not (export_root / "apple_health_export" / "export.xml").exists():
        fresh(export_root)
        generate_export(export_root, seed=1, target_bytes=args.size_mb * 1_000_000, people=2,
                        ambiguous_person=True)
    xml_bytes = (export_root / "apple_health_export" / "export.xml").stat().st_size
    data = fresh(work / "data")
    _, _, staged = run(["ingest", "--input", str(export_root), "--out", str(data / "staging")], work)
    run_dir = Path(dict(line.split("=", 1) for line in staged.splitlines() if "=" in line)["staging_dir"])
    total = sum(p.stat().st_size for p in (run_dir / "source").rglob("*") if p.is_file())
    run(["identity", "build", "--run", str(run_dir), "--state", str(data / "state")], work)
    print(f"input: export.xml {xml_bytes / 1e6:.0f} MB, staged total {total / 1e6:.0f} MB")
    for label, extra in (("deid (defaults)", []), ("deid --date-shift", ["--date-shift"])):
        walls, rss = [], []
        for _ in range(args.repeat):
            out = fresh(work / "deid-out")
            wall, peak, _ = run(["deid", "--input", str(run_dir), "--out", str(out), *extra], work)
            walls.append(wall)
            rss.append(peak)
        w = median(walls)
        print(f"{label:20s} {w:7.1f} s  {xml_bytes / 1e6 / w:6.1f} MB/s of export.xml  "
              f"{total / 1e6 / w:6.1f} MB/s of all files  peak RSS {max(rss):.0f} MiB")


if __name__ == "__main__":
    main()
