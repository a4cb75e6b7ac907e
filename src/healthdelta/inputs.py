"""Input layout detection: export.zip, the unpacked folder, its parent, or a bare export.xml.

Everything here only looks: names, sizes and zip headers are checked before a
single byte is written anywhere, so a hostile archive is refused whole.
"""

from __future__ import annotations

import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from healthdelta.errors import InputError

EXPORT_XML = "export.xml"
WRAPPER_DIR = "apple_health_export"

# Zip bomb bounds. A real export.xml deflates about 10-30x; bombs reach 1000x+.
MAX_MEMBERS = 50_000
MAX_TOTAL_BYTES = 64 << 30
MAX_RATIO = 200
RATIO_MIN_BYTES = 1 << 20  # tiny members may legitimately compress extremely well

FileKind = Literal["export_xml", "export_cda_xml", "clinical_json", "ecg_csv", "workout_route_gpx", "other"]


@dataclass(frozen=True)
class InputFile:
    relpath: str  # POSIX, relative to the input folder, or the zip member name
    size: int


@dataclass(frozen=True)
class ExportInput:
    """A recognised export: where it is, in which form, and which files it holds."""

    path: Path
    form: Literal["zip", "export_folder", "parent_folder", "export_xml"]
    root: str  # prefix of the export root inside the input: "" or "apple_health_export/"
    files: tuple[InputFile, ...]

    @property
    def is_zip(self) -> bool:
        return self.form == "zip"

    @property
    def stat_summary(self) -> tuple[int, int]:
        """(file_count, total_bytes) the fingerprint will have: lets an unchanged
        parent be ruled out without reading a byte."""
        if self.is_zip:
            return 1, self.path.stat().st_size
        return len(self.files), sum(f.size for f in self.files)

    def file_path(self, relpath: str) -> Path:
        """Where the input file `relpath` is on disk (not for zip members)."""
        return self.path if self.form == "export_xml" else self.path / relpath

    def export_relpath(self, relpath: str) -> str | None:
        """Path relative to the export root, or None for files outside it."""
        if relpath.startswith(self.root):
            return relpath[len(self.root):]
        return None


def classify(export_relpath: str) -> FileKind:
    """Which part of an export a file is, by its path under the export root."""
    path = PurePosixPath(export_relpath)
    top = path.parts[0] if len(path.parts) > 1 else ""
    suffix = path.suffix.lower()
    if export_relpath == EXPORT_XML:
        return "export_xml"
    if export_relpath == "export_cda.xml":
        return "export_cda_xml"
    if top in ("clinical-records", "clinical_records") and suffix == ".json":
        return "clinical_json"
    if top == "electrocardiograms" and suffix == ".csv":
        return "ecg_csv"
    if top == "workout-routes" and suffix == ".gpx":
        return "workout_route_gpx"
    return "other"


def detect_input(path: Path) -> ExportInput:
    """Recognise the form of `path` and list its files; raise InputError if it is not an export."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise InputError("input not found") from None
    except PermissionError:
        raise InputError("input cannot be read (permission denied)") from None
    if stat.S_ISLNK(st.st_mode):
        path = path.resolve()
        try:
            st = path.stat()
        except OSError:
            raise InputError("input is a broken symbolic link") from None
    if stat.S_ISDIR(st.st_mode):
        return _detect_folder(path)
    if stat.S_ISREG(st.st_mode):
        return _detect_file(path)
    raise InputError("input is neither a regular file nor a folder")


def _detect_folder(path: Path) -> ExportInput:
    files = list(_walk_files(path))
    if not files:
        raise InputError("input folder is empty")
    names = {f.relpath for f in files}
    if EXPORT_XML in names:
        form, root = "export_folder", ""
    elif f"{WRAPPER_DIR}/{EXPORT_XML}" in names:
        form, root = "parent_folder", f"{WRAPPER_DIR}/"
    else:
        raise InputError("no export.xml found in the input folder (expected an Apple Health export)")
    _check_export_xml_size(next(f for f in files if f.relpath == root + EXPORT_XML))
    return ExportInput(path=path, form=form, root=root, files=tuple(files))


def _walk_files(top: Path):
    """Every regular file under `top`, sorted; symlinks and special files are refused,
    since following them would read outside the export."""
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except PermissionError:
        raise InputError("a folder of the export cannot be read (permission denied)") from None
    for entry in entries:
        if entry.is_symlink():
            raise InputError("the input folder contains a symbolic link; refusing to follow it")
        if entry.is_dir(follow_symlinks=False):
            for sub in _walk_files(Path(entry.path)):
                yield InputFile(f"{entry.name}/{sub.relpath}", sub.size)
        elif entry.is_file(follow_symlinks=False):
            yield InputFile(entry.name, entry.stat(follow_symlinks=False).st_size)
        else:
            raise InputError("the input folder contains a special file (pipe, socket or device)")


EXPECTED = "give export.zip, the apple_health_export folder (or the folder holding it), or export.xml"
HEAD_BYTES = 64 << 10  # Apple's DOCTYPE, which names HealthData, fits well within this


def _detect_file(path: Path) -> ExportInput:
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    except PermissionError:
        raise InputError("input cannot be read (permission denied)") from None
    if not head.startswith(b"PK") and looks_like_export_xml(path.name, head):
        export_xml = InputFile(EXPORT_XML, path.stat().st_size)
        _check_export_xml_size(export_xml)
        # Staged and fingerprinted exactly like a folder holding only this file.
        return ExportInput(path=path, form="export_xml", root="", files=(export_xml,))
    return _detect_zip(path, head)


def looks_like_export_xml(name: str, head: bytes) -> bool:
    """A file given alone is taken as export.xml by its name, or (renamed, e.g. by a
    download) by an XML start naming the HealthData root."""
    if name == EXPORT_XML:
        return True
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    return text.startswith(b"<") and (b"<!DOCTYPE HealthData" in text or b"<HealthData" in text)


def not_an_export_message(head: bytes) -> str:
    """What a file that is neither a zip nor export.xml was, and what is expected instead.
    Says the kind of file only: never its name or contents."""
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"PK"):
        given = "the input is a damaged zip archive (corrupt or truncated)"
    elif head.startswith(b"%PDF"):
        given = "the input is a PDF document, not an Apple Health export"
    elif text.startswith(b"<"):
        given = "the input is an XML file without Apple Health data (not export.xml)"
    elif not head:
        given = "the input is an empty file"
    else:
        given = "the input is not a zip archive or an export folder"
    return f"{given}: {EXPECTED}"


def _detect_zip(path: Path, head: bytes) -> ExportInput:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile:
        raise InputError(not_an_export_message(head)) from None
    except PermissionError:
        raise InputError("input cannot be read (permission denied)") from None
    except (OSError, EOFError, ValueError, NotImplementedError):
        raise InputError(f"the input zip archive cannot be read (corrupt or truncated): {EXPECTED}") from None
    files = check_zip_members(infos, archive_size=path.stat().st_size)
    roots = sorted(
        f.relpath[: -len(EXPORT_XML)] for f in files
        if f.relpath == EXPORT_XML or (f.relpath.endswith("/" + EXPORT_XML) and f.relpath.count("/") == 1)
    )
    if not roots:
        raise InputError("no export.xml found in the zip archive (expected an Apple Health export)")
    if len(roots) > 1:
        if f"{WRAPPER_DIR}/" not in roots:
            raise InputError("the zip archive holds more than one export.xml; cannot tell which to use")
        roots = [f"{WRAPPER_DIR}/"]
    root = roots[0]
    _check_export_xml_size(next(f for f in files if f.relpath == root + EXPORT_XML))
    return ExportInput(path=path, form="zip", root=root, files=tuple(files))


def check_member_name(name: str) -> str:
    """Return the member name if it stays inside the extraction dir; raise otherwise."""
    if not name or "\x00" in name:
        raise InputError("the zip archive contains a member with an invalid name; refusing to extract")
    if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise InputError("the zip archive contains a member with an absolute path; refusing to extract")
    if ".." in PurePosixPath(name).parts:
        raise InputError("the zip archive contains a member path with '..'; refusing to extract")
    # `a/./b`, `a//b` or `.` would land on the same file as another member (or on the
    # extraction dir itself); Apple never writes them.
    parts = (name[:-1] if name.endswith("/") else name).split("/")
    if any(part in ("", ".") for part in parts):
        raise InputError("the zip archive contains a member with an invalid name; refusing to extract")
    return name


def check_zip_members(infos: list[zipfile.ZipInfo], archive_size: int | None = None) -> list[InputFile]:
    """Validate every member (names, links, encryption, sizes) before anything is extracted.

    `archive_size` (bytes of the zip file) adds a bound on the whole archive's ratio:
    many members just under the per-member threshold, or members sharing one
    compressed stream (overlapping entries), expand far beyond what the file holds.
    """
    if len(infos) > MAX_MEMBERS:
        raise InputError(f"the zip archive has more than {MAX_MEMBERS} members; refusing (possible zip bomb)")
    files: list[InputFile] = []
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = check_member_name(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise InputError("the zip archive contains a symbolic link; refusing to extract")
        if info.flag_bits & 0x1:
            raise InputError("the zip archive contains encrypted members, which are not supported")
        if info.is_dir():
            continue
        if name in seen:
            raise InputError("the zip archive contains the same member twice; refusing to extract")
        seen.add(name)
        total += info.file_size
        if total > MAX_TOTAL_BYTES:
            raise InputError("the zip archive expands beyond the size limit; refusing (possible zip bomb)")
        if info.file_size > RATIO_MIN_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise InputError("the zip archive has a member with an extreme compression ratio; refusing (possible zip bomb)")
        files.append(InputFile(name, info.file_size))
    if archive_size is not None and total > RATIO_MIN_BYTES and total > MAX_RATIO * max(archive_size, 1):
        raise InputError(
            f"the zip archive expands to more than {MAX_RATIO} times its size; refusing (possible zip bomb)"
        )
    files.sort(key=lambda f: f.relpath)
    # A member that is also another member's folder (`x` and `x/y`) cannot be extracted.
    folders = {rel[:i] for rel in seen for i in range(len(rel)) if rel[i] == "/"}
    if not folders.isdisjoint(seen):
        raise InputError("the zip archive contains a file and a folder with the same name; refusing to extract")
    return files


def _check_export_xml_size(export_xml: InputFile) -> None:
    if export_xml.size == 0:
        raise InputError("export.xml is empty")
