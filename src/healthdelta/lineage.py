"""Delta lineage: which earlier run a new run's record-level delta is taken against. Pure.

The registry's `parent_run_id` is the seed's chain of exports into one state directory: the
run `--since` selects, from which the new run id is derived. It says nothing about whose
export came before. The *delta base* is the latest earlier run of the same owner, so that a
caregiver who processes two people's exports into one `--out` never sees one person's
records "removed" because the other's export came in between.

Registry entries written since lineage exists carry `owner_person_id`, `delta_base_run_id`
and `export_date`; older entries lack them, and the caller supplies their owner from the
identity store (`owner_of`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

Entry = Mapping[str, Any]
OwnerOf = Callable[[Entry], "str | None"]


def owner_runs(entries: Iterable[Entry], owner: str, owner_of: OwnerOf) -> list[Entry]:
    return [e for e in entries if owner_of(e) == owner]


def latest_of_owner(entries: Iterable[Entry], owner: str, owner_of: OwnerOf) -> Entry | None:
    """The owner's newest run: the tip of its chain of delta bases.

    A run that some other run of the owner was diffed against is not the tip. Several tips
    (an explicit `--since` branched the chain, or entries from before lineage existed) are
    ordered by registration time, then run id, so the answer never depends on dict order.
    """
    mine = owner_runs(entries, owner, owner_of)
    bases = {e.get("delta_base_run_id") for e in mine}
    tips = [e for e in mine if e["run_id"] not in bases] or mine
    return max(tips, key=lambda e: (e.get("created_at") or "", e["run_id"]), default=None)


def delta_base(entries: Iterable[Entry], owner: str, owner_of: OwnerOf,
               explicit: Entry | None = None) -> Entry | None:
    """The run to diff against: an explicitly chosen run (`--since RUN`) when it is the same
    owner's, otherwise the owner's latest run; None for the owner's first run."""
    if explicit is not None and owner_of(explicit) == owner:
        return explicit
    return latest_of_owner(entries, owner, owner_of)


def is_older(export_date: str | None, base_export_date: str | None) -> bool:
    """An export made before its base's (both UTC `YYYY-MM-DDTHH:MM:SSZ`, so text order is
    time order); unknown dates never count as older."""
    return export_date is not None and base_export_date is not None and export_date < base_export_date
