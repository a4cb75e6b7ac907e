"""Crash-safe file system primitives: atomic files and directories, block hashing, locks.

Every final path is produced by a rename of a fully written, fsynced temporary in
the same directory, so a crash leaves either the old bytes or the new bytes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any

from healthdelta.errors import InputError, StateError
from healthdelta.progress import ProgressFn, no_progress

BLOCK = 1 << 20  # 1 MiB: large enough for sha256 to run at full speed
TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Persist a rename/creation inside `path` (POSIX needs the directory fsynced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> bool:
    """Write `data` to `path` atomically; skip (return False) if the bytes are unchanged."""
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return True


def publish_file(tmp: Path, final: Path) -> None:
    """Make the complete file `tmp` durable and rename it over `final` (same filesystem)."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def json_bytes(obj: Any, *, indent: int | None = 2) -> bytes:
    """Deterministic JSON: sorted keys, UTF-8, newline-terminated."""
    text = json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False)
    return (text + "\n").encode("utf-8")


def atomic_write_json(path: Path, obj: Any) -> bool:
    return atomic_write_bytes(path, json_bytes(obj))


class WorkDir:
    """A temporary directory `<parent>/.tmp-<label>-<pid>` that becomes final only on commit.

    Used as a context manager: leaving the block without `commit` (an exception,
    Ctrl-C, or a stage that decided not to keep it) removes the temporary, so a
    final path only ever appears complete. An unregistered leftover at the final
    path is replaced on commit; callers never commit over registered data.
    """

    def __init__(self, parent: Path, label: str) -> None:
        self.parent = parent
        self.path = parent / f"{TMP_PREFIX}{label}-{os.getpid()}"

    def __enter__(self) -> "WorkDir":
        self.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir()
        return self

    def commit(self, final: Path) -> Path:
        fsync_dir(self.path)
        if final.exists():
            shutil.rmtree(final)
        os.rename(self.path, final)
        fsync_dir(final.parent)
        return final

    def __exit__(self, *exc: object) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


def tmp_owner_alive(tmp_name: str) -> bool:
    """Whether the process that is writing a `.tmp-*` entry still runs: every temporary
    name ends in `-<pid>` of its writer (a suffix such as `.wal` may follow)."""
    pid_text = tmp_name.rsplit("-", 1)[-1].split(".", 1)[0]
    if not pid_text.isdigit() or int(pid_text) in (0, os.getpid()):
        return False
    try:
        os.kill(int(pid_text), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def remove_orphan_tmp_dirs(parent: Path) -> list[str]:
    """Remove leftovers of interrupted commands (`.tmp-*`) in `parent`; returns their names.

    Called while holding the state lock, but not every writer takes it (`export ndjson`
    to a folder of one's own, a warehouse built elsewhere), so an entry whose writer still
    runs is spared, as `doctor --repair` spares it.
    """
    removed: list[str] = []
    if not parent.is_dir():
        return removed
    for child in sorted(parent.iterdir()):
        if child.name.startswith(TMP_PREFIX) and not tmp_owner_alive(child.name):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
            removed.append(child.name)
    return removed


def copy_hashing(
    src: IO[bytes],
    dst_path: Path,
    *,
    progress: ProgressFn = no_progress,
    stage: str = "copying",
    total: int | None = None,
    limit: int | None = None,
) -> tuple[str, int]:
    """Copy a stream into a new file while hashing it: one read of every byte.

    `limit` bounds the bytes accepted (zip bomb defence when the declared size lies).
    Returns (sha256 hex, size). The file is fsynced before returning.
    """
    digest = hashlib.sha256()
    size = 0
    with open(dst_path, "xb") as out:
        while block := src.read(BLOCK):
            size += len(block)
            if limit is not None and size > limit:
                raise InputError("a member of the archive is larger than it declares (possible zip bomb)")
            digest.update(block)
            out.write(block)
            progress(stage, len(block), total)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size


def hash_stream(src: IO[bytes], *, progress: ProgressFn = no_progress, stage: str = "hashing",
                total: int | None = None) -> tuple[str, int]:
    """sha256 and size of a stream, read in blocks."""
    digest = hashlib.sha256()
    size = 0
    while block := src.read(BLOCK):
        size += len(block)
        digest.update(block)
        progress(stage, len(block), total)
    return digest.hexdigest(), size


class StateLock:
    """An exclusive advisory lock on `<state>/.lock` serialising commands on one state dir.

    flock locks vanish with the process, so a killed run never leaves a stale lock.
    """

    def __init__(self, state_dir: Path, timeout: float = 0.0) -> None:
        self.path = state_dir / ".lock"
        self.timeout = timeout
        self._fh: IO[bytes] | None = None

    def __enter__(self) -> "StateLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+b")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    fh.close()
                    raise
                if time.monotonic() >= deadline:
                    fh.close()
                    raise StateError(
                        "another healthdelta command is using this state directory; "
                        "try again when it has finished"
                    ) from None
                time.sleep(0.1)
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
