"""`healthdelta doctor`: is an output tree consistent, and removing what crashes left behind.

Checks (docs/runbook_doctor.md): the registry and LAST_RUN parse and agree; every
registered run's staged files are as its manifest lists them (sizes and sha256), in its
plain `source/` or decompressed from `staging/store/`; every artifact the registry lists exists (an NDJSON dir complete with its
delta.json); no `.tmp-*` leftovers and no unregistered run dirs under staging/,
ndjson/, deid/, reports/; the identity store parses; the warehouse's runs match the
registry (when `duckdb` is importable).

Every finding names a path relative to `<out>` (the state dir as `state/...`) or a
12-character run id prefix: never an absolute path, a name or a data value, so the
output can be pasted into a bug report. The library returns findings; the CLI prints.

`repair` deletes orphans only: `.tmp-*` leftovers, unregistered run directories and store
blobs no unpruned run lists.
Registered data is never touched, and neither is an unregistered but complete staged
run (what `healthdelta ingest` leaves for `run register`): it is reported as a warning.
Everything runs under the state lock, so a live command's work dirs are never taken
for orphans.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from healthdelta import identity, ingest, prune, registry, stagestore
from healthdelta.errors import HealthDeltaError, StateError
from healthdelta.fsutil import BLOCK, TMP_PREFIX, StateLock, tmp_owner_alive
from healthdelta.layout import OutLayout
from healthdelta.progress import ProgressFn, no_progress

Level = Literal["ok", "error", "warn", "skip"]
_LABEL = {"ok": "ok", "error": "ERROR", "warn": "WARN", "skip": "SKIP"}
_RUN_ID = re.compile(r"[0-9a-f]{64}")
PREFIX = 12  # as `run list` shows run ids
RUN_DIR_PARENTS = ("staging", "ndjson", "deid", "reports")


@dataclass(frozen=True)
class Finding:
    level: Level
    code: str
    subject: str  # relative to <out> ("state/..." for the state dir) or a run id prefix
    detail: str = ""
    # An orphan `repair` may delete, and where it is (internal: never printed).
    removable: bool = field(default=False, compare=False)
    path: Path | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        text = f"{_LABEL[self.level]} {self.code} {self.subject}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(frozen=True)
class DoctorResult:
    findings: tuple[Finding, ...]
    removed: tuple[str, ...] = ()  # subjects deleted by repair

    @property
    def errors(self) -> int:
        return sum(1 for f in self.findings if f.level == "error")

    @property
    def ok(self) -> bool:
        return self.errors == 0


def run_doctor(layout: OutLayout, *, repair: bool = False, lock_timeout: float = 0.0,
               progress: ProgressFn = no_progress) -> DoctorResult:
    """Check (and with `repair`, clean) the output tree under the state lock."""
    if not layout.out.is_dir() and not layout.state.is_dir():
        raise StateError("there is no HealthDelta output there (no such directory)")
    with ExitStack() as stack:
        if layout.state.is_dir():  # no state dir: no command has ever run on it, nothing to lock
            try:
                stack.enter_context(StateLock(layout.state, lock_timeout))
            except OSError as exc:
                # A read-only tree (a mounted backup, say) cannot take the lock, and cannot
                # be changed by anyone either: checking it unlocked is safe; repairing is not.
                if repair or exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
        result = check(layout, progress=progress)
        if not repair:
            return result
        removed = remove_orphans(layout, result.findings)
        if not removed:
            return result
        return DoctorResult(findings=check(layout, progress=progress).findings, removed=removed)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- checks


def check(layout: OutLayout, *, progress: ProgressFn = no_progress) -> DoctorResult:
    """All checks, read-only. The caller holds the state lock (or the tree is read-only)."""
    out: list[Finding] = []
    if not layout.state.is_dir():
        out.append(Finding("error", "state_missing", _state_rel(layout, layout.state)))
    reg = _check_registry(layout, out)
    if reg is not None:
        _check_last_run(layout, reg, out)
        _check_runs(layout, reg, out, progress)
    _check_orphans(layout, reg, out)
    _check_identity(layout, reg, out)
    _check_warehouse(layout, reg, out)
    return DoctorResult(findings=tuple(out))


def _state_rel(layout: OutLayout, path: Path) -> str:
    """`state/...` for paths in the state dir, wherever --state put it."""
    return "state" + ("/" + path.relative_to(layout.state).as_posix() if path != layout.state else "")


def _p(run_id: str) -> str:
    return run_id[:PREFIX]


def _check_registry(layout: OutLayout, out: list[Finding]) -> registry.Registry | None:
    subject = _state_rel(layout, layout.runs_json)
    try:
        reg = registry.read_registry(layout.state)
    except StateError:
        out.append(Finding("error", "registry_damaged", subject))
        return None
    except OSError:
        out.append(Finding("error", "registry_unreadable", subject))
        return None
    bad = False
    for run_id, entry in sorted(reg.runs.items()):
        if not registry.is_run_id(run_id):
            out.append(Finding("error", "registry_bad_run_id", subject, "an entry whose id is not a run id"))
            bad = True
            continue
        fp = entry.get("input_fingerprint")
        if not isinstance(fp, dict) or not isinstance(fp.get("sha256"), str):
            out.append(Finding("error", "registry_entry_damaged", _p(run_id), "no input fingerprint"))
            bad = True
        parent = entry.get("parent_run_id")
        if parent is not None and parent not in reg.runs:
            out.append(Finding("error", "parent_unregistered", _p(run_id), "its parent run is not registered"))
            bad = True
        if not isinstance(entry.get("artifacts", {}), dict):
            out.append(Finding("error", "registry_entry_damaged", _p(run_id), "artifacts is not an object"))
            bad = True
    if not bad:
        out.append(Finding("ok", "registry", subject, f"{len(reg.runs)} run(s)"))
    return reg


def _check_last_run(layout: OutLayout, reg: registry.Registry, out: list[Finding]) -> None:
    subject = _state_rel(layout, layout.last_run)
    try:
        last = registry.read_last_run(layout.state)
    except StateError:
        out.append(Finding("error", "last_run_damaged", subject))
        return
    if last is None:
        if reg.runs:
            out.append(Finding("error", "last_run_missing", subject, "runs are registered but LAST_RUN is absent"))
        return
    if last not in reg.runs:
        out.append(Finding("error", "last_run_unregistered", subject, f"names {_p(last)}"))
        return
    out.append(Finding("ok", "last_run", _p(last)))


def _safe_rel(rel: Any) -> str | None:
    """A stored artifact path, if it is relative and stays inside <out>."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return None
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        return None
    return pure.as_posix()


def _check_runs(layout: OutLayout, reg: registry.Registry, out: list[Finding], progress: ProgressFn) -> None:
    plans = []
    total = 0
    for entry in reg.ordered():
        run_id = entry["run_id"]
        if not registry.is_run_id(run_id):
            continue
        artifacts = entry.get("artifacts") if isinstance(entry.get("artifacts"), dict) else {}
        rel = _safe_rel(artifacts.get("staging_dir", f"staging/{run_id}"))
        if rel is None:
            out.append(Finding("error", "artifact_path_invalid", _p(run_id), "staging_dir"))
            continue
        staging_dir = layout.out / rel
        if not staging_dir.is_dir():
            out.append(Finding("error", "staging_missing", f"staging/{_p(run_id)}"))
            continue
        try:
            manifest = ingest.read_manifest(staging_dir)
        except HealthDeltaError:
            out.append(Finding("error", "manifest_damaged", f"{rel}/manifest.json"))
            continue
        files = manifest.get("files")
        if manifest["run_id"] != run_id or not isinstance(files, list):
            out.append(Finding("error", "manifest_mismatch", f"{rel}/manifest.json", "not this run's manifest"))
            continue
        if manifest["input_fingerprint"] != entry.get("input_fingerprint"):
            out.append(Finding("error", "fingerprint_mismatch", _p(run_id),
                               "the registry and the manifest disagree on the input fingerprint"))
        plans.append((entry, artifacts, rel, staging_dir, files))
        total += sum(f.get("size", 0) for f in files if isinstance(f, dict) and isinstance(f.get("size"), int))
    checked: dict[str, str | None] = {}  # a blob that runs share is verified once
    for entry, artifacts, rel, staging_dir, files in plans:
        run_id = entry["run_id"]
        errors_before = _count_errors(out)
        # `run prune` removed a pruned run's staged export and de-identified copy on purpose.
        pruned = bool(entry.get("pruned"))
        verified = 0 if pruned else _verify_staged_files(layout, staging_dir, rel, files, out, progress, total,
                                                         checked)
        if not (staging_dir / "layout.json").is_file():
            out.append(Finding("error", "layout_missing", f"{rel}/layout.json"))
        for name, art in sorted(artifacts.items()):
            if name == "staging_dir" or (pruned and name == "deid_dir"):
                continue
            art_rel = _safe_rel(art)
            if art_rel is None:
                out.append(Finding("error", "artifact_path_invalid", _p(run_id), name))
            elif not (layout.out / art_rel).exists():
                out.append(Finding("error", "artifact_missing", art_rel, name))
            elif name == "ndjson_dir" and not (layout.out / art_rel / "delta.json").is_file():
                out.append(Finding("error", "ndjson_incomplete", art_rel, "no delta.json"))
        if _count_errors(out) == errors_before:
            detail = "pruned: staged copy removed" if pruned else f"{verified} staged file(s) verified"
            out.append(Finding("ok", "run", _p(run_id), detail))


def _count_errors(out: list[Finding]) -> int:
    return sum(1 for f in out if f.level == "error")


def _verify_staged_files(layout: OutLayout, staging_dir: Path, rel: str, files: list, out: list[Finding],
                         progress: ProgressFn, total: int, checked: dict[str, str | None]) -> int:
    listed: set[str] = set()
    verified = 0
    stored = stagestore.is_stored(staging_dir)
    store = stagestore.store_of(layout.staging)
    for f in files:
        path = _safe_rel(f.get("path")) if isinstance(f, dict) else None
        if path is None or not isinstance(f.get("size"), int) or not isinstance(f.get("sha256"), str):
            out.append(Finding("error", "manifest_damaged", f"{rel}/manifest.json", "a file entry is damaged"))
            continue
        listed.add(path)
        target = staging_dir / path
        subject = f"{rel[:len('staging/') + PREFIX]}/{path}"
        if stored:
            if f["sha256"] not in checked:
                checked[f["sha256"]] = stagestore.verify_blob(store, f["size"], f["sha256"], progress, total)
            else:
                progress("verifying", f["size"], total)
            problem = checked[f["sha256"]]
            if problem is not None:
                out.append(Finding("error", f"blob_{problem}", subject, "its blob in staging/store"))
            else:
                verified += 1
            continue
        if target.is_symlink() or not target.is_file():
            out.append(Finding("error", "file_missing", subject))
            continue
        size = target.stat().st_size
        if size != f["size"]:
            out.append(Finding("error", "file_size_mismatch", subject))
            progress("verifying", f["size"], total)
            continue
        digest = hashlib.sha256()
        with open(target, "rb") as fh:
            while block := fh.read(BLOCK):
                digest.update(block)
                progress("verifying", len(block), total)
        if digest.hexdigest() != f["sha256"]:
            out.append(Finding("error", "file_hash_mismatch", subject))
            continue
        verified += 1
    source = staging_dir / ingest.SOURCE_DIR
    if source.is_dir():
        for p in sorted(source.rglob("*")):
            if (p.is_file() or p.is_symlink()) and p.relative_to(staging_dir).as_posix() not in listed:
                out.append(Finding("error", "unexpected_file", f"{rel[:len('staging/') + PREFIX]}/"
                                   f"{p.relative_to(staging_dir).as_posix()}", "not in the manifest"))
    return verified


def _check_orphans(layout: OutLayout, reg: registry.Registry | None, out: list[Finding]) -> None:
    found = False
    # Without a registry file nothing can be called unregistered (a wrong --state must
    # never make every run look like an orphan).
    registered = set(reg.runs) if reg is not None and layout.runs_json.is_file() else None
    scan: list[tuple[Path, str]] = [(layout.out / name, name) for name in RUN_DIR_PARENTS]
    scan += [(layout.out, ""), (layout.state, _state_rel(layout, layout.state)),
             (layout.identity, _state_rel(layout, layout.identity))]
    for parent, label in scan:
        if not parent.is_dir():
            continue
        is_run_parent = parent.parent == layout.out and parent.name in RUN_DIR_PARENTS
        for child in sorted(parent.iterdir(), key=lambda p: p.name):
            name = child.name
            where = f"{label}/{name}" if label else name
            if name.startswith(TMP_PREFIX):
                found = True
                if tmp_owner_alive(name):
                    # e.g. a warehouse build that does not take the state lock
                    out.append(Finding("warn", "tmp_in_use", where, "its process is still running"))
                else:
                    out.append(Finding("error", "orphan_tmp", where, "left by an interrupted command",
                                       removable=True, path=child))
            elif label == "staging" and name == stagestore.STORE_DIR:
                found |= _check_store(layout, reg, out)
            elif is_run_parent and registered is not None and name not in registered:
                found = True
                if not _RUN_ID.fullmatch(name):
                    # Not ours; its name is not shown (a folder name may hold a person's name).
                    out.append(Finding("error", "unexpected_entry", f"{label}/?", "not a run directory"))
                elif label == "staging" and _complete_staged_run(child):
                    out.append(Finding("warn", "unregistered_staged_run", f"{label}/{_p(name)}",
                                       "complete but not registered (left by `ingest` or an interrupted run): "
                                       "rerun the export, `healthdelta run register` it, or delete it"))
                else:
                    out.append(Finding("error", "unregistered_run_dir", f"{label}/{_p(name)}",
                                       "not in the registry", removable=True, path=child))
    if not found:
        out.append(Finding("ok", "orphans", "none"))


def _check_store(layout: OutLayout, reg: registry.Registry | None, out: list[Finding]) -> bool:
    """Leftovers in `staging/store/`: blob temporaries, and blobs no unpruned run lists
    (a pruned run's, a crashed run's). Those are only a warning: nothing is broken and
    `run prune` or `--repair` reclaims them; none is named when a manifest is unreadable."""
    found = False
    for d in stagestore.blob_dirs(layout.staging):
        for child in sorted(d.iterdir()):
            if child.name.startswith(TMP_PREFIX):
                found = True
                where = layout.rel(child)
                if tmp_owner_alive(child.name):
                    out.append(Finding("warn", "tmp_in_use", where, "its process is still running"))
                else:
                    out.append(Finding("error", "orphan_tmp", where, "left by an interrupted command",
                                       removable=True, path=child))
    for blob in _unreferenced_blobs(layout, reg):
        found = True
        out.append(Finding("warn", "unreferenced_blob", layout.rel(blob),
                           "no unpruned run lists it: `run prune` or `doctor --repair` removes it",
                           removable=True, path=blob))
    return found


def _unreferenced_blobs(layout: OutLayout, reg: registry.Registry | None) -> list[Path]:
    if reg is None or not layout.runs_json.is_file():
        return []
    return prune.unreferenced_blobs(layout, [rid for rid, e in reg.runs.items() if not e.get("pruned")])


def _complete_staged_run(run_dir: Path) -> bool:
    """A staged run as `ingest` leaves it: a manifest of this run, every file as listed."""
    if run_dir.is_symlink() or not run_dir.is_dir():
        return False
    try:
        manifest = ingest.read_manifest(run_dir)
    except HealthDeltaError:
        return False
    if manifest["run_id"] != run_dir.name or not (run_dir / "layout.json").is_file():
        return False
    files = manifest.get("files")
    if not isinstance(files, list):
        return False
    for f in files:
        path = _safe_rel(f.get("path")) if isinstance(f, dict) else None
        if path is None or not (run_dir / path).is_file() or (run_dir / path).stat().st_size != f.get("size"):
            return False
    return True


def _check_identity(layout: OutLayout, reg: registry.Registry | None, out: list[Finding]) -> None:
    subject = _state_rel(layout, layout.identity)
    if not layout.identity.is_dir():
        out.append(Finding("skip", "identity", subject, "not built yet"))
        return
    try:
        store = identity.Store.open(layout.identity)
    except StateError:
        out.append(Finding("error", "identity_damaged", subject))
        return
    except OSError:
        out.append(Finding("error", "identity_unreadable", subject))
        return
    owners = store.data.get("owners", {}).get("runs", {})
    if not isinstance(owners, dict):
        out.append(Finding("error", "identity_damaged", subject, "owners"))
        return
    stray = sorted(r for r in owners if reg is not None and r not in reg.runs)
    for run_id in stray:
        # `identity build --run DIR` may resolve a run never registered; a failed
        # `pipeline run` leaves one too. Worth knowing, not an error.
        out.append(Finding("warn", "identity_unregistered_run", _p(run_id) if isinstance(run_id, str) else "?",
                           "the identity store holds the owner of a run that is not registered"))
    out.append(Finding("ok", "identity", subject, f"{len(store.people)} person(s)"))


def _check_warehouse(layout: OutLayout, reg: registry.Registry | None, out: list[Finding]) -> None:
    db = layout.warehouse
    subject = db.name
    if not db.exists():
        return
    try:
        import duckdb
    except ImportError:
        out.append(Finding("skip", "warehouse", subject, "duckdb is not installed; warehouse not checked"))
        return
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error as exc:
        busy = "lock" in str(exc).lower()
        out.append(Finding("error", "warehouse_busy" if busy else "warehouse_unreadable", subject))
        return
    try:
        try:
            loaded = {row[0] for row in con.execute("SELECT run_id FROM runs").fetchall()}
        except duckdb.Error:
            out.append(Finding("error", "warehouse_damaged", subject, "no runs table"))
            return
    finally:
        con.close()
    if reg is None:
        out.append(Finding("skip", "warehouse", subject, "registry damaged; runs not compared"))
        return
    bad = False
    for run_id in sorted(r for r in loaded if r not in reg.runs):
        out.append(Finding("error", "warehouse_run_unregistered", _p(str(run_id))))
        bad = True
    for entry in reg.ordered():
        artifacts = entry.get("artifacts") if isinstance(entry.get("artifacts"), dict) else {}
        if "ndjson_dir" in artifacts and entry["run_id"] not in loaded:
            out.append(Finding("error", "warehouse_run_missing", _p(entry["run_id"]),
                               "registered with NDJSON but not loaded"))
            bad = True
    if not bad:
        out.append(Finding("ok", "warehouse", subject, f"{len(loaded)} run(s)"))


# --------------------------------------------------------------------------- repair


def remove_orphans(layout: OutLayout, findings: tuple[Finding, ...]) -> tuple[str, ...]:
    """Delete the removable findings (caller holds the lock); returns their subjects.

    Each path is checked again right before deletion: it must sit directly in one of
    the directories scanned, and be a `.tmp-*` entry or a run id the registry lacks.
    """
    try:
        reg = registry.read_registry(layout.state) if layout.runs_json.is_file() else None
    except StateError:
        reg = None  # damaged: nothing can be called unregistered, `.tmp-*` only
    allowed_parents = {layout.out, layout.state, layout.identity} | {layout.out / n for n in RUN_DIR_PARENTS}
    allowed_parents |= set(stagestore.blob_dirs(layout.staging))
    garbage = set(_unreferenced_blobs(layout, reg))
    removed: list[str] = []
    for f in findings:
        if not f.removable or f.path is None:
            continue
        path = f.path
        if path.parent not in allowed_parents:
            continue
        if not ((path.name.startswith(TMP_PREFIX) and not tmp_owner_alive(path.name)) or path in garbage
                or (reg is not None and path.parent.name in RUN_DIR_PARENTS and _RUN_ID.fullmatch(path.name)
                    and reg.get(path.name) is None)):
            continue
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
        removed.append(f.subject)
    for parent in allowed_parents:
        if parent.is_dir():
            _fsync_dir(parent)
    return tuple(removed)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def as_json(result: DoctorResult) -> str:
    """Machine-readable findings (same content as the lines)."""
    return json.dumps({"errors": result.errors, "removed": list(result.removed),
                       "findings": [{"level": f.level, "code": f.code, "subject": f.subject, "detail": f.detail}
                                    for f in result.findings]}, indent=2, sort_keys=True)
