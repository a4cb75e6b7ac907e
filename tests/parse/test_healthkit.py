"""HealthKit export.xml parser: rows, keys, damage repair, truncation, ranges,
and the fast tiers against lxml alone (they must never disagree)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from healthdelta.errors import InputError
from healthdelta.keys import record_key, strip_device_pointer
from healthdelta.parse.healthkit import _iter_healthkit, convert_date, iter_healthkit, plan_chunks, read_me
from healthdelta.parse.report import ParseReport

FIXTURE_XML = Path(__file__).resolve().parents[1] / "fixtures" / "apple-sample-export" / "apple_health_export" / "export.xml"

PROLOG = '<?xml version="1.0" encoding="UTF-8"?>\n'
GOOD_DTD = """<!DOCTYPE HealthData [
<!ELEMENT HealthData (ExportDate,Me,(Record|Correlation|Workout|ActivitySummary|ClinicalRecord)*)>
<!ATTLIST HealthData
  locale CDATA #REQUIRED
>
]>
"""
# iOS 16 shipped a DTD that no conforming parser accepts: an ATTLIST whose `>` is
# missing and an ELEMENT declaration with invalid syntax.
BROKEN_DTD = """<!DOCTYPE HealthData [
<!ELEMENT HealthData (ExportDate,Me,(Record|Correlation|Workout|ActivitySummary|ClinicalRecord)*)>
<!ATTLIST HealthData
  locale CDATA #REQUIRED

<!ELEMENT Record ((MetadataEntry|HeartRateVariabilityMetadataList)*>
<!ATTLIST Record
  type          CDATA #REQUIRED
  unit          CDATA #IMPLIED
>
<!ELEMENT WorkoutActivity (WorkoutEvent|WorkoutStatistics|MetadataEntry)*) EMPTY>
]>
"""
HEAD = (' <ExportDate value="2024-03-01 09:15:02 -0800"/>\n'
        ' <Me HKCharacteristicTypeIdentifierDateOfBirth="1961-04-07" '
        'HKCharacteristicTypeIdentifierBiologicalSex="HKBiologicalSexFemale"/>\n')
DEVICE = ("&lt;&lt;HKDevice: 0x{ptr}&gt;, name:Apple Watch, manufacturer:Apple Inc., model:Watch, "
          "hardware:Watch6,1, software:10.2&gt;")

HR = (' <Record type="HKQuantityTypeIdentifierHeartRate" sourceName="Jane’s Apple Watch" sourceVersion="10.2" '
      'device="' + DEVICE.format(ptr="283a1c7d0") + '" unit="count/min" creationDate="2024-02-03 08:19:04 -0800" '
      'startDate="2024-02-03 08:14:22 -0800" endDate="2024-02-03 08:14:22 -0800" value="72"/>\n')
HR_META = (' <Record type="HKQuantityTypeIdentifierHeartRate" sourceName="Jane’s Apple Watch" '
           'unit="count/min" creationDate="2024-02-03 23:59:04 -0800" startDate="2024-02-03 23:58:22 -0800" '
           'endDate="2024-02-03 23:58:22 -0800" value="64">\n'
           '  <MetadataEntry key="HKMetadataKeyHeartRateMotionContext" value="1"/>\n </Record>\n')
ENERGY = (' <Record type="HKQuantityTypeIdentifierActiveEnergyBurned" sourceName="Jane’s Apple Watch" '
          'unit="kcal" creationDate="2024-02-03 08:20:00 -0800" startDate="2024-02-03 08:14:22 -0800" '
          'endDate="2024-02-03 08:15:22 -0800" value="0.125"/>\n')
SLEEP = (' <Record type="HKCategoryTypeIdentifierSleepAnalysis" sourceName="AutoSleep &amp; Co" sourceVersion="6.1" '
         'creationDate="2024-02-04 07:00:00 +0100" startDate="2024-02-04 00:30:00 +0100" '
         'endDate="2024-02-04 06:30:00 +0100" value="HKCategoryValueSleepAnalysisAsleepCore">\n'
         '  <MetadataEntry key="HKTimeZone" value="Europe/Berlin"/>\n'
         '  <MetadataEntry key="note" value="&quot;deep&quot; &lt;3 &#x263A; &#233;"/>\n </Record>\n')
HRV = (' <Record type="HKQuantityTypeIdentifierHeartRateVariabilitySDNN" sourceName="Jane’s Apple Watch" '
       'unit="ms" creationDate="2024-02-03 20:15:00 -0800" startDate="2024-02-03 20:14:00 -0800" '
       'endDate="2024-02-03 20:15:00 -0800" value="41.5">\n'
       '  <HeartRateVariabilityMetadataList>\n'
       '   <InstantaneousBeatsPerMinute bpm="61" time="8:14:02.51 PM"/>\n'
       '   <InstantaneousBeatsPerMinute bpm="63" time="8:14:03.47 PM"/>\n'
       '  </HeartRateVariabilityMetadataList>\n </Record>\n')
SYS = ('<Record type="HKQuantityTypeIdentifierBloodPressureSystolic" sourceName="Withings" sourceVersion="5" '
       'device="' + DEVICE.format(ptr="{ptr}") + '" unit="mmHg" creationDate="2024-02-05 07:00:00 -0800" '
       'startDate="2024-02-05 06:59:00 -0800" endDate="2024-02-05 06:59:00 -0800" value="121"/>')
DIA = ('<Record type="HKQuantityTypeIdentifierBloodPressureDiastolic" sourceName="Withings" sourceVersion="5" '
       'unit="mmHg" creationDate="2024-02-05 07:00:00 -0800" startDate="2024-02-05 06:59:00 -0800" '
       'endDate="2024-02-05 06:59:00 -0800" value="79"/>')
CORRELATION = (' ' + SYS.format(ptr="1") + '\n ' + DIA + '\n'
               ' <Correlation type="HKCorrelationTypeIdentifierBloodPressure" sourceName="Withings" sourceVersion="5" '
               'creationDate="2024-02-05 07:00:00 -0800" startDate="2024-02-05 06:59:00 -0800" '
               'endDate="2024-02-05 06:59:00 -0800">\n'
               '  <MetadataEntry key="HKWasUserEntered" value="0"/>\n'
               '  ' + SYS.format(ptr="2") + '\n  ' + DIA + '\n </Correlation>\n')
WORKOUT = (' <Workout workoutActivityType="HKWorkoutActivityTypeRunning" duration="31.5" durationUnit="min" '
           'totalDistance="5.1" totalDistanceUnit="km" totalEnergyBurned="320" totalEnergyBurnedUnit="kcal" '
           'sourceName="Jane’s Apple Watch" sourceVersion="10.2" creationDate="2024-02-06 07:40:00 -0800" '
           'startDate="2024-02-06 07:00:00 -0800" endDate="2024-02-06 07:31:30 -0800">\n'
           '  <MetadataEntry key="HKIndoorWorkout" value="0"/>\n'
           '  <WorkoutEvent type="HKWorkoutEventTypeSegment" date="2024-02-06 07:00:00 -0800" duration="5.2" '
           'durationUnit="min"/>\n'
           '  <WorkoutStatistics type="HKQuantityTypeIdentifierHeartRate" startDate="2024-02-06 07:00:00 -0800" '
           'endDate="2024-02-06 07:31:30 -0800" average="140" minimum="90" maximum="170.5" unit="count/min"/>\n'
           '  <WorkoutRoute sourceName="Jane’s Apple Watch" sourceVersion="10.2" '
           'creationDate="2024-02-06 07:41:00 -0800" startDate="2024-02-06 07:00:00 -0800" '
           'endDate="2024-02-06 07:31:30 -0800">\n'
           '   <MetadataEntry key="HKMetadataKeySyncVersion" value="2"/>\n'
           '   <FileReference path="/workout-routes/route_2024-02-06_7.00am.gpx"/>\n'
           '  </WorkoutRoute>\n </Workout>\n')
ACTIVITY = (' <ActivitySummary dateComponents="2024-02-06" activeEnergyBurned="512.5" activeEnergyBurnedGoal="500" '
            'activeEnergyBurnedUnit="kcal" appleMoveTime="0" appleMoveTimeGoal="0" appleExerciseTime="31" '
            'appleExerciseTimeGoal="30" appleStandHours="11" appleStandHoursGoal="12"/>\n')
CLINICAL = (' <ClinicalRecord type="Observation" identifier="7" sourceName="Sample Location A" '
            'sourceURL="https://localhost:9090/resource/Observation/7" fhirVersion="1.0.2" '
            'receivedDate="2024-02-07 14:06:24 -0600" resourceFilePath="/clinical-records/Observation-7.json"/>\n')
AUDIOGRAM = (' <Audiogram type="HKDataTypeIdentifierAudiogram" sourceName="Mimi" sourceVersion="5" '
             'creationDate="2024-02-08 10:00:00 -0800" startDate="2024-02-08 09:50:00 -0800" '
             'endDate="2024-02-08 10:00:00 -0800">\n'
             '  <SensitivityPoint frequencyValue="500" frequencyUnit="Hz" leftEarValue="15" leftEarUnit="dBHL" '
             'rightEarValue="20.5" rightEarUnit="dBHL"/>\n </Audiogram>\n')
VISION = (' <VisionPrescription type="HKVisionPrescriptionTypeGlasses" dateIssued="2024-01-10 00:00:00 -0800" '
          'expirationDate="2026-01-10 00:00:00 -0800" brand="Acme">\n'
          '  <RightEye sphere="-1.25" cylinder="-0.5" axis="90"/>\n  <LeftEye sphere="-1.0"/>\n'
          ' </VisionPrescription>\n')
UNKNOWN = (' <StateOfMind kind="dailyMood" valence="0.4" startDate="2024-02-09 21:00:00 -0800">\n'
           '  <Label value="calm"/>\n </StateOfMind>\n')
ALL_KINDS = (HR + HR_META + ENERGY + SLEEP + HRV + CORRELATION + WORKOUT + ACTIVITY + CLINICAL + AUDIOGRAM + VISION
             + UNKNOWN)


def export_text(body: str, dtd: str = GOOD_DTD, head: str = HEAD, close: bool = True) -> str:
    return PROLOG + dtd + '<HealthData locale="en_US">\n' + head + body + ("</HealthData>\n" if close else "")


def write(tmp_path: Path, text: str | bytes, name: str = "export.xml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def parse(path: Path, **kw) -> tuple[list[tuple[str, dict]], ParseReport]:
    report = ParseReport()
    return list(_iter_healthkit(path, report, **kw)), report


def parse_all_ways(path: Path) -> tuple[list[tuple[str, dict]], ParseReport]:
    """Rows from the fast tiers; asserts lxml alone and tiny chunks give the same."""
    rows, report = parse(path)
    slow, _ = parse(path, force_slow=True)
    assert rows == slow
    small, _ = parse(path, chunk_bytes=97)
    assert rows == small
    return rows, report


def by_kind(rows: list[tuple[str, dict]], kind: str) -> list[dict]:
    return [row for _, row in rows if row["kind"] == kind]


# --------------------------------------------------------------------------- real fixture


def test_real_fixture_parses() -> None:
    report = ParseReport()
    rows = list(iter_healthkit(FIXTURE_XML, report))
    assert report.elements["ClinicalRecord"] == 35
    assert report.elements["Me"] == 1 and report.elements["ExportDate"] == 1
    assert {stream for stream, _ in rows} == {"clinical"}
    first = rows[0][1]
    assert first["kind"] == "ClinicalRecord"
    assert first["type"] == "Patient"
    assert first["received_date"] == "2018-12-18T20:06:24Z"
    assert first["received_date_local"] == "2018-12-18T14:06:24-06:00"
    assert first["resource_file_path"].startswith("/clinical-records/Patient-")
    assert len({row["record_key"] for _, row in rows}) == 35
    assert rows == parse(FIXTURE_XML, force_slow=True)[0]


def test_read_me_reads_the_head(tmp_path: Path) -> None:
    me = read_me(FIXTURE_XML)
    assert me["locale"] == "en_US"
    assert me["ExportDate"] == "2018-12-18 19:48:39 -0600"
    assert me["HKCharacteristicTypeIdentifierDateOfBirth"] == "1983-12-16"
    path = write(tmp_path, export_text(HR, dtd=BROKEN_DTD))
    assert read_me(path)["HKCharacteristicTypeIdentifierBiologicalSex"] == "HKBiologicalSexFemale"


# --------------------------------------------------------------------------- rows


def test_every_kind_becomes_its_row(tmp_path: Path) -> None:
    rows, report = parse_all_ways(write(tmp_path, export_text(ALL_KINDS)))
    streams = [stream for stream, _ in rows]
    assert streams.count("observations") == 10  # 7 Records + 2 nested + Audiogram
    assert streams.count("correlations") == 1 and streams.count("workouts") == 1
    assert streams.count("activity_summaries") == 1 and streams.count("clinical") == 3
    assert report.elements["Record"] == 7 and report.elements["Correlation/Record"] == 2
    assert report.elements["Record/MetadataEntry"] == 3
    assert report.unknown == {"StateOfMind": 1}

    hr = by_kind(rows, "Record")[0]
    assert hr["value"] == 72 and isinstance(hr["value"], int)
    # The pointer is a memory address, different in every export of the same sample.
    assert hr["device"].startswith("<<HKDevice: 0x>, name:Apple Watch")
    assert hr["source_name"] == "Jane’s Apple Watch"
    assert hr["event_time"] == hr["start_date"] == "2024-02-03T16:14:22Z"
    assert hr["start_date_local"] == "2024-02-03T08:14:22-08:00"
    assert hr["creation_date"] == "2024-02-03T16:19:04Z"
    assert hr["metadata"] == {} and hr["hrv_beats"] is None and hr["extra"] == {}
    assert hr["source"] == "healthkit" and hr["source_file"] == "export.xml"

    meta = by_kind(rows, "Record")[1]
    assert meta["metadata"] == {"HKMetadataKeyHeartRateMotionContext": "1"}
    assert meta["start_date"] == "2024-02-04T07:58:22Z"  # crosses midnight

    assert by_kind(rows, "Record")[2]["value"] == 0.125
    sleep = by_kind(rows, "Record")[3]
    assert sleep["value"] == "HKCategoryValueSleepAnalysisAsleepCore"
    assert sleep["source_name"] == "AutoSleep & Co"
    assert sleep["metadata"]["note"] == '"deep" <3 \u263a é'
    assert sleep["start_date"] == "2024-02-03T23:30:00Z"  # +0100 back over midnight

    hrv = by_kind(rows, "Record")[4]
    assert hrv["hrv_beats"] == [{"bpm": 61, "time": "8:14:02.51 PM"}, {"bpm": 63, "time": "8:14:03.47 PM"}]

    workout = by_kind(rows, "Workout")[0]
    assert workout["activity_type"] == "HKWorkoutActivityTypeRunning"
    assert workout["duration"] == 31.5 and workout["total_energy_burned"] == 320
    assert workout["metadata"] == {"HKIndoorWorkout": "0"}
    assert workout["events"] == [{"type": "HKWorkoutEventTypeSegment", "date": "2024-02-06T15:00:00Z",
                                  "date_local": "2024-02-06T07:00:00-08:00", "duration": 5.2,
                                  "duration_unit": "min"}]
    assert workout["statistics"][0]["maximum"] == 170.5 and workout["statistics"][0]["average"] == 140
    assert workout["route"]["file_path"] == "/workout-routes/route_2024-02-06_7.00am.gpx"
    assert workout["route"]["metadata"] == {"HKMetadataKeySyncVersion": "2"}

    activity = by_kind(rows, "ActivitySummary")[0]
    assert activity["event_time"] == "2024-02-06T00:00:00Z"
    assert activity["active_energy_burned"] == 512.5 and activity["apple_stand_hours"] == 11
    assert activity["active_energy_burned_unit"] == "kcal"

    clinical = by_kind(rows, "ClinicalRecord")[0]
    assert clinical["identifier"] == "7" and clinical["fhir_version"] == "1.0.2"
    assert clinical["source_url"].endswith("/Observation/7")

    audiogram = by_kind(rows, "Audiogram")[0]
    assert audiogram["points"] == [{"frequency_value": 500, "frequency_unit": "Hz", "left_ear_value": 15,
                                    "left_ear_unit": "dBHL", "right_ear_value": 20.5, "right_ear_unit": "dBHL"}]
    vision = by_kind(rows, "VisionPrescription")[0]
    assert vision["right_eye"] == {"sphere": "-1.25", "cylinder": "-0.5", "axis": "90"}
    assert vision["date_issued"] == "2024-01-10T08:00:00Z" and vision["brand"] == "Acme"

    unknown = by_kind(rows, "StateOfMind")[0]
    assert unknown["extra"] == {"kind": "dailyMood", "valence": "0.4", "startDate": "2024-02-09 21:00:00 -0800"}
    assert unknown["children"] == [{"tag": "Label", "attributes": {"value": "calm"}, "children": []}]
    assert unknown["event_time"] == "2024-02-10T05:00:00Z"


def test_correlation_children_link_to_their_top_level_twins(tmp_path: Path) -> None:
    rows, _ = parse_all_ways(write(tmp_path, export_text(CORRELATION)))
    top = [row for stream, row in rows if stream == "observations" and "_nested" not in row]
    nested = [row for stream, row in rows if row.get("_nested")]
    (corr,) = [row for stream, row in rows if stream == "correlations"]
    assert len(top) == len(nested) == 2
    # The nested systolic copy has another device pointer in the file: still the same record,
    # and the same row (rows never carry the pointer).
    assert len(set(re.findall(r"HKDevice: 0x[0-9a-f]+", CORRELATION))) == 2
    assert top[0]["device"] == nested[0]["device"]
    assert [r["record_key"] for r in top] == [r["record_key"] for r in nested] == corr["member_keys"]
    assert corr["metadata"] == {"HKWasUserEntered": "0"} and corr["type"] == "HKCorrelationTypeIdentifierBloodPressure"


def test_person_id_is_stamped_when_given(tmp_path: Path) -> None:
    path = write(tmp_path, export_text(HR + WORKOUT))
    rows = list(iter_healthkit(path, ParseReport(), person={"canonical_person_id": "p-1"}, source_file="x/export.xml"))
    assert all(row["canonical_person_id"] == "p-1" and row["source_file"] == "x/export.xml" for _, row in rows)


def test_comments_and_processing_instructions_in_the_body(tmp_path: Path) -> None:
    body = HR + " <!-- padding -->\n <?pi some data?>\n" + ENERGY + " <!-- a comment\n over lines -->\n"
    rows, report = parse_all_ways(write(tmp_path, export_text(body)))
    assert len(rows) == 2 and report.elements["Record"] == 2


# --------------------------------------------------------------------------- keys


def key_of(tmp_path: Path, body: str, name: str = "export.xml") -> str:
    rows, _ = parse_all_ways(write(tmp_path, export_text(body), name))
    (row,) = [row for _, row in rows]
    return row["record_key"]


def test_record_key_ignores_pointer_order_whitespace_and_wrapping(tmp_path: Path) -> None:
    base = key_of(tmp_path, HR, "a.xml")
    assert base == key_of(tmp_path, HR.replace("0x283a1c7d0", "0x1b2c3d4e5"), "b.xml")
    attrs = re.findall(r'\w+="[^"]*"', HR)
    assert base == key_of(tmp_path, " <Record " + " ".join(reversed(attrs)) + "/>\n", "c.xml")
    assert base == key_of(tmp_path, " <Record\n    " + "\n    ".join(attrs) + "\n  />\n", "d.xml")
    assert base == key_of(tmp_path, "<Record\t" + "  \t ".join(attrs) + "></Record>", "e.xml")
    assert base == key_of(tmp_path, HR.replace('value="72"', 'value = "72"'), "f.xml")
    # The key is the recipe of keys.py over the element's content.
    attrs_dict = {k: v for k, v in re.findall(r'(\w+)="([^"]*)"', HR)}
    attrs_dict["device"] = strip_device_pointer(attrs_dict["device"].replace("&lt;", "<").replace("&gt;", ">"))
    assert base == record_key("healthkit", "Record", {"attrs": attrs_dict, "children": []})


def test_record_key_covers_every_kept_field(tmp_path: Path) -> None:
    base = key_of(tmp_path, HR_META, "a.xml")
    assert base != key_of(tmp_path, HR_META.replace('value="1"', 'value="2"'), "b.xml")
    assert base != key_of(tmp_path, HR_META.replace('value="64"', 'value="65"'), "c.xml")
    assert base != key_of(tmp_path, HR_META.replace('sourceName="Jane’s', 'sourceName="John’s'), "d.xml")
    assert base != key_of(tmp_path, HR_META.replace(' unit="count/min"', ""), "e.xml")
    assert base != key_of(tmp_path, HR_META.replace("\n  <MetadataEntry key=\"HKMetadataKeyHeartRateMotionContext\" "
                                                    "value=\"1\"/>", ""), "f.xml")


def test_different_records_never_share_a_key(tmp_path: Path) -> None:
    body = "".join(HR.replace('value="72"', f'value="{v}"') for v in range(1000, 1300))
    body += "".join(ENERGY.replace("08:15:22", f"08:{m:02d}:22") for m in range(16, 60))
    rows, _ = parse_all_ways(write(tmp_path, export_text(body + ALL_KINDS)))
    top = [row["record_key"] for _, row in rows if not row.get("_nested")]
    assert len(top) == len(set(top))


# --------------------------------------------------------------------------- damage


def test_broken_ios16_dtd_is_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, export_text(ALL_KINDS, dtd=BROKEN_DTD))
    with pytest.raises(ET.ParseError):  # the damage is real
        ET.parse(path)
    rows, _ = parse_all_ways(path)
    good, _ = parse(write(tmp_path, export_text(ALL_KINDS), "good.xml"))
    assert rows == good


def test_entity_definitions_are_never_expanded(tmp_path: Path) -> None:
    dtd = ('<!DOCTYPE HealthData [\n <!ENTITY lol "lol">\n'
           + "".join(f' <!ENTITY lol{i} "{"&lol{}; ".format(i - 1 if i > 1 else "") * 10}">\n' for i in range(1, 10))
           + ' <!ENTITY xxe SYSTEM "file:///etc/passwd">\n]>\n')
    body = HR.replace('sourceVersion="10.2"', 'sourceVersion="&lol9;"').replace('unit="count/min"', 'unit="&xxe;"')
    rows, report = parse_all_ways(write(tmp_path, export_text(body, dtd=dtd)))
    (row,) = [row for _, row in rows]
    assert row["source_version"] == "&lol9;" and row["unit"] == "&xxe;"
    assert report.repairs["bare_ampersand_escaped"] == 2


def test_control_characters_are_removed(tmp_path: Path) -> None:
    body = HR.replace("name:Apple Watch", "name:Apple\x0b Watch")
    body = body.replace('sourceVersion="10.2"', 'sourceVersion="10.\x012"')
    body += ENERGY.replace('unit="kcal"', 'unit="k&#11;cal"')
    rows, report = parse_all_ways(write(tmp_path, export_text(body)))
    assert "name:Apple Watch" in rows[0][1]["device"] and rows[0][1]["source_version"] == "10.2"
    assert rows[1][1]["unit"] == "kcal"
    assert report.repairs["control_char_removed"] == 3
    assert rows[0][1]["record_key"] == key_of(tmp_path, HR, "clean.xml")


def test_invalid_utf8_is_replaced(tmp_path: Path) -> None:
    text = export_text(HR + ENERGY).encode("utf-8")
    damaged = text.replace("Jane’s".encode(), b"Jane\xe2\x80s", 1).replace(b'unit="kcal"', b'unit="k\xffcal"')
    rows, report = parse_all_ways(write(tmp_path, damaged))
    assert rows[0][1]["source_name"] == "Jane\ufffds Apple Watch"
    assert rows[1][1]["unit"] == "k\ufffdcal"
    assert report.repairs["invalid_utf8_replaced"] == 2


def test_attribute_values_follow_xml_normalisation(tmp_path: Path) -> None:
    body = HR.replace('sourceVersion="10.2"', 'sourceVersion="10\t.2\r\n x&#10;y&#9;z"')
    rows, _ = parse_all_ways(write(tmp_path, export_text(body)))
    assert rows[0][1]["source_version"] == "10 .2  x\ny\tz"


def test_cdata_text_and_single_quotes_go_through_lxml(tmp_path: Path) -> None:
    body = (HR + " <Record type='HKQuantityTypeIdentifierStepCount' value='5' startDate='2024-02-03 08:14:22 -0800'/>\n"
            + " <Note>hello <![CDATA[<raw>]]></Note>\n" + ENERGY)
    rows, report = parse_all_ways(write(tmp_path, export_text(body)))
    assert [row["kind"] for _, row in rows] == ["Record", "Record", "Note", "Record"]
    assert rows[1][1]["value"] == 5
    assert rows[2][1]["text"] == "hello <raw>"
    assert report.repairs["lxml_fallback"] == 1


@pytest.mark.parametrize("cut", [0.001, 0.2, 0.5, 0.77, 0.93, -15, -14, -5, -2])
def test_truncated_files_are_an_input_error(tmp_path: Path, cut: float) -> None:
    text = export_text(ALL_KINDS * 3).encode()
    size = len(text) + cut if cut < 0 else int(len(text) * cut) + len(PROLOG + GOOD_DTD)
    path = write(tmp_path, text[: int(size)])
    for kw in ({}, {"force_slow": True}, {"chunk_bytes": 128}):
        with pytest.raises(InputError) as err:
            parse(path, **kw)
        message = str(err.value)
        assert "truncated" in message and str(tmp_path) not in message and "Jane" not in message


def test_truncation_message_says_how_far_it_got(tmp_path: Path) -> None:
    text = export_text(HR * 100)
    path = write(tmp_path, text[: len(text) * 3 // 4])
    with pytest.raises(InputError, match=r"export.xml is truncated: stopped after \d+ elements at \d+% of the file"):
        parse(path)
    # Cut inside a long last element: the message points at the end of the last whole one.
    huge = CORRELATION.replace("  <MetadataEntry", '  <MetadataEntry key="k" value="v"/>\n' * 400 + "  <MetadataEntry")
    text = export_text(HR * 40 + huge)
    path = write(tmp_path, text[: text.index("</Correlation>")])
    with pytest.raises(InputError, match=r"stopped after 44 elements at [3-6]\d% of the file"):
        parse(path)
    with pytest.raises(InputError, match=r"stopped after 44 elements at [3-9]\d% of the file"):
        parse(path, force_slow=True)


def test_not_an_export(tmp_path: Path) -> None:
    for text in ("", "<?xml version='1.0'?>\n<ClinicalDocument/>\n"):
        with pytest.raises(InputError):
            parse(write(tmp_path, text))
    with pytest.raises(InputError, match="not well-formed"):
        parse(write(tmp_path, export_text(HR + ' <Record value="a<b"/>\n' + ENERGY)))
    with pytest.raises(InputError, match="not well-formed"):
        parse(write(tmp_path, export_text(HR + " </Workout>\n" + ENERGY)))


def test_an_element_that_never_ends_is_an_error_not_a_memory_leak(tmp_path: Path, monkeypatch) -> None:
    from healthdelta.parse import healthkit

    monkeypatch.setattr(healthkit, "_MAX_ELEMENT_BYTES", 4096)
    path = write(tmp_path, export_text(CORRELATION.replace(" </Correlation>\n", "") + HR * 40))
    with pytest.raises(InputError, match="does not end within"):
        parse(path, chunk_bytes=1024)


def test_trailing_content_after_the_root_is_ignored_and_counted(tmp_path: Path) -> None:
    rows, report = parse_all_ways(write(tmp_path, export_text(HR) + "garbage\n"))
    assert len(rows) == 1 and report.repairs["trailing_content_ignored"] == 1


# --------------------------------------------------------------------------- chunks


def test_chunks_concatenate_to_the_single_stream(tmp_path: Path) -> None:
    path = write(tmp_path, export_text((ALL_KINDS + HR + ENERGY) * 40))
    whole, whole_report = parse(path)
    size = path.stat().st_size
    for target in (1 << 30, 4096, 1500, 300):
        chunks = plan_chunks(path, target, max(1, target // 16))
        assert chunks[0][0] == export_text("").index("<HealthData") and chunks[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
        if target < 1 << 20:
            assert len(chunks) > 3
        report = ParseReport()
        rows = [row for r in chunks for row in iter_healthkit(path, report, byte_range=r)]
        assert rows == whole and report.elements == whole_report.elements


def test_chunks_never_split_inside_an_element(tmp_path: Path) -> None:
    path = write(tmp_path, export_text(CORRELATION * 50 + HRV * 50))
    text = path.read_bytes()
    starts = [start for start, _ in plan_chunks(path, 500, 64)[1:]]
    assert len(starts) > 10
    for start in starts:
        assert text[start:start + 2] == b" <"
        assert text[start:].startswith((b" <Record", b" <Correlation"))
        # not a nested Record: the previous line closes a top-level element
        assert text[:start].rstrip().endswith((b"/>", b"</Correlation>", b"</Record>"))
        assert b"</Correlation>" not in text[start:text.index(b"\n", start)]


def test_chunks_start_where_a_type_group_starts(tmp_path: Path) -> None:
    """Apple groups Records by type and a re-export appends to each group: a group's
    first element always starts a chunk, so growth of one group moves no other cut."""
    path = write(tmp_path, export_text(HR * 30 + ENERGY * 30 + CORRELATION * 10))
    text = path.read_bytes()
    starts = {start for start, _ in plan_chunks(path, 2000, 200)}
    for first in (text.index(b" <Record type=\"HKQuantityTypeIdentifierActiveEnergyBurned"),
                  text.index(b" <Correlation")):
        assert first in starts


def test_chunks_single_chunk_fallback(tmp_path: Path) -> None:
    path = write(tmp_path, export_text(HR.strip() + ENERGY.strip()).replace("\n", ""))
    assert plan_chunks(path, 10, 4) == [(path.read_bytes().index(b"<HealthData"), path.stat().st_size)]


def test_a_wrong_range_is_an_error_not_silent_data(tmp_path: Path) -> None:
    path = write(tmp_path, export_text(CORRELATION * 3))
    text = path.read_bytes()
    inside = text.index(b"<MetadataEntry")
    with pytest.raises(InputError):
        parse(path, byte_range=(0, inside))
    with pytest.raises(InputError):
        parse(path, byte_range=(inside, len(text)))


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("raw, expected", [
    ("2024-02-03 08:14:22 -0800", ("2024-02-03T16:14:22Z", "2024-02-03T08:14:22-08:00")),
    ("2023-12-31 23:30:00 -0100", ("2024-01-01T00:30:00Z", "2023-12-31T23:30:00-01:00")),
    ("2024-03-01 00:10:00 +0200", ("2024-02-29T22:10:00Z", "2024-03-01T00:10:00+02:00")),
    ("2024-02-03 08:14:22 +0530", ("2024-02-03T02:44:22Z", "2024-02-03T08:14:22+05:30")),
    ("2024-02-03 08:14:22 +0000", ("2024-02-03T08:14:22Z", "2024-02-03T08:14:22+00:00")),
    ("2024-02-03T08:14:22.250-08:00", ("2024-02-03T16:14:22.250Z", "2024-02-03T08:14:22.250-08:00")),
    ("2024-02-03 08:14:22", (None, "2024-02-03T08:14:22")),
    ("2024-02-30 08:14:22 -0800", (None, "2024-02-30 08:14:22 -0800")),
    ("yesterday", (None, "yesterday")),
])
def test_convert_date(raw: str, expected: tuple) -> None:
    assert convert_date(raw) == expected


def test_values_are_typed_by_kind(tmp_path: Path) -> None:
    body = "".join(HR.replace('value="72"', f'value="{v}"') for v in ("0072", "-3", "1.5e-05", "NaN", "12abc", ""))
    body += SLEEP.replace("HKCategoryValueSleepAnalysisAsleepCore", "1")
    rows, _ = parse_all_ways(write(tmp_path, export_text(body)))
    assert [row["value"] for _, row in rows] == [72, -3, 1.5e-05, "NaN", "12abc", "", "1"]


# --------------------------------------------------------------------------- fast tiers == lxml

_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
_NAMES = st.sampled_from(["type", "sourceName", "unit", "value", "device", "startDate", "note", "x-y.z", "a:b"])


def _attr(name: str, value: str) -> str:
    return f'{name}="' + escape(value, {'"': "&quot;"}) + '"'


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.tuples(st.dictionaries(_NAMES, _TEXT, max_size=5),
                                  st.lists(st.tuples(_TEXT, _TEXT), max_size=3),
                                  st.sampled_from([" ", "\n   ", "\t", "  "])), min_size=1, max_size=6))
def test_fast_tiers_equal_lxml(tmp_path_factory: pytest.TempPathFactory, records: list) -> None:
    body = ""
    for attrs, metadata, sep in records:
        head = " <Record" + "".join(sep + _attr(k, v) for k, v in attrs.items())
        if metadata:
            body += head + ">\n" + "".join(f'  <MetadataEntry {_attr("key", k)} {_attr("value", v)}/>\n'
                                           for k, v in metadata) + " </Record>\n"
        else:
            body += head + "/>\n"
    path = write(tmp_path_factory.mktemp("h"), export_text(body))
    rows, _ = parse_all_ways(path)
    assert len(rows) == len(records)


def test_synthetic_export_fast_equals_lxml(tmp_path: Path) -> None:
    synth = pytest.importorskip("healthdelta.synth")
    export = synth.generate_export(tmp_path / "s", seed=3, records=1500)
    path = export.export_dir / "export.xml"
    rows, report = parse(path)
    assert rows == parse(path, force_slow=True)[0]
    assert report.elements["Record"] == export.counts["records"]
    assert report.elements["Workout"] == export.counts["workouts"]
    assert sum(stream == "observations" and not row.get("_nested") for stream, row in rows) == export.counts["records"]
    ranges = plan_chunks(path, 50_000, 4096)
    assert len(ranges) > 3
    assert [row for r in ranges for row in iter_healthkit(path, ParseReport(), byte_range=r)] == rows
