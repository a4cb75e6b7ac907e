"""The one progress interface stages accept. Stages know nothing about terminals:
they report `(stage, advance, total)` and the CLI decides how to show it."""

from __future__ import annotations

from typing import Callable

# stage: short label ("hashing", "copying", ...); advance: units done since the last
# call, in the stage's unit (`STAGE_UNITS`); total: units of the whole stage or None.
ProgressFn = Callable[[str, int, "int | None"], None]

# The unit each stage counts in, where it is not bytes (of input, staged files, spill
# runs or NDJSON: hashing, copying, extracting, parsing, deid, merging, loading, ...).
STAGE_UNITS = {
    "identity": "files",
    "report": "steps",
}


def stage_unit(stage: str) -> str:
    return STAGE_UNITS.get(stage, "bytes")


def no_progress(stage: str, advance: int, total: int | None) -> None:
    """Default sink: discard progress."""
