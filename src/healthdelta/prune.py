"""`run prune`: reclaim the disk space of old runs without losing the record.

Every run keeps its staged export (in the shared store, or a plain copy for older runs)
and full NDJSON streams, though each export contains everything again. Pruning a run
removes those bulky parts, then every store blob no unpruned run lists, and keeps what
the record needs: its registry entry (marked `pruned`), manifest/layout/run report, its
delta (`delta.json`, `added/`, `removed/`), its reports, and the warehouse, which holds
every record of every run. A pruned run stays listed, and `doctor` knows what it lacks.

Never pruned: the newest `keep` runs, `LAST_RUN`, and each person's latest run, because
the next export of that person is diffed against its full streams.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from healthdelta import identity, ingest, lineage, registry, reuse, stagestore, streamfile
from healthdelta.errors import HealthDeltaError, UsageError
from healthdelta.fsutil import StateLock
from healthdelta.layout import OutLayout
from healthdelta.ndjson import STREAMS


@dataclass(frozen=True)
class PruneResult:
    pruned: tuple[str, ...]  # run ids pruned now (or that would be, with dry_run)
    kept: tuple[str, ...]
    bytes_freed: int  # bytes whose last link went (a first run's added/ shares its streams' bytes)
    dry_run: bool


def bulky_paths(layout: OutLayout, run_id: str) -> list[Path]:
    """What pruning removes of one run (those that exist)."""
    ndjson = layout.ndjson / run_id
    paths = [layout.staging_dir(run_id) / ingest.SOURCE_DIR, layout.deid / run_id,
             ndjson / "index", ndjson / "local", ndjson / reuse.CACHE_DIR]
    paths += [ndjson / streamfile.file_name(stream, compressed=c) for stream in STREAMS for c in (True, False)]
    return [p for p in paths if p.exists() or p.is_symlink()]


def runs_to_keep(reg: registry.Registry, last: str | None, owners: dict[str, str], keep: int) -> set[str]:
    """Run ids that must keep their full data. Pure."""
    ordered = reg.ordered()
    kept = {e["run_id"] for e in ordered[len(ordered) - keep:]} if keep else set()
    if last:
        kept.add(last)

    def owner_of(e):
        return e.get("owner_person_id") or owners.get(e["run_id"])

    for person in {owner_of(e) for e in ordered} - {None}:
        latest = lineage.latest_of_owner(ordered, person, owner_of)
        kept.add(latest["run_id"])
    return kept


def prune_runs(layout: OutLayout, *, keep: int, dry_run: bool = False, lock_timeout: float = 0.0) -> PruneResult:
    if keep < 1:
        raise UsageError("--keep must be at least 1")
    if not layout.runs_json.is_file():
        return PruneResult((), (), 0, dry_run)
    with StateLock(layout.state, lock_timeout):
        reg = registry.read_registry(layout.state)
        kept = runs_to_keep(reg, registry.read_last_run(layout.state), identity.run_owners(layout.identity), keep)
        # A run pruned before is pruned again: a crash after marking it may have left files.
        victims = [e["run_id"] for e in reg.ordered()
                   if e["run_id"] not in kept and (not e.get("pruned") or bulky_paths(layout, e["run_id"]))]
        unpruned = [rid for rid in reg.runs if rid not in victims and not reg.runs[rid].get("pruned")]
        garbage = unreferenced_blobs(layout, unpruned)
        freed = sum(_freed_bytes(p) for rid in victims for p in bulky_paths(layout, rid))
        freed += sum(p.stat().st_size for p in garbage)
        if not dry_run and victims:
            # Mark first, delete second: a crash in between leaves a pruned run with files to
            # spare (pruned again next time), never a run that looks whole with files missing.
            runs = dict(reg.runs)
            stamp = registry.utc_now()
            for rid in victims:
                runs[rid] = {**runs[rid], "pruned": runs[rid].get("pruned") or {"at": stamp}}
            registry.write_registry(layout.state, registry.Registry(runs=runs))
            for rid in victims:
                for path in bulky_paths(layout, rid):
                    _remove(path)
        if not dry_run:
            for blob in garbage:
                blob.unlink()
        return PruneResult(tuple(victims), tuple(sorted(kept)), freed, dry_run)


def unreferenced_blobs(layout: OutLayout, keep_runs: list[str]) -> list[Path]:
    """Store blobs that none of `keep_runs` lists, nor any staged run dir the registry does
    not know (`ingest` output, a crashed run about to be redone). Empty when a manifest
    cannot be read or is another run's: a blob goes only when it is certainly not needed. The caller
    holds the state lock, so no run is storing blobs meanwhile."""
    registered = set(registry.read_registry(layout.state).runs) if layout.runs_json.is_file() else set()
    dirs = [layout.staging_dir(rid) for rid in keep_runs]
    dirs += [layout.deid / rid for rid in keep_runs if (layout.deid / rid / "manifest.json").is_file()]
    if layout.staging.is_dir():
        dirs += [d for d in layout.staging.iterdir()
                 if registry.is_run_id(d.name) and d.name not in registered and (d / "manifest.json").exists()]
    try:
        manifests = [ingest.read_manifest(d) for d in dirs]
        keep = stagestore.referenced_blobs(layout.staging, manifests)
    except HealthDeltaError:
        return []
    if any(m["run_id"] != d.name for m, d in zip(manifests, dirs)):
        return []  # a manifest that is not its run's says nothing of what that run needs
    return [b for b in stagestore.blobs(layout.staging) if b not in keep]


def _freed_bytes(path: Path) -> int:
    files = [path] if not path.is_dir() or path.is_symlink() else [p for p in path.rglob("*") if p.is_file()]
    total = 0
    for f in files:
        st = f.lstat()
        if st.st_nlink == 1:
            total += st.st_size
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        os.unlink(path)
