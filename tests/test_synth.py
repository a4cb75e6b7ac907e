"""The synthetic export generator: deterministic, counts that match the files, the
next-export property, Apple's formats, and PII planted where promised."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import re
import zipfile
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from lxml import etree

from healthdelta import synth
from healthdelta.errors import UsageError
from healthdelta.synth import EXPORT_FOLDER, SynthExport, generate_export, make_person

APOS = "\u2019"
POINTER = re.compile(r"0x[0-9a-f]+")
CDA_NS = {"cda": "urn:hl7-org:v3"}


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_xml(export: SynthExport) -> str:
    return (export.export_dir / "export.xml").read_text(encoding="utf-8")


def parse_health_data(text: str) -> etree._Element:
    """Parse export.xml with its DOCTYPE stripped, as a reader that ignores DTDs would."""
    body = text[text.index("<HealthData"):]
    return etree.fromstring(body.encode())


def top_level_elements(text: str) -> list[str]:
    """Top-level elements of export.xml as text: Apple indents them by one space and
    their children by more, so a line starting with ' <' (not ' </') opens one."""
    elements: list[str] = []
    body = text[text.index("<HealthData"):].splitlines(keepends=True)[1:-1]
    for line in body:
        if line.startswith(" <") and not line.startswith(" </"):
            elements.append(line)
        else:
            elements[-1] += line
    return elements


def all_text(export: SynthExport) -> str:
    """Every file of the export, plus decoded base64 attachments (where narratives hide)."""
    chunks = []
    for p in sorted(export.export_dir.rglob("*")):
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            chunks.append(text)
            for data in re.findall(r'"data" : "([A-Za-z0-9+/=]+)"', text):
                chunks.append(base64.b64decode(data).decode())
    return "\n".join(chunks)


def fhir_resources(export: SynthExport) -> list[dict]:
    resources = []
    for p in sorted((export.export_dir / "clinical-records").glob("*.json")):
        doc = json.loads(p.read_text(encoding="utf-8"))
        if doc["resourceType"] == "Bundle":
            resources.extend(entry["resource"] for entry in doc["entry"])
        else:
            resources.append(doc)
    return resources


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> SynthExport:
    """Owner + one child + a namesake, zipped with the folder kept."""
    return generate_export(tmp_path_factory.mktemp("family"), seed=7, records=2000, people=2,
                           ambiguous_person=True, zip=True)


@pytest.fixture(scope="module")
def first_and_next(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthExport, SynthExport]:
    first = generate_export(tmp_path_factory.mktemp("first"), seed=3, records=1500)
    return first, generate_export(tmp_path_factory.mktemp("next"), base=first, new_records=400)


# --------------------------------------------------------------------------- determinism


def test_same_arguments_give_identical_bytes(tmp_path: Path, family: SynthExport) -> None:
    again = generate_export(tmp_path, seed=7, records=2000, people=2, ambiguous_person=True, zip=True)
    assert tree_digest(again.export_dir) == tree_digest(family.export_dir)
    assert again.zip_path.read_bytes() == family.zip_path.read_bytes()
    assert again.counts == family.counts
    assert again.people == family.people


def test_other_seed_gives_other_export(tmp_path: Path, family: SynthExport) -> None:
    other = generate_export(tmp_path, seed=8, records=2000)
    assert other.people[0] != family.people[0]
    assert read_xml(other) != read_xml(family)


def test_spilling_to_disk_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Big exports spool record groups to temporary files and write in blocks; tiny
    thresholds force that path on a small export, which must not change a byte."""
    in_memory = generate_export(tmp_path / "memory", seed=4, records=3000)
    monkeypatch.setattr(synth, "_SPILL_CHARS", 20_000)
    monkeypatch.setattr(synth, "_CHUNK_CHARS", 5_000)
    spilled = generate_export(tmp_path / "spilled", seed=4, records=3000)
    assert tree_digest(spilled.export_dir) == tree_digest(in_memory.export_dir)
    assert not list((tmp_path / "spilled").glob(".tmp-*"))


def test_no_temporary_files_are_left(family: SynthExport) -> None:
    assert sorted(p.name for p in family.root.parent.iterdir()) == [EXPORT_FOLDER, "export.zip"]


# --------------------------------------------------------------------------- export.xml


def test_export_xml_is_valid_against_its_own_dtd(family: SynthExport) -> None:
    parser = etree.XMLParser(dtd_validation=True, no_network=True, resolve_entities=False)
    root = etree.parse(str(family.export_dir / "export.xml"), parser).getroot()
    assert root.tag == "HealthData" and root.get("locale") == "en_US"


def test_header_and_layout_follow_apple(family: SynthExport) -> None:
    text = read_xml(family)
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE HealthData [\n')
    assert "\n]>\n<HealthData locale=\"en_US\">\n <ExportDate value=\"" in text
    assert text.endswith("</HealthData>\n")
    export_date = re.search(r'<ExportDate value="([^"]+)"/>', text).group(1)
    datetime.strptime(export_date, "%Y-%m-%d %H:%M:%S %z")
    stamps = re.findall(r'(?:startDate|endDate|creationDate)="([^"]+)"', text)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d -0[78]00", s) for s in stamps)
    assert {s[-5:] for s in stamps} == {"-0800", "-0700"}  # crosses the DST change
    assert '&lt;&lt;HKDevice: 0x' in text and 'hardware:Watch' in text and 'hardware:iPhone' in text


def test_counts_match_the_file(family: SynthExport) -> None:
    text = read_xml(family)
    root = parse_health_data(text)
    counts = family.counts
    records = root.findall("Record")
    assert len(records) == counts["records"] == text.count("\n <Record ")
    assert len(root.findall("Correlation")) == counts["correlations"] > 0
    assert len(root.findall("Correlation/Record")) == counts["correlation_children"] == text.count("\n  <Record ")
    assert len(root.findall("Record/MetadataEntry")) == counts["metadata_entries"]
    assert sum(1 for r in records if r.find("MetadataEntry") is not None) == counts["records_with_metadata"]
    assert len(root.findall("Record/HeartRateVariabilityMetadataList")) == counts["hrv_records"] > 0
    beats = root.findall("Record/HeartRateVariabilityMetadataList/InstantaneousBeatsPerMinute")
    assert len(beats) == counts["hrv_beats"]
    assert len(root.findall("Workout")) == counts["workouts"] > 0
    assert len(root.findall("Workout/WorkoutEvent")) == counts["workout_events"] > 0
    assert len(root.findall("Workout/WorkoutStatistics")) == counts["workout_statistics"] > 0
    assert len(root.findall("Workout/WorkoutRoute")) == counts["workout_routes"] > 0
    assert len(root.findall("Workout/MetadataEntry")) == counts["workout_metadata_entries"]
    assert len(root.findall("ActivitySummary")) == counts["activity_summaries"] == counts["days"]
    assert len(root.findall("ClinicalRecord")) == counts["clinical_records"]
    by_type = Counter(r.get("type") for r in records)
    assert {k: v for k, v in counts.items() if k.startswith("records_by_type:") and v} == {
        f"records_by_type:{t}": n for t, n in by_type.items()}
    assert sum(v for k, v in counts.items() if k.startswith("records_by_type:")) == counts["records"]


def test_realistic_mix_of_records(family: SynthExport) -> None:
    root = parse_health_data(read_xml(family))
    by_type = Counter(r.get("type") for r in root.findall("Record"))
    assert by_type.most_common(1)[0][0] == "HKQuantityTypeIdentifierHeartRate"
    for suffix in ("StepCount", "RestingHeartRate", "HeartRateVariabilitySDNN", "ActiveEnergyBurned",
                   "BasalEnergyBurned", "DistanceWalkingRunning", "BodyMass", "BloodPressureSystolic",
                   "BloodPressureDiastolic", "OxygenSaturation"):
        assert by_type["HKQuantityTypeIdentifier" + suffix] > 0, suffix
    for suffix in ("SleepAnalysis", "AppleStandHour", "MindfulSession"):
        assert by_type["HKCategoryTypeIdentifier" + suffix] > 0, suffix
    sleep = {r.get("value") for r in root.findall("Record[@type='HKCategoryTypeIdentifierSleepAnalysis']")}
    stages = ("InBed", "AsleepCore", "AsleepDeep", "AsleepREM", "Awake")
    assert {f"HKCategoryValueSleepAnalysis{v}" for v in stages} <= sleep
    with_metadata = family.counts["records_with_metadata"] / family.counts["records"]
    assert 0.2 < with_metadata < 0.45
    per_record = Counter(len(r.findall("MetadataEntry")) for r in root.findall("Record"))
    assert set(per_record) == {0, 1, 2, 3}
    assert any(r.get("sourceVersion") is None for r in root.findall("Record"))
    assert all(r.get("creationDate") for r in root.findall("Record"))
    beat = root.find("Record/HeartRateVariabilityMetadataList/InstantaneousBeatsPerMinute")
    assert re.fullmatch(r"\d{1,2}:\d\d:\d\d\.\d\d [AP]M", beat.get("time"))


def test_records_are_grouped_by_type(family: SynthExport) -> None:
    types = [r.get("type") for r in parse_health_data(read_xml(family)).findall("Record")]
    groups = [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]
    assert len(groups) == len(set(groups))


def test_correlation_children_repeat_top_level_records(family: SynthExport) -> None:
    text = read_xml(family)
    children = re.findall(r"\n  <Record ([^\n]*)/>", text)
    assert children
    for attrs in children:
        assert f"\n <Record {attrs}/>\n" in text


def test_watch_and_phone_steps_overlap(family: SynthExport) -> None:
    root = parse_health_data(read_xml(family))
    def spans(source: str) -> list[tuple[datetime, datetime]]:
        fmt = "%Y-%m-%d %H:%M:%S %z"
        return [(datetime.strptime(r.get("startDate"), fmt), datetime.strptime(r.get("endDate"), fmt))
                for r in root.findall("Record[@type='HKQuantityTypeIdentifierStepCount']")
                if r.get("sourceName").endswith(source)]
    watch, phone = spans(f"{APOS}s Apple Watch"), spans(f"{APOS}s iPhone")
    overlapping = sum(1 for ws, we in watch for ps, pe in phone if ps < we and ws < pe)
    assert overlapping >= family.counts["step_overlap_pairs"] > 0


def test_workouts_have_ios16_children_and_existing_routes(family: SynthExport) -> None:
    root = parse_health_data(read_xml(family))
    paths = [ref.get("path") for ref in root.findall("Workout/WorkoutRoute/FileReference")]
    name = re.compile(r"/workout-routes/route_\d{4}-\d\d-\d\d_\d{1,2}\.\d\d[ap]m\.gpx")
    assert paths and all(name.fullmatch(p) for p in paths)
    routes = sorted((family.export_dir / "workout-routes").glob("*.gpx"))
    assert sorted("/workout-routes/" + p.name for p in routes) == sorted(paths)
    assert len(routes) == family.counts["gpx_files"]
    points = 0
    for route in routes:
        gpx = etree.parse(str(route)).getroot()
        ns = {"g": "http://www.topografix.com/GPX/1/1"}
        assert gpx.get("version") == "1.1"
        assert gpx.find("g:trk/g:name", ns).text.startswith("Route ")
        trkpts = gpx.findall("g:trk/g:trkseg/g:trkpt", ns)
        assert trkpts[0].find("g:extensions/g:hAcc", ns) is not None
        points += len(trkpts)
    assert points == family.counts["gpx_points"]
    stats = {s.get("type") for s in root.findall("Workout/WorkoutStatistics")}
    assert "HKQuantityTypeIdentifierActiveEnergyBurned" in stats
    assert "HKQuantityTypeIdentifierDistanceWalkingRunning" in stats
    events = {e.get("type") for e in root.findall("Workout/WorkoutEvent")}
    assert "HKWorkoutEventTypeSegment" in events


# --------------------------------------------------------------------------- other files


def test_clinical_records_point_to_fhir_files(family: SynthExport) -> None:
    root = parse_health_data(read_xml(family))
    folder = family.export_dir / "clinical-records"
    listed = root.findall("ClinicalRecord")
    for record in listed:
        path = record.get("resourceFilePath")
        assert path.startswith("/clinical-records/")
        resource = json.loads((family.export_dir / path[1:]).read_text(encoding="utf-8"))
        assert resource["resourceType"] == record.get("type")
        assert resource["id"] == record.get("identifier")
    versions = Counter(r.get("fhirVersion") for r in listed)
    assert versions["4.0.1"] > versions["1.0.2"] > 0
    files = sorted(folder.glob("*.json"))
    assert len(files) == family.counts["fhir_files"] == len(listed) + 1  # the Bundle is not listed
    resources = fhir_resources(family)
    assert len(resources) == family.counts["fhir_resources"]
    assert {f"fhir:{t}": n for t, n in Counter(r["resourceType"] for r in resources).items()} == {
        k: v for k, v in family.counts.items() if k.startswith("fhir:") and k != "fhir:Bundle"}
    for kind in ("Patient", "Observation", "Condition", "MedicationRequest", "Immunization", "AllergyIntolerance",
                 "Procedure", "DiagnosticReport", "DocumentReference", "Encounter", "MedicationOrder"):
        assert family.counts[f"fhir:{kind}"] > 0, kind
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    for field in ("valueQuantity", "valueCodeableConcept", "valueString", "component"):
        assert any(field in o for o in observations), field
    assert (folder / files[0].name).read_text(encoding="utf-8").startswith('{\n  "')  # Apple's " : " style


def test_cda_has_observations(family: SynthExport) -> None:
    cda = etree.parse(str(family.export_dir / "export_cda.xml")).getroot()
    observations = cda.findall(".//cda:entry/cda:organizer/cda:component/cda:observation", CDA_NS)
    assert len(observations) == family.counts["cda_observations"] > 0
    value = observations[0].find("cda:value", CDA_NS)
    assert value.get("{http://www.w3.org/2001/XMLSchema-instance}type") == "PQ" and value.get("unit")


def test_ecg_files_in_both_number_formats(family: SynthExport) -> None:
    files = sorted((family.export_dir / "electrocardiograms").glob("ecg_*.csv"))
    assert len(files) == family.counts["ecg_files"] >= 2
    comma = 0
    samples = 0
    for path in files:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
        header = {row[0]: row[1] for row in rows[:8]}
        assert set(header) == {"Name", "Date of Birth", "Recorded Date", "Classification", "Symptoms",
                               "Software Version", "Device", "Sample Rate"}
        assert rows[8] == [] and rows[9] == ["Lead", "Lead I"] and rows[10] == ["Unit", "µV"] and rows[11] == []
        values = [row[0] for row in rows[12:]]
        samples += len(values)
        if header["Sample Rate"] == "512 Hertz":
            comma += 1
            assert all("," in v and "." not in v for v in values)
        else:
            assert header["Sample Rate"] == "512 hertz"
            assert all(re.fullmatch(r"-?\d+\.\d{3}", v) for v in values)
    assert comma == family.counts["ecg_files_decimal_comma"] == 1
    assert samples == family.counts["ecg_samples"] == len(files) * 30 * 512


def test_zip_is_laid_out_like_the_phones(family: SynthExport) -> None:
    assert family.root == family.zip_path == family.root.parent / "export.zip"
    with zipfile.ZipFile(family.zip_path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names)
        assert all(n.startswith(f"{EXPORT_FOLDER}/") and not n.endswith("/") for n in names)
        assert {i.compress_type for i in infos} == {zipfile.ZIP_DEFLATED}
        assert len({i.date_time for i in infos}) == 1
        folder = {f"{EXPORT_FOLDER}/{k}": v for k, v in tree_digest(family.export_dir).items()}
        assert {n: hashlib.sha256(zf.read(n)).hexdigest() for n in names} == folder


def test_zip_without_folder(tmp_path: Path) -> None:
    export = generate_export(tmp_path, records=200, zip=True, keep_folder=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.zip"]
    assert not export.export_dir.exists()
    with zipfile.ZipFile(export.zip_path) as zf:
        assert zf.read(f"{EXPORT_FOLDER}/export.xml").count(b"\n <Record ") == 200


# --------------------------------------------------------------------------- next export


def test_next_export_keeps_every_old_element(first_and_next: tuple[SynthExport, SynthExport]) -> None:
    first, following = first_and_next
    old = Counter(POINTER.sub("0x", e) for e in top_level_elements(read_xml(first)) if "<ExportDate" not in e)
    new = Counter(POINTER.sub("0x", e) for e in top_level_elements(read_xml(following)) if "<ExportDate" not in e)
    assert not old - new
    added = new - old
    assert sum(n for e, n in added.items() if e.startswith(" <Record ")) == 400
    assert following.counts["records"] == first.counts["records"] + 400
    assert following.generation == first.generation + 1 and following.people == first.people


def test_next_export_has_later_records_and_new_pointers(first_and_next: tuple[SynthExport, SynthExport]) -> None:
    first, following = first_and_next
    old_text, new_text = read_xml(first), read_xml(following)
    assert set(POINTER.findall(old_text)).isdisjoint(POINTER.findall(new_text))
    fmt = "%Y-%m-%d %H:%M:%S %z"
    def export_date(text: str) -> datetime:
        return datetime.strptime(re.search(r'<ExportDate value="([^"]+)"', text).group(1), fmt)
    assert export_date(new_text) > export_date(old_text)
    old_elements = {POINTER.sub("0x", e) for e in top_level_elements(old_text)}
    latest_old = max(datetime.strptime(s, fmt) for s in re.findall(r'startDate="([^"]+)"', old_text))
    added = [e for e in top_level_elements(new_text) if POINTER.sub("0x", e) not in old_elements
             and e.startswith(" <Record ")]
    starts = [datetime.strptime(re.search(r'startDate="([^"]+)"', e).group(1), fmt) for e in added]
    assert sum(s > latest_old for s in starts) > len(starts) * 0.9


def test_next_export_keeps_other_files(first_and_next: tuple[SynthExport, SynthExport]) -> None:
    first, following = first_and_next
    before, after = tree_digest(first.export_dir), tree_digest(following.export_dir)
    for name, digest in before.items():
        if name not in ("export.xml", "export_cda.xml"):
            assert after[name] == digest, name


def test_next_of_next_chains(tmp_path: Path, first_and_next: tuple[SynthExport, SynthExport]) -> None:
    _, following = first_and_next
    third = generate_export(tmp_path, base=following, new_records=10)
    assert third.counts["records"] == following.counts["records"] + 10
    assert set(POINTER.findall(read_xml(third))).isdisjoint(POINTER.findall(read_xml(following)))


def test_next_export_equals_a_direct_export_modulo_pointers(tmp_path: Path,
                                                             first_and_next: tuple[SynthExport, SynthExport]) -> None:
    _, following = first_and_next
    direct = generate_export(tmp_path, seed=3, records=1900)
    assert POINTER.sub("0x", read_xml(direct)) == POINTER.sub("0x", read_xml(following))


# --------------------------------------------------------------------------- size


@pytest.mark.parametrize("target", [300_000, 2_000_000])
def test_target_bytes_within_ten_percent(tmp_path: Path, target: int) -> None:
    export = generate_export(tmp_path, seed=1, target_bytes=target)
    assert abs(export.export_xml_bytes - target) <= target * 0.1
    assert export.export_xml_bytes == (export.export_dir / "export.xml").stat().st_size


# --------------------------------------------------------------------------- PII


def test_person_is_deterministic_and_uses_the_typographic_apostrophe() -> None:
    person = make_person(5)
    assert person == make_person(5) != make_person(6)
    assert person.device_name == f"{person.given}{APOS}s Apple Watch"
    assert make_person(5, 1).family == person.family and make_person(5, 1).given != person.given
    forms = person.pii_strings()
    born = datetime.strptime(person.birth_date, "%Y-%m-%d")
    for expected in (f"{person.given} {person.family}", f"{person.family}, {person.given}", person.birth_date,
                     born.strftime("%Y%m%d"), f"{born:%B} {born.day}, {born.year}", person.mrn, person.address_line,
                     person.phone, person.email, person.device_name, f"{person.given}{APOS}s", f"{person.given}'s"):
        assert expected in forms


def test_owner_pii_is_planted_everywhere_promised(family: SynthExport) -> None:
    owner = family.people[0]
    text = read_xml(family)
    root = parse_health_data(text)
    me = root.find("Me")
    assert me.get("HKCharacteristicTypeIdentifierDateOfBirth") == owner.birth_date
    assert me.get("HKCharacteristicTypeIdentifierBiologicalSex") == owner.sex
    assert f'sourceName="{owner.given}{APOS}s Apple Watch"' in text
    assert f'sourceName="{owner.given}{APOS}s iPhone"' in text

    patients = [r for r in fhir_resources(family) if r["resourceType"] == "Patient"]
    r4 = next(p for p in patients if p.get("identifier", [{}])[0].get("value") == owner.mrn)
    assert r4["name"][0]["family"] == owner.family and r4["name"][0]["given"] == [owner.given]
    assert r4["birthDate"] == owner.birth_date
    assert r4["address"][0]["line"] == [owner.address_line]
    assert {t["value"] for t in r4["telecom"]} == {owner.phone, owner.email}

    cda = etree.parse(str(family.export_dir / "export_cda.xml")).getroot()
    role = cda.find("cda:recordTarget/cda:patientRole", CDA_NS)
    assert role.find("cda:id", CDA_NS).get("extension") == owner.mrn
    assert role.find("cda:patient/cda:name/cda:given", CDA_NS).text == owner.given
    assert role.find("cda:patient/cda:name/cda:family", CDA_NS).text == owner.family
    assert role.find("cda:patient/cda:birthTime", CDA_NS).get("value") == owner.birth_date.replace("-", "")
    assert role.find("cda:addr/cda:streetAddressLine", CDA_NS).text == owner.address_line
    assert {t.get("value") for t in role.findall("cda:telecom", CDA_NS)} == {f"tel:{owner.phone}",
                                                                             f"mailto:{owner.email}"}

    for path in (family.export_dir / "electrocardiograms").glob("*.csv"):
        assert path.read_text(encoding="utf-8").startswith(f"Name,{owner.given} {owner.family}\nDate of Birth,")

    documents = [r for r in fhir_resources(family) if r["resourceType"] == "DocumentReference"]
    note = base64.b64decode(documents[0]["content"][0]["attachment"]["data"]).decode()
    assert f"{owner.given} {owner.family}" in note
    observation_notes = [n["text"] for r in fhir_resources(family) for n in r.get("note", [])
                         if r["resourceType"] == "Observation"]
    assert any(f"{owner.family}, {owner.given}" in n for n in observation_notes)

    everything = all_text(family)
    for form in owner.pii_strings():
        if form != f"{owner.given}'s":  # the ASCII possessive is a search form only
            assert form in everything, form


def test_family_member_and_namesake_are_separate_patients(family: SynthExport) -> None:
    owner, child, namesake = family.people
    patients = {p["birthDate"]: p for p in fhir_resources(family) if p["resourceType"] == "Patient"}
    assert child.birth_date in patients and child.family == owner.family
    assert patients[child.birth_date]["identifier"][0]["value"] == child.mrn
    assert (namesake.given, namesake.family) == (owner.given, owner.family)
    assert namesake.birth_date != owner.birth_date and namesake.mrn != owner.mrn
    twin = patients[namesake.birth_date]
    assert twin["name"][0]["text"] == f"{owner.given} {owner.family}"
    assert twin["identifier"][0]["value"] == namesake.mrn
    assert family.counts["fhir:Patient"] == 4  # owner (R4 + DSTU2), child, namesake


# --------------------------------------------------------------------------- errors


def test_refuses_to_overwrite_and_bad_arguments(tmp_path: Path, family: SynthExport) -> None:
    with pytest.raises(UsageError):
        generate_export(family.root.parent, records=10)
    with pytest.raises(UsageError):
        generate_export(tmp_path, records=10, keep_folder=False)
    with pytest.raises(UsageError):
        generate_export(tmp_path, records=-1)
    with pytest.raises(UsageError):
        generate_export(tmp_path, people=0)
    assert not any(tmp_path.iterdir())


def test_empty_export_is_still_well_formed(tmp_path: Path) -> None:
    export = generate_export(tmp_path, records=0)
    root = parse_health_data(read_xml(export))
    assert root.find("Record") is None and export.counts["records"] == 0
    assert root.find("Me") is not None and len(root.findall("ClinicalRecord")) == export.counts["clinical_records"]
