"""Benchmark the HealthKit export.xml parser against ElementTree on the same file.

    python benchmarks/bench_parse.py                 # ~250 MB synthetic export, 3 runs
    python benchmarks/bench_parse.py --size-mb 1024  # ~1 GB
    python benchmarks/bench_parse.py --xml path/to/export.xml --repeat 5 --candidates

Times, on one export.xml (the page cache is warm: the file was just written or read):

  (a) baseline: `xml.etree.ElementTree.iterparse` over the body, elements cleared as
      they end. It is given the file from `<HealthData` on (the DTD skipped), since
      the iOS 16 DTD makes ElementTree fail;
  (b) `iter_healthkit` in one process, consuming every (stream, row) it yields
      (record keys, dates, typed values included);
  (c) two worker processes over `plan_ranges(path, 2)`, each consuming its rows;
  and with --candidates, the other designs measured for the choice: lxml's
  iterparse and expat with Python callbacks (raw passes, no rows), and
  `iter_healthkit` forced onto its lxml tier (same rows as (b)).

Each measurement runs in a fresh spawned process, so its peak RSS is its own.
Prints the median MB/s of --repeat runs, the ratio to (a) and the peak RSS.
Never collected by pytest (benchmarks/ is outside `testpaths`).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from _common import workdir_or_temp  # noqa: E402 - after the path set-up, as the package imports


# --------------------------------------------------------------------------- one measurement per process


class _Body(io.RawIOBase):
    """export.xml from `<HealthData` on: what a DTD-free parser can read."""

    def __init__(self, path: str, start: int) -> None:
        self._f = open(path, "rb")
        self._f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


def _body_start(path: str) -> int:
    from healthdelta.parse.xmlrepair import find_body_start

    with open(path, "rb") as f:
        size = f.seek(0, 2)
        return find_body_start(f, size)


def _peak_rss_mib() -> float:
    # VmHWM belongs to this process image; ru_maxrss would also count the parent's
    # peak, which Linux carries over fork and exec.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _run_etree(path: str) -> tuple[float, int, float]:
    import xml.etree.ElementTree as ET

    t0 = time.perf_counter()
    n = 0
    depth = 0
    with _Body(path, _body_start(path)) as body:
        for event, el in ET.iterparse(io.BufferedReader(body, 1 << 20), events=("start", "end")):
            if event == "start":
                depth += 1
                continue
            depth -= 1
            if depth == 1:  # a top-level element is complete: drop it
                n += 1
                el.clear()
            elif depth == 0:
                el.clear()
    return time.perf_counter() - t0, n, _peak_rss_mib()


def _run_lxml(path: str) -> tuple[float, int, float]:
    from lxml import etree

    t0 = time.perf_counter()
    n = 0
    with _Body(path, _body_start(path)) as body:
        for _, el in etree.iterparse(io.BufferedReader(body, 1 << 20), events=("end",), resolve_entities=False,
                                     no_network=True, load_dtd=False, huge_tree=True):
            parent = el.getparent()
            if parent is not None and parent.getparent() is None:
                n += len(dict(el.attrib)) >= 0  # the attributes, at least, are needed
                el.clear()
                while el.getprevious() is not None:
                    del parent[0]
    return time.perf_counter() - t0, n, _peak_rss_mib()


def _run_expat(path: str) -> tuple[float, int, float]:
    import pyexpat

    t0 = time.perf_counter()
    stack: list = []
    count = [0]

    def start(tag, attrs):
        node = (tag, attrs, [])
        if len(stack) > 1:
            stack[-1][2].append(node)
        stack.append(node)

    def end(tag):
        stack.pop()
        if len(stack) == 1:
            count[0] += 1

    parser = pyexpat.ParserCreate()
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    with _Body(path, _body_start(path)) as body:
        while True:
            block = body.read(1 << 20)
            if not block:
                break
            parser.Parse(block, False)
    parser.Parse(b"", True)
    return time.perf_counter() - t0, count[0], _peak_rss_mib()


def _run_healthkit(path: str, byte_range: tuple[int, int] | None = None,
                   force_slow: bool = False) -> tuple[float, int, float]:
    from healthdelta.parse.healthkit import _iter_healthkit
    from healthdelta.parse.report import ParseReport

    t0 = time.perf_counter()
    n = 0
    for _ in _iter_healthkit(Path(path), ParseReport(), byte_range=byte_range, force_slow=force_slow):
        n += 1
    return time.perf_counter() - t0, n, _peak_rss_mib()


def _run_healthkit_slow(path: str) -> tuple[float, int, float]:
    return _run_healthkit(path, force_slow=True)


def _in_fresh_process(fn, *args):
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def _two_processes(path: str, workers: int) -> tuple[float, int, float]:
    from healthdelta.parse.healthkit import plan_ranges

    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        pool.map(abs, range(workers))  # workers are up before the clock starts
        t0 = time.perf_counter()
        ranges = plan_ranges(Path(path), workers)
        results = pool.starmap(_run_healthkit, [(path, r) for r in ranges])
        wall = time.perf_counter() - t0
    return wall, sum(r[1] for r in results), max(r[2] for r in results)


# --------------------------------------------------------------------------- driver


def _generate(size_mb: int, workdir: Path) -> Path:
    from healthdelta.synth import generate_export

    out = workdir / f"export-{size_mb}mb"
    xml = out / "apple_health_export" / "export.xml"
    if not xml.exists():
        print(f"generating a ~{size_mb} MB export.xml under {out} ...", file=sys.stderr)
        generate_export(out, seed=0, target_bytes=size_mb * 1_000_000)
    return xml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--xml", type=Path, help="an existing export.xml (default: generate one)")
    ap.add_argument("--size-mb", type=int, default=250, help="size of the generated export.xml (1024 for 1 GB)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is shown")
    ap.add_argument("--workers", type=int, default=2, help="processes for the plan_ranges run")
    ap.add_argument("--workdir", type=Path, help="where to generate (default: a temporary directory)")
    ap.add_argument("--candidates", action="store_true", help="also time lxml, expat and the forced lxml tier")
    args = ap.parse_args()

    tmp = None
    if args.xml is not None:
        xml = args.xml.resolve()
    else:
        workdir, tmp = workdir_or_temp(args.workdir, "bench-parse-")
        xml = _generate(args.size_mb, workdir)
    size = xml.stat().st_size
    path = str(xml)
    with open(xml, "rb") as f:  # warm the page cache (in blocks: this process's RSS is
        while f.read(8 << 20):  # inherited by the measured ones through fork)
            pass

    plan: list[tuple[str, object, tuple]] = [
        ("(a) ElementTree.iterparse, DTD skipped", _in_fresh_process, (_run_etree, path)),
        ("(b) iter_healthkit, 1 process", _in_fresh_process, (_run_healthkit, path)),
        (f"(c) iter_healthkit, {args.workers} processes", _two_processes, (path, args.workers)),
    ]
    if args.candidates:
        plan += [
            ("    lxml.etree.iterparse (no rows)", _in_fresh_process, (_run_lxml, path)),
            ("    expat + Python callbacks (no rows)", _in_fresh_process, (_run_expat, path)),
            ("    iter_healthkit, lxml tier only", _in_fresh_process, (_run_healthkit_slow, path)),
        ]

    print(f"export.xml: {size / 1e6:.1f} MB; median of {args.repeat} run(s)")
    print(f"{'':44s} {'MB/s':>7s} {'x (a)':>6s} {'items':>10s} {'peak RSS':>9s}")
    baseline = None
    for label, runner, runner_args in plan:
        runs = [runner(*runner_args) for _ in range(args.repeat)]
        wall = statistics.median(r[0] for r in runs)
        rate = size / wall / 1e6
        if baseline is None:
            baseline = rate
        print(f"{label:44s} {rate:7.1f} {rate / baseline:6.2f} {runs[0][1]:10d} {max(r[2] for r in runs):6.0f} MiB",
              flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
