"""Helpers shared by the benchmark scripts (never collected by pytest)."""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from healthdelta.fsutil import BLOCK


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: Path) -> float:
    """Seconds to sha256 every file under `root` once (the baseline)."""
    start = time.perf_counter()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            sha256_file(p)
    return time.perf_counter() - start


def etree_baseline(xml: Path) -> float:
    """Seconds for a bare ElementTree iterparse of the body (what many tools start from).

    Nothing is kept: each finished top-level element is cleared and dropped from the root
    (clearing alone would leave millions of empty elements attached to <HealthData>)."""
    start = time.perf_counter()
    with open(xml, "rb") as fh:
        head = fh.read(1 << 20)
        body_at = head.index(b"<HealthData")
        fh.seek(body_at)
        events = ET.iterparse(fh, events=("start", "end"))
        _, root = next(events)
        for event, elem in events:
            if event == "end" and elem.tag in ("Record", "Workout", "Correlation", "ActivitySummary",
                                               "ClinicalRecord"):
                root.clear()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Measured:
    wall_s: float
    peak_rss_mib: float
    stdout: str
    cpu_s: float = 0.0  # user + system, the child's and its reaped children's (parse pool, workers)


def run_cli(args: list[str], cwd: Path) -> Measured:
    """Run `python -m healthdelta ...` as a child and measure its own wall time and peak RSS."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "healthdelta", "--progress", "never", *args],
                                cwd=cwd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: the rusage of this child alone
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"benchmark command failed: {err.read().strip()}")
        return Measured(wall, usage.ru_maxrss / 1024, out.read(), usage.ru_utime + usage.ru_stime)


def median(values: list[float]) -> float:
    return statistics.median(values)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def workdir_or_temp(workdir: Path | None, prefix: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """`workdir` (created), or a temporary dir the caller keeps alive while it works."""
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        return Path(tmp.name), tmp
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir, None
