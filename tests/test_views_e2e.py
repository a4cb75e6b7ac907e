"""A hand-built export through the real CLI (`run all`, `duckdb query`, `report show`):
the headline numbers of a Watch + iPhone + app owner, whose right answers are known."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

pytest.importorskip("duckdb")

WATCH = "<<HKDevice: 0x1>, name:Apple Watch, manufacturer:Apple Inc., model:Watch, hardware:Watch6,1>"
PHONE = "<<HKDevice: 0x2>, name:iPhone, manufacturer:Apple Inc., model:iPhone, hardware:iPhone12,1>"
W, P = "Jane’s Apple Watch", "Jane’s iPhone"
STEPS, SLEEP = "HKQuantityTypeIdentifierStepCount", "HKCategoryTypeIdentifierSleepAnalysis"
STAGE = "HKCategoryValueSleepAnalysis"

# (type, source, device, start, end, value, unit, metadata); times are local with offset
RECORDS = [
    # 1 May: 4000 + 1500 watch, 2000 phone while the watch was off, 1000 app, 350 by hand = 8850
    (STEPS, W, WATCH, "2024-05-01 08:00:00 -0700", "2024-05-01 09:00:00 -0700", "4000", "count", {}),
    (STEPS, P, PHONE, "2024-05-01 08:00:00 -0700", "2024-05-01 09:00:00 -0700", "3800", "count", {}),
    (STEPS, P, PHONE, "2024-05-01 10:00:00 -0700", "2024-05-01 10:30:00 -0700", "2000", "count", {}),
    (STEPS, W, WATCH, "2024-05-01 12:00:00 -0700", "2024-05-01 12:30:00 -0700", "1500", "count", {}),
    (STEPS, P, PHONE, "2024-05-01 12:00:00 -0700", "2024-05-01 12:30:00 -0700", "1400", "count", {}),
    (STEPS, "Pedometer", None, "2024-05-01 17:00:00 -0700", "2024-05-01 17:20:00 -0700", "1000", "count", {}),
    (STEPS, "Health", None, "2024-05-01 19:00:00 -0700", "2024-05-01 19:10:00 -0700", "350", "count",
     {"HKWasUserEntered": "1"}),
    # night to 2 May: watch stages 7.3 h; AutoSleep 7.5 h unspecified; iPhone in bed 7 h 55 min
    (SLEEP, W, WATCH, "2024-05-01 23:00:00 -0700", "2024-05-02 02:00:00 -0700", STAGE + "AsleepCore", None, {}),
    (SLEEP, W, WATCH, "2024-05-02 02:00:00 -0700", "2024-05-02 03:00:00 -0700", STAGE + "AsleepDeep", None, {}),
    (SLEEP, W, WATCH, "2024-05-02 03:00:00 -0700", "2024-05-02 04:00:00 -0700", STAGE + "AsleepREM", None, {}),
    (SLEEP, W, WATCH, "2024-05-02 04:00:00 -0700", "2024-05-02 06:18:00 -0700", STAGE + "AsleepCore", None, {}),
    (SLEEP, "AutoSleep", None, "2024-05-01 22:45:00 -0700", "2024-05-02 06:15:00 -0700",
     STAGE + "AsleepUnspecified", None, {}),
    (SLEEP, P, PHONE, "2024-05-01 22:40:00 -0700", "2024-05-02 06:35:00 -0700", STAGE + "InBed", None, {}),
    # the afternoon nap is not part of the night of 3 May
    (SLEEP, W, WATCH, "2024-05-02 14:30:00 -0700", "2024-05-02 15:10:00 -0700", STAGE + "AsleepCore", None, {}),
    # a US export: pounds, inches, °F
    ("HKQuantityTypeIdentifierBodyMass", "Scale", None, "2024-05-01 07:00:00 -0700", "2024-05-01 07:00:00 -0700",
     "150", "lb", {}),
    ("HKQuantityTypeIdentifierHeight", P, PHONE, "2024-05-01 07:00:00 -0700", "2024-05-01 07:00:00 -0700",
     "65", "in", {}),
    ("HKQuantityTypeIdentifierBodyTemperature", P, PHONE, "2024-05-01 07:00:00 -0700",
     "2024-05-01 07:00:00 -0700", "98.6", "degF", {}),
]


def glucose(fhir_id: str, when: str, value: float, status: str) -> dict:
    return {"resourceType": "Observation", "id": fhir_id, "status": status,
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}],
                     "text": "Glucose"},
            "effectiveDateTime": when, "valueQuantity": {"value": value, "unit": "mg/dL"},
            "referenceRange": [{"low": {"value": 70, "unit": "mg/dL"}, "high": {"value": 99, "unit": "mg/dL"}}]}


def write_export(root: Path) -> Path:
    export = root / "apple_health_export"
    (export / "clinical-records").mkdir(parents=True)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', '<HealthData locale="en_US">',
             ' <ExportDate value="2024-05-10 09:00:00 -0700"/>',
             ' <Me HKCharacteristicTypeIdentifierBiologicalSex="HKBiologicalSexFemale"/>']
    for type_, source, device, start, end, value, unit, meta in RECORDS:
        attrs = {"type": type_, "sourceName": source, "sourceVersion": "1", "creationDate": end,
                 "startDate": start, "endDate": end, "value": value}
        if device:
            attrs["device"] = device
        if unit:
            attrs["unit"] = unit
        head = " ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items())
        children = "".join(f'\n  <MetadataEntry key={quoteattr(k)} value={quoteattr(v)}/>' for k, v in meta.items())
        lines.append(f" <Record {head}>{children}\n </Record>" if children else f" <Record {head}/>")
    lines.append("</HealthData>")
    (export / "export.xml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    hcg = {"resourceType": "Observation", "id": "u1", "status": "preliminary",
           "category": [{"coding": [{"code": "laboratory"}]}],
           "code": {"coding": [{"system": "http://loinc.org", "code": "2106-3", "display": "hCG"}], "text": "hCG"},
           "effectiveDateTime": "2024-05-02T10:00:00-08:00", "valueString": "Negative",
           "referenceRange": [{"text": "Negative"}]}
    labs = [glucose("g1", "2024-04-30T18:30:00-08:00", 180.0, "final"),
            glucose("g2", "2024-05-03T09:00:00-08:00", 400.0, "entered-in-error"), hcg]
    for lab in labs:
        (export / "clinical-records" / f"{lab['id']}.json").write_text(json.dumps(lab), encoding="utf-8")
    return export


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "healthdelta", "--progress", "never", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def query(db: Path, sql: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(cli("duckdb", "query", "--db", str(db), "--sql", sql))))


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    cli("run", "all", "--input", str(write_export(root)), "--out", str(root / "out"))
    return root / "out"


def test_steps_day_reads_as_in_the_health_app(out):
    assert query(out / "warehouse.duckdb", "SELECT day, steps, steps_all_sources FROM daily_steps") == [
        {"day": "2024-05-01", "steps": "8850.0", "steps_all_sources": "14050.0"}]


def test_sleep_night_and_nap(out):
    got = query(out / "warehouse.duckdb", "SELECT night, asleep_minutes, in_bed_minutes, nap_minutes "
                                          "FROM sleep_per_night ORDER BY night")
    assert got == [{"night": "2024-05-02", "asleep_minutes": "438.0", "in_bed_minutes": "475.0",
                    "nap_minutes": "40.0"}]


def test_labs_skip_entered_in_error_and_keep_the_labs_date(out):
    got = query(out / "warehouse.duckdb", "SELECT code, value, status, local_date, reference_range_text "
                                          "FROM lab_results_latest ORDER BY code")
    assert got == [
        {"code": "2106-3", "value": "", "status": "preliminary", "local_date": "2024-05-02",
         "reference_range_text": "Negative"},
        {"code": "2345-7", "value": "180.0", "status": "final", "local_date": "2024-04-30",
         "reference_range_text": ""}]
    html = next((out / "reports").glob("*/report.html")).read_text(encoding="utf-8")
    labs = html[html.index('id="labs"'):html.index('id="coverage"')]
    assert "180 mg/dL" in labs and "400" not in labs
    assert "Negative (preliminary)" in labs and "<td>Negative</td>" in labs and "2024-04-30" in labs


def test_units_are_normalised_and_the_report_is_in_us_units(out):
    got = query(out / "warehouse.duckdb", "SELECT type, value, unit, round(value_si, 4) AS si, unit_si "
                                          "FROM quantity_samples WHERE type NOT LIKE '%StepCount' ORDER BY type")
    assert [(r["value"], r["unit"], r["si"], r["unit_si"]) for r in got] == [
        ("150.0", "lb", "68.0389", "kg"), ("98.6", "degF", "37.0", "degC"), ("65.0", "in", "1.651", "m")]
    summary = json.loads(next((out / "reports").glob("*/summary.json")).read_text())
    assert summary["units"] == "us"
    (metrics,) = summary["metrics"]
    assert metrics["steps"]["mean_last_30_days"] == 8850
    assert metrics["sleep"]["mean_asleep_hours_last_30_nights"] == 7.3
    assert metrics["weight"] == {"measurements": 1, "last_day": "2024-05-01", "last_kg": 68.0, "last": 150.0,
                                 "unit": "lb"}
    shown = cli("report", "show", "--db", str(out / "warehouse.duckdb"), "--units", "metric")
    assert "8,850 steps a day" in shown and "weight 68 kg" in shown


def test_priority_file_in_the_state_dir_reorders_sources(out):
    db = out / "warehouse.duckdb"
    priority = out / "state" / "source_priority.json"
    priority.write_text(json.dumps({"source_priority": ["phone", "watch", "manual", "other"]}))
    try:
        cli("duckdb", "build", "--input", str(out / "ndjson"), "--db", str(db))
        # the iPhone's 3800 and 1400 now win over the Watch's 4000 and 1500
        assert query(db, "SELECT steps FROM daily_steps") == [{"steps": "8550.0"}]
        priority.write_text('{"source_priority": ["phone", "phone"]}')
        proc = subprocess.run([sys.executable, "-m", "healthdelta", "duckdb", "build", "--input",
                               str(out / "ndjson"), "--db", str(db)], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.splitlines() == ["error: the source priority lists an entry twice"]
    finally:
        priority.unlink()
        cli("duckdb", "build", "--input", str(out / "ndjson"), "--db", str(db), "--source-priority",
            str(write_default(out)))
    assert query(db, "SELECT steps FROM daily_steps") == [{"steps": "8850.0"}]


def write_default(out: Path) -> Path:
    path = out / "default_priority.json"
    path.write_text('["manual", "watch", "phone", "other"]')
    return path
