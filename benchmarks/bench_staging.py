"""Disk and wall time of staging for two successive exports (issue 12).

Generates an export of about --mb MB of export.xml and its next export, runs `run all` on
both into one --out, and prints the bytes under <out>/staging and <out> after each run and
each run's wall time. Run it with the interpreter of each tree to compare (e.g. the
commit before the staging store):

    .venv/bin/python benchmarks/bench_staging.py --mb 100 --work /tmp/bench-staging
    /tmp/base/.venv/bin/python benchmarks/bench_staging.py --mb 100 --work /tmp/bench-staging

The exports are generated once per --work and reused, so both trees see the same bytes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fresh, run_cli  # noqa: E402


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def exports(work: Path, mb: int) -> tuple[Path, Path]:
    from healthdelta.synth import generate_export

    first, second = work / f"export-{mb}-1", work / f"export-{mb}-2"
    if not (second / "export.zip").is_file():
        shutil.rmtree(first, ignore_errors=True)
        shutil.rmtree(second, ignore_errors=True)
        one = generate_export(first, seed=12, target_bytes=mb * 1_000_000, zip=True, keep_folder=False)
        generate_export(second, base=one, new_records=max(100, mb * 100), zip=True, keep_folder=False)
    return first / "export.zip", second / "export.zip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="export.xml size of the first export, MB")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-staging"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    zips = exports(args.work, args.mb)
    out = fresh(args.work / "out")
    import healthdelta

    print(f"healthdelta from {Path(healthdelta.__file__).parent}")
    print(f"zips: {' + '.join(f'{z.stat().st_size / 1e6:.1f} MB' for z in zips)}")
    for i, zip_path in enumerate(zips, 1):
        measured = run_cli(["run", "all", "--input", str(zip_path), "--out", str(out)], cwd=args.work)
        print(f"run {i}: wall {measured.wall_s:.1f} s, staging {tree_bytes(out / 'staging') / 1e6:.1f} MB, "
              f"total {tree_bytes(out) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
