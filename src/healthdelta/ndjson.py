"""Canonical NDJSON (CONTRACT §5): line encoding, sorted spill files and the k-way merge.

Parsers yield `(stream, row)`; `SpillWriter` (in each worker) completes every row
with the common fields, encodes it once with orjson and spills sorted runs of lines
to temporary files; `merge_stream` merges those runs into the final stream file in
(`event_time`, `record_key`) order, resolving duplicates on the way. Memory stays
bounded by the spill size, whatever the size of the export.

Spill line layout (internal, never a final file): `sortkey \\t record_key \\t flag \\t json \\n`.
`sortkey` is `event_time` in a fixed-width form so that byte order is time order
(null sorts first); JSON never contains a raw tab or newline, so the split is safe.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson

from healthdelta.keys import occurrence_key

SCHEMA_VERSION = 1
STREAMS = (
    "observations", "workouts", "activity_summaries", "correlations", "clinical",
    "documents", "medications", "conditions", "ecg", "routes",
)
SPILL_ROWS = 50_000
_NULL_SORTKEY = b"0000-00-00T00:00:00.000000"
_OPTS = orjson.OPT_SORT_KEYS


def sort_key(event_time: str | None) -> bytes:
    """Fixed-width, byte-comparable form of a UTC `...Z` time: fractions padded to 6 digits.

    `2024-01-01T00:00:00Z` and `2024-01-01T00:00:00.5Z` would otherwise compare
    by the `Z`/`.` characters rather than by time.
    """
    if not event_time:
        return _NULL_SORTKEY
    base = event_time[:19]
    frac = event_time[20:-1] if len(event_time) > 20 and event_time[19] == "." else ""
    return f"{base}.{frac[:6].ljust(6, '0')}".encode("ascii")


def encode_row(row: dict[str, Any]) -> bytes:
    """Compact sorted-key JSON of one row, no newline."""
    return orjson.dumps(row, option=_OPTS)


def decode_line(line: bytes) -> dict[str, Any]:
    return orjson.loads(line)


@dataclass
class SpillWriter:
    """Per-worker: completes rows, buffers encoded lines per stream, spills sorted runs."""

    spill_dir: Path
    run_id: str
    person_id: str
    prefix: str
    spills: dict[str, list[Path]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    _buffers: dict[str, list[bytes]] = field(default_factory=dict)

    def add(self, stream: str, row: dict[str, Any]) -> None:
        self.add_line(stream, self.line(row))

    def line(self, row: dict[str, Any]) -> bytes:
        """The spill line of a parser's row, completed with the common fields."""
        nested = row.pop("_nested", False)
        row["schema_version"] = SCHEMA_VERSION
        row["run_id"] = self.run_id
        row["canonical_person_id"] = self.person_id
        return b"%s\t%s\t%s\t%s\n" % (
            sort_key(row.get("event_time")), row["record_key"].encode("ascii"),
            b"n" if nested else b"-", encode_row(row),
        )

    def add_line(self, stream: str, line: bytes) -> None:
        buf = self._buffers.setdefault(stream, [])
        buf.append(line)
        self.counts[stream] = self.counts.get(stream, 0) + 1
        if len(buf) >= SPILL_ROWS:
            self._spill(stream)

    def add_lines(self, stream: str, lines: list[bytes]) -> None:
        """Many spill lines of one stream at once (a reused chunk's)."""
        buf = self._buffers.setdefault(stream, [])
        buf += lines
        self.counts[stream] = self.counts.get(stream, 0) + len(lines)
        if len(buf) >= SPILL_ROWS:
            self._spill(stream)

    def add_all(self, rows: Iterable[tuple[str, dict[str, Any]]]) -> None:
        for stream, row in rows:
            self.add(stream, row)

    def _spill(self, stream: str) -> None:
        buf = self._buffers.pop(stream, [])
        if not buf:
            return
        buf.sort()
        paths = self.spills.setdefault(stream, [])
        path = self.spill_dir / f"{self.prefix}-{stream}-{len(paths):05d}.spill"
        with open(path, "wb") as fh:
            fh.writelines(buf)
        paths.append(path)

    def close(self) -> dict[str, list[Path]]:
        for stream in list(self._buffers):
            self._spill(stream)
        return self.spills


IDENT = slice(0, 91)  # `sortkey \t record_key` of a spill line
JSON_START = 94


def merge_stream(spill_files: list[Path]) -> Iterator[bytes]:
    """Merge sorted spill runs into final order; yields spill-format lines.

    Repeats of one (event_time, record_key) are resolved on the way:
    - A Correlation's child Record (flag `n`) is dropped when its top-level twin is
      present: Apple writes those Records twice, they must count once.
    - Byte-identical records that really occur several times get occurrence keys
      (`keys.occurrence_key`), so two records never share a key.
    This is the hot loop of the export, so the common case (a line unlike the one
    before) does nothing but compare a prefix.
    """
    files = [open(p, "rb") for p in spill_files]
    try:
        group: list[bytes] = []
        for line in heapq.merge(*files):
            if group and line[:26] != group[0][:26]:
                if len(group) == 1:
                    yield group[0]
                else:
                    yield from _resolve_group(group)
                group = [line]
            else:
                group.append(line)
        if group:
            yield from _resolve_group(group)
    finally:
        for fh in files:
            fh.close()


def _resolve_group(lines: list[bytes]) -> list[bytes]:
    """Lines sharing one event time: drop nested twins, give repeats occurrence keys,
    and put rewritten keys back into record_key order."""
    out: list[bytes] = []
    for ident, same in itertools.groupby(lines, key=lambda line: line[IDENT]):
        copies = list(same)
        top = [c for c in copies if c[92:93] == b"-"]
        kept = top or copies[:1]
        out.append(kept[0])
        for n, line in enumerate(kept[1:], 1):
            row = decode_line(line[JSON_START:-1])
            row["record_key"] = occurrence_key(line[27:91].decode("ascii"), n)
            out.append(b"%s\t%s\t-\t%s\n" % (line[:26], row["record_key"].encode("ascii"), encode_row(row)))
    out.sort()
    return out
