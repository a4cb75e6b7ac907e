"""`export validate`: check an NDJSON directory against CONTRACT §5 and banned content.

Findings carry a file, a line number, a code and a message that never echoes the
offending value (a banned token is PII by definition).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import orjson

from healthdelta import streamfile
from healthdelta.identity import fold_for_match
from healthdelta.ndjson import SCHEMA_VERSION, STREAMS, encode_row, sort_key

SOURCES = {"healthkit", "cda", "fhir", "ecg", "gpx"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
ROW_DIRS = ("", "added", "removed")


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"ERROR {self.file}:{self.line} {self.code} {self.message}"


def validate_dir(ndjson_dir: Path, banned_tokens: tuple[str, ...] = (),
                 banned_regexes: tuple[str, ...] = ()) -> Iterator[Finding]:
    patterns = [re.compile(r) for r in banned_regexes]
    # Case, accents and apostrophe styles never hide a banned token ("ZOË" finds "zoe").
    tokens = [fold_for_match(t) for t in banned_tokens if t]
    for sub in ROW_DIRS:
        folder = ndjson_dir / sub if sub else ndjson_dir
        if not folder.is_dir():
            if not sub:
                yield Finding(".", 0, "missing_dir", "not an NDJSON directory")
            continue
        for stream in STREAMS:
            path = streamfile.find(folder, stream)
            if path is None:
                name = streamfile.file_name(stream, compressed=False)
                yield Finding(f"{sub}/{name}" if sub else name, 0, "missing_file",
                              f"stream file for {stream} is missing")
                continue
            yield from _validate_file(path, f"{sub}/{path.name}" if sub else path.name, tokens, patterns)
        seen: set[str] = set()
        for extra in streamfile.stream_files(folder):
            rel = f"{sub}/{extra.name}" if sub else extra.name
            stream = streamfile.stream_name(extra)
            if stream not in STREAMS:
                yield Finding(rel, 0, "unknown_file", "not a known stream")
            elif stream in seen:
                yield Finding(rel, 0, "duplicate_file", "the stream is stored both plain and compressed")
            seen.add(stream)


def _unescaped(text: str) -> str:
    """JSON `\\uXXXX` escapes resolved, so an escaped letter cannot hide a token."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)


def _validate_file(path: Path, rel: str, tokens: list[str], patterns: list[re.Pattern]) -> Iterator[Finding]:
    previous: tuple[bytes, str] | None = None
    seen_keys: set[str] = set()
    number = 0
    with streamfile.open_read(path) as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.endswith(b"\n"):
                yield Finding(rel, number, "no_newline", "last line is not newline-terminated")
            line = raw.rstrip(b"\n")
            if tokens:
                text = line.decode("utf-8", "replace")
                folded = fold_for_match(text if "\\u" not in text else _unescaped(text))
                for i, token in enumerate(tokens, 1):
                    if token in folded:
                        yield Finding(rel, number, "banned_token", f"banned token #{i} found")
            if patterns:
                text = line.decode("utf-8", "replace")
                for i, pattern in enumerate(patterns, 1):
                    if pattern.search(text):
                        yield Finding(rel, number, "banned_regex", f"banned pattern #{i} matched")
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                yield Finding(rel, number, "bad_json", "line is not valid JSON")
                continue
            if not isinstance(row, dict):
                yield Finding(rel, number, "bad_json", "line is not a JSON object")
                continue
            yield from _check_row(row, rel, number)
            if encode_row(row) != line:
                yield Finding(rel, number, "not_canonical", "line is not compact sorted-key JSON")
            key = row.get("record_key")
            if isinstance(key, str):
                if key in seen_keys:
                    yield Finding(rel, number, "duplicate_key", "record_key repeats within the file")
                seen_keys.add(key)
                et = row.get("event_time")
                order = (sort_key(et if isinstance(et, str) else None), key)
                if previous is not None and order < previous:
                    yield Finding(rel, number, "unsorted", "rows are not sorted by (event_time, record_key)")
                previous = order


def _check_row(row: dict, rel: str, number: int) -> Iterator[Finding]:
    def bad(code: str, message: str) -> Finding:
        return Finding(rel, number, code, message)

    for name in ("schema_version", "record_key", "canonical_person_id", "source", "source_file",
                 "event_time", "run_id"):
        if name not in row:
            yield bad("missing_field", f"field {name} is missing")
    if "schema_version" in row and row["schema_version"] != SCHEMA_VERSION:
        yield bad("bad_schema_version", f"schema_version is not {SCHEMA_VERSION}")
    for name in ("record_key", "run_id"):
        if name in row and not (isinstance(row[name], str) and _HEX64.match(row[name])):
            yield bad("bad_type", f"{name} is not 64 lowercase hex characters")
    if "canonical_person_id" in row and not (isinstance(row["canonical_person_id"], str)
                                             and row["canonical_person_id"]):
        yield bad("bad_type", "canonical_person_id is not a non-empty string")
    if "source" in row and row["source"] not in SOURCES:
        yield bad("bad_source", "source is not one of healthkit, cda, fhir, ecg, gpx")
    sf = row.get("source_file")
    if "source_file" in row and not (isinstance(sf, str) and sf and not sf.startswith("/")
                                     and ".." not in sf.split("/")):
        yield bad("bad_path", "source_file is not a relative path inside the export")
    et = row.get("event_time")
    if et is not None and not (isinstance(et, str) and _UTC.match(et)):
        yield bad("bad_time", "event_time is not a UTC ...Z timestamp")
