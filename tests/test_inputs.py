import os
import stat
import zipfile

import pytest

from healthdelta import inputs
from healthdelta.errors import InputError
from healthdelta.inputs import check_member_name, classify, detect_input

from conftest import SHARED_FIXTURE, write_mini_export, zip_folder


@pytest.mark.parametrize("rel,kind", [
    ("export.xml", "export_xml"),
    ("export_cda.xml", "export_cda_xml"),
    ("clinical-records/Observation-1.json", "clinical_json"),
    ("clinical_records/sub/Patient.json", "clinical_json"),
    ("electrocardiograms/ecg_2024-01-01.csv", "ecg_csv"),
    ("workout-routes/route_1.gpx", "workout_route_gpx"),
    ("workout-routes/readme.txt", "other"),
    ("sub/export.xml", "other"),
])
def test_classify(rel, kind):
    assert classify(rel) == kind


def test_three_forms(tmp_path):
    parent = tmp_path / "p"
    export = write_mini_export(parent)
    z = zip_folder(export, tmp_path / "export.zip")
    assert detect_input(parent).form == "parent_folder"
    assert detect_input(parent).root == "apple_health_export/"
    assert detect_input(export).form == "export_folder"
    assert detect_input(export).root == ""
    zi = detect_input(z)
    assert (zi.form, zi.root) == ("zip", "apple_health_export/")
    assert {zi.export_relpath(f.relpath) for f in zi.files} == {
        detect_input(export).export_relpath(f.relpath) for f in detect_input(export).files}


def test_shared_fixture_forms():
    assert detect_input(SHARED_FIXTURE / "export.zip").form == "zip"
    assert detect_input(SHARED_FIXTURE / "apple_health_export").form == "export_folder"
    assert detect_input(SHARED_FIXTURE).form == "parent_folder"


@pytest.mark.parametrize("name", ["/etc/passwd", "../evil", "a/../../evil", "C:/x", "a\\..\\b", "", "a\0b"])
def test_member_names_refused(name):
    with pytest.raises(InputError):
        check_member_name(name)


def _zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


def test_zip_symlink_member_refused(tmp_path):
    link = zipfile.ZipInfo("apple_health_export/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    z = _zip(tmp_path / "e.zip", [("apple_health_export/export.xml", "<HealthData/>"), (link, "/etc/passwd")])
    with pytest.raises(InputError, match="symbolic link"):
        detect_input(z)


def test_zip_bomb_ratio_refused(tmp_path):
    z = _zip(tmp_path / "e.zip", [("apple_health_export/export.xml", "<HealthData/>"),
                                  ("apple_health_export/big.xml", b"\0" * (50 << 20))])
    with pytest.raises(InputError, match="zip bomb"):
        detect_input(z)


def test_zip_total_and_member_limits(tmp_path, monkeypatch):
    z = _zip(tmp_path / "e.zip", [("apple_health_export/export.xml", "<HealthData/>" * 10),
                                  ("apple_health_export/a.txt", "x" * 100)])
    monkeypatch.setattr(inputs, "MAX_TOTAL_BYTES", 100)
    with pytest.raises(InputError, match="size limit"):
        detect_input(z)
    monkeypatch.setattr(inputs, "MAX_TOTAL_BYTES", 1 << 30)
    monkeypatch.setattr(inputs, "MAX_MEMBERS", 1)
    with pytest.raises(InputError, match="members"):
        detect_input(z)


def test_zip_duplicate_member_refused(tmp_path):
    with pytest.warns(UserWarning):
        z = _zip(tmp_path / "e.zip", [("apple_health_export/export.xml", "<a/>"), ("apple_health_export/export.xml", "<b/>")])
    with pytest.raises(InputError, match="twice"):
        detect_input(z)


def test_folder_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        detect_input(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        detect_input(tmp_path / "empty")
    (tmp_path / "noxml").mkdir()
    (tmp_path / "noxml" / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no export.xml"):
        detect_input(tmp_path / "noxml")
    export = write_mini_export(tmp_path / "withlink")
    (export / "link").symlink_to("/etc/passwd")
    with pytest.raises(InputError, match="symbolic link"):
        detect_input(export)
    export = write_mini_export(tmp_path / "fifo")
    os.mkfifo(export / "pipe")
    with pytest.raises(InputError, match="special file"):
        detect_input(export)
    os.mkfifo(tmp_path / "export.zip")
    with pytest.raises(InputError, match="neither"):
        detect_input(tmp_path / "export.zip")
    (tmp_path / "emptyxml").mkdir()
    (tmp_path / "emptyxml" / "export.xml").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        detect_input(tmp_path / "emptyxml")


@pytest.mark.parametrize("name,head,expected", [
    ("export.xml", b"", True),  # by name: its emptiness is refused with its own message
    ("export (1).xml", b'\xef\xbb\xbf<?xml version="1.0"?>\n<!DOCTYPE HealthData [\n', True),
    ("download.xml", b"  <HealthData locale='en_US'>", True),
    ("export_cda.xml", b'<?xml version="1.0"?>\n<ClinicalDocument/>', False),
    ("notes.txt", b"HealthData <HealthData", False),  # mentions it, but is not XML
    ("route.gpx", b"<gpx/>", False),
])
def test_looks_like_export_xml(name, head, expected):
    assert inputs.looks_like_export_xml(name, head) is expected


@pytest.mark.parametrize("head,given", [
    (b"PK\x03\x04broken", "damaged zip archive"),
    (b"%PDF-1.7", "PDF document"),
    (b"\xef\xbb\xbf <ClinicalDocument/>", "XML file without Apple Health data"),
    (b"", "empty file"),
    (b"hello", "not a zip archive or an export folder"),
])
def test_not_an_export_message(head, given):
    message = inputs.not_an_export_message(head)
    assert message.startswith("the input is ") and given in message
    assert message.endswith(inputs.EXPECTED)


def test_bare_export_xml_input(tmp_path):
    export = write_mini_export(tmp_path / "p")
    inp = detect_input(export / "export.xml")
    assert (inp.form, inp.root, inp.files) == ("export_xml", "", (inputs.InputFile("export.xml", (export / "export.xml").stat().st_size),))
    assert inp.file_path("export.xml") == export / "export.xml"
    assert inp.stat_summary == (1, (export / "export.xml").stat().st_size)
