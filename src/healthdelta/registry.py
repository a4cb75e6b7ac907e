"""The run registry (CONTRACT §4): `runs.json` and `LAST_RUN` in the state directory.

`runs.json` is `{"runs": {run_id: entry}, "schema_version": 1}`, sorted keys,
2-space indent, newline-terminated, rewritten only when its bytes change.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from healthdelta.errors import StateError, UsageError
from healthdelta.fingerprint import Fingerprint
from healthdelta.fsutil import atomic_write_bytes, atomic_write_json

SCHEMA_VERSION = 1
_RUN_ID = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Registry:
    runs: dict[str, dict[str, Any]]

    def get(self, run_id: str) -> dict[str, Any] | None:
        return self.runs.get(run_id)

    def resolve(self, id_or_prefix: str) -> dict[str, Any]:
        """The entry whose id is, or uniquely starts with, `id_or_prefix`."""
        if id_or_prefix in self.runs:
            return self.runs[id_or_prefix]
        if not re.fullmatch(r"[0-9a-f]{4,64}", id_or_prefix):
            raise UsageError("a run id is 4 to 64 lowercase hex characters")
        matches = [r for r in self.runs if r.startswith(id_or_prefix)]
        if not matches:
            raise StateError("no registered run has that id")
        if len(matches) > 1:
            raise StateError("that run id prefix matches more than one run; give more characters")
        return self.runs[matches[0]]

    def children(self, run_id: str) -> list[str]:
        return sorted(r for r, e in self.runs.items() if e.get("parent_run_id") == run_id)

    def ordered(self) -> list[dict[str, Any]]:
        """Entries oldest first (created_at, then id for ties)."""
        return sorted(self.runs.values(), key=lambda e: (e.get("created_at") or "", e["run_id"]))


def is_run_id(text: str) -> bool:
    return bool(_RUN_ID.match(text))


def read_registry(state_dir: Path) -> Registry:
    path = state_dir / "runs.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Registry(runs={})
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StateError("the run registry (runs.json) is damaged; run `healthdelta doctor`") from None
    runs = doc.get("runs") if isinstance(doc, dict) else None
    if not isinstance(runs, dict) or not all(
        isinstance(e, dict) and e.get("run_id") == k for k, e in runs.items()
    ):
        raise StateError("the run registry (runs.json) is damaged; run `healthdelta doctor`")
    return Registry(runs=runs)


def write_registry(state_dir: Path, registry: Registry) -> bool:
    """Atomic write; returns False (and touches nothing) when the bytes are unchanged."""
    return atomic_write_json(state_dir / "runs.json", {"runs": registry.runs, "schema_version": SCHEMA_VERSION})


def read_last_run(state_dir: Path) -> str | None:
    try:
        text = (state_dir / "LAST_RUN").read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise StateError("LAST_RUN is damaged; run `healthdelta doctor`") from None
    if not text:
        return None
    if not _RUN_ID.match(text):
        raise StateError("LAST_RUN is damaged; run `healthdelta doctor`")
    return text


def write_last_run(state_dir: Path, run_id: str) -> bool:
    return atomic_write_bytes(state_dir / "LAST_RUN", f"{run_id}\n".encode("ascii"))


def resolve_parent(registry: Registry, state_dir: Path, since: str) -> dict[str, Any] | None:
    """The parent entry for `--since last|RUN_ID`; None for a first run."""
    if since == "last":
        last = read_last_run(state_dir)
        if last is None:
            return None
        entry = registry.get(last)
        if entry is None:
            raise StateError("LAST_RUN names a run that is not registered; run `healthdelta doctor`")
        return entry
    try:
        return registry.resolve(since)
    except StateError:
        raise StateError("--since names a run that is not registered") from None


def is_unchanged(parent: dict[str, Any] | None, fingerprint: Fingerprint) -> bool:
    """The no-op rule: the parent exists and its input fingerprint equals the new one."""
    return parent is not None and parent.get("input_fingerprint", {}).get("sha256") == fingerprint.sha256


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def register_run(
    state_dir: Path,
    *,
    run_id: str,
    parent_run_id: str | None,
    fingerprint: dict[str, Any],
    artifacts: dict[str, str],
    note: str | None = None,
    mode: str | None = None,
    lineage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add or update one entry, then move LAST_RUN to it.

    Idempotent: an existing entry keeps its `created_at` (set once), its lineage
    (`owner_person_id`, `delta_base_run_id`, `export_date`: what the run was diffed
    against cannot change afterwards), gains new artifacts, and takes a note only when
    one is given, so registering the same run again leaves runs.json byte-identical.
    """
    registry = read_registry(state_dir)
    existing = registry.get(run_id)
    if existing is not None and existing.get("input_fingerprint") != fingerprint:
        raise StateError("a run with this id is registered with a different input fingerprint")
    entry = dict(existing) if existing else {
        "run_id": run_id,
        "parent_run_id": parent_run_id,
        "input_fingerprint": fingerprint,
        "created_at": utc_now(),
        "notes": None,
        "mode": mode,
        "artifacts": {},
        **(lineage or {}),
    }
    entry["artifacts"] = {**entry.get("artifacts", {}), **artifacts}
    if note is not None:
        entry["notes"] = note
    runs = dict(registry.runs)
    runs[run_id] = entry
    write_registry(state_dir, Registry(runs=runs))
    write_last_run(state_dir, run_id)
    return entry
