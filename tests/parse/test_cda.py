"""export_cda.xml → observation rows, patient facts, and the repair of damaged files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from healthdelta.errors import InputError
from healthdelta.parse import cda
from healthdelta.parse.cda import iter_cda, read_cda_patient
from healthdelta.parse.report import ParseReport
from healthdelta.parse.timefmt import from_cda

EXPORT = Path(__file__).resolve().parents[1] / "fixtures" / "apple-sample-export" / "apple_health_export"

HEAD = b"""<?xml version="1.0"?>
<?xml-stylesheet type="text/xsl" href="CDA.xsl"?>
<ClinicalDocument xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns="urn:hl7-org:v3" xmlns:cda="urn:hl7-org:v3">
 <realmCode code="US"/>
 <title>Health Data Export</title>
 <effectiveTime value="20181218194839-0600"/>
 <recordTarget>
  <patientRole>
   <id root="2.16.840.1.113883.4.6" nullFlavor="NA"/>
   <id root="1.2.3.4" extension="MRN-777"/>
   <addr use="HP"><streetAddressLine>1 Main St</streetAddressLine><city>Springfield</city><postalCode>12345</postalCode></addr>
   <telecom use="HP" value="tel:+1-555-0100"/>
   <telecom value="mailto:jane@example.org"/>
   <patient>
    <name use="L"><given>Jane</given><given>Q</given><family>Doe</family></name>
    <administrativeGenderCode code="F" codeSystem="2.16.840.1.113883.5.1" displayName="Female"/>
    <birthTime value="19610407"/>
   </patient>
  </patientRole>
 </recordTarget>
 <component>
  <structuredBody>
   <component>
    <section>
     <code code="8716-3" codeSystem="2.16.840.1.113883.6.1"/>
     <title>Vital Signs</title>
"""
TAIL = b"""    </section>
   </component>
  </structuredBody>
 </component>
</ClinicalDocument>
"""


def _observation(
    value: bytes,
    *,
    pointer: bytes = b"0x283a1c7d0",
    code: bytes = b"8867-4",
    low: bytes = b"20181218194839-0600",
) -> bytes:
    return b"""      <component>
       <observation classCode="OBS" moodCode="EVN">
        <templateId root="2.16.840.1.113883.10.20.22.4.27"/>
        <code code="%s" codeSystem="2.16.840.1.113883.6.1" codeSystemName="LOINC" displayName="Heart rate"/>
        <text>
         <sourceName>Jane's Apple Watch</sourceName>
         <sourceVersion>5.1</sourceVersion>
         <device>&lt;&lt;HKDevice: %s&gt;, name:Apple Watch, model:Watch&gt;</device>
         <value>62</value>
         <type>HKQuantityTypeIdentifierHeartRate</type>
         <unit>count/min</unit>
         <metadataEntry><key>HKMetadataKeyHeartRateMotionContext</key><value>0</value></metadataEntry>
        </text>
        <statusCode code="completed"/>
        <effectiveTime><low value="%s"/><high value="20181218194939-0600"/></effectiveTime>
        %s
        <interpretationCode code="N" codeSystem="2.16.840.1.113883.5.83"/>
        <referenceRange><observationRange><text>60-100</text></observationRange></referenceRange>
       </observation>
      </component>
""" % (code, pointer, low, value)


def _entry(*observations: bytes) -> bytes:
    return (
        b"""     <entry typeCode="DRIV">
      <organizer classCode="CLUSTER" moodCode="EVN">
       <code code="46680005" codeSystem="2.16.840.1.113883.6.96" displayName="Vital signs"/>
       <statusCode code="completed"/>
"""
        + b"".join(observations)
        + b"""      </organizer>
     </entry>
"""
    )


PQ = b'<value xsi:type="PQ" value="62" unit="count/min"/>'
CD = b'<value xsi:type="CD" code="HKCategoryValueSleepAnalysisAsleep" displayName="Asleep"/>'
ST = b'<value xsi:type="ST">feeling fine</value>'
REAL = b'<value xsi:type="REAL" value="36.6"/>'
GOOD = (
    HEAD
    + _entry(_observation(PQ), _observation(CD, code=b"X1"))
    + _entry(_observation(ST, code=b"X2"), _observation(REAL, code=b"X3"))
    + TAIL
)


def _parse(
    tmp_path: Path, data: bytes, name: str = "export_cda.xml"
) -> tuple[list[tuple[str, dict]], ParseReport]:
    path = tmp_path / name
    path.write_bytes(data)
    report = ParseReport()
    return list(iter_cda(path, report)), report


def _keys(rows: list[tuple[str, dict]]) -> list[str]:
    return [row["record_key"] for _, row in rows]


# ------------------------------------------------------------------------ real sample


def test_sample_export_cda_parses():
    path = EXPORT / "export_cda.xml"
    report = ParseReport()
    assert list(iter_cda(path, report)) == []  # Apple's sample holds a header only
    assert report.repairs == {} and report.unknown == {}
    facts = read_cda_patient(path)
    assert facts["birth_date"] == "1983-12-16" and facts["birth_time"] == "19831216"
    assert facts["sex"] == "female"
    assert facts["identifiers"] == []  # the only id is nullFlavor="NA": no identifier


# -------------------------------------------------------------------- observations


def test_observation_rows(tmp_path):
    rows, report = _parse(tmp_path, GOOD)
    assert [stream for stream, _ in rows] == ["observations"] * 4
    assert report.elements == {"cda:observation": 4, "cda:organizer": 2, "cda:section": 1}
    assert report.repairs == {}
    hr = rows[0][1]
    assert (
        hr["source"] == "cda"
        and hr["kind"] == "cda:observation"
        and hr["source_file"] == "export_cda.xml"
    )
    assert (hr["code"], hr["code_system"], hr["display_name"]) == (
        "8867-4",
        "2.16.840.1.113883.6.1",
        "Heart rate",
    )
    assert hr["status"] == "completed"
    assert hr["event_time"] == "2018-12-19T01:48:39Z"
    assert hr["effective_start"] == "2018-12-19T01:48:39Z"
    assert hr["effective_start_local"] == "2018-12-18T19:48:39-06:00"
    assert hr["effective_end"] == "2018-12-19T01:49:39Z"
    assert (hr["value_type"], hr["value"], hr["unit"]) == ("PQ", 62, "count/min")
    assert hr["interpretation"] == "N" and hr["reference_range"] == ["60-100"]
    assert hr["source_name"] == "Jane's Apple Watch" and hr["source_version"] == "5.1"
    assert hr["device"] == "<<HKDevice: 0x>, name:Apple Watch, model:Watch>"  # no memory address
    assert hr["hk_type"] == "HKQuantityTypeIdentifierHeartRate"
    assert hr["metadata"] == {"HKMetadataKeyHeartRateMotionContext": "0"}
    assert (hr["organizer_code"], hr["organizer_display_name"]) == ("46680005", "Vital signs")
    assert (hr["section_title"], hr["section_code"]) == ("Vital Signs", "8716-3")
    assert hr["element"]["tag"] == "observation"
    assert hr["element"]["attrs"] == {"classCode": "OBS", "moodCode": "EVN"}
    assert {"tag": "value", "attrs": {"xsi:type": "PQ", "value": "62", "unit": "count/min"}} in hr[
        "element"
    ]["children"]

    sleep, text, real = rows[1][1], rows[2][1], rows[3][1]
    assert (sleep["value_type"], sleep["value_text"], sleep["value_code"], sleep["value"]) == (
        "CD",
        "Asleep",
        "HKCategoryValueSleepAnalysisAsleep",
        None,
    )
    assert (text["value_type"], text["value_text"]) == ("ST", "feeling fine")
    assert (real["value_type"], real["value"]) == ("REAL", 36.6)
    assert len(set(_keys(rows))) == 4


def test_record_key_ignores_device_pointer_and_file_name(tmp_path):
    a, _ = _parse(tmp_path, HEAD + _entry(_observation(PQ, pointer=b"0x283a1c7d0")) + TAIL, "a.xml")
    b, _ = _parse(tmp_path, HEAD + _entry(_observation(PQ, pointer=b"0x1111aaaa")) + TAIL, "b.xml")
    c, _ = _parse(
        tmp_path, HEAD + _entry(_observation(PQ.replace(b'"62"', b'"63"'))) + TAIL, "c.xml"
    )
    assert _keys(a) == _keys(b)
    assert _keys(a) != _keys(c)
    assert a[0][1]["device"] == b[0][1]["device"]  # and the row holds no pointer either


def test_other_statements_are_kept_generically(tmp_path):
    act = b"""     <entry>
      <act classCode="ACT" moodCode="EVN">
       <code code="A1" displayName="Something"/>
       <effectiveTime value="20200101"/>
       <entryRelationship typeCode="SUBJ">
        <observation classCode="OBS" moodCode="EVN"><code code="inner"/><value xsi:type="ST">x</value></observation>
       </entryRelationship>
      </act>
     </entry>
"""
    rows, report = _parse(tmp_path, HEAD + act + TAIL)
    ((stream, row),) = rows
    assert stream == "clinical" and row["kind"] == "cda:act"
    assert (
        row["event_time"] == "2020-01-01T00:00:00Z" and row["effective_start_local"] == "2020-01-01"
    )
    assert "inner" in json.dumps(row["element"])  # the nested observation stays in its act
    assert report.elements["cda:observation_nested"] == 1 and report.unknown["cda:act"] == 1


def test_entities_are_not_resolved(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    doctype = (
        b'<!DOCTYPE ClinicalDocument [<!ENTITY xxe SYSTEM "%s"><!ENTITY lol "LOLLOL">]>\n'
        % secret.as_uri().encode()
    )
    data = GOOD.replace(b"<ClinicalDocument ", doctype + b"<ClinicalDocument ", 1)
    data = data.replace(b"feeling fine", b"&xxe;&lol;")
    rows, _ = _parse(tmp_path, data)
    dumped = json.dumps([row for _, row in rows])
    assert "TOP-SECRET" not in dumped and "LOLLOL" not in dumped


# ------------------------------------------------------------------------- repairs


def test_trailing_content_is_cut_and_counted(tmp_path):
    good, _ = _parse(tmp_path, GOOD, "good.xml")
    rows, report = _parse(
        tmp_path, GOOD + b"<ClinicalDocument><junk/></ClinicalDocument>\ntrailing text"
    )
    assert _keys(rows) == _keys(good)
    assert report.repairs == {"cda_trailing_content": 1}


def test_missing_opening_tag_is_repaired(tmp_path):
    good, _ = _parse(tmp_path, GOOD, "good.xml")
    # Drop the <component> opening the second observation: its </component> is now stray.
    damaged = GOOD.replace(
        b'      <component>\n       <observation classCode="OBS" moodCode="EVN">',
        b'       <observation classCode="OBS" moodCode="EVN">',
        2,
    )
    damaged = damaged.replace(
        b'       <observation classCode="OBS" moodCode="EVN">',
        b'      <component>\n       <observation classCode="OBS" moodCode="EVN">',
        1,
    )
    assert damaged.count(b"<component>") == GOOD.count(b"<component>") - 1
    rows, report = _parse(tmp_path, damaged)
    assert _keys(rows) == _keys(good)
    assert report.repairs == {"cda_stray_end_tag_removed": 1}
    assert [row["organizer_code"] for _, row in rows] == ["46680005"] * 4


def test_missing_root_opening_tag_is_repaired(tmp_path):
    good, _ = _parse(tmp_path, GOOD, "good.xml")
    damaged = GOOD.replace(
        b'<ClinicalDocument xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns="urn:hl7-org:v3" xmlns:cda="urn:hl7-org:v3">',
        b"",
    )
    rows, report = _parse(tmp_path, damaged)
    assert _keys(rows) == _keys(good)
    assert report.repairs == {"cda_root_tag_inserted": 1}
    assert read_cda_patient(tmp_path / "export_cda.xml")["birth_date"] == "1961-04-07"


def test_missing_closing_tag_is_repaired(tmp_path):
    good, _ = _parse(tmp_path, GOOD, "good.xml")
    damaged = GOOD.replace(b"</observation>\n      </component>", b"</observation>\n", 1)
    rows, report = _parse(tmp_path, damaged)
    assert _keys(rows) == _keys(good)
    assert report.repairs == {"cda_end_tag_inserted": 1}


def test_truncated_file_keeps_what_is_complete(tmp_path):
    cut = GOOD.index(b"<observation", GOOD.index(b"X3") - 800)
    rows, report = _parse(tmp_path, GOOD[: cut + 200])
    assert len(rows) == 4  # the cut observation is closed by the repair
    assert report.repairs["cda_end_tag_inserted"] > 0


def test_invalid_character_is_recovered(tmp_path):
    good, _ = _parse(tmp_path, GOOD, "good.xml")
    rows, report = _parse(tmp_path, GOOD.replace(b"feeling fine", b"feeling\x01 fine"))
    assert len(rows) == 4 and report.repairs == {"cda_invalid_char_removed": 1}
    assert _keys(rows)[:2] == _keys(good)[:2]


def test_repairing_reader_is_chunk_boundary_safe(tmp_path, monkeypatch):
    damaged = GOOD.replace(b"<component>\n    <section>", b"<section>") + b"<junk/>"
    expected, expected_report = _parse(tmp_path, damaged, "one-chunk.xml")
    for chunk in (1, 7, 64, 1000):
        monkeypatch.setattr(cda, "CHUNK_BYTES", chunk)
        rows, report = _parse(tmp_path, damaged, f"chunk-{chunk}.xml")
        assert _keys(rows) == _keys(expected)
        assert report.repairs == expected_report.repairs
    assert expected_report.repairs == {"cda_stray_end_tag_removed": 1, "cda_trailing_content": 1}


# ------------------------------------------------------------------- patient facts


def test_read_cda_patient(tmp_path):
    path = tmp_path / "export_cda.xml"
    path.write_bytes(GOOD)
    facts = read_cda_patient(path)
    assert facts["names"] == [
        {
            "text": None,
            "given": ["Jane", "Q"],
            "family": "Doe",
            "prefix": [],
            "suffix": [],
            "use": "L",
        }
    ]
    assert facts["birth_date"] == "1961-04-07" and facts["sex"] == "female"
    assert facts["identifiers"] == [
        {"system": "1.2.3.4", "value": "MRN-777", "type": None, "use": None}
    ]
    assert (
        facts["addresses"][0]["lines"] == ["1 Main St"]
        and facts["addresses"][0]["postal_code"] == "12345"
    )
    assert facts["telecom"] == [
        {"system": "phone", "value": "+1-555-0100", "use": "HP"},
        {"system": "email", "value": "jane@example.org", "use": None},
    ]


def test_rows_hold_no_record_target(tmp_path):
    rows, _ = _parse(tmp_path, GOOD)
    dumped = json.dumps([row for _, row in rows])
    for token in ("Doe", "19610407", "MRN-777", "Springfield", "555-0100"):
        assert token not in dumped


# ----------------------------------------------------------------------- bad input

SECRET = "Jane_Doe_MRN-777"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"this is not xml, Jane Doe",
        b'<?xml version="1.0"?><HealthData locale="en_US"><Record/></HealthData>',
        b"\x00\x01\x02",
    ],
    ids=["empty", "text", "other-xml", "binary"],
)
def test_not_a_cda_raises_path_free_input_error(tmp_path, data):
    path = tmp_path / SECRET / f"{SECRET}.xml"
    path.parent.mkdir()
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        list(iter_cda(path, ParseReport(), source_file="export_cda.xml"))
    message = str(info.value)
    for token in ("Jane", "Doe", "MRN", str(tmp_path)):
        assert token not in message


# ------------------------------------------------------------------------- timefmt


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20181218194839-0600", ("2018-12-19T01:48:39Z", "2018-12-18T19:48:39-06:00")),
        ("20181218194839+0130", ("2018-12-18T18:18:39Z", "2018-12-18T19:48:39+01:30")),
        ("20181218194839.123-0600", ("2018-12-19T01:48:39.123Z", "2018-12-18T19:48:39.123-06:00")),
        ("201812181948-0600", ("2018-12-19T01:48:00Z", "2018-12-18T19:48:00-06:00")),
        ("20181218", ("2018-12-18T00:00:00Z", "2018-12-18")),
        ("201812", ("2018-12-01T00:00:00Z", "2018-12")),
    ],
)
def test_from_cda(text, expected):
    assert from_cda(text) == expected


@pytest.mark.parametrize("text", ["", "2018-12-18", "20181332", "20181218250000"])
def test_from_cda_rejects(text):
    with pytest.raises(ValueError):
        from_cda(text)
