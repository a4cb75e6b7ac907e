"""Benchmark the disk footprint of keeping every version: two successive exports through `run all`.

    python benchmarks/bench_storage.py --size-mb 200

Generates an export of about --size-mb of export.xml and the export that follows it (the same
records plus --new-records), both zipped, runs `run all` on the first zip and then on the
second into one fresh <out>, and prints each run's wall and CPU time, the bytes under every top-level
folder of <out> (a hard-linked file counted once), the zips' sizes and the ratio of the two.
Run it on two checkouts in one session to compare them: the generator is deterministic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import fresh, run_cli

from healthdelta.synth import generate_export


def tree_bytes(root: Path, seen: set[tuple[int, int]]) -> int:
    """Bytes of the files under `root`, each inode once (a first run's added/ is a hard link)."""
    total = 0
    for p in [root] if root.is_file() else root.rglob("*"):
        st = p.lstat()
        if p.is_file() and not p.is_symlink() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=200, help="target size of the first export.xml in MB")
    ap.add_argument("--new-records", type=int, default=20_000, help="records the second export adds")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/storage"))
    args = ap.parse_args()

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    exports = work / f"exports-{args.size_mb}mb-{args.new_records}"
    if not (exports / "export-2" / "export.zip").exists():
        fresh(exports)
        first = generate_export(exports / "export-1", seed=1, target_bytes=args.size_mb * 1_000_000, zip=True,
                                keep_folder=False)
        generate_export(exports / "export-2", base=first, new_records=args.new_records, zip=True, keep_folder=False)
    zips = [exports / f"export-{i}" / "export.zip" for i in (1, 2)]
    zip_bytes = sum(z.stat().st_size for z in zips)
    print("zips: " + ", ".join(f"{z.stat().st_size / 1e6:.1f} MB" for z in zips))

    out = fresh(work / "out")
    for i, z in enumerate(zips, 1):
        m = run_cli(["run", "all", "--input", str(z), "--out", str(out)], work)
        print(f"run {i}: wall {m.wall_s:.1f} s, cpu {m.cpu_s:.1f} s, peak RSS {m.peak_rss_mib:.0f} MiB")

    seen: set[tuple[int, int]] = set()
    total = 0
    for child in sorted(out.iterdir()):
        size = tree_bytes(child, seen)
        total += size
        print(f"  {child.name + ('/' if child.is_dir() else ''):<20} {size / 1e6:10.1f} MB")
    print(f"  {'total':<20} {total / 1e6:10.1f} MB = {total / zip_bytes:.1f}x the two zips "
          f"({zip_bytes / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
