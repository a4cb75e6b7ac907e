"""Record-level delta of one stream against the parent run (CONTRACT §5).

Both runs' streams are in (sortkey, record_key) order, so the delta is a merge-join of
the new stream, as it is being written, with the parent's stream read sequentially: no
parent row is ever held in memory, whatever the export's size. The parent's side of
each row (`sortkey \\t record_key`) comes from its key index
(`index/<stream>.keys.zst`, line i describing line i of the stream file), which a run
keeps while it is its person's latest run (the next run's delta base); without it, it is
read off the parent's rows themselves (slower, same result).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterable

import orjson

from healthdelta.errors import StateError
from healthdelta.ndjson import IDENT, JSON_START, sort_key
from healthdelta.streamfile import StreamWriter, open_read

_END = (b"", b"")


def write_stream(
    lines: Iterable[bytes],
    rows: IO[bytes] | StreamWriter,
    index: IO[bytes],
    added: IO[bytes] | StreamWriter,
    removed: IO[bytes] | StreamWriter,
    parent_rows: Path | None,
    parent_index: Path | None,
) -> tuple[int, int, int]:
    """Write the final stream and its index from merged spill lines, and the delta
    against the parent's stream in the same pass. Returns (rows, added, removed).
    `parent_rows` may be either stream form (`streamfile`).

    A merge-join: both sides are in (sortkey, record_key) order, so each parent row is
    read once, in step with the new stream.
    """
    n = n_added = n_removed = 0
    write_row, write_index, write_added, write_removed = rows.write, index.write, added.write, removed.write
    with _parent_side(parent_rows, parent_index) as parent:
        p_ident, p_row = next(parent, _END)
        for line in lines:
            ident = line[IDENT]
            row = line[JSON_START:]
            write_row(row)
            write_index(ident + b"\n")
            n += 1
            while p_ident and p_ident < ident:
                write_removed(p_row)
                n_removed += 1
                p_ident, p_row = next(parent, _END)
            if p_ident == ident:
                p_ident, p_row = next(parent, _END)
            else:
                write_added(row)
                n_added += 1
        while p_ident:
            write_removed(p_row)
            n_removed += 1
            p_ident, p_row = next(parent, _END)
    return n, n_added, n_removed


@contextmanager
def _parent_side(parent_rows: Path | None, parent_index: Path | None) -> Iterator[Iterator[tuple[bytes, bytes]]]:
    """(ident, row line) of every parent row, in stream order."""
    if parent_rows is None:
        if parent_index is not None and parent_index.exists():
            raise StateError("the parent run's NDJSON has a key index but no stream file")
        yield iter(())
        return
    with open_read(parent_rows) as p_rows:
        if parent_index is None or not parent_index.exists():
            yield ((ident_of(row), row) for row in p_rows)
            return
        with open_read(parent_index) as p_keys:
            yield ((key[:-1], row) for key, row in zip(p_keys, p_rows))


def ident_of(row: bytes) -> bytes:
    """A stream row's line of the key index: `sortkey \\t record_key`."""
    doc = orjson.loads(row)
    return b"%s\t%s" % (sort_key(doc.get("event_time")), doc["record_key"].encode("ascii"))


def derive_index(stream_file: Path, out: IO[bytes] | StreamWriter) -> None:
    """The key index of a stream file, byte for byte what the writer wrote beside it."""
    with open_read(stream_file) as rows:
        for row in rows:
            out.write(ident_of(row) + b"\n")
