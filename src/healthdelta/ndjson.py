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
from typing import IO, Any, Iterable, Iterator

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
        nested = row.pop("_nested", False)
        row["schema_version"] = SCHEMA_VERSION
        row["run_id"] = self.run_id
        row["canonical_person_id"] = self.person_id
        line = b"%s\t%s\t%s\t%s\n" % (
            sort_key(row.get("event_time")), row["record_key"].encode("ascii"),
            b"n" if nested else b"-", encode_row(row),
        )
        buf = self._buffers.setdefault(stream, [])
        buf.append(line)
        self.counts[stream] = self.counts.get(stream, 0) + 1
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


@dataclass(frozen=True)
class MergedLine:
    sortkey: bytes
    record_key: bytes
    json: bytes


def merge_stream(spill_files: list[Path]) -> Iterator[MergedLine]:
    """Merge sorted spill runs into final order, resolving repeats of one record key.

    - A Correlation's child Record (flag `n`) is dropped when its top-level twin is
      present: Apple writes those Records twice, they must count once.
    - Byte-identical records that really occur several times get occurrence keys
      (`keys.occurrence_key`), so two records never share a key.
    Rows sharing one event time are collected (a small group) so that rewritten
    keys are put back into (event_time, record_key) order.
    """
    files = [open(p, "rb") for p in spill_files]
    try:
        merged = heapq.merge(*files)
        for sortkey, group in itertools.groupby(merged, key=lambda line: line[:26]):
            yield from _resolve_group(sortkey, group)
    finally:
        for fh in files:
            fh.close()


def _resolve_group(sortkey: bytes, lines: Iterable[bytes]) -> list[MergedLine]:
    out: list[MergedLine] = []
    for key, same in itertools.groupby(lines, key=lambda line: line[27:91]):
        copies = list(same)
        top = [c for c in copies if c[92:93] == b"-"]
        kept = top or copies[:1]
        for n, line in enumerate(kept):
            json = line[94:-1]
            if n == 0:
                out.append(MergedLine(sortkey, key, json))
                continue
            row = decode_line(json)
            row["record_key"] = occurrence_key(key.decode("ascii"), n)
            out.append(MergedLine(sortkey, row["record_key"].encode("ascii"), encode_row(row)))
    if len(out) > 1:
        out.sort(key=lambda m: m.record_key)
    return out


def write_lines(fh: IO[bytes], lines: Iterable[bytes]) -> int:
    n = 0
    for line in lines:
        fh.write(line)
        fh.write(b"\n")
        n += 1
    return n
