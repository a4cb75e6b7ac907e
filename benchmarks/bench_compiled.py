"""The compiled fast path against the pure-Python one, in the same run (issue 12).

    .venv/bin/python benchmarks/bench_compiled.py                    # ~136 MB export.xml, 3 runs each
    .venv/bin/python benchmarks/bench_compiled.py --size-mb 250 --repeat 5 --run-all

Times, alternating the two paths so a change in the machine's load hits both alike, each
measurement in a fresh subprocess (HEALTHDELTA_PURE_PYTHON=1 for the pure one):

  parse: what one export worker does with the whole export.xml: `iter_healthkit` into a
         `SpillWriter` (rows, record keys, encoding, sorted spill runs), one process;
  run all (--run-all): the CLI's `run all` on the export's zip into a fresh output dir.

Prints median wall and CPU seconds, the ratio compiled/pure and the load average before
and after (the machine may be shared). Needs the compiled path built (`make venv`).
Never collected by pytest (benchmarks/ is outside `testpaths`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import fresh, run_cli, workdir_or_temp

PURE_ENV = "HEALTHDELTA_PURE_PYTHON"

# One parse measurement, run by `python -c` in a fresh process of the chosen path.
PARSE = """
import json, sys, tempfile, time
from pathlib import Path
import healthdelta
from healthdelta.ndjson import SpillWriter
from healthdelta.parse.healthkit import iter_healthkit
from healthdelta.parse.report import ParseReport

with tempfile.TemporaryDirectory() as spill:
    t0, c0 = time.perf_counter(), time.process_time()
    writer = SpillWriter(Path(spill), "r" * 64, "p_0", prefix="t")
    writer.add_all(iter_healthkit(Path(sys.argv[1]), ParseReport()))
    writer.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"wall": wall, "cpu": cpu, "rows": sum(writer.counts.values()), "compiled": healthdelta.compiled()}))
"""


def _env(pure: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    return {**env, PURE_ENV: "1"} if pure else env


def _parse_once(xml: Path, pure: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", PARSE, str(xml)], env=_env(pure), capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout)


def _run_all_once(zip_path: Path, workdir: Path, pure: bool) -> dict:
    out = fresh(workdir / "run-all-out")
    saved = os.environ.pop(PURE_ENV, None)
    if pure:
        os.environ[PURE_ENV] = "1"  # run_cli's child inherits it
    try:
        measured = run_cli(["run", "all", "--input", str(zip_path), "--out", str(out)], cwd=workdir)
    finally:
        os.environ.pop(PURE_ENV, None)
        if saved is not None:
            os.environ[PURE_ENV] = saved
    shutil.rmtree(out)
    return {"wall": measured.wall_s, "cpu": measured.cpu_s}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _report(label: str, runs: dict[bool, list[dict]]) -> None:
    med = {pure: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu")} for pure, rs in runs.items()}
    for key in ("wall", "cpu"):
        print(f"{label:10s} {key:4s}  pure {med[True][key]:7.2f} s   compiled {med[False][key]:7.2f} s   "
              f"compiled/pure {med[False][key] / med[True][key]:5.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=136, help="size of the generated export.xml")
    ap.add_argument("--repeat", type=int, default=3, help="runs per path; medians are shown")
    ap.add_argument("--run-all", action="store_true", help="also time the CLI's `run all`")
    ap.add_argument("--workdir", type=Path, help="where to generate (default: a temporary directory)")
    args = ap.parse_args()

    from healthdelta.synth import generate_export

    workdir, tmp = workdir_or_temp(args.workdir, "bench-compiled-")
    gen = workdir / f"export-{args.size_mb}mb"
    xml = gen / "apple_health_export" / "export.xml"
    if not xml.exists() or not (gen / "export.zip").exists():
        print(f"generating a ~{args.size_mb} MB export.xml under {gen} ...", file=sys.stderr)
        generate_export(gen, seed=0, target_bytes=args.size_mb * 1_000_000, zip=True)

    first = _parse_once(xml, pure=False)
    if not first["compiled"] or _parse_once(xml, pure=True)["compiled"]:
        raise SystemExit("the compiled fast path is not built (or not switched off by the variable): make venv")
    print(f"export.xml: {xml.stat().st_size / 1e6:.1f} MB, {first['rows']} rows; median of {args.repeat}; "
          f"compiled modules: {', '.join(first['compiled'])}")
    print(f"load average before: {_load()}", flush=True)
    parse: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(args.repeat):
        for pure in (True, False):
            parse[pure].append(_parse_once(xml, pure))
    _report("parse", parse)
    if args.run_all:
        run_all: dict[bool, list[dict]] = {True: [], False: []}
        for _ in range(args.repeat):
            for pure in (True, False):
                run_all[pure].append(_run_all_once(gen / "export.zip", workdir, pure))
        _report("run all", run_all)
    print(f"load average after: {_load()} ({time.strftime('%H:%M:%S')})")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
