"""Orchestration of `pipeline run`: fingerprint → no-op check → stage → identity →
de-id → rename into place → run report → register → LAST_RUN.

A run is registered only after all its stages succeeded (CONTRACT §4). Every
stage writes into a temporary directory that is renamed into place on success;
the registry and LAST_RUN move last. A crash at any point therefore leaves the
registry, LAST_RUN and earlier runs untouched; the next invocation removes the
leftovers (it holds the state lock, so nobody else owns them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from healthdelta import deid, export, identity, ingest, lineage, registry, stagestore
from healthdelta.errors import InputError, StateError, UsageError
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
    allow_older: bool = False


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
    delta_base_run_id: str | None = None


# Stages that run after the NDJSON stage and before registration (`run all`'s warehouse
# and reports): (run_id, parent_run_id, artifacts, stages, identity_dir, staging_dir) -> None,
# filling in artifacts and stages.
LaterStages = Callable[[str, "str | None", dict, dict, Path, Path], None]


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
    created = _missing_dirs(opts.layout)
    try:
        with StateLock(opts.layout.state, opts.lock_timeout):
            return _run_locked(opts, progress, later)
    except BaseException:
        _remove_if_untouched(opts.layout, created)
        raise


def _missing_dirs(layout: OutLayout) -> list[Path]:
    """The output dirs this command would create, deepest first."""
    missing = [d for d in (layout.out, layout.state) if not d.exists()]
    return sorted(missing, key=lambda d: len(d.parts), reverse=True)


def _remove_if_untouched(layout: OutLayout, created: list[Path]) -> None:
    """A command that failed in an output dir it created leaves no trace there (a typo'd
    `--since` must not leave `<out>/state/.lock` behind). Only empty dirs and the lock file
    go; once anything else was written the tree is kept, for `doctor` to judge. (Unlinking
    the lock is safe only because this command made the state dir moments ago.)"""
    if layout.state in created:
        (layout.state / ".lock").unlink(missing_ok=True)
    for d in created:
        if d.is_dir():
            for sub in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                _rmdir_quietly(sub)
        _rmdir_quietly(d)


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty, not a dir, or already gone: keep it


def clean_orphans(layout: OutLayout) -> tuple[str, ...]:
    """Remove temporary dirs left by interrupted commands (caller holds the lock)."""
    removed: list[str] = []
    for parent in (layout.out, layout.staging, layout.ndjson, layout.deid, layout.reports, layout.state,
                   *stagestore.blob_dirs(layout.staging)):
        removed += [f"{parent.name}/{name}" for name in remove_orphan_tmp_dirs(parent)]
    return tuple(removed)


@dataclass
class _NewRun:
    """What the stages after staging need to know about the run being made."""

    opts: PipelineOptions
    progress: ProgressFn
    later: LaterStages | None
    inp: ExportInput
    reg: registry.Registry
    parent: dict | None  # the registry parent `--since` selected
    staged: ingest.StagedExport
    staging_work: WorkDir
    run_id: str
    stages: dict
    cleaned: tuple[str, ...]

    @property
    def layout(self) -> OutLayout:
        return self.opts.layout

    @property
    def parent_id(self) -> str | None:
        return self.parent["run_id"] if self.parent else None


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
        run = _NewRun(opts, progress, later, inp, reg, parent, staged, work, run_id, stages, cleaned)
        # The staged copy and the identity store stay work copies until registration:
        # a run that fails or is killed leaves neither behind.
        with IdentityWork(layout) as identity_work:
            return _after_staging(run, identity_work)


def _after_staging(run: _NewRun, identity_work: IdentityWork) -> PipelineResult:
    opts, layout, progress, stages, run_id = run.opts, run.layout, run.progress, run.stages, run.run_id
    staging_dir = run.staging_work.path
    identity_dir = identity_work.path
    # The owner of the HealthKit data; provisional (per run) when unsafe to say.
    ident = identity.resolve_run(identity_dir, staging_dir, run_id, progress)
    stages["identity"] = ident.as_report()
    base = _delta_base(run, ident.owner_person_id, identity_dir)
    if base is not None and _same_content(layout, base, run.staged):
        # The same export in another form (zip / folder / parent): nothing new to record.
        return PipelineResult(status="no_changes", run_id=base["run_id"], cleaned=run.cleaned)
    export_date = ingest.export_date(staging_dir)
    if base is not None:
        _check_not_older(layout, base, export_date, opts)
    base_id = base["run_id"] if base else None

    person_id, ndjson_source, deid_dir = ident.owner_person_id, staging_dir, None
    if opts.mode == "share" and not opts.skip_deid:
        # Share-mode NDJSON is exported from the de-identified copy only.
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
        ndjson_source, layout.ndjson, run_id=run_id, parent_run_id=base_id,
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
    if run.later is not None:
        run.later(run_id, run.parent_id, artifacts, stages, identity_dir, staging_dir)
    # Every output is made: the plain staged files move to the shared store while the run
    # dir is still a work dir, so the final run dir never lacks them. Share mode's
    # de-identified copy (read by nothing once the NDJSON is made) goes there too.
    stagestore.store_runs([staging_dir, *([deid_dir] if deid_dir is not None else [])],
                          stagestore.store_of(layout.staging), progress)
    staging_dir = run.staging_work.commit(final_staging)
    report_path = staging_dir / "run_report.json"
    atomic_write_json(report_path, {
        "schema_version": REPORT_SCHEMA_VERSION,
        "run_id": run_id,
        "parent_run_id": run.parent_id,
        "delta_base_run_id": base_id,
        "mode": opts.mode,
        "input": {"form": run.inp.form, "path_redacted": True, **run.staged.fingerprint.as_dict()},
        "stages": stages,
        "finished_at": registry.utc_now(),
    })
    identity_work.commit()
    registry.register_run(
        layout.state,
        run_id=run_id,
        parent_run_id=run.parent_id,
        fingerprint=run.staged.fingerprint.as_dict(),
        artifacts=artifacts,
        note=opts.note,
        mode=opts.mode,
        lineage={"owner_person_id": ident.owner_person_id, "delta_base_run_id": base_id,
                 "export_date": export_date},
    )
    if base_id is not None:
        # The base is no longer its person's latest run. The run is registered already:
        # what stays behind on an error is only bytes, never wrong.
        with contextlib.suppress(OSError):
            export.retire(layout.ndjson / base_id)
    return PipelineResult(
        status="created",
        run_id=run_id,
        staging_dir=artifacts["staging_dir"],
        run_report=artifacts["run_report"],
        ndjson_dir=artifacts["ndjson_dir"],
        deid_dir=artifacts.get("deid_dir"),
        artifacts=artifacts,
        cleaned=run.cleaned,
        identity_provisional_reason=ident.reason if ident.provisional else None,
        delta_base_run_id=base_id,
    )


def _delta_base(run: _NewRun, owner: str, identity_dir: Path) -> dict | None:
    """The latest registered run of this export's owner (or the `--since` run when it is
    the same owner's): what the delta is taken against, never another person's run."""
    owners = identity.run_owners(identity_dir)  # entries registered before lineage existed
    explicit = run.parent if run.opts.since != "last" else None
    base = lineage.delta_base(run.reg.runs.values(), owner,
                              lambda e: e.get("owner_person_id") or owners.get(e["run_id"]), explicit)
    if base is not None and base.get("pruned"):
        raise StateError(f"the run this export would be compared with (run {base['run_id'][:12]}) was pruned; "
                         "give --since with a run of the same person that was not pruned")
    return dict(base) if base is not None else None


def _same_content(layout: OutLayout, base: dict, staged: ingest.StagedExport) -> bool:
    try:
        manifest = ingest.read_manifest(layout.staging_dir(base["run_id"]))
    except InputError:
        return False
    return ingest.content_sha256(manifest.get("files", [])) == ingest.staged_content_sha256(staged)


def _check_not_older(layout: OutLayout, base: dict, export_date: str | None, opts: PipelineOptions) -> None:
    base_date = base.get("export_date") or ingest.export_date(layout.staging_dir(base["run_id"]))
    if lineage.is_older(export_date, base_date) and not opts.allow_older:
        raise InputError(
            f"this export is older than the latest run of the same person (run {base['run_id'][:12]}); "
            "nothing was changed. To compare it with an earlier run of that person give --since RUN_ID; "
            "to add it anyway (records newer exports hold will show as removed) give --allow-older"
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
    `out/<parent_run_id>/` when that exists; or, given a stored run `<out>/ndjson/<run_id>`,
    a copy of it. The streams are the plain canonical files either way (CONTRACT §5): runs
    store them compressed, this is the form asked for on demand."""
    if (run_dir / "delta.json").is_file():
        return export.plain_copy(run_dir, out)
    manifest = ingest.read_manifest(run_dir)
    if not (run_dir / "layout.json").is_file():
        raise InputError("the run directory has no layout.json (not a staged run)")
    run_id = manifest["run_id"]
    with stagestore.plain_run(run_dir) as plain:
        return export.export_run(plain, out, run_id=run_id, parent_run_id=manifest.get("parent_run_id"),
                                 person_id=identity.provisional_person_id(run_id), progress=progress,
                                 compressed=False, keep_chunks=False)


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
    from healthdelta import report, sources, warehouse

    layout = opts.layout

    def warehouse_and_reports(run_id: str, parent_id: str | None, artifacts: dict, stages: dict,
                              identity_dir: Path, staging_dir: Path) -> None:
        registered = set(registry.read_registry(layout.state).runs)
        if layout.warehouse.exists():
            stale = [r for r in warehouse.loaded_runs(layout.warehouse) if r not in registered]
            for stale_run in stale:
                warehouse.unload_run(layout.warehouse, stale_run)
        entry = {"run_id": run_id, "parent_run_id": parent_id, "mode": opts.mode, "created_at": registry.utc_now()}
        locale = report.export_locale(staging_dir)
        if locale:  # the report's units follow it
            entry["locale"] = locale
        loaded = warehouse.load_run(layout.warehouse, layout.ndjson / run_id, entry, progress=progress)
        try:
            if (layout.state / sources.FILE_NAME).is_file():
                warehouse.set_source_priority(layout.warehouse, sources.read_priority_file(
                    layout.state / sources.FILE_NAME, classes_only=opts.mode == "share"))
            labels = (share_person_labels(identity_dir) if opts.mode == "share"
                      else report.local_person_labels(identity_dir))
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


def list_runs(state: Path) -> list[dict]:
    """Registry entries oldest first, each with `person` (the identity store's label such as
    `Patient 2`, never a name, in either mode; `provisional` for a per-run id) and
    `is_last`, for `run list` and `run show`."""
    reg = registry.read_registry(state)
    last = registry.read_last_run(state)
    owners = identity.run_owners(state / "identity")
    try:
        labels = identity.share_labels(state / "identity")
    except StateError:
        labels = {}
    runs = []
    for entry in reg.ordered():
        owner = entry.get("owner_person_id") or owners.get(entry["run_id"])
        person = labels.get(owner) or ("provisional" if owner and owner.startswith("provisional-") else None)
        runs.append({**entry, "person": person, "is_last": entry["run_id"] == last,
                     "children": reg.children(entry["run_id"])})
    return runs
