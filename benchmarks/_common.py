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
from dataclasses import dataclass
from pathlib import Path

from healthdelta.fsutil import BLOCK


def sha256_tree(root: Path) -> float:
    """Seconds to sha256 every file under `root` once, in 1 MiB blocks (the baseline)."""
    start = time.perf_counter()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                while block := fh.read(BLOCK):
                    h.update(block)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Measured:
    wall_s: float
    peak_rss_mib: float
    stdout: str
    cpu_s: float = 0.0  # user + system of the child and the workers it waited for: steadier than wall on a busy machine


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
