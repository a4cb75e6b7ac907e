"""`run prune`: reclaim the disk space of old runs without losing the record.

Every run keeps a full staged copy of its export and full NDJSON streams, though each
export contains everything again. Pruning a run removes those bulky parts and keeps what
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

from healthdelta import identity, lineage, registry, streamfile
from healthdelta.errors import UsageError
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
    paths = [layout.staging_dir(run_id) / "source", layout.deid / run_id,
             ndjson / "index", ndjson / "local"]
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
        freed = sum(_freed_bytes(p) for rid in victims for p in bulky_paths(layout, rid))
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
        return PruneResult(tuple(victims), tuple(sorted(kept)), freed, dry_run)


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
