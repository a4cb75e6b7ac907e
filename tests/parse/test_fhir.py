"""FHIR clinical records → rows: the real sample export, synthetic R4 resources, Bundles, errors."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from hypothesis import given, strategies as st

from healthdelta.errors import InputError
from healthdelta.parse import fhir
from healthdelta.parse.fhir import guess_fhir_version, iter_fhir, patient_facts, read_patients_fhir
from healthdelta.parse.report import ParseReport
from healthdelta.parse.timefmt import from_iso

EXPORT = Path(__file__).resolve().parents[1] / "fixtures" / "apple-sample-export" / "apple_health_export"
CLINICAL = EXPORT / "clinical-records"
UTC_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")


def _rows(path: Path, report: ParseReport | None = None, **kwargs) -> list[tuple[str, dict]]:
    return list(
        iter_fhir(
            path,
            report or ParseReport(),
            source_file=kwargs.pop("source_file", "clinical-records/x.json"),
            **kwargs,
        )
    )


def _write(tmp_path: Path, name: str, document: object) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps(document).encode())
    return path


def _one(tmp_path: Path, resource: dict, name: str = "r.json") -> tuple[str, dict]:
    rows = _rows(_write(tmp_path, name, resource))
    assert len(rows) == 1
    return rows[0]


# ------------------------------------------------------------------ real sample export


@pytest.fixture(scope="module")
def sample_rows() -> list[tuple[str, dict, dict]]:
    out = []
    report = ParseReport()
    for path in sorted(CLINICAL.glob("*.json")):
        original = json.loads(path.read_text())
        for stream, row in iter_fhir(path, report, source_file=f"clinical-records/{path.name}"):
            out.append((stream, row, original))
    assert report.unknown == Counter()
    return out


def test_sample_export_parses_every_record(sample_rows):
    by_type = Counter((stream, row["resource_type"]) for stream, row, _ in sample_rows)
    assert by_type == {
        ("observations", "Observation"): 17,
        ("conditions", "Condition"): 4,
        ("medications", "MedicationOrder"): 4,
        ("clinical", "Patient"): 3,
        ("clinical", "Procedure"): 3,
        ("clinical", "AllergyIntolerance"): 2,
        ("clinical", "Immunization"): 2,
    }
    assert len(sample_rows) == len(list(CLINICAL.glob("*.json")))


def test_sample_rows_keep_resource_and_common_fields(sample_rows):
    keys = set()
    for _, row, original in sample_rows:
        assert row["resource"] == original
        assert row["source"] == "fhir"
        assert row["kind"] == original["resourceType"]
        assert row["fhir_id"] == original["id"]
        assert re.fullmatch(r"[0-9a-f]{64}", row["record_key"])
        assert row["event_time"] is None or UTC_RE.fullmatch(row["event_time"])
        keys.add(row["record_key"])
    assert len(keys) == len(sample_rows)


def test_sample_dstu2_specifics(sample_rows):
    rows = {row["resource"]["id"] + row["kind"]: row for _, row, _ in sample_rows}
    order = rows["23535MedicationOrder"]
    assert order["fhir_version"] == "DSTU2"
    assert order["code_text"] == "Levothyroxine 75 mcg"
    assert order["authored"] == "2008-01-03T08:00:00Z"
    assert order["authored_local"] == "2008-01-03T00:00:00-08:00"
    assert order["event_time"] == "2008-01-03T08:00:00Z"
    assert order["dosage_text"] == ["Once Daily"]

    asthma = rows["1Condition"]
    assert asthma["fhir_version"] == "DSTU2"
    assert asthma["status"] == "active" and asthma["verification_status"] == "confirmed"
    assert asthma["event_time"] == "1985-09-09T00:00:00Z"  # date-only onset: midnight UTC
    assert asthma["onset_local"] == "1985-09-09"  # ... kept as given
    assert asthma["recorded"] == "2012-01-02T00:00:00Z"

    bp = rows["2634785Observation"]
    assert bp["effective_source"] == "issued"  # no effective[x]: issued is the fallback
    assert bp["event_time"] == "2017-10-18T00:00:00Z"
    assert [(c["code"][0]["code"], c["value"], c["unit"]) for c in bp["components"]] == [
        ("8480-6", 110, "mm[Hg]"),
        ("8462-4", 70, "mm[Hg]"),
    ]
    glucose = rows["2738664Observation"]
    assert (glucose["value"], glucose["unit"], glucose["value_type"]) == (60, "mg/dL", "Quantity")
    assert glucose["reference_range"] == [
        {"low": 61, "high": 100, "unit": "mg/dL", "text": "61-100 mg/dL", "type": None}
    ]
    assert (
        glucose["category"][0]["code"] == "laboratory" and glucose["category_text"] == "Laboratory"
    )
    t4 = rows["6Observation"]
    assert (
        t4["event_time"] == "2007-09-04T08:15:00Z"
        and t4["effective_local"] == "2007-09-04T14:15:00+06:00"
    )


def test_sample_patient_rows_carry_no_typed_pii(sample_rows):
    for _, row, _ in sample_rows:
        if row["kind"] != "Patient":
            continue
        typed = {k: v for k, v in row.items() if k != "resource"}
        assert "Candace" not in json.dumps(typed) and "1977" not in json.dumps(typed)
        assert row["event_time"] is None  # a birth date is not an event


def test_read_patients_fhir_on_sample():
    facts = [
        f for path in sorted(CLINICAL.glob("Patient-*.json")) for f in read_patients_fhir(path)
    ]
    assert len(facts) == 3
    for fact in facts:
        assert fact["birth_date"] == "1977-04-01" and fact["sex"] == "female"
    names = sorted(
        (n["text"] or "", tuple(n["given"]), n["family"] or "") for f in facts for n in f["names"]
    )
    assert names == [
        ("", ("Candace",), "Salinas"),
        ("", ("Candace",), "Salinas"),
        ("Candace Salinas", (), ""),
    ]


# ------------------------------------------------------------- synthetic R4 resources

R4_OBSERVATION = {
    "resourceType": "Observation",
    "id": "obs-1",
    "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/vitalsigns"]},
    "status": "final",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "vital-signs",
                }
            ]
        }
    ],
    "code": {
        "coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}],
        "text": "HR",
    },
    "subject": {"reference": "Patient/p1", "display": "Jane Doe"},
    "effectiveDateTime": "2021-03-04T05:06:07.250+02:00",
    "issued": "2021-03-04T06:00:00Z",
}

VALUE_CASES = [
    (
        {
            "valueQuantity": {
                "value": 72,
                "unit": "beats/minute",
                "system": "http://unitsofmeasure.org",
                "code": "/min",
                "comparator": "<",
            }
        },
        {
            "value_type": "Quantity",
            "value": 72,
            "unit": "beats/minute",
            "unit_code": "/min",
            "value_comparator": "<",
        },
    ),
    (
        {
            "valueCodeableConcept": {
                "coding": [
                    {"system": "http://snomed.info/sct", "code": "260385009", "display": "Negative"}
                ],
                "text": "neg",
            }
        },
        {
            "value_type": "CodeableConcept",
            "value_text": "neg",
            "value_code": [
                {"system": "http://snomed.info/sct", "code": "260385009", "display": "Negative"}
            ],
        },
    ),
    (
        {"valueString": "trace amounts"},
        {"value_type": "String", "value_text": "trace amounts", "value": None},
    ),
    (
        {"valueBoolean": False},
        {"value_type": "Boolean", "value_boolean": False, "value_text": "false", "value": None},
    ),
    ({"valueInteger": 3}, {"value_type": "Integer", "value": 3}),
    (
        {"valueRange": {"low": {"value": 1.5, "unit": "mg"}, "high": {"value": 2, "unit": "mg"}}},
        {"value_type": "Range", "value_low": 1.5, "value_high": 2, "unit": "mg", "value": None},
    ),
    (
        {
            "valueRatio": {
                "numerator": {"value": 1, "unit": "mg"},
                "denominator": {"value": 10, "unit": "mL"},
            }
        },
        {
            "value_type": "Ratio",
            "value_numerator": 1,
            "value_denominator": 10,
            "unit": "mg",
            "value_denominator_unit": "mL",
        },
    ),
    (
        {
            "valueSampledData": {
                "origin": {"value": 0, "unit": "mV"},
                "period": 2,
                "factor": 1.5,
                "dimensions": 1,
                "data": "1 2 3 E 4",
            }
        },
        {
            "value_type": "SampledData",
            "unit": "mV",
            "value_sampled": {
                "origin": 0,
                "period": 2,
                "factor": 1.5,
                "lower_limit": None,
                "upper_limit": None,
                "dimensions": 1,
                "sample_count": 5,
            },
        },
    ),
    ({"valueTime": "14:30:00"}, {"value_type": "Time", "value_text": "14:30:00"}),
    (
        {"valueDateTime": "2020-01-02T03:04:05-05:00"},
        {
            "value_type": "DateTime",
            "value_time": "2020-01-02T08:04:05Z",
            "value_time_local": "2020-01-02T03:04:05-05:00",
        },
    ),
    (
        {"valuePeriod": {"start": "2020-01-02", "end": "2020-01-03T10:00:00Z"}},
        {
            "value_type": "Period",
            "value_time": "2020-01-02T00:00:00Z",
            "value_time_local": "2020-01-02",
            "value_end": "2020-01-03T10:00:00Z",
        },
    ),
]


@pytest.mark.parametrize(
    ("value", "expected"), VALUE_CASES, ids=[next(iter(v)) for v, _ in VALUE_CASES]
)
def test_r4_observation_every_value_kind(tmp_path, value, expected):
    resource = {**R4_OBSERVATION, **value}
    stream, row = _one(tmp_path, resource)
    assert stream == "observations"
    for key, wanted in expected.items():
        assert row[key] == wanted, key
    assert row["fhir_version"] == "R4"
    assert row["resource"] == resource
    assert row["event_time"] == "2021-03-04T03:06:07.250Z"  # fraction kept, offset applied
    assert row["effective_local"] == "2021-03-04T05:06:07.250+02:00"
    assert row["effective_source"] == "effectiveDateTime"
    assert row["issued"] == "2021-03-04T06:00:00Z"
    assert row["code"] == [
        {"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}
    ]
    assert row["code_text"] == "HR"
    assert row["subject_ref"] == "Patient/p1"
    assert "Jane" not in json.dumps({k: v for k, v in row.items() if k != "resource"})


def test_r4_observation_components_period_and_absent_value(tmp_path):
    resource = {
        "resourceType": "Observation",
        "id": "bp",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        "effectivePeriod": {
            "start": "2022-06-01T08:00:00+01:00",
            "end": "2022-06-01T08:05:00+01:00",
        },
        "interpretation": [{"coding": [{"code": "H"}], "text": "High"}],
        "dataAbsentReason": {"coding": [{"code": "not-applicable"}]},
        "component": [
            {
                "code": {"coding": [{"code": "8480-6"}]},
                "valueQuantity": {"value": 141, "unit": "mmHg"},
                "interpretation": [{"coding": [{"code": "H"}]}],
            },
            {
                "code": {"coding": [{"code": "8462-4"}]},
                "valueQuantity": {"value": 91.5, "unit": "mmHg"},
            },
            {"code": {"text": "position"}, "valueCodeableConcept": {"text": "sitting"}},
        ],
    }
    _, row = _one(tmp_path, resource)
    assert row["event_time"] == "2022-06-01T07:00:00Z"
    assert row["effective_end"] == "2022-06-01T07:05:00Z"
    assert row["data_absent_reason"] == "not-applicable"
    assert row["interpretation"][0]["code"] == "H" and row["interpretation_text"] == "High"
    assert [(c["value"], c["unit"], c["value_text"]) for c in row["components"]] == [
        (141, "mmHg", None),
        (91.5, "mmHg", None),
        (None, None, "sitting"),
    ]
    assert row["components"][0]["interpretation"] == [
        {"system": None, "code": "H", "display": None}
    ]
    assert row["fhir_version"] == "R4"


def _bundle(*resources: dict, bundle_type: str = "collection") -> dict:
    return {
        "resourceType": "Bundle",
        "type": bundle_type,
        "entry": [{"fullUrl": f"urn:uuid:{i}", "resource": r} for i, r in enumerate(resources)],
    }


PDF = b"%PDF-1.4 discharge summary for Jane Doe"


def test_bundle_routes_every_type_to_its_stream(tmp_path):
    resources = [
        {
            "resourceType": "Condition",
            "id": "c",
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "code": {"text": "Asthma"},
            "onsetDateTime": "2001-02-03",
            "recordedDate": "2005-01-01",
        },
        {
            "resourceType": "MedicationRequest",
            "id": "mr",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"text": "Albuterol"},
            "authoredOn": "2020-05-06T07:08:09Z",
            "dosageInstruction": [{"text": "2 puffs"}],
        },
        {
            "resourceType": "MedicationStatement",
            "id": "ms",
            "status": "active",
            "medicationReference": {"reference": "Medication/m"},
            "effectivePeriod": {"start": "2019-01-01"},
        },
        {
            "resourceType": "MedicationAdministration",
            "id": "ma",
            "status": "completed",
            "medicationCodeableConcept": {"text": "Insulin"},
            "effectiveDateTime": "2019-02-02T10:00:00Z",
            "dosage": {"text": "4 units"},
        },
        {"resourceType": "Medication", "id": "m", "code": {"text": "Albuterol"}},
        {
            "resourceType": "DocumentReference",
            "id": "d",
            "status": "current",
            "type": {"text": "Discharge summary"},
            "date": "2020-01-01T00:00:00Z",
            "content": [
                {
                    "attachment": {
                        "contentType": "application/pdf",
                        "data": base64.b64encode(PDF).decode(),
                    }
                }
            ],
        },
        {
            "resourceType": "DiagnosticReport",
            "id": "dr",
            "status": "final",
            "code": {"text": "CBC"},
            "effectiveDateTime": "2020-02-02T02:02:02Z",
            "result": [{"reference": "Observation/o"}],
            "presentedForm": [
                {"contentType": "text/plain", "data": base64.b64encode(b"all normal").decode()}
            ],
        },
        {
            "resourceType": "Immunization",
            "id": "i",
            "status": "completed",
            "vaccineCode": {"text": "Flu"},
            "occurrenceDateTime": "2020-10-10",
            "patient": {"reference": "Patient/p"},
        },
        {
            "resourceType": "Encounter",
            "id": "e",
            "status": "finished",
            "class": {"code": "AMB"},
            "period": {"start": "2020-03-03T09:00:00-04:00"},
        },
        {
            "resourceType": "Patient",
            "id": "p",
            "name": [{"family": "Doe", "given": ["Jane"]}],
            "birthDate": "1961-04-07",
        },
        {"resourceType": "FancyNewThing", "id": "f", "date": "2020-04-04"},
    ]
    inner = _bundle(resources[-2], resources[-1])
    document = _bundle(*resources[:-2], inner, bundle_type="searchset")
    document["entry"].append({"request": {"method": "GET"}})  # an entry without a resource
    report = ParseReport()
    rows = _rows(_write(tmp_path, "bundle.json", document), report)
    got = {row["fhir_id"]: (stream, row) for stream, row in rows}
    assert {fid: stream for fid, (stream, _) in got.items()} == {
        "c": "conditions",
        "mr": "medications",
        "ms": "medications",
        "ma": "medications",
        "m": "medications",
        "d": "documents",
        "dr": "documents",
        "i": "clinical",
        "e": "clinical",
        "p": "clinical",
        "f": "clinical",
    }
    assert [row["fhir_id"] for _, row in rows] == [
        "c",
        "mr",
        "ms",
        "ma",
        "m",
        "d",
        "dr",
        "i",
        "e",
        "p",
        "f",
    ]
    assert report.elements["fhir:Bundle"] == 2
    assert report.unknown["fhir:bundle_entry_without_resource"] == 1
    assert report.unknown["fhir:FancyNewThing"] == 1

    assert got["c"][1]["status"] == "active" and got["c"][1]["event_time"] == "2001-02-03T00:00:00Z"
    assert (
        got["mr"][1]["event_time"] == "2020-05-06T07:08:09Z" and got["mr"][1]["intent"] == "order"
    )
    assert got["mr"][1]["fhir_version"] == "R4"
    assert (
        got["ms"][1]["medication_ref"] == "Medication/m"
        and got["ms"][1]["event_time"] == "2019-01-01T00:00:00Z"
    )
    assert got["ma"][1]["dosage_text"] == ["4 units"]
    assert got["m"][1]["event_time"] is None and got["m"][1]["code_text"] == "Albuterol"
    assert got["i"][1]["occurrence"] == "2020-10-10T00:00:00Z" and got["i"][1]["code_text"] == "Flu"
    assert got["e"][1]["event_time"] == "2020-03-03T13:00:00Z"
    assert got["p"][1]["event_time"] is None and got["p"][1]["kind"] == "Patient"
    assert (
        got["f"][1]["kind"] == "FancyNewThing"
        and got["f"][1]["event_time"] == "2020-04-04T00:00:00Z"
    )
    assert got["f"][1]["bundle_full_url"] == "urn:uuid:1"

    document_row = got["d"][1]
    (attachment,) = document_row["attachments"]
    assert attachment["content_type"] == "application/pdf"
    assert attachment["size"] == len(PDF)
    assert attachment["sha256"] == hashlib.sha256(PDF).hexdigest()
    typed = {k: v for k, v in document_row.items() if k != "resource"}
    assert "Jane" not in json.dumps(typed) and base64.b64encode(PDF).decode() not in json.dumps(
        typed
    )
    assert (
        document_row["resource"]["content"][0]["attachment"]["data"]
        == base64.b64encode(PDF).decode()
    )
    report_row = got["dr"][1]
    assert report_row["attachments"][0]["sha256"] == hashlib.sha256(b"all normal").hexdigest()
    assert (
        report_row["result_refs"] == ["Observation/o"]
        and report_row["event_time"] == "2020-02-02T02:02:02Z"
    )


def test_bad_base64_is_counted_not_fatal(tmp_path):
    resource = {
        "resourceType": "DocumentReference",
        "id": "d",
        "content": [{"attachment": {"contentType": "text/plain", "data": "@@not base64@@"}}],
    }
    report = ParseReport()
    ((stream, row),) = _rows(_write(tmp_path, "d.json", resource), report)
    assert stream == "documents" and row["attachments"][0]["sha256"] is None
    assert report.unknown["fhir:attachment_not_base64"] == 1


# ------------------------------------------------------------------------ record keys


def test_record_key_ignores_file_name_folder_and_bundle(tmp_path):
    resource = {**R4_OBSERVATION, "valueQuantity": {"value": 72, "unit": "/min"}}
    a = _rows(
        _write(tmp_path, "a/Observation-1.json", resource),
        source_file="clinical-records/Observation-1.json",
    )
    b = _rows(
        _write(tmp_path, "b/other-name.json", resource),
        source_file="clinical_records/sub/other-name.json",
    )
    c = _rows(_write(tmp_path, "c/bundle.json", _bundle(resource)))
    shuffled = json.loads(json.dumps(resource, sort_keys=True))  # key order does not matter
    d = _rows(_write(tmp_path, "d.json", dict(reversed(list(shuffled.items())))))
    keys = {rows[0][1]["record_key"] for rows in (a, b, c, d)}
    assert len(keys) == 1


def test_record_key_differs_for_different_resources(tmp_path):
    base = {**R4_OBSERVATION, "valueQuantity": {"value": 72, "unit": "/min"}}
    changed = copy.deepcopy(base)
    changed["valueQuantity"]["value"] = 73
    other_type = {**base, "resourceType": "Condition"}
    keys = [
        _one(tmp_path, r, f"{i}.json")[1]["record_key"]
        for i, r in enumerate((base, changed, other_type))
    ]
    assert len(set(keys)) == 3


# -------------------------------------------------------------------- fhir versions


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ({"resourceType": "MedicationOrder", "dateWritten": "2017-01-01"}, "DSTU2"),
        ({"resourceType": "MedicationRequest", "authoredOn": "2017-01-01"}, "R4"),
        (
            {"resourceType": "Condition", "clinicalStatus": "active", "dateRecorded": "2017-01-01"},
            "DSTU2",
        ),
        (
            {
                "resourceType": "Condition",
                "clinicalStatus": {"coding": []},
                "recordedDate": "2017-01-01",
            },
            "R4",
        ),
        ({"resourceType": "Patient", "name": [{"family": ["Doe"]}]}, "DSTU2"),
        ({"resourceType": "Patient", "name": [{"family": "Doe"}]}, "R4"),
        ({"resourceType": "Procedure", "meta": {"profile": ["x"]}}, "R4"),
        ({"resourceType": "Procedure", "status": "completed"}, None),
    ],
)
def test_guess_fhir_version(resource, expected):
    assert guess_fhir_version(resource) == expected


def test_version_hint_from_export_xml_wins(tmp_path):
    path = _write(
        tmp_path, "p.json", {"resourceType": "Procedure", "id": "x", "status": "completed"}
    )
    assert _rows(path)[0][1]["fhir_version"] is None
    assert _rows(path, fhir_version="1.0.2")[0][1]["fhir_version"] == "DSTU2"
    assert _rows(path, fhir_version="4.0.1")[0][1]["fhir_version"] == "R4"


# ------------------------------------------------------------------------ bad input

SECRET_DIR = "Jane_Doe_1961-04-07"
SECRET_FILE = "Observation-JaneDoe-MRN12345.json"


def _secret_path(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / SECRET_DIR / SECRET_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


def _assert_path_free(message: str, path: Path) -> None:
    for part in path.parts[1:]:
        assert part not in message
    for token in ("Jane", "Doe", "1961", "MRN12345", str(path.parent)):
        assert token not in message


@pytest.mark.parametrize(
    "data",
    [
        b'{"resourceType": "Observation", "id": "Jane Doe"',  # truncated
        b"not json at all: Jane Doe",
        b"[" * 2000 + b"]" * 2000,  # deeper than orjson's 1024 levels
        b'{"a":' * 300 + b"1" + b"}" * 300,  # loads fine, too deep to serialise
        b"42",
    ],
    ids=["truncated", "garbage", "deep-decode", "deep-encode", "scalar"],
)
def test_bad_json_raises_path_free_input_error(tmp_path, data):
    path = _secret_path(tmp_path, data)
    with pytest.raises(InputError) as info:
        _rows(path, source_file=f"clinical-records/{SECRET_FILE}")
    _assert_path_free(str(info.value), path)


def test_bad_json_is_counted(tmp_path):
    report = ParseReport()
    with pytest.raises(InputError):
        _rows(_secret_path(tmp_path, b"{oops"), report)
    assert report.unknown["fhir:invalid_json"] == 1


def test_huge_file_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(fhir, "MAX_JSON_BYTES", 64)
    path = _secret_path(tmp_path, json.dumps({**R4_OBSERVATION}).encode())
    with pytest.raises(InputError, match="larger than") as info:
        _rows(path)
    _assert_path_free(str(info.value), path)


def test_missing_file_raises_path_free_input_error(tmp_path):
    path = tmp_path / SECRET_DIR / SECRET_FILE
    with pytest.raises(InputError) as info:
        _rows(path)
    _assert_path_free(str(info.value), path)


def test_utf8_bom_is_a_counted_repair(tmp_path):
    report = ParseReport()
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(R4_OBSERVATION).encode())
    ((stream, row),) = _rows(path, report)
    assert stream == "observations" and report.repairs["fhir_bom_removed"] == 1


def test_resource_without_resource_type_is_kept(tmp_path):
    report = ParseReport()
    ((stream, row),) = _rows(_write(tmp_path, "x.json", {"id": "1", "foo": "bar"}), report)
    assert (
        stream == "clinical"
        and row["kind"] == "Unknown"
        and row["resource"] == {"id": "1", "foo": "bar"}
    )
    assert report.unknown["fhir:missing_resourceType"] == 1
    # Counters never take arbitrary data values as names.
    ((stream, row),) = _rows(
        _write(tmp_path, "y.json", {"resourceType": "Jane Doe lives at 1 Main St"}), report
    )
    assert row["kind"] == "Unknown"
    assert not any("Jane" in name for counter in report.as_dict().values() for name in counter)


def test_patient_facts_r4():
    facts = patient_facts(
        {
            "resourceType": "Patient",
            "id": "p",
            "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN-1", "type": {"text": "MRN"}}],
            "name": [
                {"use": "official", "family": "Doe", "given": ["Jane", "Q"], "prefix": ["Dr."]}
            ],
            "gender": "female",
            "birthDate": "1961-04-07",
            "address": [
                {
                    "line": ["1 Main St"],
                    "city": "Springfield",
                    "postalCode": "12345",
                    "country": "US",
                }
            ],
            "telecom": [
                {"system": "phone", "value": "+1 555 0100", "use": "home"},
                {"system": "email"},
            ],
        }
    )
    assert facts["identifiers"] == [
        {"system": "urn:oid:1.2.3", "value": "MRN-1", "type": "MRN", "use": None}
    ]
    assert facts["names"] == [
        {
            "text": None,
            "given": ["Jane", "Q"],
            "family": "Doe",
            "prefix": ["Dr."],
            "suffix": [],
            "use": "official",
        }
    ]
    assert facts["birth_date"] == "1961-04-07" and facts["sex"] == "female"
    assert facts["addresses"][0]["city"] == "Springfield" and facts["addresses"][0]["lines"] == [
        "1 Main St"
    ]
    assert facts["telecom"] == [{"system": "phone", "value": "+1 555 0100", "use": "home"}]


def test_read_patients_fhir_unpacks_bundles(tmp_path):
    path = _write(
        tmp_path,
        "b.json",
        _bundle(
            {"resourceType": "Patient", "id": "a"},
            R4_OBSERVATION,
            _bundle({"resourceType": "Patient", "id": "b"}),
        ),
    )
    assert [f["fhir_id"] for f in read_patients_fhir(path)] == ["a", "b"]


# ------------------------------------------------------------------------- timefmt


@given(
    st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2100, 1, 1)),
    st.integers(min_value=-14 * 4, max_value=14 * 4),
)
def test_from_iso_matches_datetime_arithmetic(moment, quarter_hours):
    moment = moment.replace(microsecond=0)
    offset = timezone(timedelta(minutes=15 * quarter_hours))
    text = moment.replace(tzinfo=offset).isoformat()
    utc, local = from_iso(text)
    assert local == text
    expected = moment.replace(tzinfo=offset).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert utc == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2018-04-02", ("2018-04-02T00:00:00Z", "2018-04-02")),
        ("2018-04", ("2018-04-01T00:00:00Z", "2018-04")),
        ("2018", ("2018-01-01T00:00:00Z", "2018")),
        ("2017-10-18T00:00:00Z", ("2017-10-18T00:00:00Z", "2017-10-18T00:00:00Z")),
        ("2024-02-03 08:14:22 -0800", ("2024-02-03T16:14:22Z", "2024-02-03T08:14:22-08:00")),
        ("2024-12-31T23:30:00.5-01:00", ("2025-01-01T00:30:00.5Z", "2024-12-31T23:30:00.5-01:00")),
    ],
)
def test_from_iso_examples(text, expected):
    assert from_iso(text) == expected


@pytest.mark.parametrize(
    "text", ["", "yesterday", "2018-13-01", "2018-02-30", "2018-01-01T25:00:00Z"]
)
def test_from_iso_rejects(text):
    with pytest.raises(ValueError):
        from_iso(text)


def test_unparseable_dates_are_kept_and_counted(tmp_path):
    report = ParseReport()
    ((_, row),) = _rows(
        _write(tmp_path, "c.json", {"resourceType": "Condition", "onsetDateTime": "spring 1999"}),
        report,
    )
    assert (
        row["onset"] is None and row["onset_local"] == "spring 1999" and row["event_time"] is None
    )
    assert report.unknown["fhir:Condition.unparsed_time"] == 1


def test_rows_serialise_with_orjson(sample_rows):
    for _, row, _ in sample_rows:
        assert orjson.loads(orjson.dumps(row, option=orjson.OPT_SORT_KEYS)) == row
