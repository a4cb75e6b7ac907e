"""The staged exports of all runs of one output tree, kept once, compressed.

A run stages its export as plain files in `staging/<run_id>/source/`, because the parsers
need them seekable (the parallel export.xml parser reads byte ranges). Once the run's
outputs are complete, and before it is registered, `store_run` moves those files into
`staging/store/<sha256[:2]>/<sha256>.zst`, addressed by the plain sha256 the manifest
already lists, so a file that every export repeats (an ECG, a clinical record) is kept
once for all runs; the manifest, and with it run ids, fingerprints and lineage, is
unchanged. Runs made before the store existed, and runs staged by `ingest` and
registered with `run register`, keep their plain `source/`: `plain_run` serves both.
Share mode's de-identified copy (`deid/<run_id>/`, the same manifest and `source/` shape)
is stored the same way, in the same store.

Crash safety: a blob appears only by renaming a complete, fsynced temporary in its own
directory, and `source/` goes only after every blob of the run is durable, so a crash
leaves the plain files or complete blobs (or both), never neither.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import zstandard

from healthdelta.errors import InputError, StateError
from healthdelta.fsutil import BLOCK, TMP_PREFIX, WorkDir, fsync_dir, publish_file
from healthdelta.ingest import SOURCE_DIR, read_manifest
from healthdelta.progress import ProgressFn, no_progress

STORE_DIR = "store"  # beside the run dirs in staging/: never a run id
# Level 1: on a generated 100 MB export.xml (2 cores) it compressed at ~960 MB/s to 1/20,
# against ~700 MB/s for level 3 at the same ratio and ~190 MB/s for level 6 at 1/21.6;
# faster than the sha256 that runs beside it, so the store step costs about one read.
LEVEL = 1
_COMPRESSED_READ = 1 << 16
_FRAME_HEADER_MAX = 18  # ZSTD_FRAMEHEADERSIZE_MAX: the header holds the declared plain size


def store_of(staging: Path) -> Path:
    """The store that serves every run dir in `staging` (`<out>/staging` or an `ingest --out`)."""
    return staging / STORE_DIR


def blob_path(store: Path, sha256: str) -> Path:
    return store / sha256[:2] / f"{sha256}.zst"


def manifest_blobs(manifest: dict) -> list[tuple[str, int, str]]:
    """(path in the run dir, size, sha256) of each file a manifest lists."""
    files = manifest.get("files")
    if not isinstance(files, list):
        raise InputError("the run directory's manifest.json is damaged")
    out = []
    for f in files:
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
                and isinstance(f.get("sha256"), str) and len(f["sha256"]) == 64):
            raise InputError("the run directory's manifest.json is damaged")
        out.append((f["path"], f["size"], f["sha256"]))
    return out


def is_stored(run_dir: Path) -> bool:
    """Whether the run's staged files live in the store (no plain `source/`)."""
    return not (run_dir / SOURCE_DIR).is_dir()


def _blob_matches(blob: Path, size: int) -> bool:
    """A cheap check of a blob found in place: a regular file whose zstd frame header
    declares the plain size (doctor checks content; a rename only ever lands whole blobs)."""
    if blob.is_symlink() or not blob.is_file():
        return False
    try:
        with open(blob, "rb") as fh:
            params = zstandard.get_frame_parameters(fh.read(_FRAME_HEADER_MAX))
    except (OSError, zstandard.ZstdError):
        return False
    return params.content_size == size


def store_runs(run_dirs: Iterable[Path], store: Path, progress: ProgressFn = no_progress) -> int:
    """`store_run` for each dir of one run (its staged export, and share mode's de-identified
    copy, which has the same manifest and `source/` shape), as one `storing` progress stage."""
    run_dirs = list(run_dirs)
    total = sum(size for d in run_dirs for _, size, _ in manifest_blobs(read_manifest(d)))
    return sum(store_run(d, store, progress, total) for d in run_dirs)


def store_run(run_dir: Path, store: Path, progress: ProgressFn = no_progress, total: int | None = None) -> int:
    """Move the run's plain `source/` files into the store; returns the bytes of new blobs.

    Progress (`storing`, plain bytes, out of `total`: this dir's bytes unless given) for a
    file is reported after its blob is durable, so a fault at the stage's full total lands
    between the last blob and the removal of `source/`. Already stored (no `source/`):
    checks every blob is there.
    """
    files = manifest_blobs(read_manifest(run_dir))
    source = run_dir / SOURCE_DIR
    if not source.is_dir():
        if any(not _blob_matches(blob_path(store, sha), size) for _, size, sha in files):
            raise StateError("a staged file of this run is missing from staging/store; run `healthdelta doctor`")
        return 0
    if total is None:
        total = sum(size for _, size, _ in files)
    written = 0
    made_dirs = not store.is_dir()
    store.mkdir(parents=True, exist_ok=True)
    for rel, size, sha in files:
        blob = blob_path(store, sha)
        if _blob_matches(blob, size):
            progress("storing", size, total)
            continue
        if not blob.parent.is_dir():
            blob.parent.mkdir()
            made_dirs = True
        written += _write_blob(run_dir / rel, blob, size, sha, progress, total)
    if made_dirs:
        fsync_dir(store)
        fsync_dir(store.parent)
    shutil.rmtree(source)
    fsync_dir(run_dir)
    return written


def _write_blob(plain: Path, blob: Path, size: int, sha: str, progress: ProgressFn, total: int) -> int:
    tmp = blob.with_name(f"{TMP_PREFIX}{blob.stem}-{os.getpid()}")
    digest = hashlib.sha256()
    pending = 0  # the last block is reported once the blob is durable
    try:
        with open(plain, "rb") as src, open(tmp, "xb") as out:
            compressor = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True)
            try:
                with compressor.stream_writer(out, size=size, closefd=False) as writer:
                    while block := src.read(BLOCK):
                        if pending:
                            progress("storing", pending, total)
                        digest.update(block)
                        writer.write(block)
                        pending = len(block)
            except zstandard.ZstdError:
                digest = None  # the frame declares `size`: another size is a changed file
        # The name says what the content is for every run to come: never trust a copy
        # that changed since it was hashed while staging.
        if digest is None or digest.hexdigest() != sha:
            raise StateError("a staged file changed after it was staged; run the export again")
        publish_file(tmp, blob)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    progress("storing", pending, total)
    return blob.stat().st_size


def _decompress(blob: Path, sink: Callable[[bytes], object], size: int,
                progress: ProgressFn = no_progress, total: int | None = None) -> int:
    """Stream a blob's plain bytes into `sink`; returns how many, or -1 when the frame is
    incomplete or has trailing bytes (a truncated blob may still yield all its data).
    zstd's frame checksum raises ZstdError on damaged data."""
    done = 0
    dobj = zstandard.ZstdDecompressor().decompressobj()
    with open(blob, "rb") as fh:
        # Small reads keep memory bounded: one compressed read can inflate ~20x.
        while chunk := fh.read(_COMPRESSED_READ):
            if dobj.eof:
                return -1
            block = dobj.decompress(chunk)
            done += len(block)
            if done > size:
                return -1  # never past the listed size: a damaged blob must not fill the disk
            sink(block)
            progress("verifying", len(block), total)
    return done if dobj.eof else -1


def verify_blob(store: Path, size: int, sha: str, progress: ProgressFn = no_progress,
                total: int | None = None) -> str | None:
    """None when the blob decompresses to exactly the listed size and sha256, else
    `missing` or `corrupt`. Costs one decompression and hash of the plain bytes."""
    blob = blob_path(store, sha)
    if blob.is_symlink() or not blob.is_file():
        return "missing"
    digest = hashlib.sha256()
    try:
        done = _decompress(blob, digest.update, size, progress, total)
    except (OSError, zstandard.ZstdError):
        return "corrupt"
    return None if done == size and digest.hexdigest() == sha else "corrupt"


@contextmanager
def plain_run(run_dir: Path) -> Iterator[Path]:
    """A staged run dir with plain `source/` files, for commands that read a past run.

    The run dir itself when it has them (older runs, `ingest` runs); else a temporary
    run dir `staging/.tmp-view-...` (manifest, layout and the files decompressed from
    the store), removed afterwards, or by the next command if this one was killed.
    """
    if not is_stored(run_dir):
        yield run_dir
        return
    manifest = read_manifest(run_dir)
    files = manifest_blobs(manifest)
    store = store_of(run_dir.parent)
    if any(not blob_path(store, sha).is_file() for _, _, sha in files):
        raise InputError("this run's staged export is gone (the run was pruned, or staging/store lost it: "
                         "`healthdelta doctor` tells which); its records are in the warehouse and its delta files")
    with WorkDir(run_dir.parent, f"view-{manifest['run_id'][:12]}") as view:
        for name in ("manifest.json", "layout.json"):
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, view.path / name)
        for rel, size, sha in files:
            target = view.path / rel
            if not target.resolve().is_relative_to(view.path.resolve()):
                raise InputError("the run directory's manifest.json is damaged")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(target, "xb") as out:
                    done = _decompress(blob_path(store, sha), out.write, size)
            except zstandard.ZstdError:
                done = -1  # damaged data: reported below like a wrong size
            if done != size:
                raise StateError("a staged file of this run is damaged in staging/store; run `healthdelta doctor`")
        yield view.path


def referenced_blobs(staging: Path, manifests: Iterable[dict]) -> set[Path]:
    """The blob paths the given manifests list."""
    store = store_of(staging)
    return {blob_path(store, sha) for m in manifests for _, _, sha in manifest_blobs(m)}


def blobs(staging: Path) -> list[Path]:
    """Every blob in the store (not the `.tmp-*` of a blob being written)."""
    store = store_of(staging)
    if not store.is_dir():
        return []
    return sorted(p for d in store.iterdir() if d.is_dir() and not d.is_symlink()
                  for p in d.iterdir() if not p.name.startswith(TMP_PREFIX))


def blob_dirs(staging: Path) -> list[Path]:
    """The store's prefix dirs, where a blob's temporary sits while it is written."""
    store = store_of(staging)
    return sorted(d for d in store.iterdir() if d.is_dir() and not d.is_symlink()) if store.is_dir() else []
