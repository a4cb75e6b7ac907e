"""Staging: copy one export into `staging/<run_id>/` with its manifest and layout.

Every staged byte is hashed while it is copied, so the manifest's hashes describe
exactly what landed on disk, and the fingerprint computed from the copy pass is
checked against any fingerprint taken before (an export edited mid-run is refused).
"""

from __future__ import annotations

import json
import lzma
import shutil
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from healthdelta.errors import HealthDeltaError, InputError
from healthdelta.fingerprint import Fingerprint, input_fingerprint
from healthdelta.fsutil import BLOCK, atomic_write_json, copy_hashing, hash_stream
from healthdelta.inputs import ExportInput, classify
from healthdelta.parse.healthkit import read_me
from healthdelta.parse.timefmt import from_iso
from healthdelta.progress import ProgressFn, no_progress

SCHEMA_VERSION = 1
SOURCE_DIR = "source"
ZIP_ENTRY_NAME = "file"


@dataclass(frozen=True)
class StagedFile:
    path: str  # relative to the export root, POSIX
    size: int
    sha256: str


@dataclass(frozen=True)
class StagedExport:
    """What `stage_export` produced inside its (temporary) directory."""

    fingerprint: Fingerprint
    files: tuple[StagedFile, ...]
    ignored_files: int

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def compute_fingerprint(inp: ExportInput, progress: ProgressFn = no_progress) -> Fingerprint:
    """Hash-only pass over the input (no copy): what the no-op check needs."""
    if inp.is_zip:
        size = inp.path.stat().st_size
        sha, size = _hash_file(inp.path, progress, size)
        # The seed's formula names a zip by the literal word `file`, never by its file name:
        # a browser saving the same export as `export (1).zip` must not make it look new.
        return input_fingerprint([(ZIP_ENTRY_NAME, size, sha)])
    total = sum(f.size for f in inp.files)
    entries = []
    for f in inp.files:
        sha, size = _hash_file(inp.file_path(f.relpath), progress, total)
        entries.append((f.relpath, size, sha))
    return input_fingerprint(entries)


def _hash_file(path: Path, progress: ProgressFn, total: int) -> tuple[str, int]:
    with _open_input(path) as fh:
        return hash_stream(fh, progress=progress, stage="hashing", total=total)


def _open_input(path: Path):
    try:
        return open(path, "rb", buffering=BLOCK)
    except FileNotFoundError:
        raise InputError("a file of the export disappeared while it was being read") from None
    except PermissionError:
        raise InputError("a file of the export cannot be read (permission denied)") from None
    except IsADirectoryError:
        raise InputError("a file of the export turned into a folder while it was being read") from None


def check_free_space(inp: ExportInput, dest_parent: Path) -> None:
    """Refuse early rather than fill the disk halfway through a copy."""
    need = sum(f.size for f in inp.files if inp.export_relpath(f.relpath) is not None)
    dest_parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest_parent).free
    if need > free:
        raise InputError(
            f"not enough free disk space to stage the export ({need >> 20} MiB needed, {free >> 20} MiB free)"
        )


def stage_export(
    inp: ExportInput,
    dest: Path,
    *,
    expected: Fingerprint | None = None,
    progress: ProgressFn = no_progress,
) -> StagedExport:
    """Copy the export root's files into `dest/source/`, hashing as they are copied.

    `dest` is an empty work directory. Files outside the export root (e.g. a
    stray `.DS_Store` next to `apple_health_export/`) count in the fingerprint
    but are not staged. Returns the fingerprint the copy pass saw.
    """
    source = dest / SOURCE_DIR
    source.mkdir()
    if inp.is_zip:
        staged, ignored = _extract_zip(inp, source, progress)
        fingerprint = expected or compute_fingerprint(inp)
        _check_zip_unchanged(inp)
    else:
        staged, ignored, fingerprint = _copy_folder(inp, source, progress)
    if expected is not None and fingerprint != expected:
        raise InputError("the export changed while it was being read; run again when it is complete")
    return StagedExport(fingerprint=fingerprint, files=tuple(staged), ignored_files=ignored)


def _target(source: Path, export_relpath: str) -> Path:
    """Destination of one file; defence in depth against paths escaping `source`."""
    target = source / export_relpath
    if not target.resolve().is_relative_to(source.resolve()):
        raise InputError("an export file path points outside the staging folder; refusing")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _copy_folder(inp: ExportInput, source: Path, progress: ProgressFn):
    total = sum(f.size for f in inp.files)
    staged: list[StagedFile] = []
    entries: list[tuple[str, int, str]] = []
    ignored = 0
    for f in inp.files:
        rel = inp.export_relpath(f.relpath)
        with _open_input(inp.file_path(f.relpath)) as fh:
            if rel is None:
                sha, size = hash_stream(fh, progress=progress, stage="copying", total=total)
                ignored += 1
            else:
                sha, size = copy_hashing(fh, _target(source, rel), progress=progress, total=total)
                staged.append(StagedFile(rel, size, sha))
        entries.append((f.relpath, size, sha))
    return staged, ignored, input_fingerprint(entries)


def _extract_zip(inp: ExportInput, source: Path, progress: ProgressFn):
    staged: list[StagedFile] = []
    ignored = 0
    total = sum(f.size for f in inp.files)
    try:
        with zipfile.ZipFile(inp.path) as zf:
            for f in inp.files:
                rel = inp.export_relpath(f.relpath)
                if rel is None:
                    ignored += 1
                    continue
                target = _target(source, rel)
                with _ZipMember(zf, f.relpath) as member:
                    sha, size = copy_hashing(
                        member, target, progress=progress, stage="extracting", total=total, limit=f.size,
                    )
                staged.append(StagedFile(rel, size, sha))
    except zipfile.BadZipFile:
        raise InputError("the zip archive is corrupt (a member failed its integrity check)") from None
    except (EOFError, ValueError, NotImplementedError):
        raise InputError("the zip archive is corrupt or uses an unsupported compression") from None
    return staged, ignored


# What a damaged member raises while it is read, besides BadZipFile (a failed CRC,
# reported as such by the caller): zlib/lzma errors from a corrupt stream, OSError
# from a header offset pointing outside the file (or bz2's "Invalid data stream").
_MEMBER_READ_ERRORS = (zlib.error, lzma.LZMAError, OSError)


class _ZipMember:
    """A zip member opened for reading whose read-side failures become InputError.

    Kept apart from the copy's write side on purpose: an OSError while *writing* the
    staged copy (disk full, read-only) must reach the user as what it is, while one
    while *reading* the archive means the archive is damaged.
    """

    def __init__(self, zf: zipfile.ZipFile, name: str) -> None:
        self._zf, self._name, self._fh = zf, name, None

    def __enter__(self) -> "_ZipMember":
        try:
            self._fh = self._zf.open(self._name)
        except _MEMBER_READ_ERRORS:
            raise InputError("the zip archive is corrupt (a member cannot be read)") from None
        return self

    def read(self, n: int = -1) -> bytes:
        try:
            return self._fh.read(n)
        except _MEMBER_READ_ERRORS:
            raise InputError("the zip archive is corrupt (a member cannot be read)") from None

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()


def _check_zip_unchanged(inp: ExportInput) -> None:
    if inp.path.stat().st_size != inp.stat_summary[1]:
        raise InputError("the export changed while it was being read; run again when it is complete")


def write_manifest(
    dest: Path,
    staged: StagedExport,
    inp: ExportInput,
    *,
    run_id: str,
    parent_run_id: str | None,
) -> None:
    """`manifest.json` and `layout.json`: relative paths only, never the input path."""
    kinds = Counter(classify(f.path) for f in staged.files)
    atomic_write_json(dest / "manifest.json", {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "parent_run_id": parent_run_id,
        "input": {"form": inp.form, "path_redacted": True},
        "input_fingerprint": staged.fingerprint.as_dict(),
        "files": [{"path": f"{SOURCE_DIR}/{f.path}", "size": f.size, "sha256": f.sha256} for f in staged.files],
        "counts": {
            "files": len(staged.files),
            "bytes": staged.total_bytes,
            "ignored_files": staged.ignored_files,
            "by_kind": dict(sorted(kinds.items())),
        },
    })
    atomic_write_json(dest / "layout.json", build_layout(f.path for f in staged.files))


def build_layout(export_relpaths) -> dict:
    """Where each part of the export is, relative to the staging run dir."""
    layout: dict = {
        "schema_version": SCHEMA_VERSION,
        "export_xml": None,
        "export_cda_xml": None,
        "clinical_json": [],
        "ecg_csv": [],
        "workout_route_gpx": [],
        "other": [],
    }
    for rel in sorted(export_relpaths):
        kind = classify(rel)
        staged_path = f"{SOURCE_DIR}/{rel}"
        if kind in ("export_xml", "export_cda_xml"):
            layout[kind] = staged_path
        else:
            layout[kind].append(staged_path)
    return layout


def read_manifest(run_dir: Path) -> dict:
    """The manifest of a staged run; InputError if absent or damaged."""
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("the run directory has no manifest.json (not a staged run)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("the run directory's manifest.json is damaged") from None
    if not (
        isinstance(manifest, dict)
        and isinstance(manifest.get("run_id"), str)
        and isinstance(manifest.get("input_fingerprint"), dict)
    ):
        raise InputError("the run directory's manifest.json is damaged")
    return manifest


def content_sha256(manifest_files: list[dict]) -> str:
    """Identity of what a run staged (a manifest's `files`), whatever form the input had.

    A zip, the folder it unpacks to and that folder's parent have different input
    fingerprints but stage the same files, so this is what says "the same export"."""
    return input_fingerprint((f["path"], f["size"], f["sha256"]) for f in manifest_files).sha256


def staged_content_sha256(staged: StagedExport) -> str:
    return content_sha256([{"path": f"{SOURCE_DIR}/{f.path}", "size": f.size, "sha256": f.sha256}
                           for f in staged.files])


def export_date(run_dir: Path) -> str | None:
    """`ExportDate` of a staged run's export.xml in UTC, or None when it has none.

    A damaged head is not an error here: the parse stage reports it properly."""
    try:
        layout = json.loads((run_dir / "layout.json").read_text(encoding="utf-8"))
        xml = layout.get("export_xml")
        raw = read_me(run_dir / xml).get("ExportDate") if xml else None
        return from_iso(raw)[0] if raw else None
    except (HealthDeltaError, ValueError, OSError):
        return None
