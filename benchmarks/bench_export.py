"""Benchmark the NDJSON stage: throughput, peak RSS, and the cost of the delta.

    python benchmarks/bench_export.py --size-mb 250 --size-mb 1024 --repeat 3

For each size: generates an export and its next export (+1% records), stages both
(`ingest`), then times `export ndjson` of the next export (a) alone, with no parent
NDJSON present, and (b) with the parent's NDJSON present, so the delta is computed
too. Also times a plain `xml.etree.ElementTree.iterparse` pass over the same
export.xml (DTD stripped, elements cleared) in the same run, as the baseline.
Prints MB/s of export.xml, ratios, and the peak RSS of each `healthdelta` process
(workers included: wait4 reports the largest RSS of the process tree it reaped).
Issue 3 targets: >= 60 MB/s, peak RSS <= 300 MB and flat in size, delta <= +15%.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from _common import etree_baseline, fresh, median, run_cli

from healthdelta.synth import generate_export


def bench_size(work: Path, size_mb: int, repeat: int) -> None:
    root = fresh(work / f"{size_mb}mb")
    first = generate_export(root / "export-1", seed=11, target_bytes=size_mb * 1_000_000)
    second = generate_export(root / "export-2", base=first, new_records=first.counts["records"] // 100)
    staged = {}
    for name, export in (("first", first), ("next", second)):
        out = run_cli(["ingest", "--input", str(export.root), "--out", str(root / "staging")], root).stdout
        staged[name] = root / "staging" / out.split("run_id=")[1].split()[0]
    # `ingest` stages parentless runs; give the next one its parent as `pipeline run` would.
    manifest = staged["next"] / "manifest.json"
    text = manifest.read_text().replace('"parent_run_id": null', f'"parent_run_id": "{staged["first"].name}"')
    manifest.write_text(text)
    xml_mb = second.export_xml_bytes / 1e6

    base, alone, with_delta, rss_alone, rss_delta = [], [], [], [], []
    for _ in range(repeat):
        base.append(etree_baseline(staged["next"] / "source" / "export.xml"))
        out = fresh(root / "nd-alone")
        m = run_cli(["export", "ndjson", "--input", str(staged["next"]), "--out", str(out)], root)
        alone.append(m.wall_s)
        rss_alone.append(m.peak_rss_mib)
        out = fresh(root / "nd-delta")
        run_cli(["export", "ndjson", "--input", str(staged["first"]), "--out", str(out)], root)
        m = run_cli(["export", "ndjson", "--input", str(staged["next"]), "--out", str(out)], root)
        assert "removed=0" in m.stdout, m.stdout
        with_delta.append(m.wall_s)
        rss_delta.append(m.peak_rss_mib)
    b, a, d = median(base), median(alone), median(with_delta)
    print(f"export.xml {xml_mb:.0f} MB ({second.counts['records']} records), next export +1%:")
    print(f"  ElementTree iterparse baseline  {b:6.1f} s  {xml_mb / b:5.1f} MB/s")
    print(f"  export ndjson (no parent)       {a:6.1f} s  {xml_mb / a:5.1f} MB/s  ratio to baseline "
          f"{b / a:4.2f}x speed  peak RSS {max(rss_alone):.0f} MiB")
    print(f"  export ndjson + delta           {d:6.1f} s  delta costs {100 * (d - a) / a:+.1f}%  "
          f"peak RSS {max(rss_delta):.0f} MiB")
    shutil.rmtree(root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, action="append", help="export.xml size (repeatable)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/export"))
    args = ap.parse_args()
    for size in args.size_mb or [250]:
        bench_size(args.workdir.resolve(), size, args.repeat)


if __name__ == "__main__":
    main()
