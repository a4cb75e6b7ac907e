"""Source priority: which source's samples count when several recorded the same thing.

Apple's Health app keeps, per data type, an ordered list of sources; its documented
default is data entered by hand first, then the Apple Watch, then the iPhone, then other
apps, and the user can reorder the list. For cumulative types (steps, distances,
energy, ...) the Health app counts each stretch of time once, from the highest-priority
source that has a sample covering it; the warehouse views do the same
(docs/runbook_warehouse.md, "Source priority").

The order is a list of entries, most trusted first. An entry is a source class
(`manual`, `watch`, `phone`, `other`) or the exact name of a source as the export
writes it (`sourceName`, e.g. "AutoSleep"); a source named in the list takes that
place, ahead of its class's. Sources matching no entry come last.
It is stored in the warehouse (`source_priority` table) and set from a JSON file:
`{"source_priority": ["manual", "watch", "AutoSleep", "phone", "other"]}`.
"""

from __future__ import annotations

import json
from pathlib import Path

from healthdelta.errors import UsageError

CLASSES = ("manual", "watch", "phone", "other")
DEFAULT_PRIORITY: tuple[str, ...] = CLASSES
FILE_NAME = "source_priority.json"  # looked for in the state directory
MAX_ENTRIES = 200


def validate(entries: object) -> tuple[str, ...]:
    """The entries as a tuple, or UsageError (without echoing any entry: they are source names)."""
    if not isinstance(entries, list) or not entries:
        raise UsageError("the source priority must be a non-empty JSON list of strings")
    if len(entries) > MAX_ENTRIES:
        raise UsageError(f"the source priority holds more than {MAX_ENTRIES} entries")
    if not all(isinstance(e, str) and e.strip() for e in entries):
        raise UsageError("every source priority entry must be a non-empty string")
    if len(set(entries)) != len(entries):
        raise UsageError("the source priority lists an entry twice")
    return tuple(entries)


def read_priority_file(path: Path, *, classes_only: bool = False) -> tuple[str, ...]:
    """Entries from a JSON file holding `{"source_priority": [...]}` or the bare list.

    `classes_only` (share mode) keeps the class entries only: a source's name is
    identifying and a share-mode warehouse must not hold it.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError("the source priority file is not readable JSON") from None
    if isinstance(doc, dict):
        doc = doc.get("source_priority")
    entries = validate(doc)
    if classes_only:
        entries = tuple(e for e in entries if e in CLASSES) or DEFAULT_PRIORITY
    return entries
