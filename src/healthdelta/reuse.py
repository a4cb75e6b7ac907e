"""Parse reuse across exports: a chunk of export.xml (`parse.healthkit.plan_chunks`)
whose bytes, device pointers blanked, equal a chunk of the same person's previous run
gives the rows that run parsed instead of being parsed again. Every export repeats
all earlier samples, so most of a re-export's chunks are known.

A run's NDJSON dir keeps `chunks/`: one file of zstd frames per parse task and
`index.json` (chunk identity -> file, offset, length, the run whose rows the frame
holds). A frame is one JSON line (the chunk's parse report, its number of lines per
stream, the route point files its rows refer to), then its spill lines, stream by stream.
The other files of an export (CDA, FHIR, ECG, GPX) are reused the same way, one whole
file per frame: most of them are byte for byte those of the previous export. The
identity covers everything a chunk's rows depend on besides its bytes: the parser's code,
the file name rows carry, the person id and whether the chunk opens or closes the file.
Rows carry the `run_id` of their run: a frame holds a placeholder in its place (so a frame
is the same bytes whichever run parsed the chunk), replaced by the reusing run's id
(exactly once per line, checked, else the chunk is parsed again).

The cache is an accelerator, never data: a missing or unreadable one only means
parsing again, and a run's cache is dropped once a later run of its person is
registered (`export.retire`: it can no longer be a delta base).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from healthdelta.fsutil import atomic_write_json
from healthdelta.keys import blank_device_pointers
from healthdelta.parse.report import ParseReport

CACHE_DIR = "chunks"
INDEX = "index.json"
INDEX_VERSION = 2
# What a frame's lines hold for their `run_id` (no run id looks so: they are 64 hex digits).
_ANY_RUN = b'"run_id":"' + b"-" * 64 + b'"'
_LEVEL = 1  # as the stream files: ~900 MB/s on one core
# Modules whose code decides what a chunk's rows are: a change to any of them (a new
# release, a patched parser) makes every cached chunk unknown. Their `.py` source is
# hashed, also where the compiled build runs: it is built from that very file, gives the
# same rows (tests/test_compiled.py), and is never used once the file changed (_fastpath).
_ROW_MODULES = ("healthdelta.parse", "healthdelta.parse.healthkit", "healthdelta.parse.xmlrepair",
                "healthdelta.parse.timefmt", "healthdelta.parse.report", "healthdelta.parse.cda",
                "healthdelta.parse.fhir", "healthdelta.parse.ecg", "healthdelta.parse.gpx", "healthdelta.parse.xmlnames",
                "healthdelta.keys", "healthdelta.ndjson", "healthdelta.reuse")


@cache
def parser_version() -> bytes:
    h = hashlib.sha256()
    for name in _ROW_MODULES:
        __import__(name)
        module_file = Path(sys.modules[name].__file__)
        source = module_file if module_file.suffix == ".py" else module_file.with_name(name.rpartition(".")[2] + ".py")
        h.update((source if source.is_file() else module_file).read_bytes())
    return h.hexdigest().encode("ascii")


_BLOCK = 1 << 20


def chunk_identity(f: BinaryIO, start: int, end: int, *, source_file: str, person_id: str, opens: bool,
                   closes: bool) -> str:
    """Identity of the rows of export.xml's bytes [start, end) (read from `f`): the bytes
    with device pointers blanked (the parser reads them so) and the context the rows
    depend on, including whether the chunk opens or closes the file."""
    h = _hasher(b"export_xml", source_file, person_id, b"%d%d" % (opens, closes))
    f.seek(start)
    pending, pos = b"", start
    while pos < end:
        block = pending + f.read(min(_BLOCK, end - pos))
        if len(block) == len(pending):
            break
        pos += len(block) - len(pending)
        # A pointer never holds a `>`: blank whole `>`-delimited pieces only.
        cut = block.rfind(b">") + 1 if pos < end else len(block)
        h.update(blank_device_pointers(block[:cut]))
        pending = block[cut:]
    h.update(blank_device_pointers(pending))
    return h.hexdigest()


def file_identity(kind: str, path: Path, *, source_file: str, person_id: str) -> str:
    """Identity of the rows of one whole file of another kind (CDA, FHIR, ECG, GPX): its
    bytes as they are (those parsers see every byte)."""
    h = _hasher(kind.encode("ascii"), source_file, person_id, b"")
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _hasher(kind: bytes, source_file: str, person_id: str, flags: bytes) -> Any:
    h = hashlib.sha256(b"\0".join((parser_version(), kind, source_file.encode("utf-8"), person_id.encode("utf-8"),
                                   flags)))
    h.update(b"\0")
    return h


@dataclass(frozen=True)
class Entry:
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class Hit:
    report: ParseReport
    lines: dict[str, list[bytes]]  # stream -> spill lines, with the new run's id
    frame: bytes  # as stored, to be copied into the new run's cache
    points: tuple[str, ...]  # route point files (`local/route_points/`) the rows refer to


class ChunkCache:
    """The chunks of one earlier run, read by the parse workers."""

    def __init__(self, root: Path, entries: dict[str, Entry]) -> None:
        self.root = root
        self.entries = entries
        self._dctx = zstandard.ZstdDecompressor()

    @classmethod
    def open(cls, ndjson_run_dir: Path | None) -> "ChunkCache | None":
        if ndjson_run_dir is None:
            return None
        root = ndjson_run_dir / CACHE_DIR
        try:
            doc = json.loads((root / INDEX).read_text(encoding="utf-8"))
            if doc.get("version") != INDEX_VERSION:
                return None
            entries = {k: Entry(*v) for k, v in doc["chunks"].items()}
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return cls(root, entries)

    def get(self, ident: str, run_id: str) -> Hit | None:
        entry = self.entries.get(ident)
        if entry is None:
            return None
        try:
            with open(self.root / entry.file, "rb") as f:
                f.seek(entry.offset)
                frame = f.read(entry.length)
            data = self._dctx.decompress(frame)
        except (OSError, zstandard.ZstdError):
            return None
        head, _, body = data.partition(b"\n")
        try:
            doc = json.loads(head)
            report = _report_from(doc["report"])
            counts: dict[str, int] = doc["lines"]
            points = tuple(doc.get("points", ()))
        except (ValueError, TypeError, AttributeError, KeyError):
            return None
        n = sum(counts.values())
        if body.count(b"\n") != n or body.count(_ANY_RUN) != n:
            return None
        body = body.replace(_ANY_RUN, _run_field(run_id))
        rows = body.splitlines(keepends=True)
        lines: dict[str, list[bytes]] = {}
        at = 0
        for stream, count in counts.items():
            lines[stream] = rows[at:at + count]
            at += count
        return Hit(report, lines, frame, points)


def _run_field(run_id: str) -> bytes:
    return b'"run_id":"%s"' % run_id.encode("ascii")


def _report_from(doc: dict) -> ParseReport:
    report = ParseReport()
    report.elements.update(doc["elements"])
    report.repairs.update(doc["repairs"])
    report.unknown.update(doc["unknown"])
    return report


class ChunkWriter:
    """One parse task's frames, appended to `<cache>/<name>`; with no `cache_dir` (a run
    that keeps no cache) it records nothing and compresses nothing."""

    def __init__(self, cache_dir: Path | None, name: str) -> None:
        self.name = name
        self._f = None
        if cache_dir is not None:
            cache_dir.mkdir(exist_ok=True)
            self._f = open(cache_dir / name, "wb")
        self._cctx = zstandard.ZstdCompressor(level=_LEVEL)
        self.entries: dict[str, Entry] = {}

    def add(self, ident: str, report: ParseReport, lines: dict[str, list[bytes]], run_id: str,
            points: tuple[str, ...] = ()) -> None:
        """Record a parsed chunk; its lines carry `run_id`, stored as `_ANY_RUN`, so a frame
        is the same bytes whichever run parsed it. (A row whose data held this run's
        `"run_id":"..."` field once more is not cached: the count would not tell them apart.)"""
        if self._f is None:
            return
        body = b"".join(line for _, stream_lines in sorted(lines.items()) for line in stream_lines)
        ours = _run_field(run_id)
        n = sum(map(len, lines.values()))
        if body.count(ours) != n:
            return
        head = {"report": report.as_dict(), "lines": {s: len(v) for s, v in sorted(lines.items())}}
        if points:
            head["points"] = list(points)
        frame = json.dumps(head, sort_keys=True).encode("utf-8") + b"\n" + body.replace(ours, _ANY_RUN)
        self.copy(ident, self._cctx.compress(frame))

    def copy(self, ident: str, frame: bytes) -> None:
        if self._f is None:
            return
        self.entries.setdefault(ident, Entry(self.name, self._f.tell(), len(frame)))
        self._f.write(frame)

    def close(self) -> dict[str, Entry]:
        if self._f is not None:
            self._f.close()
        return self.entries


def write_index(cache_dir: Path, entries: dict[str, Entry]) -> None:
    """Written last (the run's NDJSON dir becomes visible as a whole anyway)."""
    cache_dir.mkdir(exist_ok=True)
    atomic_write_json(cache_dir / INDEX, {
        "version": INDEX_VERSION,
        "chunks": {k: [e.file, e.offset, e.length] for k, e in sorted(entries.items())},
    })
