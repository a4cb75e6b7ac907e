"""NDJSON and delta through the real CLI: counts, keys, delta, validate, profile."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import SHARED_FIXTURE, assert_one_error_line, decompress_run, kv, read_ndjson, stream_bytes

STREAMS = ("observations", "workouts", "activity_summaries", "correlations", "clinical",
           "documents", "medications", "conditions", "ecg", "routes")


def expected_counts(c) -> dict[str, int]:
    """What the generator planted, per stream (Correlation children counted once)."""
    fhir_clinical = sum(c.get(f"fhir:{t}", 0) for t in
                        ("AllergyIntolerance", "Encounter", "Immunization", "Patient", "Procedure"))
    return {
        "observations": c["records"] + c["cda_observations"] + c["fhir:Observation"],
        "workouts": c["workouts"],
        "activity_summaries": c["activity_summaries"],
        "correlations": c["correlations"],
        "clinical": c["clinical_records"] + fhir_clinical,
        "documents": c.get("fhir:DocumentReference", 0) + c.get("fhir:DiagnosticReport", 0),
        "medications": c.get("fhir:MedicationRequest", 0) + c.get("fhir:MedicationOrder", 0),
        "conditions": c["fhir:Condition"],
        "ecg": c["ecg_files"],
        "routes": c["gpx_files"],
    }


@pytest.fixture
def two_runs(cli, synth_pair):
    first, second = synth_pair
    a = kv(cli("pipeline", "run", "--input", str(first.zip_path), "--out", "data", check=True).stdout)
    b = kv(cli("pipeline", "run", "--input", str(second.zip_path), "--out", "data", check=True).stdout)
    return cli.cwd / "data", a, b


def test_counts_equal_what_was_planted(two_runs, synth_pair):
    data, a, b = two_runs
    for run, export in ((a, synth_pair[0]), (b, synth_pair[1])):
        ndjson = data.parent / run["ndjson_dir"]
        counts = {s: len(stream_bytes(ndjson / f"{s}.ndjson").splitlines()) for s in STREAMS}
        assert counts == expected_counts(export.counts)
        rows = read_ndjson(ndjson / "observations.ndjson")
        healthkit = [r for r in rows if r["source"] == "healthkit"]
        assert len(healthkit) == export.counts["records"]
        assert len({r["record_key"] for r in rows}) == len(rows)
        hrv = [r for r in healthkit if r.get("hrv_beats")]
        assert len(hrv) == export.counts["hrv_records"]
        assert sum(len(r["hrv_beats"]) for r in hrv) == export.counts["hrv_beats"]
        assert sum(len(r.get("metadata") or {}) for r in healthkit) == export.counts["metadata_entries"]
        # Correlation members link to top-level observation rows that exist exactly once.
        keys = {r["record_key"] for r in healthkit}
        for corr in read_ndjson(ndjson / "correlations.ndjson"):
            assert corr["member_keys"] and set(corr["member_keys"]) <= keys
        workouts = read_ndjson(ndjson / "workouts.ndjson")
        assert sum(len(w["events"]) for w in workouts) == export.counts["workout_events"]
        assert sum(len(w["statistics"]) for w in workouts) == export.counts["workout_statistics"]
        assert sum(1 for w in workouts if w.get("route")) == export.counts["workout_routes"]
        routes = read_ndjson(ndjson / "routes.ndjson")
        assert sum(r["point_count"] for r in routes) == export.counts["gpx_points"]
        for r in routes:
            assert (ndjson / r["points_ref"]).is_file()


def test_next_export_delta_is_exactly_the_new_records(two_runs, synth_pair):
    data, a, b = two_runs
    delta = json.loads((data.parent / b["ndjson_dir"] / "delta.json").read_text())
    assert delta["parent_run_id"] == a["run_id"] and delta["removed"] == 0
    before = expected_counts(synth_pair[0].counts)
    after = expected_counts(synth_pair[1].counts)
    for stream in STREAMS:
        assert delta["streams"][stream]["added"] == after[stream] - before[stream], stream
        assert delta["streams"][stream]["removed"] == 0
    old = {r["record_key"] for r in read_ndjson(data.parent / a["ndjson_dir"] / "observations.ndjson")}
    new = read_ndjson(data.parent / b["ndjson_dir"] / "observations.ndjson")
    added = read_ndjson(data.parent / b["ndjson_dir"] / "added" / "observations.ndjson")
    assert {r["record_key"] for r in added} == {r["record_key"] for r in new} - old
    assert sum(1 for r in added if r["source"] == "healthkit") == 120
    first = json.loads((data.parent / a["ndjson_dir"] / "delta.json").read_text())
    assert first["parent_run_id"] is None and first["added"] == sum(before.values())
    # The generator rewrote every device pointer in the next export; keys did not move, and
    # rows carry no pointer (it is a memory address, not data).
    old_rows = read_ndjson(data.parent / a["ndjson_dir"] / "observations.ndjson")
    assert all("0x>" in r["device"] for r in old_rows + new if r.get("device") and "HKDevice" in r["device"])
    assert {r["device"] for r in old_rows if r.get("device")} <= {r["device"] for r in new if r.get("device")}


@pytest.mark.slow
def test_zip_and_folder_give_the_same_rows_and_bytes_on_rerun(cli, synth_pair, tmp_path):
    first = synth_pair[0]
    z = kv(cli("pipeline", "run", "--input", str(first.zip_path), "--out", "z", check=True).stdout)
    f = kv(cli("pipeline", "run", "--input", str(first.export_dir), "--out", "f", check=True).stdout)
    staged = f["staging_dir"]
    e1 = kv(cli("export", "ndjson", "--input", staged, "--out", "e1", check=True).stdout)
    e2 = kv(cli("export", "ndjson", "--input", staged, "--out", "e2", check=True).stdout)
    for stream in STREAMS:
        zrows = read_ndjson(tmp_path / z["ndjson_dir"] / f"{stream}.ndjson")
        frows = read_ndjson(tmp_path / f["ndjson_dir"] / f"{stream}.ndjson")
        assert [r["record_key"] for r in zrows] == [r["record_key"] for r in frows]
        assert [{**r, "run_id": None, "canonical_person_id": None} for r in zrows] == \
               [{**r, "run_id": None, "canonical_person_id": None} for r in frows]
        # The same staged run exported twice: byte-identical files. (Across two state
        # dirs only canonical_person_id differs: it is keyed by each state's secret.)
        assert (tmp_path / e1["ndjson_dir"] / f"{stream}.ndjson").read_bytes() == \
               (tmp_path / e2["ndjson_dir"] / f"{stream}.ndjson").read_bytes()


def test_real_sample_export_parses(cli):
    out = kv(cli("pipeline", "run", "--input", str(SHARED_FIXTURE / "export.zip"), "--out", "data",
                 check=True).stdout)
    ndjson = cli.cwd / out["ndjson_dir"]
    report = json.loads((ndjson / "export_report.json").read_text())
    files = list((SHARED_FIXTURE / "apple_health_export" / "clinical-records").glob("*.json"))
    assert report["parse"]["elements"]["ClinicalRecord"] > 0
    zip_counts = report["counts"]
    assert sum(zip_counts.values()) > len(files) > 0
    assert "ok" == cli("export", "validate", "--input", str(ndjson), check=True).stdout.strip()


def test_validate_catches_every_error_code(cli, two_runs, tmp_path):
    data, a, _ = two_runs
    bad = tmp_path / "bad"
    shutil.copytree(data.parent / a["ndjson_dir"], bad)
    decompress_run(bad)
    obs = bad / "observations.ndjson"
    lines = obs.read_bytes().splitlines()
    row = json.loads(lines[0])
    broken = [
        b"{not json",
        json.dumps({k: v for k, v in row.items() if k != "source"}, sort_keys=True,
                   separators=(",", ":")).encode(),                              # missing_field
        json.dumps({**row, "schema_version": 9}, sort_keys=True, separators=(",", ":")).encode(),
        json.dumps({**row, "record_key": "xyz"}, sort_keys=True, separators=(",", ":")).encode(),
        json.dumps({**row, "source": "myspace"}, sort_keys=True, separators=(",", ":")).encode(),
        json.dumps({**row, "source_file": "/etc/passwd"}, sort_keys=True, separators=(",", ":")).encode(),
        json.dumps({**row, "event_time": "yesterday"}, sort_keys=True, separators=(",", ":")).encode(),
        json.dumps(row, sort_keys=True).encode(),                                # not_canonical + duplicate
        json.dumps({**row, "note": "Margarethe"}, sort_keys=True, separators=(",", ":")).encode(),
    ]
    obs.write_bytes(b"\n".join(lines[5:] + lines[:1] + broken))                 # unsorted, no final newline
    (bad / "workouts.ndjson").unlink()
    (bad / "extra.ndjson").write_text("")
    proc = cli("export", "validate", "--input", str(bad), "--banned-token", "Margarethe",
               "--banned-regex", r"M[a]rgarethe")
    assert proc.returncode == 1
    codes = {line.split()[2] for line in proc.stdout.splitlines() if line.startswith("ERROR ")}
    assert codes >= {"bad_json", "missing_field", "bad_schema_version", "bad_type", "bad_source", "bad_path",
                     "bad_time", "not_canonical", "duplicate_key", "unsorted", "no_newline", "banned_token",
                     "banned_regex", "missing_file", "unknown_file"}
    assert proc.stdout.splitlines()[-1] == f"errors={sum(1 for l in proc.stdout.splitlines() if l.startswith('ERROR'))}"
    assert "Margarethe" not in proc.stdout
    assert_one_error_line(cli("export", "validate", "--input", str(bad), "--banned-regex", "("), code=2)


def test_profile_is_share_safe(cli, synth_pair, tmp_path):
    first = synth_pair[0]
    out = kv(cli("export", "profile", "--input", str(first.zip_path), "--out", "prof", check=True).stdout)
    text = (tmp_path / "prof" / "profile.json").read_text()
    prof = json.loads(text)
    assert prof["record_types"]["HKQuantityTypeIdentifierStepCount"] == \
        first.counts["records_by_type:HKQuantityTypeIdentifierStepCount"]
    assert prof["resource_types"]["Observation"] == first.counts["fhir:Observation"]
    assert prof["files"]["by_extension"][".gpx"] == first.counts["gpx_files"]
    for person in first.people:
        for token in person.pii_strings():
            assert token not in text
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == ["profile.json"]
    assert int(out["files"]) == prof["files"]["count"]


def test_truncated_export_xml_fails_and_registers_nothing(cli, synth_pair, tmp_path):
    src = synth_pair[0].export_dir
    damaged = tmp_path / "damaged" / "apple_health_export"
    shutil.copytree(src, damaged)
    xml = damaged / "export.xml"
    data = xml.read_bytes()
    xml.write_bytes(data[: len(data) * 2 // 3])
    line = assert_one_error_line(cli("pipeline", "run", "--input", str(damaged.parent), "--out", "data"))
    assert "truncated" in line and str(tmp_path) not in line
    assert not (tmp_path / "data" / "state" / "runs.json").exists()
    assert not (tmp_path / "data" / "ndjson").exists() or not [
        p for p in (tmp_path / "data" / "ndjson").iterdir() if not p.name.startswith(".tmp-")]
