"""Test-only fault injection, read by the CLI only (stages never see it).

`HEALTHDELTA_TEST_FAULT=<stage>:<units>:<KILL|INT|TERM>` makes the process send
itself that signal once `<stage>` has reported `<units>` of progress, so tests can
interrupt a real run at a precise point (mid-copy, mid-parse, ...).
"""

from __future__ import annotations

import os
import signal

from healthdelta.progress import ProgressFn

ENV = "HEALTHDELTA_TEST_FAULT"


def with_fault(progress: ProgressFn) -> ProgressFn:
    spec = os.environ.get(ENV)
    if not spec:
        return progress
    stage, units, sig = spec.split(":")
    limit, signum = int(units), getattr(signal, f"SIG{sig}")
    done = 0

    def faulty(name: str, advance: int, total: int | None) -> None:
        nonlocal done
        progress(name, advance, total)
        if name == stage:
            done += advance
            if done >= limit:
                os.kill(os.getpid(), signum)

    return faulty
