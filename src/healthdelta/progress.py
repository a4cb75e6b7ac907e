"""The one progress interface stages accept. Stages know nothing about terminals:
they report `(stage, advance, total)` and the CLI decides how to show it."""

from __future__ import annotations

from typing import Callable

# stage: short label ("hashing", "copying", ...); advance: units done since the last
# call (bytes unless the stage says otherwise); total: units of the whole stage or None.
ProgressFn = Callable[[str, int, "int | None"], None]


def no_progress(stage: str, advance: int, total: int | None) -> None:
    """Default sink: discard progress."""
