"""What `--input` accepts besides the zip and the folders: a bare export.xml, and
clear refusals for everything else, through the real CLI."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from conftest import assert_one_error_line, kv, write_mini_export
from test_cli_pipeline import PERSON_DIR, seed_fingerprint, seed_run_id, snapshot

EXPECTED = "give export.zip, the apple_health_export folder (or the folder holding it), or export.xml"


def test_bare_export_xml_is_the_folder_holding_only_it(cli, tmp_path):
    export = write_mini_export(tmp_path / PERSON_DIR)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(export / "export.xml", alone / "export.xml")
    out = kv(cli("pipeline", "run", "--input", str(alone / "export.xml"), "--out", "data", check=True).stdout)
    # The fingerprint is the seed's folder formula over the one file, relpath `export.xml`.
    assert out["run_id"] == seed_run_id(None, seed_fingerprint(alone))
    run_dir = tmp_path / out["staging_dir"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["input"] == {"form": "export_xml", "path_redacted": True}
    assert [f["path"] for f in manifest["files"]] == ["source/export.xml"]
    assert json.loads((run_dir / "layout.json").read_text())["export_xml"] == "source/export.xml"
    assert (tmp_path / "data" / "ndjson" / out["run_id"]).is_dir()
    # The folder holding only that file, and the file renamed by a download, are the same export.
    same = cli("pipeline", "run", "--input", str(alone), "--out", "data", check=True)
    assert same.stdout.splitlines()[0] == "no changes detected"
    renamed = tmp_path / "export (1).xml"
    shutil.copy(alone / "export.xml", renamed)
    same = cli("pipeline", "run", "--input", str(renamed), "--out", "data", check=True)
    assert same.stdout.splitlines()[0] == "no changes detected"


def _not_exports(folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir()
    cases = {}
    (folder / "Health Summary.pdf").write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")
    cases["pdf"] = (folder / "Health Summary.pdf", "the input is a PDF document")
    (folder / "notes.txt").write_text("Margarethe's steps, 1961-04-07\n")
    cases["text"] = (folder / "notes.txt", "the input is not a zip archive or an export folder")
    (folder / "export_cda.xml").write_text('<?xml version="1.0"?>\n<ClinicalDocument/>\n')
    cases["other xml"] = (folder / "export_cda.xml", "XML file without Apple Health data")
    (folder / "export.zip").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    cases["truncated zip"] = (folder / "export.zip", "damaged zip archive")
    (folder / "empty.zip").write_bytes(b"")
    cases["empty file"] = (folder / "empty.zip", "empty file")
    (folder / "export.xml").write_bytes(b"")
    cases["empty export.xml"] = (folder / "export.xml", "export.xml is empty")
    with zipfile.ZipFile(folder / "photos.zip", "w") as zf:
        zf.writestr("IMG_0001.jpg", b"\xff\xd8")
    cases["zip without export"] = (folder / "photos.zip", "no export.xml")
    return cases


@pytest.mark.parametrize("command", [["pipeline", "run"], ["run", "all"], ["export", "profile"]])
@pytest.mark.slow
def test_other_files_say_what_was_given_and_what_is_expected(cli, tmp_path, command):
    cases = _not_exports(tmp_path / PERSON_DIR)
    for name, (path, fragment) in cases.items():
        args = [*command, "--input", str(path), "--out", "data"]
        proc = cli(*args)
        line = assert_one_error_line(proc)
        assert fragment in line, (name, line)
        if "empty" not in name and "without export" not in name:
            assert line.endswith(EXPECTED), (name, line)
        assert "Margarethe" not in proc.stderr + proc.stdout and str(tmp_path) not in proc.stderr
        assert not any(private in line for private in ("Health Summary", "notes", "photos", "empty.zip"))
    if command[0] == "export":  # `export profile` writes its own --out, nothing in a state dir
        assert not (tmp_path / "data").exists() or snapshot(tmp_path / "data") == {}
    else:  # a refused input leaves no trace in the output dir the command would have created
        assert not (tmp_path / "data").exists()
