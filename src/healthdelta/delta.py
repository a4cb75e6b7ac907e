"""Record-level delta of one stream against the parent run (CONTRACT §5).

Both runs' streams are in (sortkey, record_key) order, and every run keeps a key
index next to its streams (`index/<stream>.keys`: `sortkey \\t record_key` per line,
line i describing line i of the stream file). The delta is then a merge-join of
the new stream, as it is being written, with the parent's index read sequentially:
no parent row is ever held in memory, whatever the export's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

from healthdelta.ndjson import MergedLine


class StreamDelta:
    """Feed the new stream's lines in order; writes added/removed rows as it goes."""

    def __init__(self, parent_stream: Path | None, parent_index: Path | None,
                 added: IO[bytes], removed: IO[bytes]) -> None:
        self._added = added
        self._removed = removed
        self.added = self.removed = 0
        self._p_rows = open(parent_stream, "rb") if parent_stream and parent_stream.exists() else None
        self._p_keys = open(parent_index, "rb") if parent_index and parent_index.exists() else None
        self._parent: tuple[bytes, bytes] | None = None
        self._advance()

    def _advance(self) -> None:
        if self._p_keys is None:
            return
        key_line = self._p_keys.readline()
        if not key_line:
            self._parent = None
            return
        self._parent = (key_line.rstrip(b"\n"), self._p_rows.readline())

    def feed(self, line: MergedLine) -> None:
        ident = line.sortkey + b"\t" + line.record_key
        while self._parent is not None and self._parent[0] < ident:
            self._emit_removed()
        if self._parent is not None and self._parent[0] == ident:
            self._advance()
            return
        self._added.write(line.json + b"\n")
        self.added += 1

    def _emit_removed(self) -> None:
        self._removed.write(self._parent[1])
        self.removed += 1
        self._advance()

    def finish(self) -> None:
        while self._parent is not None:
            self._emit_removed()
        for fh in (self._p_rows, self._p_keys):
            if fh is not None:
                fh.close()
