"""A hand-built export that plants identifiers where de-identifiers tend to miss them.

Every planted value is listed in `PLANTED` under the leak class of issue 10 it stands
for; `find_leaks` looks for them in text the way a hostile reviewer would: case- and
accent-insensitive, after decoding HTML entities, JSON escapes and base64.
"""

from __future__ import annotations

import base64
import html
import json
import re
import unicodedata
from pathlib import Path

OWNER_DOB = "1994-05-05"
SERIAL = "8ABCD1234"
APOS = "\u2019"

# class -> values that must never appear in share output (words compared, see `_words`).
# Identifiers under their own FHIR names are lower-case: no free-text pattern would catch
# them, only the structural rule.
PLANTED: dict[str, tuple[str, ...]] = {
    "01_metadata_newline": ("987-65-4321",),
    "02_numeric_metadata": ("88124477", "19940505", "5035550199", "123456789"),
    "03_metadata_keys": ("SN77Z1Q9", "00844588003288", "10987654D321", "E1E2E3E4-AAAA-4BBB-8CCC-DDDDEEEEFFFF",
                         "MEUCIQDsig1234"),
    "04_device_serials": (SERIAL,),
    "05_old_routes": ("45.528788", "-122.660397", "45.528784", "-122.660411"),
    "06_file_names": ("Ingrid D'Angelo 1994-05-05 labs",),
    "07_fhir_birth_date_values": (OWNER_DOB,),
    "08_narrative_entities": ("Ingrid", "D'Angelo", "ingrid.dangelo@example.org"),
    "09_binary": ("Zebulon Marchetti",),
    "10_fhir_identifiers": ("UDI-(01)00844588003288", "lot4471z", "di99812q", "sub55501234", "acc202477812",
                            "req44120", "grp99017"),
    "11_urls": ("fhir.example.org",),
    "12_relatives": ("Marguerite", "Thaddeus Okafor", "1961-02-14"),
    "13_ages_over_89": ("1931", "92 years"),
    "14_cda": ("H44120X", "Thistlebrook General", "obs-Ingrid-1", "PMK" + SERIAL),
    "15_ecg_header": ("1994/5/5",),  # a form no known-date list holds: only the label says what it is
    "16_name_variants": ("DAngelo", "D Angelo", "Elodie", "Ingrid_iPhone", "I.E.D."),
    "17_device_only_name": ("Rosalind",),
    "18_free_text": ("May 5th, 1994", "5/5/94", "05-May-1994", "5 mai 1994", "123 45 6789", "QX-773-1942",
                     "20 7946 0958", "dangelo77", "PO Box 8812", "Apt 4B",
                     "Hauptstrasse 12", "192.168.14.27", "3C:22:FB:9A:10:7E", "ACCT55501234", "PLX-99812",
                     "D1234567", "4417 Quillmoor Ave", "Thistlebrook", "(503) 555-0199"),
    "19_coarse_routes": ("247.016155", "1.332374", "22.778777", "246.289895", "1.214840", "22.977493"),
}

# Real dates that must not survive --date-shift (narratives, notes, CDA text and TS values).
REAL_DATES = ("2024-03-02", "March 2, 2024", "02.03.2024", "20240302", "2024-03-15", "20240315",
              "America/Los_Angeles")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


NARRATIVE = (
    "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>Patient &#73;ngrid D&#39;Angelo was seen on 2024-03-02."
    " <a href=\"mailto:ingrid.dangelo@example.org\" title=\"Ingrid D'Angelo\">mail</a>"
    " <img alt=\"Ingrid\" src=\"x.png\"/></p></div>"
)
FREE_TEXT = (
    "Seen March 2, 2024 (02.03.2024). Born May 5th, 1994; also written 5/5/94, 05-May-1994, 5 mai 1994 and "
    f"{OWNER_DOB}. SSN 123 45 6789, MRN QX-773-1942. Call +44 20 7946 0958 or (503) 555-0199, mail "
    "i.dangelo77 at example dot com. Lives PO Box 8812, Apt 4B, 4417 Quillmoor Ave, Thistlebrook; before "
    "that Hauptstrasse 12. Router 192.168.14.27, MAC 3C:22:FB:9A:10:7E. Acct# ACCT55501234, policy no. "
    "PLX-99812, driver licence D1234567. Name variants: D\u2019Angelo, DAngelo, D Angelo, E\u0301lodie, "
    "Ingrid_iPhone, I.E.D. Age: 92 years."
)


def _export_xml(*, with_clinical: bool, owner_device: str) -> str:
    device = (f"&lt;&lt;HKDevice: 0x280d9e176&gt;, name:Ingrid_iPhone (serial {SERIAL}), manufacturer:Apple Inc., "
              f"model:Watch SN {SERIAL}, hardware:Watch5,4, software:10.1, firmware:fw-{SERIAL}&gt;")
    clinical = ""
    if with_clinical:
        clinical = (
            ' <ClinicalRecord type="HKClinicalTypeIdentifierLabResultRecord" identifier="obs-1" '
            'sourceName="Thistle Clinic" sourceURL="https://fhir.example.org/api" fhirVersion="4.0.1" '
            'receivedDate="2024-03-02 08:00:00 -0800" '
            'resourceFilePath="/clinical-records/Ingrid D\'Angelo 1994-05-05 labs.json"/>\n')
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE HealthData [
<!ELEMENT HealthData ANY>
]>
<HealthData locale="en_US">
 <ExportDate value="2024-03-15 07:29:24 -0700"/>
 <Me HKCharacteristicTypeIdentifierDateOfBirth="{OWNER_DOB}" HKCharacteristicTypeIdentifierBiologicalSex="HKBiologicalSexFemale" HKCharacteristicTypeIdentifierBloodType="HKBloodTypeNotSet" HKCharacteristicTypeIdentifierFitzpatrickSkinType="HKFitzpatrickSkinTypeNotSet" HKCharacteristicTypeIdentifierCardioFitnessMedicationsUse="None"/>
 <Record type="HKQuantityTypeIdentifierHeartRate" sourceName="{owner_device}" sourceVersion="10.1" device="{device}" unit="count/min" creationDate="2024-03-02 07:35:24 -0800" startDate="2024-03-02 07:35:19 -0800" endDate="2024-03-02 07:35:19 -0800" value="61">
  <MetadataEntry key="Note" value="ok
SSN 987-65-4321"/>
  <MetadataEntry key="Buddy" value="ran with Rosalind"/>
  <MetadataEntry key="Patient MRN" value="88124477"/>
  <MetadataEntry key="Ingrid D'Angelo goal" value="1"/>
  <MetadataEntry key="DOB" value="19940505"/>
  <MetadataEntry key="Phone" value="5035550199"/>
  <MetadataEntry key="SSN" value="123456789"/>
  <MetadataEntry key="HKDeviceSerialNumber" value="SN77Z1Q9"/>
  <MetadataEntry key="HKUDIDeviceIdentifier" value="00844588003288"/>
  <MetadataEntry key="HKUDIProductionIdentifier" value="(21)10987654d321"/>
  <MetadataEntry key="HKExternalUUID" value="E1E2E3E4-AAAA-4BBB-8CCC-DDDDEEEEFFFF"/>
  <MetadataEntry key="HKDigitalSignature" value="MEUCIQDsig1234"/>
  <MetadataEntry key="Comment" value="{html.escape(FREE_TEXT)}"/>
 </Record>
 <Record type="HKQuantityTypeIdentifierStepCount" sourceName="Ingrid_iPhone" sourceVersion="17.1" device="Pedometer (serial {SERIAL})" unit="count" creationDate="2024-03-02 08:35:24 -0800" startDate="2024-03-02 08:00:00 -0800" endDate="2024-03-02 08:30:00 -0800" value="812"/>
 <Record type="HKQuantityTypeIdentifierStepCount" sourceName="iPhone d{APOS}Rosalind" sourceVersion="17.1" unit="count" creationDate="2024-03-02 09:35:24 -0800" startDate="2024-03-02 09:00:00 -0800" endDate="2024-03-02 09:30:00 -0800" value="455"/>
 <Workout workoutActivityType="HKWorkoutActivityTypeRunning" duration="30.0" durationUnit="min" sourceName="{owner_device}" sourceVersion="10.1" creationDate="2024-03-02 08:25:29 -0800" startDate="2024-03-02 07:30:23 -0800" endDate="2024-03-02 08:00:23 -0800">
  <MetadataEntry key="HKTimeZone" value="America/Los_Angeles"/>
  <WorkoutRoute sourceName="{owner_device}" sourceVersion="10.1" creationDate="2024-03-02 08:25:29 -0800" startDate="2024-03-02 07:30:23 -0800" endDate="2024-03-02 08:00:23 -0800">
   <Location date="2024-03-02 07:30:23 -0800" latitude="45.528788" longitude="-122.660397" altitude="22.778777" horizontalAccuracy="5.4" verticalAccuracy="3.4" course="247.016155" speed="1.332374"/>
   <FileReference path="/workout-routes/route_2024-03-02_7.30am.gpx"/>
   <Location date="2024-03-02 07:30:24 -0800" latitude="45.528784" longitude="-122.660411" altitude="22.977493" course="246.289895" speed="1.214840"/></WorkoutRoute>
 </Workout>
{clinical}</HealthData>
"""


GPX = """<?xml version="1.0" encoding="UTF-8"?>
<gpx version="1.1" creator="Apple Health Export" xmlns="http://www.topografix.com/GPX/1/1">
 <metadata><time>2024-03-02T15:30:23Z</time></metadata>
 <trk>
  <name>Route 2024-03-02 7:30am</name>
  <trkseg>
   <trkpt lon="-122.660397" lat="45.528788"><ele>22.778777</ele><time>2024-03-02T15:30:23Z</time><extensions><speed>1.332374</speed><course>247.016155</course><hAcc>5.4</hAcc><vAcc>3.4</vAcc></extensions></trkpt>
   <trkpt lon="-122.660411" lat="45.528784"><ele>22.977493</ele><time>2024-03-02T15:30:24Z</time><extensions><speed>1.214840</speed><course>246.289895</course><hAcc>2.3</hAcc><vAcc>3.4</vAcc></extensions></trkpt>
  </trkseg>
 </trk>
</gpx>
"""

ECG = f"""Name,Ingrid Élodie D'Angelo
Recorded Date,2024-03-02 09:39:28 -0800
DOB,1994/5/5
Classification,Sinus Rhythm
Symptoms,
Software Version,1.70
Device,"Watch5,4 SN {SERIAL}"
Sample Rate,512 hertz

Lead,Lead I
Unit,µV

7.038
-1.182
"""

CDA = f"""<?xml version="1.0"?>
<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
 <id extension="Health Export CDA" root="1.1.1.1.1.1.1.1.1"/>
 <code code="34109-9" codeSystem="2.16.840.1.113883.6.1" displayName="Note"/>
 <effectiveTime value="20240315072924-0700"/>
 <recordTarget>
  <patientRole>
   <id root="2.16.840.1.113883.19.5" extension="QX7731942" assigningAuthorityName="Thistlebrook General"/>
   <addr use="HP"><streetAddressLine>4417 Quillmoor Ave</streetAddressLine><city>Thistlebrook</city><state>OR</state><country>US</country></addr>
   <telecom use="HP" value="tel:+1-503-555-0199"/>
   <patient>
    <name use="L"><given>Ingrid</given><given>Élodie</given><family>D'Angelo</family></name>
    <administrativeGenderCode code="F" codeSystem="2.16.840.1.113883.5.1"/>
    <birthTime value="19940505"/>
   </patient>
  </patientRole>
 </recordTarget>
 <informant>
  <relatedEntity classCode="PRS">
   <relatedPerson><name><given>Thaddeus</given><family>Okafor</family></name><birthTime value="19310601"/></relatedPerson>
  </relatedEntity>
 </informant>
 <component>
  <structuredBody>
   <component>
    <section>
     <code code="8716-3" codeSystem="2.16.840.1.113883.6.1" displayName="Vital Signs"/>
     <title>Vital Signs</title>
     <text>Seen March 2, 2024 by the team. Born 05 May 1994.</text>
     <entry>
      <observation classCode="OBS" moodCode="EVN" ID="obs-Ingrid-1">
       <id root="2.16.840.1.113883.19.5.99" extension="H44120X" assigningAuthorityName="Thistlebrook General"/>
       <code code="8867-4" codeSystem="2.16.840.1.113883.6.1" displayName="Heart rate"/>
       <text><reference value="#obs-Ingrid-1"/></text>
       <effectiveTime><low value="20240302095530-0800"/></effectiveTime>
       <value xsi:type="PQ" value="68" unit="count/min"/>
       <participant><participantRole><playingDevice><code code="1" displayName="Pacemaker PMK{SERIAL}"/></playingDevice></participantRole></participant>
      </observation>
     </entry>
     <entry>
      <observation classCode="OBS" moodCode="EVN">
       <code code="21112-8" codeSystem="2.16.840.1.113883.6.1" displayName="Birth date"/>
       <value xsi:type="TS" value="19940505"/>
       <effectiveTime value="20240302"/>
      </observation>
     </entry>
     <entry>
      <observation classCode="OBS" moodCode="EVN">
       <code code="11488-4" codeSystem="2.16.840.1.113883.6.1" displayName="Note"/>
       <value xsi:type="ED" mediaType="text/plain" representation="B64">{_b64("Medical note for Ingrid D'Angelo")}</value>
       <text mediaType="text/plain" representation="B64">TWVkaWNhbCBub3Rl</text>
      </observation>
     </entry>
    </section>
   </component>
  </structuredBody>
 </component>
</ClinicalDocument>
"""


def _fhir_resources() -> dict[str, dict]:
    patient_ref = {"reference": "Patient/pat-1", "display": "Ingrid D'Angelo"}
    return {
        "Patient-pat-1.json": {
            "resourceType": "Patient", "id": "pat-1",
            "identifier": [{"system": "urn:oid:1.2.3.4", "value": "QX7731942"},
                           {"system": "urn:oid:1.2.3.5", "value": "88124477"},
                           {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789"}],
            "name": [{"use": "official", "family": "D'Angelo", "given": ["Ingrid", "Élodie"]}],
            "telecom": [{"system": "phone", "value": "+1 503 555 0199"},
                        {"system": "email", "value": "ingrid.dangelo@example.org"}],
            "address": [{"line": ["4417 Quillmoor Ave"], "city": "Thistlebrook", "state": "OR",
                         "postalCode": "97999", "country": "US"}],
            "gender": "female", "birthDate": OWNER_DOB,
        },
        "Ingrid D'Angelo 1994-05-05 labs.json": {
            "resourceType": "Bundle", "id": "b-1", "type": "searchset",
            "link": [{"relation": "self",
                      "url": "https://fhir.example.org/Patient?name=Ingrid%20D%27Angelo&birthdate=1994-05-05"}],
            "entry": [
                {"fullUrl": "https://fhir.example.org/Observation/obs-1", "resource": {
                    "resourceType": "Observation", "id": "obs-1", "status": "final", "subject": patient_ref,
                    "code": {"text": "Date of birth"}, "effectiveDateTime": "2024-03-02T09:00:00-08:00",
                    "valueDateTime": OWNER_DOB,
                    "note": [{"authorString": "Thaddeus Okafor", "text": FREE_TEXT}],
                    "text": {"status": "generated", "div": NARRATIVE}}},
                {"resource": {"resourceType": "Observation", "id": "obs-2", "status": "final", "subject": patient_ref,
                              "code": {"text": "Birth date"}, "valueDate": OWNER_DOB}},
                {"resource": {"resourceType": "Observation", "id": "obs-3", "status": "final", "subject": patient_ref,
                              "code": {"text": "Birth date text"}, "valueString": OWNER_DOB}},
                {"resource": {"resourceType": "Observation", "id": "obs-4", "status": "final", "subject": patient_ref,
                              "code": {"text": "Age"}, "valueAge": {"value": 93, "unit": "a"}}},
            ],
        },
        "DocumentReference-doc-1.json": {
            "resourceType": "DocumentReference", "id": "doc-1", "status": "current", "subject": patient_ref,
            "content": [{"attachment": {"contentType": "text/html", "data": _b64(NARRATIVE)}}],
        },
        "Binary-bin-1.json": {
            "resourceType": "Binary", "id": "bin-1", "contentType": "application/pdf",
            "data": _b64("%PDF-1.4 Zebulon Marchetti"),
        },
        "Device-dev-1.json": {
            "resourceType": "Device", "id": "dev-1", "patient": patient_ref,
            "udiCarrier": [{"deviceIdentifier": "00844588003288", "carrierHRF": "UDI-(01)00844588003288"}],
            "serialNumber": "SN77Z1Q9", "lotNumber": "lot4471z", "distinctIdentifier": "di99812q",
        },
        "Coverage-cov-1.json": {
            "resourceType": "Coverage", "id": "cov-1", "status": "active", "beneficiary": patient_ref,
            "subscriberId": "sub55501234",
            "subscriber": {"display": "Marguerite D'Angelo"}, "policyHolder": {"display": "Marguerite D'Angelo"},
        },
        "Specimen-sp-1.json": {
            "resourceType": "Specimen", "id": "sp-1", "subject": patient_ref,
            "accessionIdentifier": {"system": "urn:lab", "value": "acc202477812"},
        },
        "ServiceRequest-sr-1.json": {
            "resourceType": "ServiceRequest", "id": "sr-1", "status": "active", "intent": "order",
            "subject": patient_ref, "requisition": {"value": "req44120"},
        },
        "MedicationRequest-mr-1.json": {
            "resourceType": "MedicationRequest", "id": "mr-1", "status": "active", "intent": "order",
            "subject": patient_ref, "groupIdentifier": {"value": "grp99017"},
        },
        "FamilyMemberHistory-fmh-1.json": {
            "resourceType": "FamilyMemberHistory", "id": "fmh-1", "status": "completed", "patient": patient_ref,
            "name": "Marguerite D'Angelo", "bornDate": "1961-02-14",
            "relationship": {"text": "mother"},
        },
        "FamilyMemberHistory-fmh-2.json": {
            "resourceType": "FamilyMemberHistory", "id": "fmh-2", "status": "completed", "patient": patient_ref,
            "bornDate": "1931-06-01", "ageAge": {"value": 92, "unit": "a"},
            "relationship": {"text": "grandfather"},
        },
        "RelatedPerson-rp-1.json": {
            "resourceType": "RelatedPerson", "id": "rp-1", "patient": patient_ref, "birthDate": "1931-06-01",
            "name": [{"text": "Thaddeus Okafor"}],
        },
    }


def write_export(root: Path, *, export_xml_only: bool = False) -> Path:
    """`root/apple_health_export/` with every planted class (or only the export.xml of class 17)."""
    folder = root / "apple_health_export"
    folder.mkdir(parents=True)
    owner_device = f"iPhone d{APOS}Rosalind" if export_xml_only else f"Ingrid{APOS}s Apple Watch"
    (folder / "export.xml").write_text(_export_xml(with_clinical=not export_xml_only, owner_device=owner_device),
                                       encoding="utf-8")
    if export_xml_only:
        return root
    (folder / "export_cda.xml").write_text(CDA, encoding="utf-8")
    (folder / "workout-routes").mkdir()
    (folder / "workout-routes" / "route_2024-03-02_7.30am.gpx").write_text(GPX, encoding="utf-8")
    (folder / "electrocardiograms").mkdir()
    (folder / "electrocardiograms" / "ecg_2024-03-02.csv").write_text(ECG, encoding="utf-8")
    (folder / "clinical-records").mkdir()
    for name, doc in _fhir_resources().items():
        (folder / "clinical-records" / name).write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return root


# --------------------------------------------------------------------------- the hostile reader

_JSON_U = re.compile(r"\\u([0-9a-fA-F]{4})")
_B64_RUN = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")


def readable(text: str) -> str:
    """What a reader can recover from text: entities, JSON escapes and base64 runs decoded."""
    layers = [text]
    for _ in range(2):
        text = html.unescape(_JSON_U.sub(lambda m: chr(int(m.group(1), 16)), text)).replace("\\n", "\n")
        layers.append(text)
    for run in _B64_RUN.findall(layers[-1]):
        try:
            layers.append(base64.b64decode(run + "=" * (-len(run) % 4)).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
    return "\n".join(layers)


def _words(text: str, *, drop_apostrophes: bool) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    text = re.sub(r"['\u2019\u2018`\u00b4]", "" if drop_apostrophes else " ", text)
    return " " + " ".join(re.findall(r"[^\W_]+|[.:+-]", text)) + " "


def find_leaks(text: str, classes: dict[str, tuple[str, ...]] = PLANTED) -> list[tuple[str, str]]:
    """(class, value) of every planted value found in `text` (values never echoed elsewhere)."""
    plain = readable(text)
    variants = [_words(plain, drop_apostrophes=True), _words(plain, drop_apostrophes=False)]
    found = []
    for cls, values in classes.items():
        for value in values:
            forms = {_words(value, drop_apostrophes=True), _words(value, drop_apostrophes=False)}
            if any(f.strip() and f in v for f in forms for v in variants):
                found.append((cls, value))
    return found
