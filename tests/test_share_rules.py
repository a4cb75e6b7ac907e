"""The pure rules behind share mode's hardening (issue 10), tested directly."""

from __future__ import annotations

import hashlib
import re

import pytest

from healthdelta import deid, share, validate
from healthdelta.deid import DateShift, Scrubber, identifier_regex, literal_regex
from healthdelta.identity import PersonPII, device_possessors, fold_for_match
from healthdelta.ndjson import STREAMS


def _person() -> PersonPII:
    return PersonPII(
        person_id="p_1", label="Patient 1",
        names=({"given": ["Ingrid", "Élodie"], "family": "D'Angelo"},), extra_names=("Ingrid’s iPhone",),
        birth_dates=("1994-05-05",), birth_texts=(), identifiers=("QX7731942", "123-45-6789", "2010"),
        telecom=({"system": "phone", "value": "+1 503 555 0199"},), addresses=({"lines": ["4417 Quillmoor Ave"]},))


@pytest.fixture(scope="module")
def scrubber() -> Scrubber:
    return Scrubber([_person()], "Patient 1", "p_1")


@pytest.mark.parametrize("text", ["D’Angelo", "DAngelo", "D Angelo", "d'angelo", "E\u0301lodie", "Elodie",
                                  "Ingrid_iPhone", "I.E.D.", "I. E. D.", "Ingrid D'Angelo"])
def test_name_variants_are_replaced(scrubber, text):
    out = scrubber.text(f"seen by {text} today")
    assert "Patient 1" in out and not re.search(r"(?i)ingrid|angelo|lodie|I\.E\.D", out), out


@pytest.mark.parametrize("text", ["QX-773-1942", "qx 773 1942", "123 45 6789", "123456789", "19940505",
                                  "5 mai 1994", "May 5th, 1994", "05-May-1994", "5/5/94", "(503) 555-0199",
                                  "+44 20 7946 0958", "i.dangelo77 at example dot com", "PO Box 8812", "Apt 4B",
                                  "Hauptstraße 12", "192.168.14.27", "3C:22:FB:9A:10:7E", "policy no. PLX-99812",
                                  "licence D1234567", "ACCT55501234", "Age: 92 years", "a 93-year-old man",
                                  "SN 8ABCD1234"])
def test_free_text_identifiers_are_replaced(scrubber, text):
    out = scrubber.text(f"note: {text}.")
    assert out != f"note: {text}.", text
    assert not re.search(r"\d{3,}", out.replace("90+", "")), out


@pytest.mark.parametrize("text", ["Heart rate 72 count/min", "LOINC 8867-4", "E11.9", "COVID-19", "Watch5,4",
                                  "SARS-CoV-2 negative", "2024-03-02 07:35:24 -0800", "HbA1c 5.4 %",
                                  "Age: 45 years"])
def test_ordinary_text_is_kept(scrubber, text):
    assert scrubber.text(text) == text


def test_known_digits_are_matched_whole_only(scrubber):
    assert scrubber.text("2010") == "[ID]" and scrubber.text("20101") == "20101"
    assert literal_regex("D'Angelo") != "D'Angelo" and re.fullmatch(literal_regex("D'Angelo"), "D’ Angelo")
    assert identifier_regex("12345") is None
    assert re.fullmatch(identifier_regex("QX7731942"), "QX.773.1942")


def test_device_serials_are_dropped(scrubber):
    out = scrubber.device("<<HKDevice: 0x1>, name:Ingrid_iPhone (serial 8ABCD1234), manufacturer:Apple Inc., "
                          "model:Watch SN 8ABCD1234, hardware:Watch5,4, software:10.1, firmware:fw-8ABCD1234>")
    assert "8ABCD1234" not in out and "Ingrid" not in out and "Watch5,4" in out and "Apple Inc." in out
    assert "8ABCD1234" not in scrubber.device("Pedometer (serial 8ABCD1234)")


@pytest.mark.parametrize("name, expected", [
    ("Jane’s Apple Watch", {"Jane"}), ("Janes iPhone", {"Jane", "Janes"}), ("iPhone d’Élodie", {"Élodie"}),
    ("iPhone de Jean Paul", {"Jean Paul"}), ("Ingrid_iPhone", {"Ingrid"}), ("Apple Watch von Jana", {"Jana"}),
    ("Health Mate", set()), ("iPhone", set()), ("My-iPhone", set()), ("iPhone de travail", set()),
])
def test_device_names_say_who_owns_them(name, expected):
    assert device_possessors(name) == expected


def test_date_shift_reaches_every_written_form():
    s = DateShift(-7)
    assert s.text("seen March 2, 2024") == "seen 2024-02-24"
    assert s.text("am 2. März 2024 / le 2 mars 2024") == "am 2024-02-24 / le 2024-02-24"
    assert s.text("02.03.2024, 13/02/2024, 20240302") == "2024-02-24, 2024-02-06, 2024-02-24"
    assert s.text("03/02/2024") == "[DATE]"  # March 2 or February 3: no right shift exists
    assert s.text("2024-03-02 07:35:24 -0800") == "2024-02-24 15:35:24 +0000"
    assert s.text("2024-03-02T23:30:00-08:00") == "2024-02-25T07:30:00Z"
    assert s.cda("20240302233000-0800") == "20240225073000+0000"
    assert s.apple(b"2024-11-03 01:30:00 -0700") == b"2024-10-27 08:30:00 +0000"
    assert s.text("version 1.2.3, 0.5 mg, 2020") == "version 1.2.3, 0.5 mg, 2020"
    assert DateShift(0).text("March 2, 2024") == "March 2, 2024"


def test_file_names_keep_apple_shapes_only():
    ctx = deid.Context(scrubber=Scrubber([], "Patient 1"), secret=b"s" * 32, owner_person_id="p_1",
                       owner_label="Patient 1", labels={}, fhir_subjects={}, date_shift=False)
    assert ctx.member_path("source/clinical-records/Observation-1A2B3C4D-5E6F.json").endswith(
        "Observation-1A2B3C4D-5E6F.json")
    renamed = ctx.member_path("/clinical-records/Ingrid D'Angelo 1994-05-05 labs.json")
    assert renamed.startswith("/clinical-records/record-") and renamed.endswith(".json") and "1994" not in renamed
    assert renamed == ctx.member_path("/clinical-records/Ingrid D'Angelo 1994-05-05 labs.json")
    assert ctx.member_path("workout-routes/route_2024-03-02_7.30am.gpx") == "workout-routes/route_2024-03-02_7.30am.gpx"


# --------------------------------------------------------------------------- the bundle scan


def test_scan_matches_initials_and_short_numbers_only_as_whole_fields():
    scan = share.IdentifierScan([_person()])
    code = b"function(i,d){return i d+2010}%2010 var e=i.d;"  # minified code: every pair of letters
    assert scan.find(code) is None
    for field in (b'{"name":"I. E. D."}', b"<td>I.E.D.</td>", b'{"id":"2010"}'):
        assert scan.find(field), field
    assert scan.find(b'{"id":"x"}') is None and scan.find(b'{"y":[1,2010,3]}') is None


def test_scan_matches_two_letter_names_only_as_whole_fields():
    li = PersonPII("p_2", "Patient 2", ({"given": ["Li"], "family": "Na"},), (), (), (), (), (), ())
    scan = share.IdentifierScan([li])
    assert scan.find(b"<ul><li>steps</li></ul> var na=1") is None
    assert scan.find(b'{"name":"Li"}') == "name" and scan.find(b"<td>Li Na</td>") == "name"


@pytest.mark.parametrize("text", ["D’Angelo", "DAngelo", "d angelo", "E\u0301lodie", "ÉLODIE", "Ingrid_iPhone",
                                  "&#73;ngrid", "\\u0049ngrid"])
def test_scan_matches_name_variants(text):
    assert share.IdentifierScan([_person()]).find(text.encode()) == "name"


def test_only_the_pinned_vendor_script_is_skipped():
    from healthdelta.charts import plotly_js

    vendor = plotly_js().encode()
    page = b"<html><script>" + vendor + b"</script><script>var d={\"x\":\"Ingrid\"}</script></html>"
    stripped = share.without_vendor_code(page)
    assert vendor not in stripped and b"Ingrid" in stripped
    tampered = page.replace(b"<script>" + vendor[:20], b"<script>" + vendor[:20] + b" ", 1)
    assert len(share.without_vendor_code(tampered)) == len(tampered)
    assert hashlib.sha256(vendor).hexdigest() in share.vendor_script_hashes()


# --------------------------------------------------------------------------- export validate


def test_banned_tokens_match_case_and_accent_insensitively(tmp_path):
    for stream in STREAMS:
        (tmp_path / f"{stream}.ndjson").write_bytes(b"")
    rows = ['{"note":"ZOË D’ANGELO"}', '{"note":"zoe d\'angelo"}', '{"note":"Zo\\u00eb"}', '{"note":"Zoey"}']
    (tmp_path / "observations.ndjson").write_text("\n".join(rows) + "\n", encoding="utf-8")
    hits = [f.line for f in validate.validate_dir(tmp_path, banned_tokens=("Zoë D'Angelo",))
            if f.code == "banned_token"]
    assert hits == [1, 2]
    hits = [f.line for f in validate.validate_dir(tmp_path, banned_tokens=("zoe",)) if f.code == "banned_token"]
    assert hits == [1, 2, 3, 4]
    assert fold_for_match("D’Ángelo") == "d'angelo"
