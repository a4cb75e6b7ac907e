"""De-identification (CONTRACT §9): pure transforms, the stage on planted PII, date shift, routes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import stream_bytes
from healthdelta import deid, export, identity, pipeline, streamfile, synth, validate
from healthdelta.deid import DateShift, Scrubber, birth_year, name_forms, person_offset_days
from healthdelta.identity import PersonPII

# --------------------------------------------------------------------------- pure transforms


# Found by hypothesis: shifted back a day, 16:00 -0800 is midnight UTC of the same date
# (the text was then taken for "not a date" and left unshifted).
@example(a=datetime(2000, 1, 1, 16, 0), b=datetime(2000, 1, 1, 0, 0), days=-1)
@given(st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2040, 1, 1)),
       st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2040, 1, 1)),
       st.integers(min_value=-800, max_value=800).filter(bool))
def test_date_shift_keeps_intervals_exact(a, b, days):
    """Shifted timestamps are written in UTC: the instant moves by exactly `days`."""
    shift = DateShift(days)
    fmt = "%Y-%m-%d %H:%M:%S"
    sa_text = shift.text(a.strftime(fmt) + " -0800")
    assert sa_text.endswith(" +0000")
    sa = datetime.strptime(sa_text[:19], fmt)
    sb = datetime.strptime(shift.apple(b.strftime(fmt).encode() + b" -0800").decode()[:19], fmt)
    assert sb - sa == b.replace(microsecond=0) - a.replace(microsecond=0)
    assert sa - a.replace(microsecond=0) == timedelta(days=days, hours=8)


def test_person_offset_is_whole_weeks_into_the_past_and_per_person():
    secret = b"s" * 32
    a, b = person_offset_days(secret, "p_a"), person_offset_days(secret, "p_b")
    assert a == person_offset_days(secret, "p_a") and a % 7 == 0 and -728 <= a <= -7
    assert person_offset_days(b"t" * 32, "p_a") != a or b != a


def test_date_shift_formats():
    s = DateShift(-14)
    assert s.cda("20200302074109-0800") == "20200217154109+0000"
    assert s.cda("20200302") == "20200217"
    assert s.cda("1961") == "1961"
    assert s.fhir("2020-03") == "2020-03" or s.fhir("2020-03") == "2020-02"
    assert s.fhir("2020-03-02T10:00:00Z") == "2020-02-17T10:00:00Z"
    assert s.text("route_2020-03-02_7.30am.gpx") == "route_2020-02-17_7.30am.gpx"
    assert birth_year("1961-04-07") == "1961" and birth_year(None) is None


def _person(label="Patient 1", pid="p_1"):
    return PersonPII(
        person_id=pid, label=label,
        names=({"given": ["Margarethe"], "family": "Quist", "text": None},),
        extra_names=(), birth_dates=("1961-04-07",), birth_texts=("April 7, 1961",),
        identifiers=("K1234567",), telecom=({"system": "phone", "value": "+1-503-555-0142"},
                                            {"system": "email", "value": "m.quist@example.net"}),
        addresses=({"lines": ["12 Alder Creek Rd"], "city": "Cedarhaven", "postal_code": "97123"},),
    )


def test_name_forms_cover_orders_initials_and_possessives():
    forms = name_forms([{"given": ["Jane"], "family": "Doe"}])
    for f in ("Jane Doe", "Doe, Jane", "J. Doe", "Jane D.", "J.D.", "Jane", "Doe", "Janes"):
        assert f in forms


def test_scrubber_free_text_and_values():
    sc = Scrubber([_person()], "Patient 1", "p_1")
    note = ("Progress note for Quist, Margarethe (DOB April 7, 1961, MRN K1234567). Call (503) 555-0142 or "
            "m.quist@example.net, see https://portal.example.org/x. Lives at 12 Alder Creek Rd, Cedarhaven. "
            "M. Quist agreed. Unknown person SSN 123-45-6789, phone 971-555-0100.")
    out = sc.text(note)
    for leaked in ("Quist", "Margarethe", "1961", "K1234567", "555-0142", "m.quist", "portal.example", "Alder",
                   "Cedarhaven", "123-45-6789", "971-555-0100"):
        assert leaked not in out
    assert "Patient 1" in out
    assert sc.value("2020-03-02 07:41:09 -0800") == "2020-03-02 07:41:09 -0800"  # dates are not birth dates
    assert sc.device_name("Margarethe’s Apple Watch") == "Patient 1’s Apple Watch"
    assert sc.device_name("Unknown’s iPhone") == "Patient 1’s iPhone"
    assert sc.device_name("Margarethes iPhone") == "Patient 1’s iPhone"
    assert sc.device_name("iPhone de Jean") == "iPhone de Patient 1"
    assert sc.device_name("Health Mate") == "Health Mate"
    dev = ("<<HKDevice: 0x283a1c7d0>, name:Margarethe’s Polar H10, manufacturer:Polar Electro Oy, model:H10, "
           "hardware:1.0, localIdentifier:4A5B6C7D-0000-1111-2222-333344445555, UDIDeviceIdentifier:0123456789>")
    cleaned = sc.device(dev)
    assert "localIdentifier" not in cleaned and "UDIDevice" not in cleaned and "Margarethe" not in cleaned
    assert cleaned.startswith("<<HKDevice: 0x283a1c7d0>, name:Patient 1’s Polar H10, manufacturer:Polar")


def test_shared_name_forms_get_no_single_label():
    a = _person("Patient 1", "p_1")
    b = PersonPII("p_2", "Patient 2", ({"given": ["Otto"], "family": "Quist"},), (), (), (), (), (), ())
    sc = Scrubber([a, b], "Patient 1", "p_1")
    assert sc.text("Quist") == "[NAME]"
    assert sc.text("Otto") == "Patient 2"


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A generated export with planted PII (2 people + an ambiguous namesake), staged and resolved."""
    root = tmp_path_factory.mktemp("planted")
    export_ = synth.generate_export(root / "in", seed=3, records=700, people=2, ambiguous_person=True)
    run_id, run_dir = pipeline.ingest_only(export_.root, root / "data" / "staging")
    idir = root / "data" / "state" / "identity"
    identity.resolve_run(idir, run_dir, run_id)
    return export_, run_id, run_dir, idir


def _pii(export_) -> list[str]:
    return [v for p in export_.people for v in p.pii_strings()]


def _assert_tree_clean(root: Path, pii: list[str]) -> int:
    checked = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            text = streamfile.read_bytes(path).decode("utf-8", "replace").casefold()  # plain, if compressed
            for value in pii:
                assert value.casefold() not in text, f"planted PII left in {path.relative_to(root)}"
            checked += 1
    return checked


def _deid(planted, tmp_path, **kw):
    export_, run_id, run_dir, idir = planted
    if kw.get("date_shift"):  # a store's share runs are all shifted or none is
        shutil.copytree(idir, tmp_path / "identity", ignore=shutil.ignore_patterns(deid.SETTINGS_FILE))
        idir = tmp_path / "identity"
    dest = tmp_path / "deid" / run_id
    result = deid.deidentify_run(run_dir, dest, idir, **kw)
    return result, dest


def test_share_copy_and_share_ndjson_hold_no_planted_pii(planted, tmp_path):
    export_, run_id, run_dir, idir = planted
    result, dest = _deid(planted, tmp_path)
    assert _assert_tree_clean(dest, _pii(export_)) > 10
    ndjson = tmp_path / "ndjson"
    exported = export.export_run(dest, ndjson, run_id=run_id, parent_run_id=None,
                                 person_id=result.share_person_id)
    assert exported.counts["observations"] > 700 and exported.counts["clinical"] > 0
    assert exported.counts["routes"] == 0  # dropped by default
    _assert_tree_clean(ndjson, _pii(export_))
    findings = list(validate.validate_dir(ndjson / run_id, tuple(_pii(export_))))
    assert findings == []
    rows = [json.loads(line) for line in stream_bytes(ndjson / run_id / "observations.ndjson").splitlines()]
    assert {r["canonical_person_id"] for r in rows} == {"patient-1"}


def test_person_fields_are_reduced(planted, tmp_path):
    export_, *_ = planted
    _, dest = _deid(planted, tmp_path)
    patients = [json.loads(p.read_text()) for p in (dest / "source" / "clinical-records").glob("Patient-*.json")]
    assert patients
    for p in patients:
        assert set(p) <= {"resourceType", "id", "gender", "birthDate", "active", "name"}
        assert re.fullmatch(r"\d{4}", p.get("birthDate", "1900"))
        assert p["name"][0]["text"].startswith("Patient ") or p["name"][0]["text"] == "[NAME]"
    ecg = next((dest / "source" / "electrocardiograms").glob("*.csv")).read_text().splitlines()
    assert ecg[0] == "Name,Patient 1" and ecg[1].rstrip(",") == "Date of Birth"
    me = next(line for line in (dest / "source" / "export.xml").open(encoding="utf-8") if "<Me " in line)
    assert re.search(r'DateOfBirth="\d{4}"', me)
    report = json.loads((dest / "deid_report.json").read_text())
    assert report["date_shift"] is False and report["mode"] == "share"


_APPLE_DATE = re.compile(r'(startDate|endDate|creationDate)="(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} [+-]\d{4})')


def _record_times(path: Path) -> list[dict[str, datetime]]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(" <Record "):
                out.append({k: datetime.strptime(v, "%Y-%m-%d %H:%M:%S %z") for k, v in _APPLE_DATE.findall(line)})
    return out


def test_date_shift_moves_every_date_by_one_offset(planted, tmp_path):
    export_, run_id, run_dir, idir = planted
    result, dest = _deid(planted, tmp_path, date_shift=True)
    assert result.date_shift and json.loads((dest / "deid_report.json").read_text())["date_shift"] is True
    before = _record_times(run_dir / "source" / "export.xml")
    after = _record_times(dest / "source" / "export.xml")
    assert len(before) == len(after) > 100
    offsets = {a[k] - b[k] for b, a in zip(before, after) for k in b}
    assert len(offsets) == 1 and next(iter(offsets)) != timedelta(0)
    for b, a in zip(before, after):
        assert a["endDate"] - a["startDate"] == b["endDate"] - b["startDate"]
    days = next(iter(offsets)).days
    assert days == person_offset_days(identity.read_secret(idir), identity.run_owner(idir, run_id).owner_person_id)
    # File names carrying dates move with them; nothing else is renamed.
    names = sorted(p.name for p in (dest / "source" / "electrocardiograms").glob("*.csv"))
    originals = sorted(p.name for p in (run_dir / "source" / "electrocardiograms").glob("*.csv"))
    assert names == sorted(DateShift(days).text(n) for n in originals) and names != originals
    _assert_tree_clean(dest, _pii(export_))
    # The offset itself is never written down.
    assert str(days) not in (dest / "deid_report.json").read_text().replace(" ", "")


def test_without_date_shift_dates_are_kept(planted, tmp_path):
    _, run_id, run_dir, _ = planted
    _, dest = _deid(planted, tmp_path)
    assert _record_times(run_dir / "source" / "export.xml") == _record_times(dest / "source" / "export.xml")


def test_coarse_routes(planted, tmp_path):
    export_, run_id, run_dir, idir = planted
    result, dest = _deid(planted, tmp_path, keep_routes="coarse")
    gpx = sorted((dest / "source" / "workout-routes").glob("*.gpx"))
    assert gpx
    coords = re.findall(r'(?:lat|lon)="(-?\d+(?:\.\d+)?)"', gpx[0].read_text())
    assert coords and all(len(c.split(".")[1]) <= 2 for c in coords if "." in c)
    exported = export.export_run(dest, tmp_path / "nd", run_id=run_id, parent_run_id=None, person_id="patient-1")
    assert exported.counts["routes"] == len(gpx)
    _assert_tree_clean(dest, _pii(export_))


def test_deid_is_deterministic(planted, tmp_path):
    _, a = _deid(planted, tmp_path / "a")
    _, b = _deid(planted, tmp_path / "b")
    files_a = {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    assert files_a == files_b


def test_dest_must_be_empty_and_routes_option_checked(planted, tmp_path):
    from healthdelta.errors import UsageError

    _, run_id, run_dir, idir = planted
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("x")
    with pytest.raises(UsageError):
        deid.deidentify_run(run_dir, tmp_path / "x", idir)
    with pytest.raises(UsageError):
        deid.deidentify_run(run_dir, tmp_path / "y", idir, keep_routes="fine")


def test_unusual_export_xml_lines_are_scrubbed_too(tmp_path):
    """Text content, comments, single quotes and tags over several lines take the slow path."""
    person = _person()
    ctx = deid.Context(scrubber=Scrubber([person], "Patient 1", "p_1"), secret=b"s" * 32, owner_person_id="p_1",
                       owner_label="Patient 1", labels={"p_1": "Patient 1"}, fhir_subjects={}, date_shift=False)
    rw = deid.ExportXmlRewriter(ctx)
    lines = [
        b' <Record type="X" sourceName="Margarethe\xe2\x80\x99s iPhone" value="Call 503-555-0142"/>',
        b" <Note>Margarethe Quist wrote this</Note>",
        b" <!-- Quist -->",
        b" <Record type='X' sourceName='Margarethe Quist'",
        b'   device="K1234567" startDate="2020-01-01 00:00:00 -0800"/>',
        b' <MetadataEntry key="HKMetadataKeyDeviceSerialNumber" value="SN-998877"/>',
        b' <MetadataEntry key="Comment" value="m.quist@example.net"/>',
    ]
    out = b"\n".join(rw.line(x) for x in lines).decode("utf-8")
    for leaked in ("Margarethe", "Quist", "555-0142", "K1234567", "SN-998877", "m.quist"):
        assert leaked not in out
    assert "2020-01-01 00:00:00 -0800" in out


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from healthdelta.cli import commands_identity, main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_deid(planted, tmp_path):
    export_, run_id, run_dir, idir = planted
    shutil.copytree(idir, tmp_path / "identity", ignore=shutil.ignore_patterns(deid.SETTINGS_FILE))
    idir = tmp_path / "identity"
    proc = run_cli("deid", "--input", str(run_dir), "--out", str(tmp_path / "deid"), "--identity", str(idir),
                   "--date-shift", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The store's share runs are shifted now: an unshifted one would give the shift away.
    mixed = run_cli("deid", "--input", str(run_dir), "--out", str(tmp_path / "deid3"), "--identity", str(idir),
                    cwd=tmp_path)
    assert mixed.returncode == 2 and mixed.stderr.startswith("error: ") and "--date-shift" in mixed.stderr
    assert not (tmp_path / "deid3" / run_id).exists()
    assert f"deid_dir={(tmp_path / 'deid' / run_id).as_posix()}" in proc.stdout
    for value in _pii(export_):
        assert value.casefold() not in (proc.stdout + proc.stderr).casefold()
    assert not [p for p in (tmp_path / "deid").iterdir() if p.name.startswith(".tmp-")]
    bad = run_cli("deid", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "deid2"), cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1
    assert str(tmp_path) not in bad.stderr


@pytest.mark.slow
def test_pipeline_share_mode_end_to_end(tmp_path):
    """`pipeline run --mode share`: identity, de-id and share-mode NDJSON, nothing planted anywhere."""
    export_ = synth.generate_export(tmp_path / "in", seed=8, records=300, people=2, ambiguous_person=True)
    code = "import sys; from healthdelta.cli import commands_identity, main; main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, "pipeline", "run", "--input", str(export_.root), "--out",
                           str(tmp_path / "data"), "--mode", "share"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    kv = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert "deid_dir" in kv
    for value in _pii(export_):
        assert value.casefold() not in (proc.stdout + proc.stderr).casefold()
    _assert_tree_clean(tmp_path / "data" / "deid", _pii(export_))
    _assert_tree_clean(tmp_path / "data" / "ndjson", _pii(export_))
