"""Stream files on disk: canonical NDJSON stored zstd-compressed, read in either form.

CONTRACT §5 lets stream files be stored compressed in a format DuckDB reads natively, as
long as `export ndjson` writes the plain canonical files on demand. The NDJSON of every
run is about 2.4x its export.xml and compresses about 11x, so runs store
`<stream>.ndjson.zst` (streams, `added/`, `removed/`); runs written before store
`<stream>.ndjson`, and `export ndjson` writes that plain form. Every reader finds and
opens streams here, so one state dir may hold runs of both forms.

The compressed bytes are deterministic (fixed level and parameters, one frame, no
timestamps in zstd frames): the same rows always give the same file. An empty stream is
an empty file in both forms, so a size of 0 still means "no rows".
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, Iterable

import zstandard

from healthdelta.errors import StateError
from healthdelta.fsutil import TMP_PREFIX, publish_file

PLAIN = ".ndjson"
ZST = ".zst"
COMPRESSED = PLAIN + ZST
INDEX = ".keys"  # a stream's key index (delta.py), stored like its stream
# Level 1 measured best on a generated 316 MB stream: 11.7x at ~890 MB/s on one core; level 3
# gave 10.8x at ~360 MB/s, level 6 11.5x at ~120 MB/s (docs/ndjson.md).
LEVEL = 1
_BUFFER = 1 << 20


def file_name(stream: str, *, compressed: bool = True) -> str:
    return f"{stream}{COMPRESSED if compressed else PLAIN}"


def index_name(stream: str, *, compressed: bool = True) -> str:
    return f"{stream}{INDEX}{ZST if compressed else ''}"


def find_index(folder: Path, stream: str) -> Path | None:
    """A run's key index of `stream` (`index/`), compressed, or plain as runs stored it before streams were compressed."""
    for compressed in (True, False):
        path = folder / "index" / index_name(stream, compressed=compressed)
        if path.is_file():
            return path
    return None


def stream_name(path: Path) -> str | None:
    """The stream a file holds by its name (`observations` for either form), else None."""
    for suffix in (COMPRESSED, PLAIN):
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def find(folder: Path, stream: str) -> Path | None:
    """The file holding `stream` in `folder`, compressed or plain; None when neither exists."""
    for compressed in (True, False):
        path = folder / file_name(stream, compressed=compressed)
        if path.is_file():
            return path
    return None


def stream_files(folder: Path) -> list[Path]:
    """Every stream-like file of `folder` (either form), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if stream_name(p) is not None and not p.name.startswith(TMP_PREFIX))


class _ZstdSource(io.RawIOBase):
    """Decompressed bytes of a `.zst` file; a damaged frame is a StateError, not a zstd one."""

    def __init__(self, path: Path) -> None:
        self._reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True,
                                                                  closefd=True)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            return self._reader.readinto(buffer)
        except zstandard.ZstdError:
            raise StateError("a stored stream file is damaged (its zstd data does not decompress)") from None

    def close(self) -> None:
        self._reader.close()
        super().close()


def open_read(path: Path) -> IO[bytes]:
    """A buffered binary reader of the plain canonical bytes, whichever form `path` is."""
    if not path.name.endswith(ZST):
        return open(path, "rb", buffering=_BUFFER)
    return io.BufferedReader(_ZstdSource(path), _BUFFER)


def read_bytes(path: Path) -> bytes:
    with open_read(path) as fh:
        return fh.read()


class _ZstdSink(io.RawIOBase):
    """Compresses what the buffered writer hands it; no frame at all until the first byte."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self._cobj = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self._cobj is None:
            # Single-threaded on purpose: two zstd threads were slower on two cores (~670 MB/s),
            # and multithreaded frames differ from single-threaded ones.
            cctx = zstandard.ZstdCompressor(level=LEVEL, threads=0, write_checksum=True, write_content_size=False)
            self._cobj = cctx.compressobj()
        self._fh.write(self._cobj.compress(data))
        return len(data)

    def finish(self) -> None:
        if self._cobj is not None:
            self._fh.write(self._cobj.flush())


class StreamWriter:
    """Writes one stream file atomically: a temporary beside `path`, compressed while the
    rows arrive (constant memory), fsynced and renamed into place on a clean exit,
    removed on any exception. The form follows the name (`file_name`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
        self._raw: IO[bytes] | None = None
        self._sink: _ZstdSink | None = None
        self._out: IO[bytes] | None = None

    def __enter__(self) -> "StreamWriter":
        self._raw = open(self._tmp, "wb")
        if self.path.name.endswith(ZST):
            self._sink = _ZstdSink(self._raw)
            self._out = io.BufferedWriter(self._sink, _BUFFER)
        else:
            self._out = io.BufferedWriter(self._raw, _BUFFER)
        # Called once per row (several million per GB): the buffered writer's own method,
        # not a wrapper around it.
        self.write = self._out.write  # type: ignore[method-assign]
        return self

    def write(self, data: bytes) -> None:
        self._out.write(data)

    def writelines(self, lines: Iterable[bytes]) -> None:
        self._out.writelines(lines)

    def __exit__(self, exc_type, *exc: object) -> None:
        try:
            if exc_type is None:
                self._out.flush()
                if self._sink is not None:
                    self._sink.finish()
                self._raw.close()
                publish_file(self._tmp, self.path)
        finally:
            if not self._raw.closed:
                self._raw.close()
            self._tmp.unlink(missing_ok=True)
