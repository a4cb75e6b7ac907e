"""Share bundles: a deterministic `.tar.gz` of one share-mode run, and its verifier.

A bundle holds only share-safe artifacts of one run: the de-identified NDJSON
(`<out>/ndjson/<run_id>/` of a run registered with mode `share`: the streams,
`added/`, `removed/`, `delta.json`, `export_report.json`; never `index/` or
`local/`) and the run's reports when they were built in share mode. Never
staging, the identity store, notes or raw inputs.

Layout inside the archive (one top folder, a manifest first):

    share-<run_id[:12]>/manifest.json         {"files": [{"path", "size", "sha256"}], "run_id", ...}
    share-<run_id[:12]>/ndjson/<stream>.ndjson ...
    share-<run_id[:12]>/reports/...

Determinism: members sorted, mtime 0, uid/gid 0, no user or group names, mode
0644, PAX format, gzip header with mtime 0 and no file name. Rebuilding from the
same artifacts gives the same bytes.

Before anything is written every member is scanned for the identity store's
known identifiers (all name forms, birth dates in several formats, MRNs and other
identifiers, phones, e-mails, addresses); one hit refuses the whole bundle, naming the
member and the kind of identifier, never the value. What is scanned is what was made
from the person's data: the plotly.js a report inlines is vendor code, skipped when its
sha256 is that of the copy the installed plotly package ships (a changed copy is
scanned like anything else); initials and short numbers, which any code or markup holds
as free words, count only as a whole field.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import html
import io
import json
import os
import re
import tarfile
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from healthdelta import streamfile
from healthdelta.errors import HealthDeltaError, InputError, StateError
from healthdelta.identity import PersonPII, load_people_pii

SCHEMA_VERSION = 1
BLOCK = 8 << 20
_OVERLAP = 512  # characters carried between scan chunks (longer than any identifier)
NDJSON_FILES = ("delta.json", "export_report.json")
NDJSON_DIRS = ("", "added", "removed")


class LeakError(HealthDeltaError):
    """A bundle member holds a known identifier: nothing was written."""


@dataclass(frozen=True)
class BundleResult:
    path: Path
    run_id: str
    members: int
    bytes: int
    sha256: str


# --------------------------------------------------------------------------- members


def _registry_entry(state: Path, run_id: str) -> dict[str, Any]:
    from healthdelta import registry

    return registry.read_registry(state).resolve(run_id)


def collect_members(out: Path, run_id: str, state: Path) -> tuple[str, list[tuple[str, Path]]]:
    """(full run id, [(path inside the bundle, file)]) of a run's share-safe artifacts."""
    entry = _registry_entry(state, run_id)
    run_id = entry["run_id"]
    if entry.get("mode") != "share":
        raise StateError("this run was not made in share mode; run `pipeline run --mode share` to share it")
    if not (out / "deid" / run_id / "deid_report.json").is_file():
        raise StateError("this run has no de-identified copy; nothing can be shared")
    artifacts = entry.get("artifacts", {})
    rel = artifacts.get("share_ndjson_dir") or artifacts.get("ndjson_dir") or f"ndjson/{run_id}"
    ndjson_dir = _inside(out, rel)
    if not (ndjson_dir / "delta.json").is_file():
        raise StateError("this run has no share-mode NDJSON to bundle")
    top = f"share-{run_id[:12]}"
    members: list[tuple[str, Path]] = []
    for sub in NDJSON_DIRS:
        folder = ndjson_dir / sub if sub else ndjson_dir
        for path in streamfile.stream_files(folder):
            if path.is_file() and not path.is_symlink():
                # A reviewer gets the plain canonical files, however the run stores them.
                name = streamfile.file_name(streamfile.stream_name(path), compressed=False)
                members.append((f"{top}/ndjson/{sub + '/' if sub else ''}{name}", path))
    for name in NDJSON_FILES:
        if (ndjson_dir / name).is_file():
            members.append((f"{top}/ndjson/{name}", ndjson_dir / name))
    reports = out / "reports" / run_id
    if _share_report(reports):
        for path in sorted(reports.rglob("*")):
            if path.is_file() and not path.is_symlink():
                members.append((f"{top}/reports/{path.relative_to(reports).as_posix()}", path))
    return run_id, sorted(members)


def _inside(out: Path, rel: str) -> Path:
    candidate = (out / rel).resolve()
    if not candidate.is_relative_to(out.resolve()):
        raise StateError("the run registry points outside the output directory")
    return candidate


def _share_report(reports: Path) -> bool:
    """Reports are bundled only when they say they were built in share mode."""
    try:
        summary = json.loads((reports / "summary.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, NotADirectoryError):
        return False
    return isinstance(summary, dict) and summary.get("mode") == "share"


# --------------------------------------------------------------------------- leak scan


@dataclass(frozen=True)
class Finding:
    member: str
    kind: str


def _fold_table() -> bytes:
    table = bytearray(range(256))
    for i in range(128):
        c = chr(i)
        table[i] = ord(c.lower()) if c.isalnum() else 0x20
    return bytes(table)


# References that may stand for letters or digits (not the markup escapes &lt; &gt; ...).
_ENTITY = re.compile(rb"&(?:#|(?!(?:lt|gt|quot|apos|amp);)[A-Za-z][A-Za-z0-9]*;)")
# ASCII letters lower-cased, ASCII punctuation, `_` and space -> one separator, UTF-8 bytes
# of other characters kept: text becomes words that `bytes.split` finds at C speed.
_FOLD = _fold_table()
_APOSTROPHES = ("\u2019", "\u2018", "\u02bc", "\u00b4", "`")
# Combining marks (what decomposing an accented letter leaves next to it), matched at C speed.
_COMBINING = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]+")


def normalise_text(data: bytes) -> bytes:
    """Case, accents (composed or decomposed) and curly apostrophes do not matter."""
    if data.isascii():
        return data
    text = data.decode("utf-8", "replace")
    for apostrophe in _APOSTROPHES:
        if apostrophe in text:
            text = text.replace(apostrophe, " ")
    return _COMBINING.sub("", unicodedata.normalize("NFKD", text)).casefold().encode("utf-8", "replace")


def fold_words(data: bytes) -> list[bytes]:
    return normalise_text(data).translate(_FOLD).split()


def _short_form(words: list[bytes]) -> bool:
    """Initials (`J. D.`), two-letter names (`Li`, also the `<li>` of any page) and short
    numbers occur in any code or markup as free words: they count only where they make up
    a whole field."""
    return all(len(w) <= 2 for w in words) or (len(words) == 1 and words[0].isdigit() and len(words[0]) < 6)


# A whole JSON string or HTML element text: `"J. D."`, `>J.D.<`, `"1234"` (not a number in a
# list of numbers: a chart's series holds any short number). One pattern for all of them.
_FIELD = rb'["\'>]\s*(?:%s)\s*["\'<]'


class IdentifierScan:
    """Finds any known identifier of any person in the store, fast enough for GBs.

    Text is compared as sequences of words (case, accents and punctuation ignored, so
    "Doe, Jane" also matches "doe-jane" and "D’Angelo" matches "d'angelo" and "DAngelo"):
    a chunk becomes its set of words at C speed, a literal is a candidate only when all
    its words occur, and only candidates are looked for as a word sequence. Initials and
    short numbers count only as a whole field. Known phones are matched by their digits
    whatever the separators. Stricter than the de-identification scrub on purpose: a
    bundle is refused rather than risked.
    """

    def __init__(self, people: Sequence[PersonPII]) -> None:
        from healthdelta.deid import birth_date_forms, name_forms

        kinds: dict[bytes, str] = {}
        fields: dict[bytes, str] = {}

        def add(text: str, kind: str, minimum: int = 3) -> None:
            text = text.strip()
            if len(text) < minimum and not (kind == "name" and len(text) >= 2):
                return
            forms = {text, text.replace("'", "").replace("\u2019", "")}
            for form in forms:
                words = fold_words(form.encode("utf-8"))
                if not words:
                    continue
                if _short_form(words):
                    fields.setdefault(rb"[\s.]+".join(re.escape(w) for w in words) + rb"\.?", kind)
                else:
                    kinds.setdefault(b" ".join(words), kind)

        phones: set[str] = set()
        for p in people:
            for form in name_forms(p.names, p.extra_names):
                add(form, "name")
            for dob in p.birth_dates:
                for form in birth_date_forms(dob):
                    add(form, "birth_date", 6)
            for text in p.birth_texts:
                add(text, "birth_date", 6)
            for value in p.identifiers:
                if not re.fullmatch(r"\d+(?:\.\d+){3,}", value.strip()):
                    add(value, "identifier", 4)
            for t in p.telecom:
                value = str(t.get("value") or "")
                if "@" in value:
                    add(value, "email")
                elif len(digits := re.sub(r"\D", "", value)) >= 7:
                    phones.add(digits[-10:])  # the national number: a country code may be left out
                else:
                    add(value, "contact", 4)
            for a in p.addresses:
                for line in a.get("lines") or []:
                    add(str(line), "address", 4)
                for key in ("text", "city"):
                    if a.get(key):
                        add(str(a[key]), "address", 4)
        self._literals = [(seq, frozenset(seq.split()), kind) for seq, kind in sorted(kinds.items())]
        ordered = sorted(fields.items())
        self._field_kinds = [kind for _, kind in ordered]
        self._fields = re.compile(_FIELD % b"|".join(b"(%s)" % body for body, _ in ordered),
                                  re.IGNORECASE) if ordered else None
        # One pattern for every known phone, whatever the separators between its digits.
        self._phones = re.compile(rb"(?<![0-9])(?:" + b"|".join(
            rb"[\s.()-]*".join(re.escape(d.encode()) for d in number) for number in sorted(phones))
            + rb")(?![0-9])") if phones else None

    def find(self, text: str | bytes) -> str | None:
        """The kind of the first known identifier in `text`, or None."""
        data = text.encode("utf-8", "replace") if isinstance(text, str) else text
        hit = self._find(data)
        if hit is None and (_ENTITY.search(data) or b"\\u" in data):
            hit = self._find(_decoded(data.decode("utf-8", "replace")).encode("utf-8", "replace"))
        if hit is None and b'"data":"' in data:  # base64 attachments: what a reader decodes
            for m in _BASE64_VALUE.finditer(data):
                try:
                    decoded = base64.b64decode(m.group(1), validate=True)
                except (binascii.Error, ValueError):
                    continue
                if (hit := self.find(decoded)) is not None:
                    break
        return hit

    def _find(self, data: bytes) -> str | None:
        normal = normalise_text(data)
        parts = normal.translate(_FOLD).split()
        words = set(parts)
        joined = None
        for seq, needed, kind in self._literals:
            if needed <= words:
                if len(needed) == 1 and b" " not in seq:
                    return kind
                if joined is None:
                    joined = b" " + b" ".join(parts) + b" "
                if b" " + seq + b" " in joined:
                    return kind
        if self._fields is not None and (m := self._fields.search(normal)) is not None:
            return self._field_kinds[m.lastindex - 1]
        if self._phones is not None and self._phones.search(data):
            return "phone"
        return None

    def scan_file(self, path: Path) -> tuple[str | None, str, int]:
        """(kind of the first hit or None, sha256, size): one read of the file. The vendor
        scripts of a report are checked by hash, not scanned (see `without_vendor_code`)."""
        if path.suffix == ".html":
            data = path.read_bytes()
            return self.find(without_vendor_code(data)), hashlib.sha256(data).hexdigest(), len(data)
        digest = hashlib.sha256()
        size = 0
        carry = b""
        hit = None
        with streamfile.open_read(path) as fh:  # plain bytes: what the bundle will hold
            while block := fh.read(BLOCK):
                digest.update(block)
                size += len(block)
                if hit is None:
                    data = carry + block
                    hit = self.find(data)
                    carry = data[-_OVERLAP:]
        return hit, digest.hexdigest(), size


_SCRIPT = re.compile(rb"(<script[^>]*>)(.*?)(</script>)", re.DOTALL | re.IGNORECASE)


def vendor_script_hashes() -> frozenset[str]:
    """sha256 of the vendor code a report may inline: the plotly.js the installed plotly
    package ships (the report inlines exactly that copy)."""
    from healthdelta.charts import plotly_js

    return frozenset({hashlib.sha256(plotly_js().encode("utf-8")).hexdigest()})


def without_vendor_code(html_bytes: bytes) -> bytes:
    """The report with every inline script whose bytes are a known vendor copy removed:
    minified code holds every pair of letters, and it is not the person's data. Any
    other script (the figures' data) stays and is scanned."""
    pinned = vendor_script_hashes()

    def strip(m: re.Match[bytes]) -> bytes:
        return m.group(1) + m.group(3) if hashlib.sha256(m.group(2)).hexdigest() in pinned else m.group(0)

    return _SCRIPT.sub(strip, html_bytes)


_BASE64_VALUE = re.compile(rb'"data":"([A-Za-z0-9+/]{8,}={0,2})"')
_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def _decoded(text: str) -> str:
    """What a reader sees: HTML entities and JSON `\\uXXXX` escapes resolved."""
    if "&" in text:
        text = html.unescape(text)
    if "\\u" in text:
        text = _JSON_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
    return text


# --------------------------------------------------------------------------- build


def build_bundle(out: Path, run_id: str, dest_tar_gz: Path, identity_dir: Path,
                 state: Path | None = None) -> BundleResult:
    """Scan, then write `dest_tar_gz` atomically; LeakError (nothing written) on any hit."""
    state = state if state is not None else identity_dir.parent
    run_id, members = collect_members(out, run_id, state)
    if not members:
        raise StateError("this run has no share-safe artifacts to bundle")
    try:
        people = load_people_pii(identity_dir)
    except StateError:
        raise StateError("the identity store is missing; a bundle cannot be checked without it") from None
    scan = IdentifierScan(people)
    entries = []
    stored_sizes = []
    for arcname, path in members:
        stored_sizes.append(path.stat().st_size)
        hit, sha, size = scan.scan_file(path)
        if hit is not None:
            rel = arcname.split("/", 1)[1]
            raise LeakError(f"the bundle would contain a known identifier ({hit}) in {rel}; nothing was written")
        entries.append({"path": arcname, "size": size, "sha256": sha})
    top = members[0][0].split("/", 1)[0]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "mode": "share",
        "files": entries,
    }
    manifest_bytes = (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode("utf-8")
    dest_tar_gz.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest_tar_gz.with_name(f".tmp-{dest_tar_gz.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    tar.addfile(_info(f"{top}/manifest.json", len(manifest_bytes)), io.BytesIO(manifest_bytes))
                    for (arcname, path), entry, stored in zip(members, entries, stored_sizes):
                        if path.stat().st_size != stored:
                            raise StateError("an artifact changed while the bundle was written")
                        with streamfile.open_read(path) as fh:
                            tar.addfile(_info(arcname, entry["size"]), fh)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, dest_tar_gz)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    digest = hashlib.sha256()
    with open(dest_tar_gz, "rb") as fh:
        while block := fh.read(BLOCK):
            digest.update(block)
    return BundleResult(dest_tar_gz, run_id, len(members) + 1, dest_tar_gz.stat().st_size, digest.hexdigest())


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


# --------------------------------------------------------------------------- verify


def _printable(name: str) -> str:
    return "".join(ch if ch.isprintable() and ch != " " else "?" for ch in name)[:200]


def _path_problem(name: str) -> str | None:
    if not name or name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        return "absolute_path"
    if ".." in PurePosixPath(name).parts:
        return "parent_path"
    return None


def verify_bundle(path: Path) -> list[str]:
    """Every problem as one `ERROR <code> <member>` line; an empty list means the bundle is sound."""
    problems: list[str] = []
    seen: dict[str, tuple[int, str]] = {}
    manifest_doc: Any = None
    manifest_name: str | None = None
    first = True
    try:
        with tarfile.open(path, mode="r|gz") as tar:
            for member in tar:
                name = member.name
                shown = _printable(name)
                problem = _path_problem(name)
                if problem:
                    problems.append(f"ERROR {problem} {shown}")
                if not member.isreg():
                    kind = "link" if (member.issym() or member.islnk()) else "not_a_file"
                    problems.append(f"ERROR {kind} {shown}")
                    first = False
                    continue
                if name in seen:
                    problems.append(f"ERROR duplicate_member {shown}")
                fh = tar.extractfile(member)
                digest = hashlib.sha256()
                size = 0
                data = b""
                is_manifest = first and name.endswith("/manifest.json") and name.count("/") == 1
                while fh is not None and (block := fh.read(BLOCK)):
                    digest.update(block)
                    size += len(block)
                    if is_manifest and len(data) < (64 << 20):
                        data += block
                if is_manifest:
                    manifest_name = name
                    try:
                        manifest_doc = json.loads(data.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        problems.append(f"ERROR manifest_unreadable {shown}")
                else:
                    seen[name] = (size, digest.hexdigest())
                first = False
    except FileNotFoundError:
        raise InputError("bundle not found") from None
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile):
        return problems + ["ERROR unreadable the file is not a complete .tar.gz bundle"]
    if manifest_name is None:
        return problems + ["ERROR missing_manifest manifest.json must be the first member"]
    files = manifest_doc.get("files") if isinstance(manifest_doc, dict) else None
    if not isinstance(files, list):
        return problems + ["ERROR manifest_unreadable the manifest has no file list"]
    top = manifest_name.split("/", 1)[0]
    listed: set[str] = set()
    for entry in files:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            problems.append("ERROR manifest_unreadable a manifest entry is malformed")
            continue
        name = entry["path"]
        listed.add(name)
        shown = _printable(name)
        if not name.startswith(top + "/") or _path_problem(name):
            problems.append(f"ERROR manifest_path {shown}")
        found = seen.get(name)
        if found is None:
            problems.append(f"ERROR missing_member {shown}")
            continue
        if found[0] != entry.get("size"):
            problems.append(f"ERROR size_mismatch {shown}")
        if found[1] != entry.get("sha256"):
            problems.append(f"ERROR hash_mismatch {shown}")
    for name in sorted(set(seen) - listed):
        problems.append(f"ERROR unlisted_member {_printable(name)}")
    return problems


def iter_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular member; for tests and tools (small bundles)."""
    with tarfile.open(path, mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.isreg():
                fh = tar.extractfile(member)
                yield member.name, fh.read() if fh else b""
