"""Orchestration of `pipeline run`: fingerprint → no-op check → stage → identity →
de-id → rename into place → run report → register → LAST_RUN.

A run is registered only after all its stages succeeded (CONTRACT §4). Every
stage writes into a temporary directory that is renamed into place on success;
the registry and LAST_RUN move last. A crash at any point therefore leaves the
registry, LAST_RUN and earlier runs untouched; the next invocation removes the
leftovers (it holds the state lock, so nobody else owns them).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from healthdelta import deid, export, identity, ingest, registry
from healthdelta.errors import InputError, UsageError
from healthdelta.fingerprint import Fingerprint, run_id as compute_run_id
from healthdelta.fsutil import StateLock, WorkDir, atomic_write_json, fsync_dir, remove_orphan_tmp_dirs
from healthdelta.inputs import ExportInput, detect_input
from healthdelta.layout import OutLayout
from healthdelta.progress import ProgressFn, no_progress

Mode = Literal["local", "share"]
REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PipelineOptions:
    input: Path
    layout: OutLayout
    mode: Mode = "local"
    since: str = "last"
    expected_run_id: str | None = None
    skip_deid: bool = False
    note: str | None = None
    lock_timeout: float = 0.0
    date_shift: bool = False
    keep_routes: Literal["drop", "coarse"] = "drop"


@dataclass(frozen=True)
class PipelineResult:
    status: Literal["created", "no_changes", "already_registered"]
    run_id: str
    staging_dir: str | None = None
    run_report: str | None = None
    deid_dir: str | None = None
    ndjson_dir: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    cleaned: tuple[str, ...] = field(default_factory=tuple)
    identity_provisional_reason: str | None = None  # a reason code, never a name


# Stages that run after the NDJSON stage and before registration (`run all`'s warehouse
# and reports): (run_id, parent_run_id, artifacts, stages, identity_dir) -> None,
# filling in artifacts and stages.
LaterStages = Callable[[str, "str | None", dict, dict, Path], None]


class IdentityWork(WorkDir):
    """A work copy of `<state>/identity/` for one run.

    `commit` moves each changed file into the real store by rename (modes such as the
    secret's 0600 travel with the file); leaving without commit drops the copy.
    """

    def __init__(self, layout: OutLayout) -> None:
        super().__init__(layout.state, "identity")
        self.final = layout.identity

    def __enter__(self) -> "IdentityWork":
        super().__enter__()
        os.chmod(self.path, 0o700)  # holds PII, like the store itself
        if self.final.is_dir():
            shutil.copytree(self.final, self.path, dirs_exist_ok=True, copy_function=shutil.copy2)
        return self

    def commit(self) -> None:  # type: ignore[override]
        self.final.mkdir(mode=0o700, parents=True, exist_ok=True)
        for src in sorted(self.path.iterdir()):
            if not src.is_file():
                continue
            dst = self.final / src.name
            if dst.is_file() and dst.read_bytes() == src.read_bytes():
                continue
            os.replace(src, dst)
        fsync_dir(self.final)


def run_pipeline(opts: PipelineOptions, progress: ProgressFn = no_progress,
                 later: LaterStages | None = None) -> PipelineResult:
    """Run the pipeline for one export under the state lock."""
    if opts.expected_run_id is not None and not registry.is_run_id(opts.expected_run_id):
        raise UsageError("--run-id must be 64 lowercase hex characters")
    with StateLock(opts.layout.state, opts.lock_timeout):
        return _run_locked(opts, progress, later)


def clean_orphans(layout: OutLayout) -> tuple[str, ...]:
    """Remove temporary dirs left by interrupted commands (caller holds the lock)."""
    removed: list[str] = []
    for parent in (layout.out, layout.staging, layout.ndjson, layout.deid, layout.reports, layout.state):
        removed += [f"{parent.name}/{name}" for name in remove_orphan_tmp_dirs(parent)]
    return tuple(removed)


def _run_locked(opts: PipelineOptions, progress: ProgressFn, later: LaterStages | None) -> PipelineResult:
    layout = opts.layout
    cleaned = clean_orphans(layout)
    inp = detect_input(opts.input)
    reg = registry.read_registry(layout.state)
    parent = registry.resolve_parent(reg, layout.state, opts.since)
    parent_id = parent["run_id"] if parent else None
    parent_mode = (parent or {}).get("mode") or "local"
    if parent is not None and parent_mode != opts.mode:
        # Keys of share-mode rows hash de-identified content: a delta across modes is
        # meaningless, and one warehouse must never mix identified and shared rows.
        raise UsageError(f"the parent run was made in {parent_mode} mode; "
                         f"use a separate --out for {opts.mode} mode")

    fingerprint = _prepass_fingerprint(inp, parent, opts.expected_run_id is not None, progress)
    if fingerprint is not None:
        if registry.is_unchanged(parent, fingerprint):
            if registry.read_last_run(layout.state) is None:
                registry.write_last_run(layout.state, parent_id)
            return PipelineResult(status="no_changes", run_id=parent_id, cleaned=cleaned)
        run_id = compute_run_id(parent_id, fingerprint.sha256)
        _check_expected(opts, run_id)
        if reg.get(run_id) is not None:
            return _already_registered(layout, run_id, cleaned)

    ingest.check_free_space(inp, layout.staging)
    with WorkDir(layout.staging, "ingest") as work:
        staged = ingest.stage_export(inp, work.path, expected=fingerprint, progress=progress)
        if fingerprint is None and registry.is_unchanged(parent, staged.fingerprint):
            return PipelineResult(status="no_changes", run_id=parent_id, cleaned=cleaned)
        run_id = compute_run_id(parent_id, staged.fingerprint.sha256)
        _check_expected(opts, run_id)
        if reg.get(run_id) is not None:
            return _already_registered(layout, run_id, cleaned)
        ingest.write_manifest(work.path, staged, inp, run_id=run_id, parent_run_id=parent_id)
        stages = {
            "ingest": {
                "status": "ok",
                "files": len(staged.files),
                "bytes": staged.total_bytes,
                "ignored_files": staged.ignored_files,
            },
        }
        # The staged copy and the identity store stay work copies until registration:
        # a run that fails or is killed leaves neither behind (CONTRACT §4).
        with IdentityWork(layout) as identity_work:
            return _after_staging(opts, progress, later, layout, inp, staged, stages, work, run_id,
                                  parent_id, cleaned, identity_work)


def _after_staging(opts, progress, later, layout, inp, staged, stages, staging_work: WorkDir, run_id, parent_id,
                   cleaned, identity_work: "IdentityWork") -> PipelineResult:
    staging_dir = staging_work.path
    identity_dir = identity_work.path
    # CONTRACT §8: the owner of the HealthKit data; provisional (per run) when unsafe to say.
    ident = identity.resolve_run(identity_dir, staging_dir, run_id, progress)
    stages["identity"] = ident.as_report()
    person_id, ndjson_source, deid_dir = ident.owner_person_id, staging_dir, None
    if opts.mode == "share" and not opts.skip_deid:
        # CONTRACT §9: share-mode NDJSON is exported from the de-identified copy only.
        with WorkDir(layout.deid, run_id) as work:
            deidentified = deid.deidentify_run(staging_dir, work.path, identity_dir,
                                               date_shift=opts.date_shift, keep_routes=opts.keep_routes,
                                               progress=progress)
            deid_dir = work.commit(layout.deid / run_id)
        stages["deid"] = deidentified.as_report()
        person_id, ndjson_source = deidentified.share_person_id, deid_dir
    else:
        stages["deid"] = {"status": "skipped" if opts.skip_deid else "not_requested"}

    exported = export.export_run(
        ndjson_source, layout.ndjson, run_id=run_id, parent_run_id=parent_id,
        person_id=person_id, progress=progress,
    )
    stages["ndjson"] = {
        "status": "ok",
        "delta_parent_run_id": exported.parent_run_id,
        "counts": exported.counts,
        "added": sum(d["added"] for d in exported.delta.values()),
        "removed": sum(d["removed"] for d in exported.delta.values()),
        "parse": exported.report,
    }
    final_staging = layout.staging_dir(run_id)
    artifacts = {
        "staging_dir": layout.rel(final_staging),
        "run_report": layout.rel(final_staging / "run_report.json"),
        "ndjson_dir": layout.rel(layout.ndjson / run_id),
    }
    if deid_dir is not None:
        artifacts["deid_dir"] = layout.rel(deid_dir)
    if later is not None:
        later(run_id, parent_id, artifacts, stages, identity_dir)
    staging_dir = staging_work.commit(final_staging)
    report_path = staging_dir / "run_report.json"
    atomic_write_json(report_path, {
        "schema_version": REPORT_SCHEMA_VERSION,
        "run_id": run_id,
        "parent_run_id": parent_id,
        "mode": opts.mode,
        "input": {"form": inp.form, "path_redacted": True, **staged.fingerprint.as_dict()},
        "stages": stages,
        "finished_at": registry.utc_now(),
    })
    identity_work.commit()
    registry.register_run(
        layout.state,
        run_id=run_id,
        parent_run_id=parent_id,
        fingerprint=staged.fingerprint.as_dict(),
        artifacts=artifacts,
        note=opts.note,
        mode=opts.mode,
    )
    return PipelineResult(
        status="created",
        run_id=run_id,
        staging_dir=artifacts["staging_dir"],
        run_report=artifacts["run_report"],
        ndjson_dir=artifacts["ndjson_dir"],
        deid_dir=artifacts.get("deid_dir"),
        artifacts=artifacts,
        cleaned=cleaned,
        identity_provisional_reason=ident.reason if ident.provisional else None,
    )


def _prepass_fingerprint(
    inp: ExportInput, parent: dict | None, need_run_id: bool, progress: ProgressFn
) -> Fingerprint | None:
    """Hash the input before copying only when that can save work or is required.

    An unchanged export must have the parent's file count and byte total, so when
    those differ the export is new for sure and one copy-while-hashing pass is
    enough; a zip is always hashed first (its fingerprint is the archive's hash).
    """
    if inp.is_zip or need_run_id:
        return ingest.compute_fingerprint(inp, progress)
    if parent is None:
        return None
    fp = parent.get("input_fingerprint", {})
    if (fp.get("file_count"), fp.get("total_bytes")) != inp.stat_summary:
        return None
    return ingest.compute_fingerprint(inp, progress)


def _check_expected(opts: PipelineOptions, run_id: str) -> None:
    if opts.expected_run_id is not None and opts.expected_run_id != run_id:
        raise InputError("--run-id does not match the run id this export and parent produce")


def _already_registered(layout: OutLayout, run_id: str, cleaned: tuple[str, ...]) -> PipelineResult:
    staging_dir = layout.staging_dir(run_id)
    return PipelineResult(
        status="already_registered",
        run_id=run_id,
        staging_dir=layout.rel(staging_dir),
        run_report=layout.rel(staging_dir / "run_report.json"),
        cleaned=cleaned,
    )


def register_existing(run_dir: Path, state: Path | None, note: str | None, lock_timeout: float = 0.0) -> dict:
    """`run register`: register a staged run dir `<out>/staging/<run_id>` and move LAST_RUN."""
    run_dir = run_dir.absolute()
    manifest = ingest.read_manifest(run_dir)
    run_id = manifest["run_id"]
    if run_dir.name != run_id or run_dir.parent.name != "staging":
        raise InputError("the run directory must be <out>/staging/<run_id> as written by ingest or pipeline run")
    layout = OutLayout.create(run_dir.parent.parent, state)
    artifacts = {"staging_dir": layout.rel(run_dir)}
    if (run_dir / "run_report.json").is_file():
        artifacts["run_report"] = layout.rel(run_dir / "run_report.json")
    with StateLock(layout.state, lock_timeout):
        return registry.register_run(
            layout.state,
            run_id=run_id,
            parent_run_id=manifest.get("parent_run_id"),
            fingerprint=manifest["input_fingerprint"],
            artifacts=artifacts,
            note=note,
        )


def export_ndjson(run_dir: Path, out: Path, progress: ProgressFn = no_progress) -> export.ExportResult:
    """`export ndjson`: NDJSON of one staged run into `out/<run_id>/`, delta against
    `out/<parent_run_id>/` when that exists."""
    manifest = ingest.read_manifest(run_dir)
    if not (run_dir / "layout.json").is_file():
        raise InputError("the run directory has no layout.json (not a staged run)")
    run_id = manifest["run_id"]
    return export.export_run(run_dir, out, run_id=run_id, parent_run_id=manifest.get("parent_run_id"),
                             person_id=identity.provisional_person_id(run_id), progress=progress)


def ingest_only(input_path: Path, staging_parent: Path, progress: ProgressFn = no_progress) -> tuple[str, Path]:
    """`healthdelta ingest`: stage an export as a parentless run, without the registry."""
    inp = detect_input(input_path)
    ingest.check_free_space(inp, staging_parent)
    with WorkDir(staging_parent, "ingest") as work:
        staged = ingest.stage_export(inp, work.path, progress=progress)
        run_id = compute_run_id(None, staged.fingerprint.sha256)
        ingest.write_manifest(work.path, staged, inp, run_id=run_id, parent_run_id=None)
        final = staging_parent / run_id
        if final.exists() and (final / "manifest.json").is_file():
            return run_id, final  # content-addressed: the identical run is already staged
        return run_id, work.commit(final)


def run_all(opts: PipelineOptions, progress: ProgressFn = no_progress) -> PipelineResult:
    """`run all`: pipeline run + NDJSON + delta → warehouse → reports, registered last.

    The warehouse load is one DuckDB transaction. If the reports fail after it
    committed, the run is unloaded again before the error propagates, so a failure
    at any stage leaves registry and warehouse as they were. (A SIGKILL in the few
    milliseconds between the load's commit and the registry write leaves a loaded,
    unregistered run; the next `run all` unloads it first, `doctor` reports it.)
    """
    from healthdelta import report, warehouse

    layout = opts.layout

    def warehouse_and_reports(run_id: str, parent_id: str | None, artifacts: dict, stages: dict,
                              identity_dir: Path) -> None:
        registered = set(registry.read_registry(layout.state).runs)
        if layout.warehouse.exists():
            stale = [r for r in warehouse.loaded_runs(layout.warehouse) if r not in registered]
            for stale_run in stale:
                warehouse.unload_run(layout.warehouse, stale_run)
        entry = {"run_id": run_id, "parent_run_id": parent_id, "mode": opts.mode, "created_at": registry.utc_now()}
        loaded = warehouse.load_run(layout.warehouse, layout.ndjson / run_id, entry, progress=progress)
        try:
            labels = share_person_labels(identity_dir) if opts.mode == "share" else None
            built = report.build_report(layout.warehouse, layout.reports / run_id, mode=opts.mode, run_id=run_id,
                                        person_labels=labels, progress=progress)
        except BaseException:
            if loaded.status == "loaded":
                warehouse.unload_run(layout.warehouse, run_id)
            raise
        stages["warehouse"] = {"status": loaded.status, "load_mode": loaded.load_mode,
                               "inserted": loaded.rows_inserted, "removed": loaded.rows_removed}
        stages["reports"] = {"status": "ok", "files": list(built.files), "people": built.people}
        artifacts["warehouse"] = layout.rel(layout.warehouse)
        artifacts["reports_dir"] = layout.rel(layout.reports / run_id)

    return run_pipeline(opts, progress, later=warehouse_and_reports)


def share_person_labels(identity_dir: Path) -> dict[str, str]:
    """Share-mode rows carry `patient-N` ids; the report shows their `Patient N` labels."""
    return {deid.share_person_id(label): label for label in identity.share_labels(identity_dir).values()}
