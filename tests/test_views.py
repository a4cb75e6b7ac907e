"""The warehouse views against hand-built samples whose right answers are written here:
steps de-duplicated by source priority on the UTC time line, sleep per night, labs,
normalised units, per-day values from the best source. Each case asserts the number."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from pathlib import Path

import pytest

pytest.importorskip("duckdb")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_warehouse import PHONE, WATCH, _row, write_run  # noqa: E402

from healthdelta import sources, units, warehouse  # noqa: E402
from healthdelta.errors import UsageError  # noqa: E402

STEPS = "HKQuantityTypeIdentifierStepCount"
SLEEP = "HKCategoryTypeIdentifierSleepAnalysis"
APP = None  # a third-party app: no HKDevice
W, P = "Jane’s Apple Watch", "Jane’s iPhone"


def step(key: str, start: str, end: str, device: str | None, value: float, source: str, *,
         offset: str = "-07:00", end_offset: str | None = None, manual: bool = False) -> dict:
    row = _row(key, start, end, device, value, STEPS, source, offset)
    if end_offset is not None:  # a sample across a DST change: its end in the new offset
        row = {**row, "end_date": _utc(end, end_offset), "end_date_local": end + end_offset}
    if manual:
        row["metadata"] = {"HKWasUserEntered": "1"}
    return row


def _utc(local: str, offset: str) -> str:
    sign = -1 if offset[0] == "-" else 1
    delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])) * sign
    return (datetime.fromisoformat(local) - delta).strftime("%Y-%m-%dT%H:%M:%SZ")


def load(tmp_path: Path, rows: list[dict], priority: list[str] | None = None) -> Path:
    db = tmp_path / "w.duckdb"
    warehouse.load_run(db, write_run(tmp_path, "r1", None, {"observations": rows}), {"run_id": "r1"})
    if priority is not None:
        warehouse.set_source_priority(db, priority)
    return db


def rows_of(db: Path, sql: str) -> list[tuple]:
    con = warehouse.connect(db, read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def daily_steps(db: Path) -> dict[str, tuple[float, float]]:
    return {d: (round(s, 6), round(a, 6)) for d, s, a in rows_of(
        db, "SELECT day::VARCHAR, steps, steps_all_sources FROM daily_steps ORDER BY day")}


# --------------------------------------------------------------------------- steps

# (case, samples, {day: (expected steps, expected naive sum)}); every case is its own warehouse.
STEP_CASES = [
    ("watch + iPhone + app + manual, one day", [
        step("w1", "2024-05-01T08:00:00", "2024-05-01T09:00:00", WATCH, 4000, W),
        step("p1", "2024-05-01T08:00:00", "2024-05-01T09:00:00", PHONE, 3800, P),  # same walk: dropped
        step("p2", "2024-05-01T10:00:00", "2024-05-01T10:30:00", PHONE, 2000, P),  # watch off: kept
        step("w2", "2024-05-01T12:00:00", "2024-05-01T12:30:00", WATCH, 1500, W),
        step("p3", "2024-05-01T12:00:00", "2024-05-01T12:30:00", PHONE, 1400, P),  # dropped
        step("a1", "2024-05-01T17:00:00", "2024-05-01T17:20:00", APP, 1000, "Pedometer"),  # alone: kept
        step("m1", "2024-05-01T19:00:00", "2024-05-01T19:10:00", None, 350, "Health", manual=True),
    ], {"2024-05-01": (8850, 14050)}),
    ("full overlap: the watch wins", [
        step("w", "2024-05-01T10:00:00", "2024-05-01T10:10:00", WATCH, 500, W),
        step("p", "2024-05-01T10:00:00", "2024-05-01T10:10:00", PHONE, 480, P),
    ], {"2024-05-01": (500, 980)}),
    ("partial overlap: the phone keeps its uncovered half", [
        step("w", "2024-05-01T10:00:00", "2024-05-01T10:10:00", WATCH, 600, W),
        step("p", "2024-05-01T10:05:00", "2024-05-01T10:15:00", PHONE, 400, P),
    ], {"2024-05-01": (800, 1000)}),
    ("across an hour boundary: counted once", [
        step("p", "2024-05-01T09:50:00", "2024-05-01T10:10:00", PHONE, 200, P),
        step("w", "2024-05-01T09:55:00", "2024-05-01T10:05:00", WATCH, 100, W),
    ], {"2024-05-01": (200, 300)}),
    ("across midnight: split pro rata, then de-duplicated", [
        step("p", "2024-05-01T23:50:00", "2024-05-02T00:10:00", PHONE, 200, P),
        step("w", "2024-05-02T00:00:00", "2024-05-02T00:05:00", WATCH, 60, W),
    ], {"2024-05-01": (100, 100), "2024-05-02": (110, 160)}),
    ("same clock time in two time zones: no overlap in UTC, both count", [
        step("w", "2024-05-01T10:00:00", "2024-05-01T10:10:00", WATCH, 500, W, offset="+02:00"),
        step("p", "2024-05-01T10:00:00", "2024-05-01T10:10:00", PHONE, 400, P, offset="-05:00"),
    ], {"2024-05-01": (900, 900)}),
    ("manual entry outranks the watch", [
        step("m", "2024-05-01T14:00:00", "2024-05-01T15:00:00", None, 1000, "Health", manual=True),
        step("w", "2024-05-01T14:00:00", "2024-05-01T14:30:00", WATCH, 800, W),
    ], {"2024-05-01": (1000, 1800)}),
    ("the iPhone outranks another app", [
        step("a", "2024-05-01T16:00:00", "2024-05-01T16:10:00", APP, 300, "Pedometer"),
        step("p", "2024-05-01T16:00:00", "2024-05-01T16:10:00", PHONE, 280, P),
    ], {"2024-05-01": (280, 580)}),
    ("US spring forward (23-hour day)", [
        step("p1", "2024-03-10T01:30:00", "2024-03-10T01:40:00", PHONE, 100, P, offset="-08:00"),
        step("p2", "2024-03-10T03:10:00", "2024-03-10T03:20:00", PHONE, 200, P),
        step("w", "2024-03-10T03:15:00", "2024-03-10T03:20:00", WATCH, 60, W),
    ], {"2024-03-10": (260, 360)}),
    ("US fall back: the repeated 01:30 is two different hours", [
        step("p", "2024-11-03T01:30:00", "2024-11-03T01:40:00", PHONE, 100, P, offset="-07:00"),
        step("w", "2024-11-03T01:30:00", "2024-11-03T01:40:00", WATCH, 120, W, offset="-08:00"),
    ], {"2024-11-03": (220, 220)}),
    ("EU spring forward: a sample across the change", [
        step("p", "2024-03-31T01:50:00", "2024-03-31T03:10:00", PHONE, 200, P, offset="+01:00", end_offset="+02:00"),
        step("w", "2024-03-31T01:50:00", "2024-03-31T01:59:00", WATCH, 90, W, offset="+01:00"),
    ], {"2024-03-31": (200, 290)}),
    ("EU fall back: the repeated 02:30 is two different hours", [
        step("p", "2024-10-27T02:30:00", "2024-10-27T02:40:00", PHONE, 100, P, offset="+02:00"),
        step("w", "2024-10-27T02:30:00", "2024-10-27T02:40:00", WATCH, 80, W, offset="+01:00"),
    ], {"2024-10-27": (180, 180)}),
    ("a zero-length sample inside a better one is dropped, outside it is kept", [
        step("w", "2024-05-01T10:00:00", "2024-05-01T10:10:00", WATCH, 500, W),
        step("p1", "2024-05-01T10:05:00", "2024-05-01T10:05:00", PHONE, 30, P),
        step("p2", "2024-05-01T11:00:00", "2024-05-01T11:00:00", PHONE, 40, P),
    ], {"2024-05-01": (540, 570)}),
]


@pytest.mark.parametrize("case, samples, expected", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_daily_steps_cases(tmp_path, case, samples, expected):
    assert daily_steps(load(tmp_path, samples)) == {d: (float(s), float(a)) for d, (s, a) in expected.items()}


def test_user_priority_reorders_sources(tmp_path):
    samples = STEP_CASES[1][1]  # full overlap, watch 500 vs phone 480
    db = load(tmp_path, samples)
    assert daily_steps(db) == {"2024-05-01": (500.0, 980.0)}
    assert warehouse.set_source_priority(db, ["phone", "watch", "manual", "other"]) is True
    assert daily_steps(db) == {"2024-05-01": (480.0, 980.0)}
    # a source named in the list takes its place ahead of its class
    warehouse.set_source_priority(db, ["manual", "watch", "phone", "other"])
    warehouse.set_source_priority(db, [P, "manual", "watch", "phone", "other"])
    assert daily_steps(db) == {"2024-05-01": (480.0, 980.0)}
    assert warehouse.set_source_priority(db, [P, "manual", "watch", "phone", "other"]) is False


def test_source_priority_file_is_validated(tmp_path):
    path = tmp_path / sources.FILE_NAME
    path.write_text('{"source_priority": ["phone", "watch"]}')
    assert sources.read_priority_file(path) == ("phone", "watch")
    for bad in ('["phone", "phone"]', "[]", '{"source_priority": [1]}', "not json"):
        path.write_text(bad)
        with pytest.raises(UsageError):
            sources.read_priority_file(path)


def test_other_cumulative_types_are_normalised_and_deduplicated(tmp_path):
    dist = "HKQuantityTypeIdentifierDistanceWalkingRunning"
    rows = [
        {**_row("w", "2024-05-01T08:00:00", "2024-05-01T08:30:00", WATCH, 3.0, dist, W), "unit": "km"},
        # a US app writes miles; half of it overlaps the watch
        {**_row("a", "2024-05-01T08:15:00", "2024-05-01T08:45:00", APP, 2.0, dist, "Runner"), "unit": "mi"},
    ]
    got = rows_of(load(tmp_path, rows), "SELECT type, day::VARCHAR, unit_si, round(total, 3), "
                                        "round(total_all_sources, 3) FROM daily_totals")
    assert got == [(dist, "2024-05-01", "m", round(3000 + 1609.344, 3), round(3000 + 2 * 1609.344, 3))]


# A property: whatever the overlaps, each day's de-duplicated total lies between the
# best-ranked source's own total that day and the naive sum, and equals the naive sum when
# nothing overlaps. Samples start between 18:00 and 04:00, so many cross midnight.
_SOURCES = [(WATCH, W), (PHONE, P), (APP, "Pedometer"), (APP, "Steps App")]  # in priority order
_BASE = datetime(2024, 5, 1, 18, 0)


def _per_day(start_min: int, length_min: int, value: float) -> dict[str, float]:
    """A sample's value shared between local days by its minutes on each."""
    start = _BASE + timedelta(minutes=start_min)
    if length_min == 0:
        return {start.date().isoformat(): value}
    out: dict[str, float] = {}
    for m in range(length_min):
        day = (start + timedelta(minutes=m)).date().isoformat()
        out[day] = out.get(day, 0.0) + value / length_min
    return out


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 600), st.integers(0, 180), st.integers(0, 500)),
                min_size=1, max_size=12))
def test_dedup_lies_between_best_source_and_naive_sum(tmp_path_factory, samples):
    rows = []
    for i, (src, start_min, length_min, value) in enumerate(samples):
        start, end = _BASE + timedelta(minutes=start_min), _BASE + timedelta(minutes=start_min + length_min)
        device, name = _SOURCES[src]
        rows.append(step(f"s{i}", start.isoformat(), end.isoformat(), device, value, name))
    got = daily_steps(load(tmp_path_factory.mktemp("prop"), rows))
    best_src = min(s for s, *_ in samples)
    naive: dict[str, float] = {}
    best: dict[str, float] = {}
    for src, start_min, length_min, value in samples:
        for day, part in _per_day(start_min, length_min, value).items():
            naive[day] = naive.get(day, 0.0) + part
            if src == best_src:
                best[day] = best.get(day, 0.0) + part
    assert set(got) == set(naive)
    no_overlap = not any(x[0] != y[0] and _overlap(x, y) for x in samples for y in samples)
    for day, (deduped, naive_sum) in got.items():
        assert naive_sum == pytest.approx(naive[day], abs=1e-4)
        assert best.get(day, 0.0) - 1e-4 <= deduped <= naive_sum + 1e-4
        if no_overlap:
            assert deduped == pytest.approx(naive_sum, abs=1e-4)


def _overlap(x: tuple, y: tuple) -> bool:
    """Samples (source, start, length, value) share time; an instant inside a span counts."""
    (_, xs, xn, _), (_, ys, yn, _) = x, y
    if xn == 0 or yn == 0:
        point, (start, length) = (xs, (ys, yn)) if xn == 0 else (ys, (xs, xn))
        return start <= point < start + length
    return max(xs, ys) < min(xs + xn, ys + yn)


# --------------------------------------------------------------------------- sleep

CORE, DEEP, REM = "HKCategoryValueSleepAnalysisAsleepCore", "HKCategoryValueSleepAnalysisAsleepDeep", \
    "HKCategoryValueSleepAnalysisAsleepREM"
AWAKE, IN_BED = "HKCategoryValueSleepAnalysisAwake", "HKCategoryValueSleepAnalysisInBed"
UNSPEC, OLD_ASLEEP = "HKCategoryValueSleepAnalysisAsleepUnspecified", "HKCategoryValueSleepAnalysisAsleep"


def sleep(key: str, start: str, end: str, device: str | None, stage: str, source: str) -> dict:
    return _row(key, start, end, device, stage, SLEEP, source)


def test_sleep_watch_phone_and_app_the_same_night_and_a_nap(tmp_path):
    rows = [
        # Watch stages, 7.3 h asleep, across midnight
        sleep("w1", "2024-05-01T23:00:00", "2024-05-02T02:00:00", WATCH, CORE, W),
        sleep("w2", "2024-05-02T02:00:00", "2024-05-02T03:00:00", WATCH, DEEP, W),
        sleep("w3", "2024-05-02T03:00:00", "2024-05-02T04:00:00", WATCH, REM, W),
        sleep("w4", "2024-05-02T04:00:00", "2024-05-02T06:18:00", WATCH, CORE, W),
        sleep("w5", "2024-05-02T06:18:00", "2024-05-02T06:30:00", WATCH, AWAKE, W),
        # AutoSleep's own view of the same night (7.5 h) and its in-bed time
        sleep("a1", "2024-05-01T22:45:00", "2024-05-02T06:15:00", APP, UNSPEC, "AutoSleep"),
        sleep("a2", "2024-05-01T22:30:00", "2024-05-02T06:40:00", APP, IN_BED, "AutoSleep"),
        # the iPhone's bedtime in-bed time
        sleep("p1", "2024-05-01T22:40:00", "2024-05-02T06:35:00", PHONE, IN_BED, P),
        # an afternoon nap: its own session, not added to any night
        sleep("n1", "2024-05-02T14:30:00", "2024-05-02T15:10:00", WATCH, CORE, W),
    ]
    db = load(tmp_path, rows)
    assert rows_of(db, "SELECT night::VARCHAR, asleep_minutes, in_bed_minutes, awake_minutes, nap_minutes, "
                       "asleep_source, in_bed_source FROM sleep_per_night ORDER BY night") == [
        ("2024-05-02", 438.0, 475.0, 12.0, 40.0, W, P)]
    assert rows_of(db, "SELECT stage, minutes FROM sleep_nightly ORDER BY stage") == [
        ("Awake", 12.0), ("Core", 318.0), ("Deep", 60.0), ("In bed", 475.0), ("REM", 60.0)]
    assert rows_of(db, "SELECT kind, night::VARCHAR, asleep_minutes FROM sleep_sessions ORDER BY session_start") == [
        ("night", "2024-05-02", 438.0), ("nap", "2024-05-02", 40.0)]


def test_sleep_app_ranked_first_by_the_user(tmp_path):
    rows = [
        sleep("w1", "2024-05-01T23:00:00", "2024-05-02T06:18:00", WATCH, CORE, W),
        sleep("a1", "2024-05-01T22:45:00", "2024-05-02T06:15:00", APP, UNSPEC, "AutoSleep"),
    ]
    db = load(tmp_path, rows, priority=["AutoSleep", "manual", "watch", "phone", "other"])
    assert rows_of(db, "SELECT asleep_minutes, asleep_source FROM sleep_per_night") == [(450.0, "AutoSleep")]
    assert rows_of(db, "SELECT stage, minutes FROM sleep_nightly") == [("Asleep (unspecified)", 450.0)]


def test_sleep_before_ios16_asleep_value(tmp_path):
    rows = [
        sleep("p1", "2020-02-01T23:30:00", "2020-02-02T07:00:00", PHONE, OLD_ASLEEP, P),
        sleep("p2", "2020-02-01T23:00:00", "2020-02-02T07:10:00", PHONE, IN_BED, P),
    ]
    db = load(tmp_path, rows)
    assert rows_of(db, "SELECT night::VARCHAR, asleep_minutes, in_bed_minutes FROM sleep_per_night") == [
        ("2020-02-02", 450.0, 490.0)]
    assert rows_of(db, "SELECT stage, minutes FROM sleep_nightly ORDER BY stage") == [
        ("Asleep (unspecified)", 450.0), ("In bed", 490.0)]


# --------------------------------------------------------------------------- labs


def lab(key: str, effective_local: str, value: float | None, status: str, *, text_range: str | None = None,
        low: float | None = 70.0, high: float | None = 99.0) -> dict:
    offset = effective_local[-6:]
    utc = _utc(effective_local[:-6], offset)
    return {
        "record_key": hashlib.sha256(key.encode()).hexdigest(), "schema_version": 1,
        "canonical_person_id": "p_test", "source": "fhir", "source_file": "clinical-records/x.json",
        "run_id": "r1", "kind": "Observation", "event_time": utc, "event_time_field": "effective",
        "resource_type": "Observation", "fhir_id": key, "fhir_version": "R4", "status": status,
        "code": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}], "code_text": "Glucose",
        "category": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                      "code": "laboratory", "display": "Laboratory"}],
        "effective": utc, "effective_local": effective_local, "value_type": "Quantity", "value": value,
        "unit": "mg/dL",
        "reference_range": [{"low": None if text_range else low, "high": None if text_range else high,
                             "unit": "mg/dL", "text": text_range, "type": None}],
        "extra": {},
    }


def test_lab_results_latest_skips_errors_and_keeps_the_labs_own_date(tmp_path):
    rows = [
        lab("valid", "2024-05-01T09:00:00-08:00", 180.0, "final"),
        # later, but entered in error: not the latest value
        lab("error", "2024-05-03T09:00:00-08:00", 400.0, "entered-in-error"),
        lab("cancel", "2024-05-04T09:00:00-08:00", 10.0, "cancelled"),
    ]
    db = load(tmp_path, rows)
    assert rows_of(db, "SELECT value, status, local_date::VARCHAR FROM lab_results_latest") == [
        (180.0, "final", "2024-05-01")]


def test_lab_evening_result_keeps_its_local_date_and_text_range_and_status(tmp_path):
    rows = [lab("eve", "2024-05-01T18:30:00-08:00", 5.2, "preliminary", text_range="negative")]
    db = load(tmp_path, rows)
    assert rows_of(db, "SELECT local_date::VARCHAR, strftime(effective_time, '%Y-%m-%d'), status, "
                       "reference_range_text FROM lab_results_latest") == [
        ("2024-05-01", "2024-05-02", "preliminary", "negative")]


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize("value, unit, expected", [
    (150.0, "lb", (68.0388555, "kg")), (70.0, "kg", (70.0, "kg")), (180.0, "cm", (1.8, "m")),
    (70.0, "in", (1.778, "m")), (1.0, "mi", (1609.344, "m")), (100.0, "kJ", (23.9005736, "kcal")),
    (250.0, "Cal", (250.0, "kcal")), (98.6, "degF", (37.0, "degC")), (36.6, "degC", (36.6, "degC")),
    (90.0, "mg/dL", (4.9956737, "mmol/L")), (5.5, "mmol<180.15588000005408>/L", (5.5, "mmol/L")),
    (30.0, "min", (1800.0, "s")), (62.0, "count/min", (62.0, "count/min")),
])
def test_unit_table(value, unit, expected):
    got, unit_si = units.to_si(value, unit)
    assert (round(got, 7), unit_si) == expected


def test_unknown_unit_has_no_normalised_value():
    assert units.to_si(1.0, "furlong") is None and units.to_si(1.0, None) is None


def test_quantities_keep_value_and_unit_and_gain_si(tmp_path):
    temp, glucose, height = ("HKQuantityTypeIdentifierBodyTemperature", "HKQuantityTypeIdentifierBloodGlucose",
                             "HKQuantityTypeIdentifierHeight")
    rows = [
        {**_row("t", "2024-05-01T08:00:00", "2024-05-01T08:00:00", PHONE, 98.6, temp, P), "unit": "degF"},
        {**_row("g", "2024-05-01T08:00:00", "2024-05-01T08:00:00", PHONE, 90.0, glucose, P), "unit": "mg/dL"},
        {**_row("h", "2024-05-01T08:00:00", "2024-05-01T08:00:00", PHONE, 70.0, height, P), "unit": "in"},
    ]
    got = rows_of(load(tmp_path, rows), "SELECT type, value, unit, round(value_si, 4), unit_si "
                                        "FROM quantity_samples ORDER BY type")
    assert got == [(glucose, 90.0, "mg/dL", 4.9957, "mmol/L"), (temp, 98.6, "degF", 37.0, "degC"),
                   (height, 70.0, "in", 1.778, "m")]


@pytest.mark.parametrize("locale, system", [("en_US", "us"), ("en_GB", "metric"), ("de_DE", "metric"),
                                            ("es_US", "us"), (None, "metric"), ("fr", "metric")])
def test_system_for_locale(locale, system):
    assert units.system_for_locale(locale) == system


def test_display_units():
    assert units.display(68.0388555, "kg", "us")[1] == "lb"
    assert round(units.display(68.0388555, "kg", "us")[0], 3) == 150.0
    assert units.display(37.0, "degC", "us") == (pytest.approx(98.6), "°F")
    assert units.display(1609.344, "m", "metric") == (pytest.approx(1.609344), "km")


# --------------------------------------------------------------------------- per-day values


def test_daily_values_come_from_the_best_source_of_the_day(tmp_path):
    rhr = "HKQuantityTypeIdentifierRestingHeartRate"
    mass = "HKQuantityTypeIdentifierBodyMass"
    rows = [
        {**_row("r1", "2024-05-01T07:00:00", "2024-05-01T07:00:00", WATCH, 58, rhr, W), "unit": "count/min"},
        {**_row("r2", "2024-05-01T08:00:00", "2024-05-01T08:00:00", APP, 70, rhr, "Oura"), "unit": "count/min"},
        {**_row("r3", "2024-05-02T08:00:00", "2024-05-02T08:00:00", APP, 66, rhr, "Oura"), "unit": "count/min"},
        {**_row("m1", "2024-05-01T07:00:00", "2024-05-01T07:00:00", APP, 150.0, mass, "Scale"), "unit": "lb"},
    ]
    db = load(tmp_path, rows)
    assert rows_of(db, "SELECT day::VARCHAR, bpm, source_name FROM resting_heart_rate_daily ORDER BY day") == [
        ("2024-05-01", 58.0, W), ("2024-05-02", 66.0, "Oura")]
    assert rows_of(db, "SELECT day::VARCHAR, round(kg, 3) FROM body_mass_daily") == [("2024-05-01", 68.039)]


def test_views_of_an_older_version_are_renewed_by_duckdb_build(tmp_path):
    db = load(tmp_path, STEP_CASES[1][1])
    con = warehouse.connect(db)
    try:
        con.execute("UPDATE warehouse_meta SET value = '1' WHERE key = 'views_version'")
        con.execute("DROP VIEW daily_steps")
    finally:
        con.close()
    from healthdelta import report

    with pytest.raises(UsageError, match="older version"):
        report.build_report(db, tmp_path / "report")
    warehouse.build(tmp_path / "r1", db)  # nothing new to load: the views are renewed all the same
    assert daily_steps(db) == {"2024-05-01": (500.0, 980.0)}
    report.build_report(db, tmp_path / "report")


def test_sources_missing_from_a_short_list_keep_the_default_order(tmp_path):
    db = load(tmp_path, STEP_CASES[1][1], priority=["AutoSleep"])  # neither watch nor phone listed
    assert daily_steps(db) == {"2024-05-01": (500.0, 980.0)}  # the watch still wins


def test_report_units_follow_the_exports_locale_before_its_units(tmp_path):
    from healthdelta import report

    mass = "HKQuantityTypeIdentifierBodyMass"
    rows = [{**_row("m", "2024-05-01T07:00:00", "2024-05-01T07:00:00", APP, 70.0, mass, "Scale"), "unit": "kg"}]
    db = tmp_path / "w.duckdb"
    warehouse.load_run(db, write_run(tmp_path, "r1", None, {"observations": rows}), {"run_id": "r1"})
    con = warehouse.connect(db, read_only=True)
    try:
        assert report.export_units(con) == "metric"  # no locale recorded: the samples' kg
    finally:
        con.close()
    db2 = tmp_path / "w2.duckdb"
    warehouse.load_run(db2, tmp_path / "r1", {"run_id": "r1", "locale": "en_US"})
    con = warehouse.connect(db2, read_only=True)
    try:
        assert report.export_units(con) == "us"
    finally:
        con.close()


def test_export_locale_of_a_staged_run(tmp_path):
    from healthdelta import report

    (tmp_path / "layout.json").write_text('{"export_xml": "apple_health_export/export.xml"}')
    (tmp_path / "apple_health_export").mkdir()
    (tmp_path / "apple_health_export" / "export.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n<HealthData locale="en_US">\n <ExportDate value="x"/>\n</HealthData>\n')
    assert report.export_locale(tmp_path) == "en_US"
    assert report.export_locale(tmp_path / "missing") is None


def test_hrv_daily_in_milliseconds(tmp_path):
    hrv = "HKQuantityTypeIdentifierHeartRateVariabilitySDNN"
    rows = [{**_row(k, f"2024-05-01T0{h}:00:00", f"2024-05-01T0{h}:01:00", WATCH, v, hrv, W), "unit": "ms"}
            for k, h, v in (("h1", 1, 45.0), ("h2", 3, 52.5))]
    assert rows_of(load(tmp_path, rows), "SELECT day::VARCHAR, sdnn_ms, samples FROM hrv_daily") == [
        ("2024-05-01", 48.75, 2)]
