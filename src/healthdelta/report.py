"""Reports from the warehouse (CONTRACT §7): summary.json, summary.md, three CSVs and a
self-contained report.html; `report show` for the terminal.

Everything is read from the warehouse through its views (`warehouse.VIEWS`), never
from NDJSON. Rebuilding from the same warehouse gives byte-identical files: no build
time anywhere, every query fully ordered, sums exact (integers or decimals) or rounded
after an exact step, fixed chart ids.

Share mode (`mode="share"`) labels people `Patient N` only (order of first appearance:
the load order of the run that first brought the person's records, then id, unless
a mapping is given) and leaves out everything that could identify someone: source and
device names (replaced by the device class), run notes, free-text results, records of
people-type resources (Patient, RelatedPerson, Practitioner). It does not shift
dates: that is the de-identification stage's job (CONTRACT §9).
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import duckdb

from healthdelta import __version__, charts, identity, units, warehouse
from healthdelta.errors import HealthDeltaError, UsageError
from healthdelta.fsutil import WorkDir, atomic_write_bytes, json_bytes
from healthdelta.ndjson import STREAMS
from healthdelta.progress import ProgressFn, no_progress

SCHEMA_VERSION = 1
MODES = ("local", "share")
FILES = ("summary.json", "summary.md", "coverage_by_person.csv", "coverage_by_source.csv",
         "timeline_daily_counts.csv", "report.html")
TOP_TYPES = 15
_PATIENT_LABEL = re.compile(r"Patient [1-9][0-9]*")
# FHIR resources about people rather than health events: their dates include birth dates.
_PEOPLE_TYPES = ("Patient", "RelatedPerson", "Practitioner", "PractitionerRole", "Person")
_DEVICE_CLASS_LABEL = {"watch": "Apple Watch", "phone": "iPhone", "other": "other app or device"}


@dataclass(frozen=True)
class ReportResult:
    out_dir: Path
    mode: str
    run_id: str | None  # the run the "since last run" section describes
    files: tuple[str, ...] = FILES
    people: int = 0


@dataclass
class _Ctx:
    con: duckdb.DuckDBPyConnection
    mode: str
    labels: dict[str | None, str]
    run: dict[str, Any] | None
    system: str = "metric"  # display units: units.SYSTEMS
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def share(self) -> bool:
        return self.mode == "share"

    def rows(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        return self.con.execute(sql, params or []).fetchall()

    def label(self, person_id: str | None) -> str:
        return self.labels.get(person_id, "Unassigned")


# --------------------------------------------------------------------------- entry points


def build_report(db_path: Path, out_dir: Path, *, mode: str = "local", run_id: str | None = None,
                 person_labels: Mapping[str, str] | None = None, units_system: str | None = None,
                 progress: ProgressFn = no_progress) -> ReportResult:
    """Write the report files into `out_dir` (replaced as a whole, atomically).

    `run_id` selects the run of the "since last run" section (default: the run loaded
    last). `person_labels` maps canonical_person_id to a label (share mode: must be
    `Patient N` labels, e.g. the identity stage's mapping). `units_system` ('metric' or
    'us') overrides the units the export itself is written in (`export_units`).
    """
    if mode not in MODES:
        raise UsageError("--mode must be local or share")
    if units_system is not None and units_system not in units.SYSTEMS:
        raise UsageError("--units must be metric or us")
    con = warehouse.connect(db_path, read_only=True)
    try:
        if not warehouse.is_initialised(con):
            raise UsageError("the warehouse is empty; load a run first (`healthdelta duckdb build`)")
        _check_views(con)
        run = _select_run(con, run_id)
        labels = person_label_map(con, mode, person_labels)
        ctx = _Ctx(con, mode, labels, run, units_system or export_units(con))
        _collect(ctx)
        progress("report", 1, 3)
        files = {
            "summary.json": json_bytes(_summary(ctx)),
            "summary.md": _markdown(ctx).encode("utf-8"),
            "coverage_by_person.csv": _csv(ctx.data["coverage_person_header"], ctx.data["coverage_person"]),
            "coverage_by_source.csv": _csv(ctx.data["coverage_source_header"], ctx.data["coverage_source"]),
            "timeline_daily_counts.csv": _csv(("date", "person", "stream", "records"), ctx.data["timeline"]),
        }
        progress("report", 1, 3)
        files["report.html"] = _html(ctx).encode("utf-8")
    finally:
        con.close()
    with WorkDir(out_dir.parent, f"report-{out_dir.name}") as work:
        for name in FILES:
            atomic_write_bytes(work.path / name, files[name])
        work.commit(out_dir)
    progress("report", 1, 3)
    return ReportResult(out_dir=out_dir, mode=mode, run_id=run["run_id"] if run else None,
                        people=len([k for k in labels if k is not None]))


_SHOW_KEYS = ("tables", "runs", "removed_total", "first_date", "last_date", "people", "top_types", "since")


def show_data(db_path: Path, *, units_system: str | None = None) -> dict[str, Any]:
    """What `report show` summarises, as data (`report show --json`): tables and counts, people,
    date range, top types, latest values (in the export's units unless `units_system` is given),
    the last run's delta; `runs` 0 when nothing is loaded."""
    if units_system is not None and units_system not in units.SYSTEMS:
        raise UsageError("--units must be metric or us")
    con = warehouse.connect(db_path, read_only=True)
    try:
        if not warehouse.is_initialised(con):
            return {"tables": dict.fromkeys(STREAMS, 0), "runs": 0, "removed_total": 0, "first_date": None,
                    "last_date": None, "people": [], "top_types": [], "since": None, "latest_values": [],
                    "units": units_system}
        _check_views(con)
        run = _select_run(con, None)
        ctx = _Ctx(con, "local", person_label_map(con, "local", None), run, units_system or export_units(con))
        _collect(ctx)
    finally:
        con.close()
    summary = {k: ctx.data[k] for k in _SHOW_KEYS}
    return {**summary, "latest_values": _metrics(ctx), "units": ctx.system}


def show(db_path: Path, *, units_system: str | None = None) -> list[str]:
    """`show_data` as lines for the terminal."""
    d = show_data(db_path, units_system=units_system)
    if not d["runs"]:
        return ["warehouse: empty (no run loaded)"]
    total = sum(d["tables"].values())
    lines = [f"records: {total:,} in {sum(1 for v in d['tables'].values() if v)} of {len(STREAMS)} stream tables"
             f" ({d['removed_total']:,} of them removed by a later export)"]
    lines.append(f"runs: {d['runs']}")
    lines.append(f"date range: {d['first_date'] or '-'} .. {d['last_date'] or '-'}")
    lines.append(f"people: {len(d['people'])}")
    for p in d["people"]:
        lines.append(f"  {p['label']}  {p['records']:,} records  {p['first_date'] or '-'} .. {p['last_date'] or '-'}")
    lines.append("tables:")
    width = max(len(s) for s in STREAMS)
    for stream in STREAMS:
        lines.append(f"  {stream:<{width}}  {d['tables'][stream]:>12,}")
    lines.append("top record types:")
    for t in d["top_types"][:10]:
        lines.append(f"  {t['record_type']}  ({t['stream']})  {t['records']:,}")
    if d["latest_values"]:
        lines.append(f"latest values ({d['units']} units):")
        lines += [f"  {m['person']}: {'; '.join(_metric_phrases(m))}" for m in d["latest_values"]]
    s = d["since"]
    if s:
        lines.append(f"last run: {s['run_id'][:12]} (load {s['load_seq']}, {s['load_mode']}"
                     f"{', parent ' + s['parent_run_id'][:12] if s['parent_run_id'] else ', first run'})")
        added = ", ".join(f"{k} +{v:,}" for k, v in s["added"].items() if v) or "none"
        removed = ", ".join(f"{k} -{v:,}" for k, v in s["removed"].items() if v) or "none"
        lines.append(f"  new records: {sum(s['added'].values()):,} ({added})")
        lines.append(f"  removed records: {sum(s['removed'].values()):,} ({removed})")
        if s["new_first_date"]:
            lines.append(f"  new records dated {s['new_first_date']} .. {s['new_last_date']}")
    return lines


def person_label_map(con: duckdb.DuckDBPyConnection, mode: str,
                     mapping: Mapping[str, str] | None) -> dict[str | None, str]:
    """canonical_person_id -> label, ordered by first appearance.

    Local mode shows the id itself (or the mapping's label); share mode shows
    `Patient N`, from the mapping when given (validated) or by order of appearance.
    """
    order = [r[0] for r in con.execute(
        "SELECT p.canonical_person_id FROM (SELECT DISTINCT canonical_person_id, run_id FROM records) p "
        "LEFT JOIN runs r ON r.run_id = p.run_id GROUP BY p.canonical_person_id "
        "ORDER BY min(r.load_seq) NULLS LAST, p.canonical_person_id NULLS LAST").fetchall()]
    labels: dict[str | None, str] = {}
    n = 0
    for pid in order:
        if pid is None:
            labels[None] = "Unassigned"
            continue
        n += 1
        given = (mapping or {}).get(pid)
        if mode == "share":
            if given is not None and not _PATIENT_LABEL.fullmatch(given):
                raise UsageError("share mode needs `Patient N` person labels")
            labels[pid] = given or f"Patient {n}"
        else:
            labels[pid] = given or pid
    return labels


def export_locale(run_dir: Path) -> str | None:
    """`<HealthData locale="...">` of a staged run's export.xml, or None."""
    from healthdelta.parse.healthkit import read_me

    try:
        layout = json.loads((run_dir / "layout.json").read_text(encoding="utf-8"))
        locale = read_me(run_dir / layout["export_xml"]).get("locale")
    except (OSError, ValueError, KeyError, TypeError, HealthDeltaError):
        return None
    return locale if isinstance(locale, str) and len(locale) <= 35 else None


def export_units(con: duckdb.DuckDBPyConnection) -> str:
    """'us' or 'metric': from the locale of the newest loaded run that recorded one
    (`run all` does: en_US -> us), else from the units the exports' own body mass,
    distance and temperature samples are written in (the Health app writes the phone's
    region's units)."""
    row = con.execute("SELECT registry_entry ->> 'locale' FROM runs WHERE registry_entry ->> 'locale' IS NOT NULL "
                      "ORDER BY load_seq DESC LIMIT 1").fetchone()
    if row:
        return units.system_for_locale(row[0])
    rows = con.execute(
        "SELECT unit, count(*) FROM observations WHERE source = 'healthkit' AND unit IN "
        "('lb', 'kg', 'mi', 'km', 'degF', 'degC', 'ft', 'in', 'cm', 'm', 'yd') GROUP BY unit").fetchall()
    return units.system_for_units(dict(rows))


def local_person_labels(identity_dir: Path) -> dict[str, str]:
    """Local mode, for the owner's own eyes: each person by the first name the identity
    store knows for them (people without one keep their id)."""
    out = {}
    for person in identity.load_people_pii(identity_dir):
        names = [text for name in person.names for text in identity.name_strings(name)]
        if names:
            out[person.person_id] = names[0]
    return out


def _check_views(con: duckdb.DuckDBPyConnection) -> None:
    if not warehouse.views_current(con):
        raise UsageError("the warehouse's views are from an older version of healthdelta; "
                         "renew them with `healthdelta duckdb build`")


def _select_run(con: duckdb.DuckDBPyConnection, run_id: str | None) -> dict[str, Any] | None:
    cols = ("run_id", "parent_run_id", "delta_parent_run_id", "load_seq", "load_mode", "created_at", "notes")
    sql = ("SELECT run_id, parent_run_id, delta_parent_run_id, load_seq, load_mode, "
           "strftime(created_at, '%Y-%m-%dT%H:%M:%SZ'), notes FROM runs ")
    if run_id is None:
        row = con.execute(sql + "ORDER BY load_seq DESC LIMIT 1").fetchone()
    else:
        rows = con.execute(sql + "WHERE starts_with(run_id, ?) ORDER BY load_seq", [run_id]).fetchall()
        if len(rows) != 1:
            raise UsageError("no loaded run has that id" if not rows else "that run id prefix is ambiguous")
        row = rows[0]
    return dict(zip(cols, row, strict=True)) if row else None


# --------------------------------------------------------------------------- data


def _create_counts(ctx: _Ctx) -> None:
    """One scan of every stream table into a small temporary table of record counts by
    (stream, person, source, type, source label, local date, first-seen run, removing run):
    every count, date range and coverage figure of the report is read from it.

    Share mode leaves out people-type FHIR resources here (their dates are birth dates
    and the like) and keeps only the device class of a source, never its name.
    """
    label = "hd_device_class(r.device, r.source_name)" if ctx.share else "COALESCE(r.source_name, '')"
    people = ", ".join(f"'{t}'" for t in _PEOPLE_TYPES)
    keep = f"NOT (r.stream = 'clinical' AND r.record_type IN ({people}))" if ctx.share else "TRUE"
    ctx.con.execute(
        f"CREATE OR REPLACE TEMP TABLE report_counts AS "
        f"SELECT r.stream, r.canonical_person_id AS person, r.source, "
        f"COALESCE(r.record_type, '(none)') AS record_type, {label} AS source_label, r.local_date, r.run_id, "
        f"x.removed_in_run, count(*) AS n "
        f"FROM records AS r LEFT JOIN removed_records AS x ON x.record_key = r.record_key AND x.stream = r.stream "
        f"WHERE {keep} GROUP BY ALL")


_CURRENT = "removed_in_run IS NULL"


def _collect(ctx: _Ctx) -> None:
    d = ctx.data
    con = ctx.con
    d["tables"] = {s: con.execute(f"SELECT count(*) FROM {s}").fetchone()[0] for s in STREAMS}
    d["runs"] = con.execute("SELECT count(*) FROM runs").fetchone()[0]
    d["removed_total"] = con.execute("SELECT count(*) FROM removed_records").fetchone()[0]
    _create_counts(ctx)
    first, last = ctx.rows(f"SELECT min(local_date)::VARCHAR, max(local_date)::VARCHAR FROM report_counts "
                           f"WHERE {_CURRENT}")[0]
    d["first_date"], d["last_date"] = first, last
    d["people"] = [
        {"label": ctx.label(pid), "records": int(n), "first_date": first_day, "last_date": last_day}
        for pid, n, first_day, last_day in ctx.rows(
            f"SELECT person, sum(n), min(local_date)::VARCHAR, max(local_date)::VARCHAR "
            f"FROM report_counts WHERE {_CURRENT} GROUP BY 1")
    ]
    d["people"].sort(key=lambda p: _label_key(p["label"]))
    d["top_types"] = [
        {"stream": s, "record_type": t, "records": int(n)}
        for s, t, n in ctx.rows(
            f"SELECT stream, record_type, sum(n) AS total FROM report_counts WHERE {_CURRENT} "
            f"GROUP BY 1, 2 ORDER BY total DESC, 1, 2 LIMIT {TOP_TYPES}")
    ]
    d["since"] = _since(ctx) if ctx.run else None
    _coverage(ctx)
    _series(ctx)


def _label_key(label: str) -> tuple:
    m = _PATIENT_LABEL.fullmatch(label)
    return (0, int(label.split()[1]), "") if m else (1, 0, label)


def _since(ctx: _Ctx) -> dict[str, Any]:
    """What run `ctx.run` brought: records first seen in it, records its delta removed."""
    run = ctx.run
    rid = run["run_id"]
    added = dict.fromkeys(STREAMS, 0)
    added.update({s: int(n) for s, n in ctx.rows(
        "SELECT stream, sum(n) FROM report_counts WHERE run_id = ? GROUP BY 1", [rid])})
    removed = dict.fromkeys(STREAMS, 0)
    removed.update({s: int(n) for s, n in ctx.rows(
        "SELECT stream, sum(n) FROM report_counts WHERE removed_in_run = ? GROUP BY 1", [rid])})
    new_types = [
        {"stream": s, "record_type": t, "records": int(n), "first_date": first_day, "last_date": last_day}
        for s, t, n, first_day, last_day in ctx.rows(
            "SELECT stream, record_type, sum(n) AS total, min(local_date)::VARCHAR, max(local_date)::VARCHAR "
            "FROM report_counts WHERE run_id = ? GROUP BY 1, 2 ORDER BY total DESC, 1, 2", [rid])
    ]
    removed_types = [
        {"stream": s, "record_type": t, "records": int(n)}
        for s, t, n in ctx.rows(
            "SELECT stream, record_type, sum(n) AS total FROM report_counts WHERE removed_in_run = ? "
            "GROUP BY 1, 2 ORDER BY total DESC, 1, 2", [rid])
    ]
    first, last = ctx.rows("SELECT min(local_date)::VARCHAR, max(local_date)::VARCHAR FROM report_counts "
                           "WHERE run_id = ?", [rid])[0]
    since = {
        "run_id": rid,
        "parent_run_id": run["delta_parent_run_id"],
        "load_seq": run["load_seq"],
        "load_mode": run["load_mode"],
        "created_at": None if ctx.share else run["created_at"],  # wall-clock time could date a shifted run
        "added": added,
        "removed": removed,
        "new_by_type": new_types,
        "removed_by_type": removed_types,
        "new_first_date": first,
        "new_last_date": last,
    }
    if not ctx.share:
        since["notes"] = run["notes"]
    return since


def _coverage(ctx: _Ctx) -> None:
    d = ctx.data
    d["coverage_person_header"] = ("person", "stream", "records", "removed", "first_date", "last_date",
                                   "days_with_data")
    rows = ctx.rows(
        f"SELECT person, stream, COALESCE(sum(n) FILTER (WHERE {_CURRENT}), 0), "
        f"COALESCE(sum(n) FILTER (WHERE NOT {_CURRENT}), 0), "
        f"min(local_date) FILTER (WHERE {_CURRENT})::VARCHAR, max(local_date) FILTER (WHERE {_CURRENT})::VARCHAR, "
        f"count(DISTINCT local_date) FILTER (WHERE {_CURRENT}) FROM report_counts GROUP BY 1, 2")
    d["coverage_person"] = sorted(((ctx.label(p), s, int(a), int(b), *rest) for p, s, a, b, *rest in rows),
                                  key=lambda r: (_label_key(r[0]), STREAMS.index(r[1])))
    third = "device_class" if ctx.share else "source_name"
    d["coverage_source_header"] = ("person", "source", third, "records", "first_date", "last_date")
    rows = ctx.rows(f"SELECT person, source, source_label, sum(n), min(local_date)::VARCHAR, "
                    f"max(local_date)::VARCHAR FROM report_counts WHERE {_CURRENT} GROUP BY 1, 2, 3")
    if ctx.share:
        rows = [(p, s, _DEVICE_CLASS_LABEL[c], *rest) for p, s, c, *rest in rows]
    d["coverage_source"] = sorted(((ctx.label(p), s, lab, int(n), *rest) for p, s, lab, n, *rest in rows),
                                  key=lambda r: (_label_key(r[0]), r[1] or "", r[2] or ""))
    rows = ctx.rows(f"SELECT local_date::VARCHAR, person, stream, sum(n) FROM report_counts "
                    f"WHERE {_CURRENT} AND local_date IS NOT NULL GROUP BY 1, 2, 3")
    d["timeline"] = sorted(((day, ctx.label(p), s, int(n)) for day, p, s, n in rows),
                           key=lambda r: (r[0], _label_key(r[1]), STREAMS.index(r[2])))


def _series(ctx: _Ctx) -> None:
    """Per-person series for the charts and the lab table (people in label order)."""
    d = ctx.data
    persons = sorted((pid for pid in ctx.labels), key=lambda p: _label_key(ctx.label(p)))

    def by_person(sql: str) -> dict[str | None, list[tuple]]:
        out: dict[str | None, list[tuple]] = {}
        for row in ctx.rows(sql):
            out.setdefault(row[0], []).append(row[1:])
        return out

    steps = by_person("SELECT canonical_person_id, day::VARCHAR, steps, steps_all_sources FROM daily_steps "
                      "WHERE day IS NOT NULL ORDER BY 1, 2")
    d["steps"] = [(ctx.label(p), steps[p]) for p in persons if p in steps]
    rhr = by_person("SELECT canonical_person_id, day::VARCHAR, round(bpm, 1) FROM resting_heart_rate_daily "
                    "WHERE day IS NOT NULL ORDER BY 1, 2")
    d["rhr"] = [(ctx.label(p), rhr[p]) for p in persons if p in rhr]
    sleep = by_person("SELECT canonical_person_id, night::VARCHAR, stage, minutes FROM sleep_nightly "
                      "WHERE night IS NOT NULL ORDER BY 1, 2, 3")
    d["sleep"] = [(ctx.label(p), sleep[p]) for p in persons if p in sleep]
    nights = by_person("SELECT canonical_person_id, night::VARCHAR, asleep_minutes FROM sleep_per_night "
                       "WHERE night IS NOT NULL AND asleep_minutes > 0 ORDER BY 1, 2")
    d["nights"] = [(ctx.label(p), nights[p]) for p in persons if p in nights]
    workouts = by_person(
        "SELECT canonical_person_id, date_trunc('week', local_date)::DATE::VARCHAR, activity, count(*), "
        "sum(CAST(duration_min AS DECIMAL(18, 3))), sum(CAST(energy_kcal AS DECIMAL(18, 3))), "
        "sum(CAST(distance_km AS DECIMAL(18, 3))) FROM workout_summary "
        "WHERE local_date IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
    d["workouts"] = [(ctx.label(p), workouts[p]) for p in persons if p in workouts]
    weight = by_person("SELECT canonical_person_id, day::VARCHAR, kg FROM body_mass_daily "
                       "WHERE day IS NOT NULL ORDER BY 1, 2")
    d["weight"] = [(ctx.label(p), weight[p]) for p in persons if p in weight]
    labs = by_person(
        "SELECT canonical_person_id, COALESCE(name, code, ''), code, local_date::VARCHAR, "
        "value, value_text, unit, value_comparator, value_low, value_high, "
        "json_extract_string(reference_range, '$[0].low'), json_extract_string(reference_range, '$[0].high'), "
        "json_extract_string(reference_range, '$[0].unit'), reference_range_text, "
        "COALESCE(json_extract_string(interpretation, '$[0].code'), "
        "         CASE WHEN json_type(interpretation) = 'VARCHAR' THEN interpretation ->> '$' END), status "
        "FROM lab_results_latest ORDER BY 1, 2, 3, 4")
    d["labs"] = [(ctx.label(p), labs[p]) for p in persons if p in labs]


# --------------------------------------------------------------------------- summary files


def _num(x: Any, digits: int = 1) -> float | int | None:
    if x is None:
        return None
    value = round(float(x), digits)
    return int(value) if value.is_integer() else value


def _summary(ctx: _Ctx) -> dict[str, Any]:
    d = ctx.data
    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "generator": f"healthdelta {__version__}",
        "mode": ctx.mode,
        "warehouse": {"tables": d["tables"], "records": sum(d["tables"].values()), "runs": d["runs"],
                      "removed_records": d["removed_total"]},
        "date_range": {"first": d["first_date"], "last": d["last_date"]},
        "people": d["people"],
        "top_record_types": d["top_types"],
        "since_last_run": d["since"],
        "units": ctx.system,
        "metrics": _metrics(ctx),
    }
    return summary


def _metrics(ctx: _Ctx) -> list[dict[str, Any]]:
    """Per person: the latest values and recent averages a reader looks for first."""
    d = ctx.data
    out: dict[str, dict[str, Any]] = {}
    for label, rows in d["steps"]:
        last30 = rows[-30:]
        out.setdefault(label, {})["steps"] = {
            "days": len(rows), "last_day": rows[-1][0],
            "mean_last_30_days": _num(sum(r[1] for r in last30) / len(last30), 0),
        }
    for label, rows in d["rhr"]:
        out.setdefault(label, {})["resting_heart_rate"] = {"days": len(rows), "last_day": rows[-1][0],
                                                           "last_bpm": _num(rows[-1][1])}
    for label, rows in d["nights"]:
        recent = rows[-30:]
        out.setdefault(label, {})["sleep"] = {
            "nights": len(rows), "last_night": rows[-1][0],
            "mean_asleep_hours_last_30_nights": _num(sum(float(r[1]) for r in recent) / len(recent) / 60, 2),
        }
    for label, rows in d["workouts"]:
        out.setdefault(label, {})["workouts"] = {"count": sum(r[2] for r in rows), "weeks": len({r[0] for r in rows})}
    for label, rows in d["weight"]:
        shown, unit = units.display(rows[-1][1], "kg", ctx.system)
        out.setdefault(label, {})["weight"] = {"measurements": len(rows), "last_day": rows[-1][0],
                                               "last_kg": _num(rows[-1][1]), "last": _num(shown), "unit": unit}
    return [{"person": label, **values} for label, values in sorted(out.items(), key=lambda kv: _label_key(kv[0]))]


def _metric_phrases(m: dict[str, Any]) -> list[str]:
    parts = []
    if "steps" in m:
        parts.append(f"{m['steps']['mean_last_30_days']:,} steps a day (last 30 days of data)")
    if "resting_heart_rate" in m:
        parts.append(f"resting heart rate {m['resting_heart_rate']['last_bpm']} bpm "
                     f"({m['resting_heart_rate']['last_day']})")
    if "sleep" in m:
        parts.append(f"{m['sleep']['mean_asleep_hours_last_30_nights']} h asleep a night (last 30 nights)")
    if "workouts" in m:
        parts.append(f"{m['workouts']['count']} workouts")
    if "weight" in m:
        parts.append(f"weight {m['weight']['last']} {m['weight']['unit']} ({m['weight']['last_day']})")
    return parts


def _csv(header: tuple[str, ...], rows: list[tuple]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue().encode("utf-8")


def _markdown(ctx: _Ctx) -> str:
    d = ctx.data
    lines = ["# HealthDelta summary", ""]
    lines.append(f"Mode: {ctx.mode}. Records: {sum(d['tables'].values()):,} in the warehouse "
                 f"({d['runs']} run{'s' if d['runs'] != 1 else ''} loaded). "
                 f"Dates: {d['first_date'] or '-'} to {d['last_date'] or '-'}.")
    lines += ["", "## People", "", "| person | records | first | last |", "|---|---:|---|---|"]
    lines += [f"| {_md(p['label'])} | {p['records']:,} | {p['first_date'] or ''} | {p['last_date'] or ''} |"
              for p in d["people"]]
    s = d["since"]
    if s:
        lines += ["", "## Since the last run", ""]
        parent = f"compared with run `{s['parent_run_id'][:12]}`" if s["parent_run_id"] else "first run"
        lines.append(f"Run `{s['run_id'][:12]}` ({parent}): {sum(s['added'].values()):,} new records, "
                     f"{sum(s['removed'].values()):,} removed"
                     + (f"; new records dated {s['new_first_date']} to {s['new_last_date']}." if s["new_first_date"]
                        else "."))
        lines += ["", "| stream | new | removed |", "|---|---:|---:|"]
        lines += [f"| {k} | {s['added'][k]:,} | {s['removed'][k]:,} |" for k in STREAMS
                  if s["added"][k] or s["removed"][k]]
        if s["new_by_type"]:
            lines += ["", "| new records by type | stream | records | from | to |", "|---|---|---:|---|---|"]
            lines += [f"| {_md(t['record_type'])} | {t['stream']} | {t['records']:,} | {t['first_date'] or ''} | "
                      f"{t['last_date'] or ''} |" for t in s["new_by_type"]]
        if s["removed_by_type"]:
            lines += ["", "| removed records by type | stream | records |", "|---|---|---:|"]
            lines += [f"| {_md(t['record_type'])} | {t['stream']} | {t['records']:,} |" for t in s["removed_by_type"]]
    metrics = _metrics(ctx)
    if metrics:
        lines += ["", "## Latest values", ""]
        for m in metrics:
            lines.append(f"- {_md(m['person'])}: " + "; ".join(_metric_phrases(m)))
    lines += ["", "## Tables", "", "| table | rows |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in d["tables"].items()]
    lines += ["", "## Top record types", "", "| type | stream | records |", "|---|---|---:|"]
    lines += [f"| {_md(t['record_type'])} | {t['stream']} | {t['records']:,} |" for t in d["top_types"]]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- html


def _mean7(values: list[float]) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - 6): i + 1]
        out.append(round(sum(window) / len(window), 1))
    return out


def _charts(ctx: _Ctx) -> dict[str, list[charts.Chart]]:
    d = ctx.data
    out: dict[str, list[charts.Chart]] = {"activity": [], "heart": [], "sleep": [], "body": []}
    if d["steps"]:
        series = []
        for label, rows in d["steps"]:
            days = [r[0] for r in rows]
            steps = [_num(r[1], 0) for r in rows]
            series.append((label, days, steps, _mean7([float(s) for s in steps])))
        out["activity"].append(charts.daily_steps(series))
    for i, (label, rows) in enumerate(d["workouts"], 1):
        weeks = sorted({r[0] for r in rows})
        activities = sorted({r[1] for r in rows if r[1] is not None})
        counts = {(r[0], r[1]): r[2] for r in rows}
        out["activity"].append(charts.workouts_per_week(
            f"chart-workouts-{i}", label, weeks,
            [(_CAMEL.sub(" ", a), [counts.get((w, a), 0) for w in weeks]) for a in activities]))
    if d["rhr"]:
        out["heart"].append(charts.resting_heart_rate(
            [(label, [r[0] for r in rows], [_num(r[1]) for r in rows]) for label, rows in d["rhr"]]))
    for i, (label, rows) in enumerate(d["sleep"], 1):
        nights = sorted({r[0] for r in rows})
        stages = [s for s in charts.SLEEP_COLOURS if any(r[1] == s for r in rows)]
        stages += sorted({r[1] for r in rows} - set(stages))
        minutes = {(r[0], r[1]): float(r[2]) for r in rows}
        out["sleep"].append(charts.sleep_by_stage(
            f"chart-sleep-{i}", label, nights,
            [(s, [_num(minutes[(n, s)] / 60, 2) if (n, s) in minutes else None for n in nights]) for s in stages]))
    if d["weight"]:
        unit = units.display(None, "kg", ctx.system)[1]
        out["body"].append(charts.body_mass(unit, [
            (label, [r[0] for r in rows], [_num(units.display(r[1], "kg", ctx.system)[0], 2) for r in rows])
            for label, rows in d["weight"]]))
    return out


_CSS = """
:root { color-scheme: light; --ink: #1d1d1f; --muted: #6e6e73; --line: #e5e5ea; --accent: #0072B2; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #f5f5f7; }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 24px 32px 16px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 2px 0; color: var(--muted); }
nav { margin-top: 12px; display: flex; flex-wrap: wrap; gap: 6px 14px; }
nav a { color: var(--accent); text-decoration: none; font-weight: 500; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 24px 48px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 12px; padding: 18px 22px;
          margin: 18px 0; }
section h2 { margin: 0 0 10px; font-size: 20px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px; margin: 8px 0 4px; }
.card { border: 1px solid var(--line); border-radius: 10px; padding: 10px 14px; background: #fbfbfd; }
.card .v { font-size: 22px; font-weight: 600; }
.card .k { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 4px; font-size: 14px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.chart { width: 100%; min-height: 340px; margin: 6px 0 14px; }
.empty, .note { color: var(--muted); }
.flag { color: #b00020; font-weight: 600; }
footer { color: var(--muted); text-align: center; font-size: 13px; padding: 0 0 24px; }
code { font-size: 13px; }
th, td { overflow-wrap: anywhere; }
.chart-title { font-size: 15px; margin: 14px 0 0; }
@media (max-width: 640px) {
  header { padding: 16px 14px 12px; }
  header h1 { font-size: 22px; }
  main { padding: 8px 8px 32px; }
  section { padding: 12px 10px; margin: 12px 0; }
  table { font-size: 12px; }
  th, td { padding: 4px 3px; }
  .opt { display: none; }
  .card .v { font-size: 18px; }
}
"""


_TYPE_PREFIX = re.compile(r"^HK(?:Quantity|Category|Correlation|DataType)TypeIdentifier|^HKWorkoutActivityType")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def pretty_type(name: str | None) -> str:
    """'HKQuantityTypeIdentifierHeartRateVariabilitySDNN' -> 'Heart Rate Variability SDNN' (display only)."""
    if not name:
        return ""
    short = _TYPE_PREFIX.sub("", name)
    return _CAMEL.sub(" ", short) if short != name or short.isalnum() else name


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] = frozenset(),
           optional: set[int] = frozenset()) -> str:
    """`optional` columns are hidden on a phone-width screen, where every column shares 370 px."""
    def cls(i: int) -> str:
        names = " ".join(n for n, on in (("n", i in numeric), ("opt", i in optional)) if on)
        return f' class="{names}"' if names else ""

    head = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{_e(v)}</td>" for i, v in enumerate(row)) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt_int(n: Any) -> str:
    return f"{int(n):,}" if n is not None else ""


def _html(ctx: _Ctx) -> str:
    d = ctx.data
    groups = _charts(ctx)
    parts: list[str] = []
    people = ", ".join(p["label"] for p in d["people"]) or "none"
    parts.append(
        f"<header><h1>HealthDelta report</h1>"
        f"<p>{_fmt_int(sum(d['tables'].values()))} records from {d['runs']} export"
        f"{'s' if d['runs'] != 1 else ''}, dated {_e(d['first_date'] or '-')} to {_e(d['last_date'] or '-')}."
        f" People: {_e(people)}.</p>"
        f"<p>{_SHARE_NOTE if ctx.share else _LOCAL_NOTE}</p>"
        f'<nav><a href="#since">Since last run</a><a href="#activity">Activity</a><a href="#heart">Heart</a>'
        f'<a href="#sleep">Sleep</a><a href="#body">Weight</a><a href="#labs">Lab results</a>'
        f'<a href="#coverage">Coverage</a></nav></header><main>')
    parts.append(_since_html(ctx))
    titles = {"activity": "Activity", "heart": "Resting heart rate", "sleep": "Sleep", "body": "Weight"}
    notes = {
        "activity": "Steps: where sources overlap in time, each minute is counted once, from the source "
                    "ranked highest (entered by hand, then Apple Watch, then iPhone, then other apps: the "
                    "Health app's default order); the rest of a sample still counts.",
        "sleep": "A night is the sleep session that ends between 04:00 and 14:00, named by that morning; "
                 "its asleep time comes from one source. Naps are not added. In-bed time is the dotted line.",
    }
    for key in ("activity", "heart", "sleep", "body"):
        body = "".join(c.html() for c in groups[key]) or f'<p class="empty">No {titles[key].lower()} data.</p>'
        note = f'<p class="note">{_e(notes[key])}</p>' if key in notes and groups[key] else ""
        parts.append(f'<section id="{key}"><h2>{titles[key]}</h2>{note}{body}</section>')
    parts.append(_labs_html(ctx))
    parts.append(_coverage_html(ctx))
    parts.append(f"</main><footer>Generated by healthdelta {_e(__version__)} from the warehouse; "
                 f"works offline.</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>HealthDelta report</title><style>{_CSS}</style>"
            f"<script>{charts.plotly_js()}</script></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


_SHARE_NOTE = "Share mode: people are shown as Patient N; names, sources and identifiers are left out."
_LOCAL_NOTE = "Local mode: for your own eyes; do not share this file."


def _since_html(ctx: _Ctx) -> str:
    s = ctx.data["since"]
    if not s:
        return '<section id="since"><h2>Since last run</h2><p class="empty">No run loaded.</p></section>'
    added, removed = sum(s["added"].values()), sum(s["removed"].values())
    parent = (f"compared with run <code>{_e(s['parent_run_id'][:12])}</code>" if s["parent_run_id"]
              else "the first run: everything is new")
    cards = [("new records", _fmt_int(added)), ("removed records", _fmt_int(removed)),
             ("new records dated", f"{s['new_first_date']} to {s['new_last_date']}" if s["new_first_date"] else "-")]
    out = [f'<section id="since"><h2>Since last run</h2>'
           f"<p>Run <code>{_e(s['run_id'][:12])}</code>, {parent}"
           f"{', registered ' + _e(s['created_at']) if s['created_at'] else ''}.</p>",
           '<div class="cards">' + "".join(f'<div class="card"><div class="v">{_e(v)}</div>'
                                          f'<div class="k">{_e(k)}</div></div>' for k, v in cards) + "</div>"]
    if s["new_by_type"]:
        out.append("<h3>New records by type</h3>" + _table(
            ["type", "stream", "records", "from", "to"],
            [[pretty_type(t["record_type"]), t["stream"], _fmt_int(t["records"]), t["first_date"], t["last_date"]]
             for t in s["new_by_type"]], {2}, optional={1}))
    if s["removed_by_type"]:
        out.append('<h3 class="flag">Removed records by type</h3>'
                   '<p class="note">Present in the previous export, missing from this one (deleted on the '
                   'phone, or no longer exported). They stay in the warehouse and are left out of the charts.</p>'
                   + _table(["type", "stream", "records"],
                            [[pretty_type(t["record_type"]), t["stream"], _fmt_int(t["records"])]
                             for t in s["removed_by_type"]],
                            {2}))
    out.append("</section>")
    return "".join(out)


def _labs_html(ctx: _Ctx) -> str:
    labs = ctx.data["labs"]
    if not labs:
        return '<section id="labs"><h2>Latest lab results</h2><p class="empty">No lab results.</p></section>'
    out = ['<section id="labs"><h2>Latest lab results</h2>'
           '<p class="note">The most recent result of each test, from clinical records (FHIR).</p>']
    for label, rows in labs:
        table_rows = []
        for name, code, day, value, text, unit, comparator, low, high, rr_low, rr_high, rr_unit, rr_text, flag, \
                status in rows:
            if value is not None:
                shown = f"{comparator or ''}{_num(value, 2)} {unit or ''}".strip()
            elif low is not None or high is not None:
                shown = f"{_opt(low)}–{_opt(high)} {unit or ''}".strip()
            elif text is not None:
                shown = "(text result)" if ctx.share else text
            else:
                shown = ""
            ref = ""
            if rr_low or rr_high:
                ref = f"{rr_low or ''}–{rr_high or ''} {rr_unit or ''}".strip()
            elif rr_text:
                ref = "(text range)" if ctx.share else rr_text
            if status and status not in ("final", "amended", "corrected"):
                shown = f"{shown} ({status})".strip()
            table_rows.append([name, shown, ref, flag or "", day or "", code or ""])
        heading = f"<h3>{_e(label)}</h3>" if len(labs) > 1 or ctx.share else ""
        out.append(heading + _table(["test", "result", "reference range", "flag", "date", "code"], table_rows,
                                    optional={5}))
    out.append("</section>")
    return "".join(out)


def _opt(x: Any) -> str:
    return "" if x is None else str(_num(x, 2))


def _coverage_html(ctx: _Ctx) -> str:
    d = ctx.data
    rows = [[r[0], r[1], _fmt_int(r[2]), _fmt_int(r[3]), r[4] or "", r[5] or "", _fmt_int(r[6])]
            for r in d["coverage_person"] if r[2] or r[3]]
    top = [[pretty_type(t["record_type"]), t["stream"], _fmt_int(t["records"])] for t in d["top_types"]]
    return ('<section id="coverage"><h2>Coverage</h2>'
            + _table(["person", "stream", "records", "removed", "first", "last", "days with data"], rows,
                     {2, 3, 6}, optional={3, 6})
            + "<h3>Most frequent record types</h3>" + _table(["type", "stream", "records"], top, {2}, optional={1})
            + "</section>")
