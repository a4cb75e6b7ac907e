"""Progress on stderr: a tqdm bar on a terminal, plain lines otherwise.

Stages call `display(stage, advance, total)`; a change of stage closes the
previous bar. Each stage is shown in its own unit (`progress.stage_unit`): bytes
human-readable, other units as counts. A command with several steps gives the
display its plan, and the start of each step prints `stage k of n: <step>`. In
`auto` mode on a non-terminal, lines start only once a stage has run for a while,
so short commands in scripts and CI stay quiet.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Literal, Sequence

from tqdm import tqdm

from healthdelta.progress import stage_unit

ProgressMode = Literal["auto", "always", "never"]
# (title, stage labels that belong to the step): what `stage k of n` counts.
Plan = Sequence[tuple[str, tuple[str, ...]]]

STAGING_STEP = ("staging the export", ("hashing", "copying", "extracting"))
IDENTITY_STEP = ("resolving people", ("identity",))
DEID_STEP = ("de-identifying", ("deid",))
NDJSON_STEPS = (("parsing", ("parsing",)), ("merging and delta", ("merging",)))
WAREHOUSE_STEPS = (("loading the warehouse", ("loading",)), ("writing the reports", ("report",)))
STORE_STEP = ("storing the staged export", ("storing",))


def command_plan(command: str, share: bool) -> Plan | None:
    """The steps a command goes through, in order (None: a one-step command)."""
    ndjson = (STAGING_STEP, IDENTITY_STEP, *((DEID_STEP,) if share else ()), *NDJSON_STEPS)
    return {"pipeline run": (*ndjson, STORE_STEP), "run all": (*ndjson, *WAREHOUSE_STEPS, STORE_STEP)}.get(command)


def _format(unit: str, known_total: bool) -> tuple[str, dict]:
    """tqdm bar format and scaling for one unit: bytes scaled by 1024 (KB, MB, GB), others plain."""
    head = "{desc}: {percentage:3.0f}% " if known_total else "{desc}: "
    if unit == "bytes":
        counts = "{n_fmt}B/{total_fmt}B" if known_total else "{n_fmt}B"
        return head + counts + " [{elapsed}, {rate_fmt}]", {"unit": "B", "unit_scale": True, "unit_divisor": 1024}
    counts = "{n_fmt}/{total_fmt} {unit}" if known_total else "{n_fmt} {unit}"
    return head + counts + " [{elapsed}, {rate_fmt}]", {"unit": unit, "unit_scale": False}


class ProgressDisplay:
    def __init__(self, mode: ProgressMode = "auto", stream: IO[str] | None = None, plan: Plan | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = mode != "never"
        self.tty = self.stream.isatty()
        self.always = mode == "always"
        self.line_interval = 1.0 if self.always else 5.0
        self.line_delay = 0.0 if self.always else 2.0
        self.plan = tuple(plan or ())
        self._step: int | None = None
        self._pending_header: str | None = None
        self._stage: str | None = None
        self._bar: tqdm | None = None
        self._done = 0
        self._total: int | None = None
        self._started = 0.0
        self._last_line = 0.0

    def __call__(self, stage: str, advance: int, total: int | None) -> None:
        if not self.enabled:
            return
        if stage != self._stage:
            self.close()
            self._enter_step(stage)
            self._stage, self._done, self._total = stage, 0, total
            self._started = self._last_line = time.monotonic()
            if self.tty:
                self._flush_header()
                bar_format, scale = _format(stage_unit(stage), total is not None)
                self._bar = tqdm(total=total, desc=stage, bar_format=bar_format, file=self.stream, leave=False,
                                 dynamic_ncols=True, **scale)
            elif self.always:
                self._flush_header()
        self._done += advance
        if self._bar is not None:
            self._bar.update(advance)
            return
        now = time.monotonic()
        if now - self._started >= self.line_delay and now - self._last_line >= self.line_interval:
            self._line(now)

    def _enter_step(self, stage: str) -> None:
        """A stage opening a later step of the plan queues its `stage k of n` header."""
        for k, (title, stages) in enumerate(self.plan):
            if stage in stages:
                if self._step is None or k > self._step:
                    self._step = k
                    self._pending_header = f"stage {k + 1} of {len(self.plan)}: {title}"
                return

    def _flush_header(self) -> None:
        if self._pending_header is not None:
            print(self._pending_header, file=self.stream, flush=True)
            self._pending_header = None

    def _line(self, now: float) -> None:
        self._flush_header()
        self._last_line = now
        bar_format, scale = _format(stage_unit(self._stage or ""), self._total is not None)
        text = tqdm.format_meter(self._done, self._total, now - self._started, prefix=self._stage,
                                 bar_format=bar_format, **scale)
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Finish the current stage (a last line if lines were being shown)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._stage is not None and (self.always or self._last_line > self._started):
            self._line(time.monotonic())
        self._stage = None
