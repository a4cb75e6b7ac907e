"""The DuckDB warehouse (CONTRACT §6): `<out>/warehouse.duckdb`, loaded run by run.

One table per NDJSON stream (typed columns, see `_FIELDS`; its `run_id` is the run
that first brought the record), `runs` (the registry entries of the loaded runs),
`record_removals` (each time a run's delta removed a record, and the run that
brought it back, if any) and the views `removed_records` (removed now) and
`record_history` (record_key, stream, first_seen_run, last_seen_run, removed_in_run)
over them, plus convenience views (`VIEWS`): daily steps without iPhone/Watch double
counting, resting heart rate per day, sleep per night and stage, workouts with
energy and distance, body mass, latest lab results.

Loading (`load_run`):
- bulk: one `INSERT ... SELECT` per stream straight from DuckDB's `read_json` over
  the NDJSON file, with an explicit column spec (no type sniffing, no row-at-a-time
  inserts); numbers that may be text in the NDJSON are read as JSON and TRY_CAST.
- append-only by `record_key`: a run whose delta parent is already loaded contributes
  only its `added/` rows and its `removed/` keys (the next export costs what its
  delta costs); otherwise its full streams are read and anti-joined on
  `record_key`. The anti-join is against the keys a row could collide with
  (`_known_keys`): none in an empty warehouse; only the removed ones when the loaded
  runs are one chain of delta loads ending at the delta parent, with no run taken out
  between (a key new since the parent can then only be one the chain removed earlier,
  a re-added record, and every `removed/` key is held); else every key of the table. Either way no record is ever inserted twice, and rows are never
  updated or deleted: a removed record stays, listed in `removed_records`, and the
  convenience views leave it out. The one exception is `unload_run`, which takes
  back exactly what one (unregistered, childless) run's load added, for `run all`
  to undo a load whose run then failed.
- history costs no second copy of the keys: first_seen_run is the row's `run_id`
  (set to the loading run), last_seen_run is derived from the chain of loaded runs.
- one transaction per run; a run already in `runs` is skipped without writing,
  so loading twice changes nothing.

Crash safety, what we rely on: DuckDB commits atomically. A commit is durable once
its WAL record is fsynced; rows of a large insert may be written to free blocks of
the database file before the commit ("optimistic writes"), but they only become
reachable when the commit (and later a checkpoint, which swaps between two
checksummed headers) says so. A failed statement rolls the transaction back
explicitly; a crash or kill mid-load leaves the uncommitted blocks unreferenced,
and the next open replays the WAL up to the last commit: the previous warehouse,
unchanged. `build(replace=True)` writes a new file beside the old one and renames
it into place, so a rebuild is atomic too.

Every connection pins `TimeZone` to UTC, so TIMESTAMPTZ values print and cast the
same on every machine. Values are bound with `?`; identifiers come only from
`ndjson.STREAMS` and the fixed specs below.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping

import duckdb
import orjson

from healthdelta import sources, units
from healthdelta.errors import HealthDeltaError, InputError, StateError, UsageError
from healthdelta import streamfile
from healthdelta.ndjson import STREAMS
from healthdelta.progress import ProgressFn, no_progress

SCHEMA_VERSION = 1  # tables; a mismatch asks for `duckdb build --replace`
VIEWS_VERSION = 3  # views and macros; re-created when it changes
QUERY_BATCH_ROWS = 10_000

# --------------------------------------------------------------------------- column specs
#
# Field kinds: how an NDJSON field is read (`read_json` column type) and stored.
#   s  VARCHAR      text (any JSON value is accepted and kept as its JSON text)
#   t  TIMESTAMPTZ  a UTC `...Z` time (the NDJSON writer only emits valid ones)
#   l  VARCHAR      the `<name>_local` twin: the source's local time with its offset
#   j  JSON         nested values (metadata, FHIR resource, lists of codings, ...)
#   i  BIGINT       integer; read as JSON and TRY_CAST (a non-number becomes NULL)
#   d  DOUBLE       number; read as JSON and TRY_CAST
#   b  BOOLEAN      read as JSON and TRY_CAST
#   I  INTEGER      read typed (only for fields the writer sets itself)
#   v  `value DOUBLE` + `value_str VARCHAR`: a HealthKit value is a number (quantity)
#      or a string (category value such as HKCategoryValueSleepAnalysisAsleepCore);
#      value_str holds the value when it is not a number (read as text: cheaper than
#      asking the JSON for its type, and only a numeric-looking string is affected)

_READ_TYPE = {"s": "VARCHAR", "t": "TIMESTAMPTZ", "l": "VARCHAR", "j": "JSON", "i": "JSON",
              "d": "JSON", "b": "JSON", "I": "INTEGER", "v": "VARCHAR"}
_TABLE_TYPE = {"s": "VARCHAR", "t": "TIMESTAMPTZ", "l": "VARCHAR", "j": "JSON", "i": "BIGINT",
               "d": "DOUBLE", "b": "BOOLEAN", "I": "INTEGER"}


def _spec(text: str) -> tuple[tuple[str, str], ...]:
    """'name:kind name:kind ...' -> ((name, kind), ...)."""
    return tuple(tuple(item.split(":")) for item in text.split())  # type: ignore[misc]


_COMMON = _spec("record_key:s schema_version:I canonical_person_id:s source:s source_file:s "
                "run_id:s kind:s event_time:t event_time_field:s extra:j children:j")
_SAMPLE = _spec("type:s source_name:s source_version:s device:s start_date:t start_date_local:l "
                "end_date:t end_date_local:l creation_date:t creation_date_local:l metadata:j")
_FHIR = _spec("resource_type:s fhir_id:s fhir_version:s bundle_full_url:s status:s code:j code_text:s "
              "category:j category_text:s subject_ref:s encounter_ref:s resource:j")
_FHIR_VALUE = _spec(
    "value_type:s unit_code:s unit_system:s value_comparator:s value_text:s value_code:j value_boolean:b "
    "value_low:d value_high:d value_numerator:j value_denominator:j value_denominator_unit:s "
    "value_time:t value_time_local:l value_end:t value_end_local:l value_sampled:j value_attachment:j "
    "data_absent_reason:s"
)


def _merge(*groups: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    out: dict[str, str] = {}
    for group in groups:
        for name, kind in group:
            out.setdefault(name, kind)
    return tuple(out.items())


_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    # HealthKit Records (the hot path: ~99% of all rows), CDA and FHIR Observations.
    "observations": _merge(
        _COMMON,
        _spec("type:s value:v unit:s"),
        _SAMPLE,
        _spec("hrv_beats:j points:j"),
        # CDA observations (export_cda.xml)
        _spec("hk_type:s class_code:s mood_code:s code:j code_system:s code_system_name:s display_name:s "
              "effective_start:t effective_start_local:l effective_end:t effective_end_local:l "
              "section_code:s section_title:s organizer_code:s organizer_display_name:s "
              "interpretation:j reference_range:j value_code_system:s element:j"),
        _FHIR,
        _spec("effective:t effective_local:l effective_source:s issued:t issued_local:l "
              "interpretation_text:s components:j"),
        _FHIR_VALUE,
    ),
    "workouts": _merge(
        _COMMON, _SAMPLE,
        _spec("activity_type:s duration:d duration_unit:s total_distance:d total_distance_unit:s "
              "total_energy_burned:d total_energy_burned_unit:s events:j statistics:j route:j"),
    ),
    "activity_summaries": _merge(
        _COMMON,
        _spec("date_components:s active_energy_burned:d active_energy_burned_goal:d "
              "active_energy_burned_unit:s apple_exercise_time:d apple_exercise_time_goal:d "
              "apple_move_time:d apple_move_time_goal:d apple_stand_hours:d apple_stand_hours_goal:d"),
    ),
    "correlations": _merge(_COMMON, _SAMPLE, _spec("member_keys:j")),
    # HealthKit ClinicalRecord pointers, other FHIR resources, VisionPrescription, unknown elements.
    "clinical": _merge(
        _COMMON, _FHIR, _SAMPLE,
        _spec("source_url:s resource_file_path:s received_date:t received_date_local:l identifier:s "
              "gender:s occurrence:t occurrence_local:l performed:t performed_local:l performed_end:t "
              "performed_end_local:l period_start:t period_start_local:l period_end:t period_end_local:l "
              "onset:t onset_local:l recorded:t recorded_local:l last_occurrence:t last_occurrence_local:l "
              "date_issued:t date_issued_local:l expiration_date:t expiration_date_local:l brand:s "
              "right_eye:j left_eye:j attachments:j text:s"),
    ),
    "documents": _merge(
        _COMMON, _FHIR,
        _spec("doc_status:s date:t date_local:l created:t created_local:l effective:t effective_local:l "
              "effective_end:t effective_end_local:l issued:t issued_local:l period_start:t "
              "period_start_local:l period_end:t period_end_local:l result_refs:j attachments:j"),
    ),
    "medications": _merge(
        _COMMON, _FHIR,
        _spec("intent:s medication_ref:s dosage_text:j authored:t authored_local:l date_asserted:t "
              "date_asserted_local:l effective:t effective_local:l effective_end:t effective_end_local:l "
              "handed_over:t handed_over_local:l"),
    ),
    "conditions": _merge(
        _COMMON, _FHIR,
        _spec("verification_status:s severity:s onset:t onset_local:l onset_text:s abated:s abatement:t "
              "abatement_local:l recorded:t recorded_local:l"),
    ),
    "ecg": _merge(
        _COMMON,
        _spec("recorded:t recorded_local:l classification:s symptoms:s lead:s unit:s device:s "
              "software_version:s sample_rate_hz:d sample_count:i bad_sample_lines:i samples:j "
              "samples_file:s header:j header_language:s"),
    ),
    "routes": _merge(
        _COMMON,
        _spec("name:s creator:s gpx_version:s track_index:i segment_count:i point_count:i bad_points:i "
              "start_time:t start_time_local:l end_time:t end_time_local:l metadata_time:t "
              "metadata_time_local:l duration_s:d distance_m:d elevation_gain_m:d elevation_loss_m:d "
              "min_elevation_m:d max_elevation_m:d bbox:j points_file:s points_ref:s points_sha256:s"),
    ),
}
assert tuple(_FIELDS) == STREAMS

# Observations fields kept as typed columns; every other observations field (the
# CDA- and FHIR-specific ones, NULL on the ~99% HealthKit rows) goes into one
# `details` JSON object, NULL when all of them are. Why: each extra column costs about
# as much to write as the data itself when it is almost always NULL (measured: 66
# all-NULL columns doubled the write time of a million HealthKit rows).
_TYPED_OBSERVATIONS = frozenset(
    name for name, _ in _COMMON + _SAMPLE
) | frozenset(
    "type value unit hrv_beats points resource_type code code_text category category_text status "
    "value_type value_text value_comparator interpretation reference_range resource element".split()
)
_DETAILS = {"observations": frozenset(n for n, _ in _FIELDS["observations"] if n not in _TYPED_OBSERVATIONS)}

# The local time a row's `local_date` / `utc_offset_min` come from: the `_local` twin of
# `event_time_field` when the row names one (FHIR), else the first present of these.
_EVENT_LOCAL: dict[str, tuple[str, ...]] = {
    "observations": ("start_date_local",),
    "workouts": ("start_date_local",),
    "activity_summaries": ("date_components",),
    "correlations": ("start_date_local",),
    "clinical": ("received_date_local", "start_date_local", "date_issued_local"),
    "documents": ("date_local",),
    "medications": ("authored_local",),
    "conditions": ("onset_local", "recorded_local"),
    "ecg": ("recorded_local",),
    "routes": ("start_time_local",),
}


def stream_fields(stream: str) -> tuple[str, ...]:
    """The NDJSON field names the `stream` table stores, as columns or inside `details`
    (tests use it to catch schema drift)."""
    return tuple(name for name, _ in _FIELDS[stream])


def _table_columns(stream: str) -> list[tuple[str, str, str]]:
    """(column, SQL type, select expression over the read_json relation `src`)."""
    cols: list[tuple[str, str, str]] = []
    details = _DETAILS.get(stream, frozenset())
    for name, kind in _FIELDS[stream]:
        if name in details:
            continue
        if kind == "v":
            cols.append((name, "DOUBLE", f"TRY_CAST(src.{name} AS DOUBLE)"))
            cols.append((f"{name}_str", "VARCHAR",
                         f"CASE WHEN TRY_CAST(src.{name} AS DOUBLE) IS NULL THEN src.{name} END"))
        elif name == "run_id":
            # The loading run, bound as a parameter: equal to the NDJSON's run_id by
            # construction, and the invariant `record_history` relies on.
            cols.append((name, "VARCHAR", "$run_id"))
        elif kind in ("i", "d", "b"):
            cols.append((name, _TABLE_TYPE[kind], f"TRY_CAST(src.{name} AS {_TABLE_TYPE[kind]})"))
        else:
            cols.append((name, _TABLE_TYPE[kind], f"src.{name}"))
    if details:
        names = [n for n, _ in _FIELDS[stream] if n in details]
        all_null = " AND ".join(f"src.{n} IS NULL" for n in names)
        pairs = ", ".join(f"'{n}', src.{n}" for n in names)
        cols.append(("details", "JSON", f"CASE WHEN {all_null} THEN NULL ELSE json_object({pairs}) END"))
    return cols


def _read_spec(stream: str, only: tuple[str, ...] | None = None) -> str:
    """The `columns={...}` struct literal for read_json (names and types from the fixed specs)."""
    items = [(n, _READ_TYPE[k]) for n, k in _FIELDS[stream]
             if (only is None and n != "run_id") or (only is not None and n in only)]
    return "{" + ", ".join(f"'{n}': '{t}'" for n, t in items) + "}"


def _event_local_expr(stream: str) -> str:
    names = {n for n, _ in _FIELDS[stream]}
    parts = []
    details = _DETAILS.get(stream, frozenset())
    whens = " ".join(f"WHEN '{n[:-6]}' THEN {n}" for n, k in _FIELDS[stream] if k == "l" and n not in details)
    if "event_time_field" in names and whens:
        parts.append(f"CASE event_time_field {whens} END")
    parts.extend(_EVENT_LOCAL[stream])
    return f"COALESCE({', '.join(parts)})"


def _generated_columns(stream: str) -> list[str]:
    """Virtual columns: computed when read, so they cost nothing at load time."""
    x = _event_local_expr(stream)
    local_date = f"COALESCE(TRY_CAST(left({x}, 10) AS DATE), CAST(event_time AS DATE))"
    # '...T08:14:22-08:00' -> -480; '...Z' -> 0; a date without time -> NULL.
    offset = (f"CASE WHEN length({x}) >= 20 AND right({x}, 1) = 'Z' THEN 0 "
              f"WHEN length({x}) >= 25 AND substr({x}, -6, 1) IN ('+', '-') AND substr({x}, -3, 1) = ':' "
              f"THEN (CASE substr({x}, -6, 1) WHEN '-' THEN -1 ELSE 1 END) * "
              f"(TRY_CAST(substr({x}, -5, 2) AS INTEGER) * 60 + TRY_CAST(substr({x}, -2, 2) AS INTEGER)) END")
    return [f"local_date DATE GENERATED ALWAYS AS ({local_date}) VIRTUAL",
            f"utc_offset_min SMALLINT GENERATED ALWAYS AS ({offset}) VIRTUAL"]


def _stream_ddl(stream: str) -> str:
    cols = [f"{name} {sqltype}" for name, sqltype, _ in _table_columns(stream)]
    return f"CREATE TABLE IF NOT EXISTS {stream} ({', '.join(cols + _generated_columns(stream))})"


_BASE_DDL = (
    "CREATE TABLE IF NOT EXISTS warehouse_meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY,
        parent_run_id VARCHAR,          -- as registered
        created_at TIMESTAMPTZ,
        mode VARCHAR,
        notes VARCHAR,
        input_sha256 VARCHAR,
        input_file_count BIGINT,
        input_total_bytes BIGINT,
        artifacts JSON,
        registry_entry JSON,            -- the whole registry entry as given
        load_seq INTEGER NOT NULL,      -- 1, 2, ... in load order
        load_mode VARCHAR NOT NULL,     -- 'delta' (added/ + removed/) or 'full' (streams, anti-joined)
        delta_parent_run_id VARCHAR,    -- the run the NDJSON delta was taken against
        lineage_root VARCHAR NOT NULL,  -- first run of this chain of loaded runs
        delta JSON,                     -- delta.json's per-stream counts
        rows_inserted BIGINT NOT NULL,  -- records new to the warehouse
        rows_removed BIGINT NOT NULL    -- records this run's delta removed
    )""",
    # One row each time a run's delta removed a record (deleted on the phone, gone from
    # the export); readded_in_run is set when a later run brings it back.
    """CREATE TABLE IF NOT EXISTS record_removals (
        record_key VARCHAR NOT NULL,
        stream VARCHAR NOT NULL,
        removed_in_run VARCHAR NOT NULL,
        readded_in_run VARCHAR
    )""",
)

# --------------------------------------------------------------------------- views

_MACROS = (
    """CREATE OR REPLACE MACRO hd_device_class(device, source_name) AS CASE
        WHEN device LIKE '%model:Watch%' OR device LIKE '%name:Apple Watch%' THEN 'watch'
        WHEN device LIKE '%model:iPhone%' OR device LIKE '%name:iPhone%' THEN 'phone'
        WHEN device IS NULL AND source_name LIKE '%Watch%' THEN 'watch'
        WHEN device IS NULL AND source_name LIKE '%iPhone%' THEN 'phone'
        ELSE 'other' END""",
    # The Health app ranks data entered by hand above every device.
    """CREATE OR REPLACE MACRO hd_source_class(device, source_name, metadata) AS CASE
        WHEN metadata ->> 'HKWasUserEntered' IN ('1', 'true') THEN 'manual'
        ELSE hd_device_class(device, source_name) END""",
    """CREATE OR REPLACE MACRO hd_canonical_unit(unit) AS
        CASE WHEN unit LIKE 'mmol<%>/L' THEN 'mmol/L' ELSE unit END""",
    # Energy to kcal (HealthKit writes 'Cal' = kcal, 'kcal' or 'kJ') and distance to km.
    """CREATE OR REPLACE MACRO hd_kcal(v, unit) AS CASE
        WHEN unit IN ('Cal', 'kcal') THEN v WHEN unit = 'kJ' THEN v / 4.184 WHEN unit = 'cal' THEN v / 1000 END""",
    """CREATE OR REPLACE MACRO hd_km(v, unit) AS CASE
        WHEN unit = 'km' THEN v WHEN unit = 'mi' THEN v * 1.609344 WHEN unit = 'm' THEN v / 1000
        WHEN unit = 'yd' THEN v * 0.0009144 WHEN unit = 'ft' THEN v * 0.0003048 END""",
    """CREATE OR REPLACE MACRO hd_minutes(v, unit) AS CASE
        WHEN unit = 'min' THEN v WHEN unit = 's' THEN v / 60 WHEN unit = 'hr' OR unit = 'h' THEN v * 60 END""",
    # exact decimal sum: the same result whatever order threads add in
    """CREATE OR REPLACE MACRO hd_exact_sum(x) AS CAST(sum(CAST(x AS DECIMAL(38, 6))) AS DOUBLE)""",
)

# HealthKit quantity types whose samples add up over time (HKQuantityAggregationStyle
# cumulative): the Health app de-duplicates them across sources by time.
CUMULATIVE_TYPES = tuple("HKQuantityTypeIdentifier" + t for t in (
    "StepCount", "DistanceWalkingRunning", "DistanceCycling", "DistanceSwimming", "DistanceWheelchair",
    "DistanceDownhillSnowSports", "ActiveEnergyBurned", "BasalEnergyBurned", "FlightsClimbed",
    "AppleExerciseTime", "AppleStandTime", "AppleMoveTime", "SwimmingStrokeCount", "PushCount",
    "NikeFuel", "TimeInDaylight",
))
_SLEEP_STAGES = {  # HKCategoryValueSleepAnalysis... -> the Health app's name
    "InBed": "In bed", "Awake": "Awake", "AsleepCore": "Core", "AsleepDeep": "Deep", "AsleepREM": "REM",
    "AsleepUnspecified": "Asleep (unspecified)", "Asleep": "Asleep (unspecified)",
}
UNLISTED_PRIORITY = 1000  # + the class's place in sources.CLASSES: after every listed entry
SLEEP_GAP_S = 3600  # samples more than an hour apart start a new sleep session
NIGHT_ENDS = ("04:00", "14:00")  # a session ending in this local window is a night, otherwise a nap


def _sql_list(items: Iterable[str]) -> str:
    return ", ".join("'" + i.replace("'", "''") + "'" for i in items)


def _sleep_stage_case() -> str:
    whens = " ".join(f"WHEN 'HKCategoryValueSleepAnalysis{k}' THEN '{v}'" for k, v in _SLEEP_STAGES.items())
    return f"CASE value_str {whens} END"


_RECORD_TYPE = {
    "observations": "COALESCE(type, details ->> 'hk_type', kind)",
    "workouts": "COALESCE(activity_type, kind)",
    "activity_summaries": "kind",
    "correlations": "COALESCE(type, kind)",
    "clinical": "COALESCE(resource_type, type, kind)",
    "documents": "COALESCE(resource_type, kind)",
    "medications": "COALESCE(resource_type, kind)",
    "conditions": "COALESCE(resource_type, kind)",
    "ecg": "kind",
    "routes": "kind",
}
_SOURCE_NAME = {s: ("source_name" if "source_name" in stream_fields(s) else "NULL") for s in STREAMS}
_DEVICE = {s: ("device" if "device" in stream_fields(s) else "NULL") for s in STREAMS}


def _records_view() -> str:
    parts = [
        f"SELECT '{s}' AS stream, record_key, canonical_person_id, source, {_RECORD_TYPE[s]} AS record_type, "
        f"{_SOURCE_NAME[s]} AS source_name, {_DEVICE[s]} AS device, event_time, local_date, run_id FROM {s}"
        for s in STREAMS
    ]
    return "CREATE OR REPLACE VIEW records AS\n" + "\nUNION ALL\n".join(parts)


VIEWS: dict[str, str] = {
    "removed_records": """CREATE OR REPLACE VIEW removed_records AS
        SELECT record_key, stream, removed_in_run FROM record_removals WHERE readded_in_run IS NULL""",
    "records": _records_view(),
    # last_seen_run: the run before the one that removed it, else the newest loaded run
    # of the chain (lineage_root) the record first appeared in.
    "record_history": """CREATE OR REPLACE VIEW record_history AS
        WITH heads AS (
            SELECT lineage_root, arg_max(run_id, load_seq) AS head_run_id FROM runs GROUP BY lineage_root
        )
        SELECT k.record_key, k.stream, k.run_id AS first_seen_run,
               CASE WHEN x.removed_in_run IS NULL THEN h.head_run_id ELSE r.delta_parent_run_id END
                   AS last_seen_run,
               x.removed_in_run
        FROM records k
        LEFT JOIN removed_records x ON x.record_key = k.record_key AND x.stream = k.stream
        LEFT JOIN runs f ON f.run_id = k.run_id
        LEFT JOIN heads h ON h.lineage_root = f.lineage_root
        LEFT JOIN runs r ON r.run_id = x.removed_in_run""",
    # Every HealthKit sample with its source class, priority and normalised value.
    # source_priority: position of the source's name in the `source_priority` table,
    # else of its class; when neither is listed, after every listed one in the default
    # order (1001 manual .. 1004 other). value_si/unit_si: units.CONVERSIONS.
    "unit_conversions": "CREATE OR REPLACE VIEW unit_conversions AS SELECT * FROM " + units.sql_values(),
    "healthkit_samples": f"""CREATE OR REPLACE VIEW healthkit_samples AS
        SELECT o.record_key, o.canonical_person_id, o.type, o.start_date, o.end_date, o.start_date_local,
               o.end_date_local, o.local_date, COALESCE(o.utc_offset_min, 0) AS utc_offset_min,
               o.value, o.value_str, o.unit, o.value * u.factor + u.shift AS value_si, u.unit_si,
               o.source_name, o.device, hd_source_class(o.device, o.source_name, o.metadata) AS source_class,
               COALESCE(pn.position, pc.position,
                        {UNLISTED_PRIORITY} + list_position([{_sql_list(sources.CLASSES)}],
                                                           hd_source_class(o.device, o.source_name, o.metadata)))
                   AS source_priority
        FROM observations o
        LEFT JOIN unit_conversions u ON u.unit = hd_canonical_unit(o.unit)
        LEFT JOIN source_priority pn ON pn.entry = o.source_name
        LEFT JOIN source_priority pc ON pc.entry = hd_source_class(o.device, o.source_name, o.metadata)
        WHERE o.source = 'healthkit' AND o.start_date IS NOT NULL AND o.end_date >= o.start_date
          AND NOT EXISTS (SELECT 1 FROM removed_records x WHERE x.record_key = o.record_key)""",
    "quantity_samples": """CREATE OR REPLACE VIEW quantity_samples AS
        SELECT * EXCLUDE (value_str) FROM healthkit_samples WHERE value IS NOT NULL""",
    # Cumulative types, de-duplicated as the Health app does (runbook: "Source priority"):
    # on the UTC time line, each second goes to the best-ranked source with a sample
    # covering it; a sample keeps the share of its value that its kept seconds are of
    # its duration. Samples are first cut at their own local midnights, so a sample
    # crossing midnight is shared between the days pro rata. How, without an interval
    # join (quadratic on millions of samples): every piece boundary is a grid point; per
    # source key a running sum of +1/-1 events says whether the key covers the segment
    # after a grid point (ASOF join), the best covering key owns the segment, and a
    # running sum of owned seconds per key turns "kept seconds of [a, b)" into C(b) - C(a).
    "cumulative_pieces": f"""CREATE OR REPLACE VIEW cumulative_pieces AS
        WITH s AS (
            SELECT COALESCE(canonical_person_id, '') AS person, type, record_key, source_class,
                   COALESCE(source_name, '') AS source_name, source_priority, unit_si, value_si,
                   CAST(epoch(start_date) AS BIGINT) AS t0, CAST(epoch(end_date) AS BIGINT) AS t1,
                   utc_offset_min * 60 AS off
            FROM quantity_samples
            WHERE type IN ({_sql_list(CUMULATIVE_TYPES)}) AND value_si IS NOT NULL
        ), sources AS (
            SELECT *, dense_rank() OVER (PARTITION BY person, type
                                         ORDER BY source_priority, source_class, source_name) AS skey
            FROM (SELECT DISTINCT person, type, source_priority, source_class, source_name FROM s)
        ), cut AS (
            SELECT s.*, k.skey, unnest(range((s.t0 + s.off) // 86400, (s.t1 + s.off) // 86400 + 1)) AS day_index
            FROM s JOIN sources k USING (person, type, source_priority, source_class, source_name)
        ), pieces AS MATERIALIZED (
            -- Materialized: inlined, a `type = ...` filter from outside (daily_steps) was pushed
            -- into the self-joins below and one share-mode warehouse took 83 s instead of 0.6 s.
            SELECT * FROM (
                SELECT *, greatest(t0, day_index * 86400 - off) AS a, least(t1, (day_index + 1) * 86400 - off) AS b
                FROM cut)
            WHERE b > a OR t1 = t0
        ), ev AS (
            SELECT person, type, skey, t, sum(d) AS d FROM (
                SELECT person, type, skey, a AS t, 1 AS d FROM pieces
                UNION ALL SELECT person, type, skey, b AS t, -1 AS d FROM pieces)
            GROUP BY ALL
        ), act AS (
            SELECT person, type, skey, t, sum(d) OVER (PARTITION BY person, type, skey ORDER BY t) AS n FROM ev
        ), grid AS (
            SELECT b.person, b.type, b.t, k.skey
            FROM (SELECT DISTINCT person, type, t FROM ev) b JOIN (SELECT DISTINCT person, type, skey FROM ev) k
                 USING (person, type)
        ), covered AS (
            SELECT g.person, g.type, g.t, g.skey, COALESCE(a.n, 0) AS n
            FROM grid g ASOF LEFT JOIN act a
                 ON a.person = g.person AND a.type = g.type AND a.skey = g.skey AND a.t <= g.t
        ), owned AS (
            SELECT *, min(skey) FILTER (WHERE n > 0) OVER (PARTITION BY person, type, t) AS best,
                      lead(t) OVER (PARTITION BY person, type, skey ORDER BY t) - t AS len
            FROM covered
        ), cum AS (
            SELECT person, type, skey, t, best,
                   COALESCE(sum(CASE WHEN best = skey THEN len ELSE 0 END) OVER (
                       PARTITION BY person, type, skey ORDER BY t
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS c
            FROM owned
        )
        SELECT NULLIF(p.person, '') AS canonical_person_id, p.type, p.record_key,
               CAST(DATE '1970-01-01' + CAST(p.day_index AS INTEGER) AS DATE) AS day,
               p.source_class, NULLIF(p.source_name, '') AS source_name, p.source_priority, p.unit_si,
               to_timestamp(p.a) AS piece_start, to_timestamp(p.b) AS piece_end,
               CASE WHEN p.t1 = p.t0 THEN p.value_si ELSE p.value_si * (p.b - p.a) / (p.t1 - p.t0) END
                   AS value_all_sources,
               CASE WHEN p.t1 = p.t0 THEN (CASE WHEN ca.best IS NULL OR ca.best >= p.skey THEN p.value_si ELSE 0 END)
                    ELSE p.value_si * (cb.c - ca.c) / (p.t1 - p.t0) END AS value_kept
        FROM pieces p
        JOIN cum ca ON ca.person = p.person AND ca.type = p.type AND ca.skey = p.skey AND ca.t = p.a
        JOIN cum cb ON cb.person = p.person AND cb.type = p.type AND cb.skey = p.skey AND cb.t = p.b""",
    "daily_totals": """CREATE OR REPLACE VIEW daily_totals AS
        SELECT canonical_person_id, type, day, unit_si,
               hd_exact_sum(value_kept) AS total, hd_exact_sum(value_all_sources) AS total_all_sources,
               hd_exact_sum(CASE WHEN source_class = 'manual' THEN value_kept END) AS manual,
               hd_exact_sum(CASE WHEN source_class = 'watch' THEN value_kept END) AS watch,
               hd_exact_sum(CASE WHEN source_class = 'phone' THEN value_kept END) AS phone,
               hd_exact_sum(CASE WHEN source_class = 'other' THEN value_kept END) AS other
        FROM cumulative_pieces GROUP BY ALL""",
    "daily_steps": """CREATE OR REPLACE VIEW daily_steps AS
        SELECT canonical_person_id, day, total AS steps, total_all_sources AS steps_all_sources,
               COALESCE(manual, 0) AS manual_steps, COALESCE(watch, 0) AS watch_steps,
               COALESCE(phone, 0) AS phone_steps, COALESCE(other, 0) AS other_steps
        FROM daily_totals WHERE type = 'HKQuantityTypeIdentifierStepCount'""",
    # Types that are not cumulative (heart rate, HRV, weight, ...): one value per person,
    # type and local day, from the one best-ranked source with data that day; mixing a
    # Watch's readings with another app's would move the day's mean with whichever
    # device happened to be worn. value: the mean of that source's samples (normalised).
    "daily_values": f"""CREATE OR REPLACE VIEW daily_values AS
        WITH per_source AS (
            SELECT canonical_person_id, type, local_date AS day, source_priority, source_class,
                   COALESCE(source_name, '') AS source_name, unit_si,
                   CAST(sum(CAST(value_si AS DECIMAL(38, 6))) / count(*) AS DOUBLE) AS value,
                   min(value_si) AS value_min, max(value_si) AS value_max, count(*) AS samples
            FROM quantity_samples
            WHERE type NOT IN ({_sql_list(CUMULATIVE_TYPES)}) AND value_si IS NOT NULL
            GROUP BY ALL
        )
        SELECT canonical_person_id, type, day, unit_si, value, value_min, value_max, samples, source_class,
               NULLIF(source_name, '') AS source_name
        FROM (SELECT *, row_number() OVER (PARTITION BY canonical_person_id, type, day
                                           ORDER BY source_priority, source_class, source_name, unit_si) AS rank
              FROM per_source)
        WHERE rank = 1""",
    "resting_heart_rate_daily": """CREATE OR REPLACE VIEW resting_heart_rate_daily AS
        SELECT canonical_person_id, day, value AS bpm, value_min AS bpm_min, value_max AS bpm_max, samples,
               source_class, source_name
        FROM daily_values WHERE type = 'HKQuantityTypeIdentifierRestingHeartRate'""",
    "heart_rate_daily": """CREATE OR REPLACE VIEW heart_rate_daily AS
        SELECT canonical_person_id, day, value AS bpm, value_min AS bpm_min, value_max AS bpm_max, samples,
               source_class, source_name
        FROM daily_values WHERE type = 'HKQuantityTypeIdentifierHeartRate'""",
    "hrv_daily": """CREATE OR REPLACE VIEW hrv_daily AS
        SELECT canonical_person_id, day, round(value * 1000, 3) AS sdnn_ms, samples, source_class, source_name
        FROM daily_values WHERE type = 'HKQuantityTypeIdentifierHeartRateVariabilitySDNN'""",
    "body_mass_daily": """CREATE OR REPLACE VIEW body_mass_daily AS
        SELECT canonical_person_id, day, value AS kg, samples, source_class, source_name
        FROM daily_values WHERE type = 'HKQuantityTypeIdentifierBodyMass'""",
    # Sleep (runbook: "Sleep"): samples of every source, per person, form sessions
    # (a gap over SLEEP_GAP_S starts a new one). A session ending between NIGHT_ENDS
    # local time is the night of that date, any other is a nap. In a session, asleep
    # time and stages come from the one best-ranked source that has asleep samples in
    # it, in-bed time from the best-ranked source with in-bed samples.
    "sleep_samples": f"""CREATE OR REPLACE VIEW sleep_samples AS
        WITH s AS (
            SELECT COALESCE(canonical_person_id, '') AS person, record_key, start_date, end_date, end_date_local,
                   CAST(epoch(start_date) AS BIGINT) AS t0, CAST(epoch(end_date) AS BIGINT) AS t1,
                   {_sleep_stage_case()} AS stage, source_priority, source_class,
                   COALESCE(source_name, '') AS source_name
            FROM healthkit_samples WHERE type = 'HKCategoryTypeIdentifierSleepAnalysis'
        ), flagged AS (
            SELECT *, CASE WHEN t0 > max(t1) OVER (PARTITION BY person ORDER BY t0, t1, record_key
                                                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
                                     + {SLEEP_GAP_S} THEN 1 ELSE 0 END AS starts_session
            FROM s WHERE stage IS NOT NULL
        ), sessions AS (
            SELECT *, CAST(sum(starts_session) OVER (PARTITION BY person ORDER BY t0, t1, record_key) AS BIGINT)
                          AS session_no
            FROM flagged
        ), bounds AS (
            SELECT person, session_no, min(start_date) AS session_start, max(end_date) AS session_end,
                   arg_max(end_date_local, t1) AS end_local
            FROM sessions GROUP BY ALL
        )
        SELECT NULLIF(x.person, '') AS canonical_person_id, x.record_key, x.stage,
               x.stage NOT IN ('In bed', 'Awake') AS asleep, x.t1 - x.t0 AS seconds,
               x.source_priority, x.source_class, NULLIF(x.source_name, '') AS source_name,
               b.session_no, b.session_start, b.session_end, CAST(left(b.end_local, 10) AS DATE) AS date,
               CASE WHEN substr(b.end_local, 12, 5) BETWEEN '{NIGHT_ENDS[0]}' AND '{NIGHT_ENDS[1]}'
                    THEN 'night' ELSE 'nap' END AS kind
        FROM sessions x JOIN bounds b USING (person, session_no)""",
    "sleep_sessions": """CREATE OR REPLACE VIEW sleep_sessions AS
        WITH per_source AS (
            SELECT canonical_person_id, session_no, source_priority, source_class,
                   COALESCE(source_name, '') AS source_name,
                   sum(seconds) FILTER (WHERE asleep) AS asleep_s,
                   sum(seconds) FILTER (WHERE stage = 'Awake') AS awake_s,
                   sum(seconds) FILTER (WHERE stage = 'In bed') AS in_bed_s
            FROM sleep_samples GROUP BY ALL
        ), best AS (
            SELECT canonical_person_id, session_no,
                   arg_min(struct_pack(s := source_name, c := source_class, asleep := asleep_s, awake := awake_s),
                           struct_pack(p := source_priority, c := source_class, s := source_name))
                       FILTER (WHERE asleep_s IS NOT NULL) AS a,
                   arg_min(struct_pack(s := source_name, in_bed := in_bed_s),
                           struct_pack(p := source_priority, c := source_class, s := source_name))
                       FILTER (WHERE in_bed_s IS NOT NULL) AS b
            FROM per_source GROUP BY ALL
        ), sessions AS (
            SELECT DISTINCT canonical_person_id, session_no, session_start, session_end, date, kind FROM sleep_samples
        )
        SELECT x.canonical_person_id, x.session_no, x.kind, x.date AS night, x.session_start, x.session_end,
               COALESCE(b.a.asleep, 0) / 60.0 AS asleep_minutes, COALESCE(b.a.awake, 0) / 60.0 AS awake_minutes,
               COALESCE(b.b.in_bed, 0) / 60.0 AS in_bed_minutes,
               b.a.c AS asleep_source_class, NULLIF(b.a.s, '') AS asleep_source, NULLIF(b.b.s, '') AS in_bed_source
        FROM sessions x JOIN best b
             ON b.canonical_person_id IS NOT DISTINCT FROM x.canonical_person_id AND b.session_no = x.session_no""",
    # One row per night: the nights' sessions added up; naps of that date beside, not in it.
    "sleep_per_night": """CREATE OR REPLACE VIEW sleep_per_night AS
        SELECT canonical_person_id, night,
               sum(asleep_minutes) FILTER (WHERE kind = 'night') AS asleep_minutes,
               sum(in_bed_minutes) FILTER (WHERE kind = 'night') AS in_bed_minutes,
               sum(awake_minutes) FILTER (WHERE kind = 'night') AS awake_minutes,
               COALESCE(sum(asleep_minutes) FILTER (WHERE kind = 'nap'), 0) AS nap_minutes,
               min(asleep_source) FILTER (WHERE kind = 'night') AS asleep_source,
               min(in_bed_source) FILTER (WHERE kind = 'night') AS in_bed_source
        FROM sleep_sessions GROUP BY ALL""",
    # Minutes per night and stage: the stages of each night session's asleep source and
    # the in-bed time of its in-bed source (naps left out).
    "sleep_nightly": """CREATE OR REPLACE VIEW sleep_nightly AS
        SELECT s.canonical_person_id, s.date AS night, s.stage, sum(s.seconds) / 60.0 AS minutes,
               count(*) AS samples, min(s.source_class) AS device_class, min(s.source_name) AS source_name
        FROM sleep_samples s JOIN sleep_sessions x
             ON x.canonical_person_id IS NOT DISTINCT FROM s.canonical_person_id AND x.session_no = s.session_no
        WHERE s.kind = 'night'
          AND COALESCE(s.source_name, '') = COALESCE(CASE WHEN s.stage = 'In bed' THEN x.in_bed_source
                                                          ELSE x.asleep_source END, '')
          AND (s.stage = 'In bed' OR s.source_class = x.asleep_source_class)
        GROUP BY ALL""",
    # Workouts: energy and distance from WorkoutStatistics (sum of the active energy and of
    # every Distance* statistic) when present, else the Workout's totals.
    "workout_summary": """CREATE OR REPLACE VIEW workout_summary AS
        WITH stats AS (
            SELECT w.record_key,
                   unnest(from_json(w.statistics, '[{"type": "VARCHAR", "sum": "DOUBLE", "unit": "VARCHAR"}]'))
                       AS s
            FROM workouts w
        ), agg AS (
            SELECT record_key,
                   sum(hd_kcal(s.sum, s.unit)) FILTER (
                       WHERE s.type = 'HKQuantityTypeIdentifierActiveEnergyBurned') AS energy_kcal,
                   sum(hd_km(s.sum, s.unit)) FILTER (
                       WHERE s.type LIKE 'HKQuantityTypeIdentifierDistance%') AS distance_km
            FROM stats GROUP BY record_key
        )
        SELECT w.record_key, w.canonical_person_id, w.start_date, w.end_date, w.local_date,
               replace(w.activity_type, 'HKWorkoutActivityType', '') AS activity,
               hd_minutes(w.duration, w.duration_unit) AS duration_min,
               COALESCE(a.energy_kcal, hd_kcal(w.total_energy_burned, w.total_energy_burned_unit))
                   AS energy_kcal,
               COALESCE(a.distance_km, hd_km(w.total_distance, w.total_distance_unit)) AS distance_km,
               w.source_name, w.device
        FROM workouts w LEFT JOIN agg a ON a.record_key = w.record_key
        WHERE NOT EXISTS (SELECT 1 FROM removed_records x WHERE x.record_key = w.record_key)""",
    "body_mass": """CREATE OR REPLACE VIEW body_mass AS
        SELECT canonical_person_id, start_date AS measured_at, local_date AS day,
               value_si AS kg, value, unit, source_name, source_class
        FROM quantity_samples WHERE type = 'HKQuantityTypeIdentifierBodyMass'""",
    # Latest result per person and test (first LOINC coding, else first coding, else the
    # text) among FHIR Observations that are laboratory results or carry no category;
    # results marked entered-in-error or cancelled are not results. local_date: the
    # date in the lab's own offset (the `_local` twin of the time the row is dated by).
    "lab_results_latest": """CREATE OR REPLACE VIEW lab_results_latest AS
        WITH obs AS (
            SELECT o.*, from_json(o.code, '[{"system": "VARCHAR", "code": "VARCHAR", "display": "VARCHAR"}]')
                       AS codings
            FROM observations o
            WHERE o.source = 'fhir' AND COALESCE(o.status, '') NOT IN ('entered-in-error', 'cancelled')
              AND (o.category IS NULL OR json_array_length(o.category) = 0
                   OR list_contains(json_extract_string(o.category, '$[*].code'), 'laboratory'))
              AND NOT EXISTS (SELECT 1 FROM removed_records x WHERE x.record_key = o.record_key)
        ), keyed AS (
            SELECT *, codings[COALESCE(list_position([c.system FOR c IN codings], 'http://loinc.org'), 1)]
                       AS coding
            FROM obs
        ), ranked AS (
            SELECT *, row_number() OVER (
                       PARTITION BY canonical_person_id, COALESCE(coding.code, code_text)
                       ORDER BY event_time DESC NULLS LAST, record_key) AS rank
            FROM keyed
        )
        SELECT canonical_person_id, coding.system AS code_system, coding.code AS code,
               COALESCE(code_text, coding.display) AS name, event_time AS effective_time,
               value, value_text, unit, value_comparator,
               TRY_CAST(details ->> 'value_low' AS DOUBLE) AS value_low,
               TRY_CAST(details ->> 'value_high' AS DOUBLE) AS value_high,
               interpretation, reference_range, status, category_text, record_key,
               COALESCE(TRY_CAST(left(details ->> (event_time_field || '_local'), 10) AS DATE), local_date)
                   AS local_date,
               CASE WHEN json_extract_string(reference_range, '$[0].low') IS NULL
                         AND json_extract_string(reference_range, '$[0].high') IS NULL
                    THEN json_extract_string(reference_range, '$[0].text') END AS reference_range_text
        FROM ranked WHERE rank = 1""",
}

# --------------------------------------------------------------------------- connections


def connect(db_path: Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the warehouse with `TimeZone` pinned to UTC."""
    if read_only and not Path(db_path).is_file():
        raise InputError("there is no warehouse at that path; build it with `healthdelta duckdb build`")
    try:
        con = duckdb.connect(str(db_path), read_only=read_only)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise StateError("the warehouse is in use by another process; try again when it has finished") from None
        raise HealthDeltaError("the warehouse file could not be opened (not a DuckDB database?)") from None
    except duckdb.Error:
        raise HealthDeltaError("the warehouse file could not be opened (not a DuckDB database?)") from None
    con.execute("SET TimeZone = 'UTC'")
    _bound_resources(con, Path(db_path), read_only)
    return con


# DuckDB's default memory limit is 80% of RAM: one warehouse load could then take most of a
# laptop. Bounded here, it spills to `<warehouse>.tmp/` beside the file (inside <out>) instead;
# measured on a 136 MB export.xml, 256 MB leaves `run all` as fast as unbounded and its peak RSS
# at about a third (benchmarks/side_by_side.py; docs/runbook_warehouse.md).
MEMORY_LIMIT_ENV = "HEALTHDELTA_DUCKDB_MEMORY_LIMIT"
DEFAULT_MEMORY_LIMIT = "256MB"
_MEMORY = re.compile(r"\d+(\.\d+)?\s*(KB|MB|GB|KiB|MiB|GiB)", re.IGNORECASE)


def memory_limit() -> str:
    value = os.environ.get(MEMORY_LIMIT_ENV, DEFAULT_MEMORY_LIMIT).strip()
    if not _MEMORY.fullmatch(value):
        raise UsageError(f"{MEMORY_LIMIT_ENV} must be a size such as 256MB or 2GB")
    return value


def _bound_resources(con: duckdb.DuckDBPyConnection, db_path: Path, read_only: bool) -> None:
    con.execute(f"SET memory_limit = '{memory_limit()}'")
    con.execute(f"SET threads = {max(1, min(4, os.cpu_count() or 1))}")  # each thread holds buffers
    if not read_only:
        spill = (str(db_path.absolute()) + ".tmp").replace("'", "''")
        con.execute(f"SET temp_directory = '{spill}'")


def _table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND schema_name = 'main'",
                       [name]).fetchone()[0] > 0


def _meta(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
    if not _table_exists(con, "warehouse_meta"):
        return None
    row = con.execute("SELECT value FROM warehouse_meta WHERE key = ?", [key]).fetchone()
    return row[0] if row else None


def is_initialised(con: duckdb.DuckDBPyConnection) -> bool:
    """True when the warehouse has its tables and views (at least one load happened)."""
    return _meta(con, "schema_version") == str(SCHEMA_VERSION) and _meta(con, "views_version") is not None


def views_current(con: duckdb.DuckDBPyConnection) -> bool:
    """False when the views were made by an older version (the next load or `duckdb build` renews them)."""
    return _meta(con, "views_version") == str(VIEWS_VERSION)


def _ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create tables (first use) and views (first use or new VIEWS_VERSION); inside the caller's transaction."""
    version = _meta(con, "schema_version")
    if version is not None and version != str(SCHEMA_VERSION):
        raise StateError("the warehouse was built by another version of healthdelta; "
                         "rebuild it with `healthdelta duckdb build --replace`")
    if version is None:
        for ddl in _BASE_DDL:
            con.execute(ddl)
        for stream in STREAMS:
            con.execute(_stream_ddl(stream))
        con.execute("INSERT INTO warehouse_meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
    if _meta(con, "views_version") != str(VIEWS_VERSION):
        ensure_source_priority(con)
        for ddl in _MACROS:
            con.execute(ddl)
        for ddl in VIEWS.values():
            con.execute(ddl)
        con.execute("INSERT OR REPLACE INTO warehouse_meta VALUES ('views_version', ?)", [str(VIEWS_VERSION)])


def ensure_source_priority(con: duckdb.DuckDBPyConnection) -> None:
    """The table the views rank sources by, holding the default order unless one was stored."""
    con.execute("CREATE TABLE IF NOT EXISTS source_priority (position INTEGER NOT NULL, entry VARCHAR NOT NULL)")
    if not con.execute("SELECT count(*) FROM source_priority").fetchone()[0]:
        _write_priority(con, sources.DEFAULT_PRIORITY)


def _write_priority(con: duckdb.DuckDBPyConnection, entries: Iterable[str]) -> None:
    con.execute("DELETE FROM source_priority")
    con.executemany("INSERT INTO source_priority VALUES (?, ?)", [[i, e] for i, e in enumerate(entries, 1)])


def set_source_priority(db_path: Path, entries: Iterable[str]) -> bool:
    """Store the source priority (sources.py) the views rank sources by; True when it changed.

    Creates the warehouse's tables and views first if needed, in the same transaction.
    """
    wanted = sources.validate(list(entries))
    con = connect(db_path)
    try:
        with _transaction(con):
            _ensure_schema(con)
            current = tuple(r[0] for r in con.execute("SELECT entry FROM source_priority ORDER BY position").fetchall())
            if current != wanted:
                _write_priority(con, wanted)
        return current != wanted
    finally:
        con.close()


def source_priority(con: duckdb.DuckDBPyConnection) -> tuple[str, ...]:
    """The stored source priority, most trusted first."""
    return tuple(r[0] for r in con.execute("SELECT entry FROM source_priority ORDER BY position").fetchall())


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadResult:
    run_id: str
    status: str  # 'loaded' or 'already_loaded'
    load_mode: str | None = None  # 'delta' or 'full'
    inserted: dict[str, int] = field(default_factory=dict)  # records new to the warehouse, per stream
    removed: dict[str, int] = field(default_factory=dict)  # records this run's delta removed
    unknown_fields: tuple[str, ...] = ()  # "stream.field" present in the NDJSON, not in the tables

    @property
    def rows_inserted(self) -> int:
        return sum(self.inserted.values())

    @property
    def rows_removed(self) -> int:
        return sum(self.removed.values())


@dataclass(frozen=True)
class BuildResult:
    db_path: Path
    runs: tuple[LoadResult, ...]
    replaced: bool
    unregistered: tuple[str, ...] = ()  # run dirs skipped: not in the registry given

    @property
    def loaded(self) -> int:
        return sum(1 for r in self.runs if r.status == "loaded")


def read_delta(ndjson_dir: Path) -> dict[str, Any]:
    """`delta.json` of an NDJSON run directory (its run id and delta parent)."""
    try:
        doc = json.loads((ndjson_dir / "delta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("the NDJSON directory has no delta.json (not a run written by `export ndjson`)") from None
    except (OSError, ValueError):
        raise InputError("the NDJSON run's delta.json is unreadable") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("run_id"), str):
        raise InputError("the NDJSON run's delta.json has no run id")
    return doc


def _is_loaded(con: duckdb.DuckDBPyConnection, run_id: str) -> bool:
    if not _table_exists(con, "runs"):
        return False
    return con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0] > 0


_SAMPLE_LINES = 200  # per file, for the schema drift check


def _unknown_fields(stream: str, path: Path) -> set[str]:
    """Fields of the first rows of `path` that the table has no column for.

    The NDJSON is the lossless record; this only tells the user that this version of
    the warehouse does not type a field a newer parser writes.
    """
    known = set(stream_fields(stream))
    seen: set[str] = set()
    with streamfile.open_read(path) as fh:
        for n, line in enumerate(fh):
            if n >= _SAMPLE_LINES:
                break
            try:
                seen.update(orjson.loads(line).keys())
            except orjson.JSONDecodeError:
                break  # read_json reports it, and the load fails
    return seen - known


def load_run(db_path: Path, ndjson_dir: Path, run: Mapping[str, Any], *,
             progress: ProgressFn = no_progress) -> LoadResult:
    """Load one NDJSON run directory into the warehouse at `db_path` (created if missing).

    `run` is the run's registry entry (`run_id`, `parent_run_id`, `created_at`, ...);
    only `run_id` is required. Idempotent: an already loaded run is skipped.
    """
    delta = read_delta(ndjson_dir)
    run_id = run.get("run_id") or delta["run_id"]
    if delta["run_id"] != run_id:
        raise InputError("the NDJSON directory belongs to another run than the one being loaded")
    con = connect(db_path)
    try:
        if _is_loaded(con, run_id):
            return LoadResult(run_id=run_id, status="already_loaded")
        return _load_in_transaction(con, ndjson_dir, dict(run), delta, progress)
    finally:
        con.close()


def _changed_message(exc: duckdb.Error) -> str:
    return f"the warehouse could not be changed ({type(exc).__name__})"


@contextmanager
def _transaction(con: duckdb.DuckDBPyConnection, message: Callable[[duckdb.Error], str] = _changed_message):
    """One transaction: committed when the block ends, rolled back on any exception
    (Ctrl-C included); a DuckDB error becomes one HealthDeltaError line (details with --debug)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        con.execute("COMMIT")
    except BaseException as exc:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # the connection is gone: nothing was committed either way
        if isinstance(exc, duckdb.Error):
            raise HealthDeltaError(message(exc)) from exc
        raise


def _load_in_transaction(con: duckdb.DuckDBPyConnection, ndjson_dir: Path, run: dict[str, Any],
                 delta: dict[str, Any], progress: ProgressFn) -> LoadResult:
    run_id = delta["run_id"]
    delta_parent = delta.get("parent_run_id")
    # Both cores write row groups. One thread uses 17-31% less CPU and leaves a smaller
    # file, and is as fast on a loaded machine, but on an idle one a 1 GB export's first
    # load took ~10 s longer (docs/runbook_warehouse.md): wall time is what people wait for.
    con.execute("SET preserve_insertion_order = false")
    with _transaction(con, _load_error_message):
        _ensure_schema(con)
        parent_loaded = delta_parent is not None and _is_loaded(con, delta_parent)
        load_mode = "delta" if delta_parent is None or parent_loaded else "full"
        inserted: dict[str, int] = {}
        removed: dict[str, int] = {}
        unknown: set[str] = set()
        against = _known_keys(con, load_mode, delta_parent)
        folder = ndjson_dir / "added" if load_mode == "delta" else ndjson_dir
        sources = {s: streamfile.find(folder, s) for s in STREAMS}
        missing = [s for s, path in sources.items() if path is None]
        if missing:
            raise InputError(f"the NDJSON run is incomplete: the {missing[0]} stream is missing")
        total = sum(path.stat().st_size for path in sources.values())
        for stream in STREAMS:
            source = sources[stream]
            unknown |= {f"{stream}.{f}" for f in _unknown_fields(stream, source)}
            # Progress in bytes of NDJSON loaded, also while one large stream's insert runs.
            with _statement_progress(con, lambda n: progress("loading", n, total), source.stat().st_size):
                inserted[stream] = _insert_stream(con, stream, source, run_id, against)
            removed[stream] = 0
            if load_mode == "delta":
                gone = streamfile.find(ndjson_dir / "removed", stream)
                if gone is not None and gone.stat().st_size:
                    removed[stream] = _mark_removed(con, stream, gone, run_id, against)
        _insert_run(con, run, delta, load_mode, parent_loaded, inserted, removed)
    try:
        con.execute("CHECKPOINT")
    except duckdb.Error:
        pass  # committed already: the WAL holds the load until the next checkpoint
    return LoadResult(run_id=run_id, status="loaded", load_mode=load_mode, inserted=inserted,
                      removed=removed, unknown_fields=tuple(sorted(unknown)))


def _load_error_message(exc: duckdb.Error) -> str:
    # DuckDB's messages quote file paths and offending values; CONTRACT §10 allows neither.
    if isinstance(exc, duckdb.InvalidInputException):
        return "the NDJSON of this run is not valid canonical NDJSON; nothing was loaded"
    if isinstance(exc, duckdb.OutOfMemoryException):
        return "DuckDB ran out of memory while loading; nothing was loaded"
    if isinstance(exc, duckdb.IOException):
        return "the warehouse could not be written (disk full or read-only?); nothing was loaded"
    return f"the warehouse load failed ({type(exc).__name__}); nothing was loaded"


PROGRESS_POLL_SECONDS = 0.5


@contextmanager
def _statement_progress(con: duckdb.DuckDBPyConnection, report: Callable[[int], None], units: int):
    """Report `units` over the statements run inside the block: while they run, a helper
    thread reports DuckDB's own estimate of the running statement's progress (so one
    long insert is not a frozen bar); the rest is reported when the block succeeds."""
    con.execute("SET enable_progress_bar = true")
    con.execute("SET enable_progress_bar_print = false")
    reported = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal reported
        while not stop.wait(PROGRESS_POLL_SECONDS):
            percent = con.query_progress()
            done = int(units * min(max(percent, 0.0), 100.0) / 100)
            if done > reported:
                report(done - reported)
                reported = done

    thread = threading.Thread(target=poll, name="load-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if units > reported:
        report(units - reported)


def _known_keys(con: duckdb.DuckDBPyConnection, load_mode: str, delta_parent: str | None) -> str:
    """What the rows of this load must be anti-joined against so that no record is inserted twice.

    'none' when no run is loaded: the tables are empty (rows only come and go with their run).
    'removed' when the loaded runs are one chain, each a delta load of the one before, loaded
    1, 2, ... n (no run taken out between: its rows would be missing) and ending at this
    run's delta parent. The tables then hold exactly the keys of the chain's streams, so a
    key of `added/` (not in the parent's stream) that a table holds left the chain at a later
    run, whose `removed/` listed it in `removed_records`, where it stays until a run brings
    it back; and every key of `removed/` (the parent's) is held. Checking those keys costs
    what the delta costs; the whole table's keys cost a scan of every key ever loaded, on
    every next export.
    'table' otherwise (a full load, a parent that is not the newest run, two chains, a gap):
    every key of the table.
    """
    if not con.execute("SELECT count(*) FROM runs").fetchone()[0]:
        return "none"
    if load_mode != "delta":
        return "table"
    chained = con.execute(
        "SELECT count(*) FILTER (WHERE prev IS NOT NULL AND (load_mode <> 'delta' "
        "OR delta_parent_run_id IS DISTINCT FROM prev)) = 0 AND arg_max(run_id, load_seq) = ? "
        "AND max(load_seq) = count(*) "
        "FROM (SELECT run_id, load_seq, load_mode, delta_parent_run_id, "
        "lag(run_id) OVER (ORDER BY load_seq) AS prev FROM runs)", [delta_parent]).fetchone()[0]
    return "removed" if chained else "table"


def _insert_stream(con: duckdb.DuckDBPyConnection, stream: str, source: Path, run_id: str, against: str) -> int:
    """Bulk-insert the rows of `source` whose record_key is not among the `against` keys
    (`_known_keys`); returns their count."""
    if source.stat().st_size == 0:
        return 0
    removed_now = 0 if against == "none" else con.execute(
        "SELECT count(*) FROM removed_records WHERE stream = ?", [stream]).fetchone()[0]
    params = {"path": str(source), "run_id": run_id}
    where = ""
    if against == "table":
        where = f"WHERE NOT EXISTS (SELECT 1 FROM {stream} AS t WHERE t.record_key = src.record_key)"
    elif against == "removed" and removed_now:
        where = ("WHERE NOT EXISTS (SELECT 1 FROM removed_records AS x "
                 "WHERE x.stream = $stream AND x.record_key = src.record_key)")
        params["stream"] = stream
    cols = _table_columns(stream)
    reader = f"read_json($path, format = 'newline_delimited', columns = {_read_spec(stream)})"
    sql = (f"INSERT INTO {stream} ({', '.join(c for c, _, _ in cols)}) "
           f"SELECT {', '.join(e for _, _, e in cols)} FROM {reader} AS src {where}")
    count = con.execute(sql, params).fetchone()[0]
    # A record removed by an earlier run and now back: present again (first_seen_run kept).
    if removed_now:
        con.execute(f"UPDATE record_removals SET readded_in_run = ? WHERE stream = ? AND readded_in_run IS NULL "
                    f"AND record_key IN (SELECT record_key FROM {_keys_reader(stream)})",
                    [run_id, stream, str(source)])
    return count


def _keys_reader(stream: str) -> str:
    return f"read_json(?, format = 'newline_delimited', columns = {_read_spec(stream, ('record_key',))})"


def _mark_removed(con: duckdb.DuckDBPyConnection, stream: str, gone: Path, run_id: str, against: str) -> int:
    """List the keys of `removed/<stream>.ndjson[.zst]` that the table holds and are not listed yet
    (after a chain, `_known_keys` 'removed', the table holds them all: no scan of its keys)."""
    held = "" if against == "removed" else f"EXISTS (SELECT 1 FROM {stream} AS t WHERE t.record_key = g.record_key) AND "
    return con.execute(
        f"INSERT INTO record_removals SELECT DISTINCT g.record_key, ?, ?, NULL FROM {_keys_reader(stream)} AS g "
        f"WHERE {held}NOT EXISTS (SELECT 1 FROM removed_records AS x WHERE x.stream = ? AND x.record_key = g.record_key)",
        [stream, run_id, str(gone), stream],
    ).fetchone()[0]


def _insert_run(con: duckdb.DuckDBPyConnection, run: dict[str, Any], delta: dict[str, Any], load_mode: str,
                parent_loaded: bool, inserted: dict[str, int], removed: dict[str, int]) -> None:
    run_id = delta["run_id"]
    delta_parent = delta.get("parent_run_id")
    seq = con.execute("SELECT COALESCE(max(load_seq), 0) + 1 FROM runs").fetchone()[0]
    if parent_loaded:
        root = con.execute("SELECT lineage_root FROM runs WHERE run_id = ?", [delta_parent]).fetchone()[0]
    else:
        root = run_id
    fingerprint = run.get("input_fingerprint") or {}
    notes = run.get("notes")
    con.execute(
        "INSERT INTO runs VALUES (?, ?, TRY_CAST(? AS TIMESTAMPTZ), ?, ?, ?, ?, ?, ?::JSON, ?::JSON, "
        "?, ?, ?, ?, ?::JSON, ?, ?)",
        [
            run_id, run.get("parent_run_id", delta_parent), run.get("created_at"), run.get("mode"),
            notes if isinstance(notes, str) or notes is None else json.dumps(notes, sort_keys=True),
            fingerprint.get("sha256"), fingerprint.get("file_count"), fingerprint.get("total_bytes"),
            json.dumps(run.get("artifacts"), sort_keys=True) if run.get("artifacts") is not None else None,
            json.dumps(run, sort_keys=True) if len(run) > 1 else None,
            seq, load_mode, delta_parent, root,
            json.dumps(delta.get("streams"), sort_keys=True) if delta.get("streams") is not None else None,
            sum(inserted.values()), sum(removed.values()),
        ],
    )


# --------------------------------------------------------------------------- build


def find_run_dirs(ndjson_input: Path) -> list[Path]:
    """`ndjson_input` is one run directory (holds delta.json) or the parent of several."""
    if (ndjson_input / "delta.json").is_file():
        return [ndjson_input]
    if not ndjson_input.is_dir():
        raise InputError("the NDJSON input is not a directory")
    dirs = sorted(p for p in ndjson_input.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / "delta.json").is_file())
    if not dirs:
        raise InputError("the NDJSON input holds no run directories (<run_id>/delta.json)")
    return dirs


def _load_order(runs: list[tuple[Path, dict[str, Any], dict[str, Any]]]) -> list[tuple[Path, dict, dict]]:
    """Parents before children; otherwise oldest first (created_at, then run id)."""
    by_id = {delta["run_id"]: (d, entry, delta) for d, entry, delta in runs}
    done: set[str] = set()
    ordered: list[tuple[Path, dict, dict]] = []

    def visit(run_id: str, trail: frozenset[str]) -> None:
        if run_id in done or run_id in trail:
            return
        d, entry, delta = by_id[run_id]
        parent = delta.get("parent_run_id")
        if parent in by_id:
            visit(parent, trail | {run_id})
        done.add(run_id)
        ordered.append((d, entry, delta))

    for _, _, delta in sorted(runs, key=lambda r: (r[1].get("created_at") or "", r[2]["run_id"])):
        visit(delta["run_id"], frozenset())
    return ordered


def build(ndjson_input: Path, db_path: Path, *, replace: bool = False,
          registry_entries: Mapping[str, Mapping[str, Any]] | Iterable[Mapping[str, Any]] | None = None,
          progress: ProgressFn = no_progress) -> BuildResult:
    """`duckdb build`: load every run under `ndjson_input` that the warehouse lacks.

    `registry_entries` (run_id -> entry, or entries) supply created_at, notes, etc.;
    when given, only registered runs are loaded (an NDJSON dir left by a run that
    failed before registration is not trusted). Without them every run directory is
    loaded, known by its delta.json alone. With `replace`, a new warehouse is built
    beside the old one and renamed over it when complete.
    """
    if isinstance(registry_entries, Mapping):
        entries = {k: dict(v) for k, v in registry_entries.items()}
    else:
        entries = {e["run_id"]: dict(e) for e in registry_entries or ()}
    runs = []
    unregistered = []
    for d in find_run_dirs(ndjson_input):
        delta = read_delta(d)
        if entries and delta["run_id"] not in entries:
            unregistered.append(delta["run_id"])
            continue
        runs.append((d, entries.get(delta["run_id"], {"run_id": delta["run_id"]}), delta))
    ordered = _load_order(runs)
    if replace and not ordered:
        raise InputError("no registered run to build the warehouse from; the old warehouse is kept")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    target = db_path.with_name(f".tmp-{db_path.name}-{os.getpid()}") if replace else db_path
    if replace:
        _remove_db(target)
    # One progress total for the whole build: the bytes of every run's added/ streams
    # (what a chain of runs loads; a run loaded in full reads more, the bar then ends early).
    grand = sum(p.stat().st_size for d, _, _ in ordered for p in streamfile.stream_files(d / "added")) or None

    def overall(stage: str, advance: int, total: int | None) -> None:
        progress(stage, advance, grand)

    try:
        results = tuple(load_run(target, d, entry, progress=overall) for d, entry, _ in ordered)
        if not replace and target.is_file():
            _ensure_exists(target)  # renews the views of an older version even when no run was new
        if replace:
            _ensure_exists(target)
            # A WAL left by the old file must not be replayed against the new one.
            Path(f"{db_path}.wal").unlink(missing_ok=True)
            os.replace(target, db_path)
    finally:
        if replace:
            _remove_db(target)
    return BuildResult(db_path=db_path, runs=results, replaced=replace, unregistered=tuple(unregistered))


def _ensure_exists(db_path: Path) -> None:
    con = connect(db_path)
    try:
        con.execute("BEGIN TRANSACTION")
        _ensure_schema(con)
        con.execute("COMMIT")
        con.execute("CHECKPOINT")
    finally:
        con.close()


def _remove_db(path: Path) -> None:
    path.unlink(missing_ok=True)
    Path(f"{path}.wal").unlink(missing_ok=True)


def loaded_runs(db_path: Path) -> list[str]:
    """Ids of the runs in the warehouse, in load order ([] for no warehouse yet)."""
    if not Path(db_path).is_file():
        return []
    con = connect(db_path, read_only=True)
    try:
        if not _table_exists(con, "runs"):
            return []
        return [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY load_seq").fetchall()]
    finally:
        con.close()


def unload_run(db_path: Path, run_id: str) -> bool:
    """Take back what loading `run_id` did, in one transaction; False if it is not loaded.

    For `run all`: a run whose later stage failed (or that was never registered) must
    not stay in the warehouse. Its rows are exactly those whose `run_id` is it (the
    records it was first to bring); its removals are dropped and the records it brought
    back count as removed again. A run that another loaded run builds on is refused.
    """
    con = connect(db_path)
    try:
        if not _is_loaded(con, run_id):
            return False
        if con.execute("SELECT count(*) FROM runs WHERE delta_parent_run_id = ?", [run_id]).fetchone()[0]:
            raise StateError("that run cannot be taken out of the warehouse: a later loaded run builds on it")
        with _transaction(con):
            for stream in STREAMS:
                con.execute(f"DELETE FROM {stream} WHERE run_id = ?", [run_id])
            con.execute("DELETE FROM record_removals WHERE removed_in_run = ?", [run_id])
            con.execute("UPDATE record_removals SET readded_in_run = NULL WHERE readded_in_run = ?", [run_id])
            con.execute("DELETE FROM runs WHERE run_id = ?", [run_id])
        con.execute("CHECKPOINT")
        return True
    finally:
        con.close()


# --------------------------------------------------------------------------- reading


def table_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Row counts of the stream tables, `runs` and `record_removals` (fixed names)."""
    return {name: con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
            for name in (*STREAMS, "runs", "record_removals")}


_SQL_ERRORS_WITHOUT_DATA = (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException)


QUERY_FORMATS = ("csv", "json", "parquet")


def query(db_path: Path, sql: str, out: IO[bytes] | IO[str], fmt: str = "csv") -> int:
    """`duckdb query`: run one SQL statement on a read-only connection, stream it to `out`.

    csv: values rendered by DuckDB itself (the statement is wrapped as `SELECT
    COLUMNS(*)::VARCHAR FROM (...)`), so timestamps, lists and structs print as DuckDB
    prints them; NULL is an empty field. json: one JSON array, one row object per line
    with the columns in the query's order; numbers, booleans, lists and structs stay
    JSON values, NaN/Infinity and NULL are null, timestamps are ISO 8601 text, DECIMAL
    is a number and any other type its text. Rows are fetched in batches (never the
    whole result at once); statements that cannot be wrapped (PRAGMA) are run as given.
    Returns the number of rows written.
    """
    con = _query_connection(db_path)
    text_out, detach = (out, False) if isinstance(out, io.TextIOBase) else (
        io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True), True)  # type: ignore[arg-type]
    try:
        _execute_query(con, _one_statement(con, sql), as_text=fmt == "csv")
        write = _write_csv if fmt == "csv" else _write_json
        try:
            rows = write(con, text_out)
        except duckdb.Error as exc:
            raise HealthDeltaError(f"the query failed while reading its result ({type(exc).__name__})") from None
        text_out.flush()
        return rows
    finally:
        if detach:
            text_out.detach()  # type: ignore[union-attr]
        con.close()


def query_parquet(db_path: Path, sql: str, dest: Path) -> int:
    """`duckdb query --format parquet`: DuckDB's own Parquet writer (COPY) writes the
    result to `dest`, whose folder (private and empty) is the only place the connection
    may touch besides the warehouse. Returns the number of rows."""
    dest = dest.parent.resolve() / dest.name  # DuckDB checks the path it is given against the allowed folder
    con = _query_connection(db_path, writable_dir=dest.parent)
    try:
        text = _one_statement(con, sql)
        with _query_errors():
            relation = con.sql(text)
            if relation is None:
                raise UsageError("--format parquet needs a statement that returns rows")
            relation.write_parquet(str(dest))
        return con.execute("SELECT count(*) FROM read_parquet(?)", [str(dest)]).fetchone()[0]
    finally:
        con.close()


def _query_connection(db_path: Path, writable_dir: Path | None = None) -> duckdb.DuckDBPyConnection:
    con = connect(db_path, read_only=True)
    # Least privilege: the statement sees the warehouse only (no files, no ATTACH, no
    # extensions) besides the folder the caller's output goes to, and cannot turn that back on.
    if writable_dir is not None:
        quoted = str(writable_dir).replace("'", "''")
        con.execute(f"SET allowed_directories = ['{quoted}/']")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _one_statement(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise UsageError(f"the query is not valid: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise UsageError("give exactly one SQL statement")
    return sql.strip().rstrip(";").strip()


def _write_csv(con: duckdb.DuckDBPyConnection, out: IO[str]) -> int:
    if not con.description:
        return 0
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([d[0] for d in con.description])
    rows = 0
    while batch := con.fetchmany(QUERY_BATCH_ROWS):
        writer.writerows(batch)
        rows += len(batch)
    return rows


def _write_json(con: duckdb.DuckDBPyConnection, out: IO[str]) -> int:
    names = [d[0] for d in con.description or ()]
    if len(set(names)) != len(names):
        raise UsageError("--format json needs distinct column names: give repeated columns an alias (AS ...)")
    out.write("[")
    rows = 0
    while con.description and (batch := con.fetchmany(QUERY_BATCH_ROWS)):
        for row in batch:
            try:
                line = orjson.dumps(dict(zip(names, row)), default=_json_value, option=orjson.OPT_NON_STR_KEYS)
            except orjson.JSONEncodeError:
                raise UsageError("--format json: a value does not fit in a 64-bit integer; "
                                 "CAST that column to DOUBLE or VARCHAR") from None
            out.write(("\n" if rows == 0 else ",\n") + line.decode("utf-8"))
            rows += 1
    out.write("\n]\n")
    return rows


def _json_value(value: object) -> object:
    """Types orjson leaves to the caller: DECIMAL as a number, BLOB as hex, anything else as text."""
    if isinstance(value, Decimal):
        return float(value)
    return value.hex() if isinstance(value, bytes) else str(value)


def _execute_query(con: duckdb.DuckDBPyConnection, text: str, *, as_text: bool) -> None:
    with _query_errors():
        if not as_text:
            con.execute(text)
            return
        try:
            con.execute(f"SELECT COLUMNS(*)::VARCHAR FROM ({text}) AS hd_query")
        except (duckdb.ParserException, duckdb.CatalogException):
            con.execute(text)  # PRAGMA and other statements that are not a relation


@contextmanager
def _query_errors():
    """The user's statement failed: say why without quoting data values."""
    try:
        yield
    except _SQL_ERRORS_WITHOUT_DATA as exc:
        # These describe the SQL text the user wrote, never data values.
        raise UsageError(f"the query is not valid: {str(exc).splitlines()[0]}") from None
    except duckdb.PermissionException:
        raise UsageError("`duckdb query` reads the warehouse only: no files, other databases or extensions") from None
    except duckdb.Error as exc:
        message = str(exc).lower()
        if "read-only" in message or "read only" in message:
            raise UsageError("the warehouse is opened read-only: `duckdb query` cannot change it") from None
        if "configuration has been locked" in message:
            raise UsageError("`duckdb query` cannot change the connection's settings") from None
        # Conversion and similar errors quote values: keep them out of the message.
        raise HealthDeltaError(f"the query failed ({type(exc).__name__})") from None
