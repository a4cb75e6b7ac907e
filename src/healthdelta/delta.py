"""Record-level delta of one stream against the parent run (CONTRACT §5).

Both runs' streams are in (sortkey, record_key) order, and every run keeps a key
index next to its streams (`index/<stream>.keys.zst`: `sortkey \\t record_key` per line,
line i describing line i of the stream file). The delta is then a merge-join of
the new stream, as it is being written, with the parent's index read sequentially:
no parent row is ever held in memory, whatever the export's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Iterable

from healthdelta.errors import StateError
from healthdelta.ndjson import IDENT, JSON_START
from healthdelta.streamfile import StreamWriter, open_read


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

    A merge-join: both sides are in (sortkey, record_key) order, so each parent
    index line is read once, in step with the new stream.
    """
    n = n_added = n_removed = 0
    has_parent = parent_index is not None and parent_index.exists()
    if has_parent and parent_rows is None:
        raise StateError("the parent run's NDJSON has a key index but no stream file")
    p_keys = open_read(parent_index) if has_parent else None
    p_rows = open_read(parent_rows) if has_parent else None
    write_row, write_index, write_added = rows.write, index.write, added.write
    try:
        p_ident = p_keys.readline()[:-1] if p_keys else b""
        for line in lines:
            ident = line[IDENT]
            row = line[JSON_START:]
            write_row(row)
            write_index(ident + b"\n")
            n += 1
            while p_ident and p_ident < ident:
                removed.write(p_rows.readline())
                n_removed += 1
                p_ident = p_keys.readline()[:-1]
            if p_ident == ident:
                p_rows.readline()
                p_ident = p_keys.readline()[:-1]
            else:
                write_added(row)
                n_added += 1
        while p_ident:
            removed.write(p_rows.readline())
            n_removed += 1
            p_ident = p_keys.readline()[:-1]
    finally:
        for fh in (p_keys, p_rows):
            if fh is not None:
                fh.close()
    return n, n_added, n_removed
