"""Benchmark parse reuse: the NDJSON stage of the next export, with and without the
previous run's chunk cache, in one run.

    python benchmarks/bench_reuse.py --size-mb 136 --repeat 3

Generates (deterministically) an export of about --size-mb of export.xml and the export
that follows it (1% more records, every device pointer rewritten, as real re-exports do),
then times the NDJSON stage (`export.export_run`, the stage's own worker pool) of:
  - the first export (no delta base: every chunk parsed, and the cache written);
  - the next export against the first with the first's chunk cache (reuse);
  - the next export against a retired copy of the first (no cache, no key index: a full
    parse, the delta reading the base's rows).
Each is a fresh output dir; wall and this process's CPU time plus its workers', medians of
--repeat. The reused and fresh outputs are compared byte for byte (streams, index, delta).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import time
from pathlib import Path

from _common import fresh, median

from healthdelta import export
from healthdelta.synth import generate_export

RUN_A, RUN_B, PERSON = "a" * 64, "b" * 64, "patient-1"


def staged(root: Path, xml: Path) -> Path:
    """A minimal staged run holding only export.xml (the part reuse is about)."""
    (root / "source").mkdir(parents=True, exist_ok=True)
    target = root / "source" / "export.xml"
    if not target.exists():
        os.link(xml, target)
    (root / "layout.json").write_text(json.dumps({"export_xml": "source/export.xml"}))
    return root


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def same(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*")
                   if p.is_file() and "chunks" not in p.relative_to(a).parts and p.name != "reuse.json")
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=136)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/reuse"))
    args = ap.parse_args()
    work = args.workdir.resolve()
    gen = work / f"exports-{args.size_mb}"
    if not (gen / "done").exists():
        fresh(gen)
        first = generate_export(gen / "e1", seed=12, target_bytes=args.size_mb * 1_000_000)
        generate_export(gen / "e2", base=first, new_records=max(1, first.counts["records"] // 100))
        (gen / "done").write_text("ok\n")
    a = staged(work / "A", gen / "e1" / "apple_health_export" / "export.xml")
    b = staged(work / "B", gen / "e2" / "apple_health_export" / "export.xml")

    rows: dict[str, list[tuple[float, float]]] = {"first": [], "next, reused": [], "next, fresh": []}
    identical = True
    for _ in range(args.repeat):
        out = fresh(work / "out")
        rows["first"].append(timed(lambda: export.export_run(a, out / "r", run_id=RUN_A, parent_run_id=None,
                                                             person_id=PERSON)))
        shutil.copytree(out / "r" / RUN_A, out / "f" / RUN_A)
        export.retire(out / "f" / RUN_A)
        for name, sub in (("next, reused", "r"), ("next, fresh", "f")):
            rows[name].append(timed(lambda sub=sub: export.export_run(
                b, out / sub, run_id=RUN_B, parent_run_id=RUN_A, person_id=PERSON)))
        identical &= same(out / "r" / RUN_B, out / "f" / RUN_B)
    figures = json.loads((out / "r" / RUN_B / "reuse.json").read_text())
    size = (gen / "e1" / "apple_health_export" / "export.xml").stat().st_size
    print(f"export.xml {size / 1e6:.0f} MB; next export: {figures['reused_chunks']} of {figures['chunks']} "
          f"chunks reused ({figures['reused_bytes'] / 1e6:.0f} MB); load average {os.getloadavg()[0]:.2f}")
    print(f"{'NDJSON stage':16} {'wall s':>8} {'cpu s':>8}   (median of {args.repeat})")
    base = median([w for w, _ in rows["next, fresh"]])
    for name, samples in rows.items():
        wall, cpu = median([w for w, _ in samples]), median([c for _, c in samples])
        print(f"{name:16} {wall:8.2f} {cpu:8.2f}   {wall / base:.2f}x the fresh next export")
    print(f"reused and fresh outputs byte-identical: {identical}")


if __name__ == "__main__":
    main()
