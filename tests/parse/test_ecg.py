"""Apple ECG CSV → one `ecg` row: English and German exports, person facts, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from healthdelta.errors import InputError
from healthdelta.parse import ecg
from healthdelta.parse.ecg import iter_ecg, parse_birth_date, read_ecg_person
from healthdelta.parse.report import ParseReport

SAMPLES = ["-145.631", "-164.307", "12", "0.5", "310.25"]

ENGLISH = (
    "Name,Jane Doe\n"
    'Date of Birth,"April 7, 1961"\n'
    "Recorded Date,2024-02-03 08:14:22 -0800\n"
    "Classification,Sinus Rhythm\n"
    "Symptoms,\n"
    "Software Version,1.70\n"
    'Device,"Watch6,2"\n'
    "Sample Rate,512 hertz\n"
    "\n"
    "Lead,Lead I\n"
    "Unit,µV\n"
    "\n" + "\n".join(SAMPLES) + "\n"
)
GERMAN = (
    "Name,Jane Doe\n"
    "Geburtsdatum,07.04.1961\n"
    "Aufzeichnungsdatum,2024-02-03 17:14:22 +0100\n"
    "Klassifizierung,Sinusrhythmus\n"
    "Symptome,Herzrasen\n"
    "Softwareversion,1.70\n"
    'Gerät,"Watch6,2"\n'
    "Abtastrate,512 Hertz\n"
    "\n"
    "Ableitung,Ableitung I\n"
    "Einheit,µV\n"
    "\n" + "\n".join(f'"{s.replace(".", ",")}"' for s in SAMPLES) + "\n"
)


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def _row(
    path: Path,
    report: ParseReport | None = None,
    source_file: str = "electrocardiograms/ecg_2024-02-03.csv",
) -> dict:
    rows = list(iter_ecg(path, report or ParseReport(), source_file=source_file))
    assert [stream for stream, _ in rows] == ["ecg"]
    return rows[0][1]


def _expected_sha() -> str:
    return hashlib.sha256(b"".join(repr(float(s)).encode() + b"\n" for s in SAMPLES)).hexdigest()


def test_english_export(tmp_path):
    report = ParseReport()
    row = _row(_write(tmp_path, "ecg_en.csv", ENGLISH), report)
    assert row["source"] == "ecg" and row["kind"] == "ECG"
    assert row["source_file"] == row["samples_file"] == "electrocardiograms/ecg_2024-02-03.csv"
    assert row["event_time"] == row["recorded"] == "2024-02-03T16:14:22Z"
    assert row["recorded_local"] == "2024-02-03T08:14:22-08:00"
    assert row["classification"] == "Sinus Rhythm"
    assert row["symptoms"] is None
    assert row["software_version"] == "1.70"  # a version, not a number
    assert row["device"] == "Watch6,2"
    assert row["sample_rate_hz"] == 512
    assert (row["lead"], row["unit"]) == ("Lead I", "µV")
    assert row["sample_count"] == 5
    assert row["samples"] == {
        "min": -164.307,
        "max": 310.25,
        "mean": round(sum(map(float, SAMPLES)) / 5, 6),
        "sha256": _expected_sha(),
    }
    assert row["header_language"] == "en"
    assert row["header"] == {
        "Recorded Date": "2024-02-03 08:14:22 -0800",
        "Classification": "Sinus Rhythm",
        "Symptoms": "",
        "Software Version": "1.70",
        "Device": "Watch6,2",
        "Sample Rate": "512 hertz",
        "Lead": "Lead I",
        "Unit": "µV",
    }
    assert "Jane" not in json.dumps(row) and "1961" not in json.dumps(row)
    assert report.elements == {"ecg:recording": 1, "ecg:sample": 5}
    assert report.repairs == {} and report.unknown == {}


def test_german_decimal_comma_export(tmp_path):
    english = _row(_write(tmp_path, "en.csv", ENGLISH))
    row = _row(_write(tmp_path, "de.csv", GERMAN))
    assert row["header_language"] == "de"
    assert row["recorded"] == english["recorded"]
    assert row["recorded_local"] == "2024-02-03T17:14:22+01:00"
    assert row["classification"] == "Sinusrhythmus" and row["symptoms"] == "Herzrasen"
    assert row["sample_rate_hz"] == 512 and row["device"] == "Watch6,2"
    assert (row["lead"], row["unit"]) == ("Ableitung I", "µV")
    assert row["samples"] == english["samples"]  # normalised: "-145,631" == "-145.631"
    assert set(row["header"]) == {
        "Aufzeichnungsdatum",
        "Klassifizierung",
        "Symptome",
        "Softwareversion",
        "Gerät",
        "Abtastrate",
        "Ableitung",
        "Einheit",
    }
    assert "Jane" not in json.dumps(row) and "1961" not in json.dumps(row)


def test_unquoted_decimal_comma_is_a_counted_repair(tmp_path):
    text = GERMAN.replace('"', "").replace("Gerät,Watch6,2", 'Gerät,"Watch6,2"')
    report = ParseReport()
    row = _row(_write(tmp_path, "de.csv", text), report)
    assert row["samples"]["sha256"] == _expected_sha() and row["sample_count"] == 5
    assert report.repairs["ecg_unquoted_decimal_comma"] == 4  # "12" needs no repair


def test_bom_crlf_and_utf16(tmp_path):
    english = _row(_write(tmp_path, "en.csv", ENGLISH))
    bom_crlf = _row(
        _write(tmp_path, "bom.csv", b"\xef\xbb\xbf" + ENGLISH.replace("\n", "\r\n").encode())
    )
    utf16 = _row(_write(tmp_path, "u16.csv", ENGLISH.encode("utf-16")))
    for other in (bom_crlf, utf16):
        assert other["samples"] == english["samples"] and other["header"] == english["header"]
        assert other["record_key"] == english["record_key"]


def test_record_key(tmp_path):
    a = _row(_write(tmp_path, "a/ecg_1.csv", ENGLISH), source_file="electrocardiograms/ecg_1.csv")
    b = _row(
        _write(tmp_path, "b/renamed.csv", ENGLISH), source_file="electrocardiograms/renamed.csv"
    )
    c = _row(_write(tmp_path, "c.csv", ENGLISH.replace("310.25", "310.26")))
    d = _row(_write(tmp_path, "d.csv", ENGLISH.replace("08:14:22", "08:14:23")))
    assert a["record_key"] == b["record_key"]
    assert len({a["record_key"], c["record_key"], d["record_key"]}) == 3


def test_junk_sample_lines_are_counted(tmp_path):
    report = ParseReport()
    row = _row(_write(tmp_path, "x.csv", ENGLISH + "oops\n\n1.5\n"), report)
    assert row["sample_count"] == 6 and row["bad_sample_lines"] == 1
    assert report.unknown["ecg:non_sample_line"] == 1


def test_unknown_language_keeps_name_out_of_the_row(tmp_path):
    text = ENGLISH.replace("Name,", "Nazwisko,").replace("Date of Birth,", "Data urodzenia,")
    text = text.replace("Recorded Date,", "Data nagrania,")
    row = _row(_write(tmp_path, "pl.csv", text))
    assert row["recorded"] == "2024-02-03T16:14:22Z"  # found by its value's shape
    assert "Jane" not in json.dumps(row) and "1961" not in json.dumps(row)
    person = read_ecg_person(tmp_path / "pl.csv")
    assert person["names"][0]["text"] == "Jane Doe" and person["birth_date"] == "1961-04-07"


# ------------------------------------------------------------------- person facts


@pytest.mark.parametrize("text", [ENGLISH, GERMAN])
def test_read_ecg_person(tmp_path, text):
    person = read_ecg_person(_write(tmp_path, "e.csv", text))
    assert person["source"] == "ecg"
    assert person["names"] == [
        {"text": "Jane Doe", "given": [], "family": None, "prefix": [], "suffix": [], "use": None}
    ]
    assert person["birth_date"] == "1961-04-07"
    assert person["birth_date_text"] in ("April 7, 1961", "07.04.1961")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("April 7, 1961", "1961-04-07"),
        ("Apr 7, 1961", "1961-04-07"),
        ("7 April 1961", "1961-04-07"),
        ("7. April 1961", "1961-04-07"),
        ("07.04.1961", "1961-04-07"),
        ("1961-04-07", "1961-04-07"),
        ("7 avril 1961", "1961-04-07"),
        ("7 de abril de 1961", "1961-04-07"),
        ("25/12/1961", "1961-12-25"),
        ("12/25/1961", "1961-12-25"),
        ("04/07/1961", None),  # ambiguous
        ("", None),
        ("February 30, 1961", None),
    ],
)
def test_parse_birth_date(text, expected):
    assert parse_birth_date(text) == expected


# ---------------------------------------------------------------------- bad input

SECRET = "Jane_Doe_1961"


def _bad(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / SECRET / f"ecg_{SECRET}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        list(iter_ecg(path, ParseReport(), source_file=f"electrocardiograms/ecg_{SECRET}.csv"))
    message = str(info.value)
    for token in ("Jane", "Doe", "1961", str(tmp_path)):
        assert token not in message
    return message


@pytest.mark.parametrize(
    "data",
    [b"", b"foo,bar\nbaz,qux\n", b"1.0\n2.0\n", b'{"json": "Jane Doe"}'],
    ids=["empty", "unknown-header", "samples-only", "json"],
)
def test_unrecognised_header_raises(tmp_path, data):
    assert "header" in _bad(tmp_path, data)


def test_not_utf8_raises(tmp_path):
    _bad(tmp_path, ENGLISH.encode("utf-8").replace("µ".encode(), b"\xb5"))


def test_huge_file_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ecg, "MAX_ECG_BYTES", 100)
    assert "larger" in _bad(tmp_path, ENGLISH.encode())


def test_long_recording(tmp_path):
    many = ENGLISH + "\n".join("1.25" for _ in range(50_000)) + "\n"
    row = _row(_write(tmp_path, "long.csv", many))
    assert row["sample_count"] == 50_005 and row["samples"]["max"] == 310.25
