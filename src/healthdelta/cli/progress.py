"""Progress on stderr: a tqdm bar on a terminal, plain lines otherwise.

Stages call `display(stage, advance, total)`; a change of stage closes the
previous bar. In `auto` mode on a non-terminal, lines start only once a stage
has run for a while, so short commands in scripts and CI stay quiet.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Literal

from tqdm import tqdm

ProgressMode = Literal["auto", "always", "never"]
LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}B/{total_fmt}B [{elapsed}, {rate_fmt}]"


class ProgressDisplay:
    def __init__(self, mode: ProgressMode = "auto", stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = mode != "never"
        self.tty = self.stream.isatty()
        self.always = mode == "always"
        self.line_interval = 1.0 if self.always else 5.0
        self.line_delay = 0.0 if self.always else 2.0
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
            self._stage, self._done, self._total = stage, 0, total
            self._started = self._last_line = time.monotonic()
            if self.tty:
                self._bar = tqdm(total=total, desc=stage, unit="B", unit_scale=True,
                                 unit_divisor=1024, file=self.stream, leave=False, dynamic_ncols=True)
        self._done += advance
        if self._bar is not None:
            self._bar.update(advance)
            return
        now = time.monotonic()
        if now - self._started >= self.line_delay and now - self._last_line >= self.line_interval:
            self._line(now)

    def _line(self, now: float) -> None:
        self._last_line = now
        text = tqdm.format_meter(self._done, self._total, now - self._started, prefix=self._stage,
                                 unit="B", unit_scale=True, unit_divisor=1024, bar_format=LINE_FORMAT)
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Finish the current stage (a last line if lines were being shown)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._stage is not None and (self.always or self._last_line > self._started):
            self._line(time.monotonic())
        self._stage = None
