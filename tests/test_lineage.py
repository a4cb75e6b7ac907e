"""Runs that mean what they say: per-person delta lineage, older exports, the same export in
three forms, the seed's zip fingerprint, pruning and the JSON outputs, through the real CLI."""

from __future__ import annotations

import hashlib
import json

import duckdb
import pytest

from conftest import assert_one_error_line, kv, read_ndjson
from healthdelta import lineage
from healthdelta.ndjson import STREAMS
from test_cli_pipeline import snapshot


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Person A's export, A's next export (+40 records), and person B's export."""
    from healthdelta.synth import generate_export

    root = tmp_path_factory.mktemp("family")
    a = generate_export(root / "a-1", seed=21, records=600, zip=True)
    a_next = generate_export(root / "a-2", base=a, new_records=40, zip=True)
    b = generate_export(root / "b-1", seed=22, records=500, zip=True)
    return a, a_next, b


def run_all(cli, export, *extra, out="data"):
    return kv(cli("run", "all", "--input", str(export.zip_path), "--out", out, *extra, check=True).stdout)


def keys(ndjson_dir):
    return {row["record_key"] for stream in STREAMS for row in read_ndjson(ndjson_dir / f"{stream}.ndjson")}


def delta(ndjson_dir):
    return json.loads((ndjson_dir / "delta.json").read_text())


@pytest.mark.slow
def test_caregiver_two_people_in_one_out(cli, family):
    a, a_next, b = family
    r_a = run_all(cli, a)
    r_b = run_all(cli, b)
    r_a2 = run_all(cli, a_next)
    d_a, d_b, d_a2 = (cli.cwd / r["ndjson_dir"] for r in (r_a, r_b, r_a2))

    # B's first run: everything added, nothing of A's "removed".
    assert r_b["delta_base_run_id"] == ""
    assert delta(d_b)["removed"] == 0 and delta(d_b)["added"] == len(keys(d_b))
    # A's next export is diffed against A's run, not against B's (the registry parent).
    runs = json.loads((cli.cwd / "data/state/runs.json").read_text())["runs"]
    assert runs[r_a2["run_id"]]["parent_run_id"] == r_b["run_id"]
    assert runs[r_a2["run_id"]]["delta_base_run_id"] == r_a["run_id"] == r_a2["delta_base_run_id"]
    assert delta(d_a2)["parent_run_id"] == r_a["run_id"]
    new_keys = keys(d_a2) - keys(d_a)
    assert delta(d_a2)["removed"] == 0
    assert {row["record_key"] for s in STREAMS for row in read_ndjson(d_a2 / "added" / f"{s}.ndjson")} == new_keys
    assert delta(d_a2)["added"] == len(new_keys) >= 40
    # The warehouse holds both people, each record once.
    con = duckdb.connect(str(cli.cwd / "data/warehouse.duckdb"), read_only=True)
    total, distinct, people = con.execute(
        "SELECT count(*), count(DISTINCT record_key), count(DISTINCT canonical_person_id) FROM observations"
    ).fetchone()
    con.close()
    assert total == distinct and people == 2

    listed = json.loads(cli("run", "list", "--state", "data/state", "--json", check=True).stdout)["runs"]
    person = {r["run_id"]: r["person"] for r in listed}
    assert person[r_a["run_id"]] == person[r_a2["run_id"]] != person[r_b["run_id"]]
    assert all(p.startswith("Patient ") for p in person.values())
    table = cli("run", "list", "--state", "data/state", check=True).stdout
    assert "PERSON" in table and "BASE" in table and r_a["run_id"][:12] in table.splitlines()[-1]

    # A's older export after the newer one: refused, nothing changes (bytes and mtimes).
    data = cli.cwd / "data"
    before = snapshot(data)
    older = cli("run", "all", "--input", str(a.zip_path.rename(a.zip_path.with_name("old copy.zip"))),
                "--out", "data")
    a.zip_path.with_name("old copy.zip").rename(a.zip_path)
    line = assert_one_error_line(older)
    assert "older than the latest run of the same person" in line and "--allow-older" in line
    assert "old copy" not in older.stderr + older.stdout
    assert snapshot(data) == before


@pytest.mark.slow
def test_allow_older_and_since_choose_the_base(cli, family):
    a, a_next, _ = family
    r_a = run_all(cli, a)
    r_a2 = run_all(cli, a_next)
    r_old = run_all(cli, a, "--allow-older")
    # Diffed against the newer run: its newer records show as removed, as the flag says.
    assert r_old["delta_base_run_id"] == r_a2["run_id"]
    assert delta(cli.cwd / r_old["ndjson_dir"])["removed"] == delta(cli.cwd / r_a2["ndjson_dir"])["added"]
    assert r_a["run_id"] != r_old["run_id"]  # another parent, so another run id (the seed's formula)


@pytest.mark.slow
def test_same_export_as_zip_folder_and_parent_is_one_run(cli, tmp_path):
    from healthdelta.synth import generate_export

    e = generate_export(tmp_path / "in", seed=23, records=300, zip=True)
    first = run_all(cli, e)
    assert first["status"] == "created"
    for form in (e.export_dir, e.export_dir.parent):
        proc = cli("run", "all", "--input", str(form), "--out", "data", check=True)
        assert proc.stdout.splitlines()[:3] == ["no changes detected", "status=no_changes",
                                                f"run_id={first['run_id']}"]
    assert len(json.loads((cli.cwd / "data/state/runs.json").read_text())["runs"]) == 1


def test_zip_fingerprint_is_the_seed_formula_and_survives_renaming(cli, tmp_path):
    from healthdelta.synth import generate_export

    e = generate_export(tmp_path / "in", seed=24, records=200, zip=True, keep_folder=False)
    blob = e.zip_path.read_bytes()
    expected = hashlib.sha256(b"file\0%d\0%s\n" % (len(blob), hashlib.sha256(blob).hexdigest().encode())).hexdigest()
    out = kv(cli("pipeline", "run", "--input", str(e.zip_path), "--out", "data", check=True).stdout)
    entry = json.loads((cli.cwd / "data/state/runs.json").read_text())["runs"][out["run_id"]]
    assert entry["input_fingerprint"]["sha256"] == expected
    salted = hashlib.sha256(f"healthdelta_pipeline_v1\n\n{expected}\n".encode()).hexdigest()
    assert out["run_id"] == salted
    renamed = e.zip_path.rename(e.zip_path.with_name("export (1).zip"))
    again = cli("pipeline", "run", "--input", str(renamed), "--out", "data", check=True)
    assert again.stdout.splitlines() == ["no changes detected", f"run_id={out['run_id']}"]


def test_registry_from_before_the_zip_fix_keeps_working(cli, tmp_path):
    """An entry whose zip fingerprint hashed the file name is not rewritten; the unchanged
    export is still recognised (by its staged content) and nothing is registered."""
    from healthdelta.synth import generate_export

    e = generate_export(tmp_path / "in", seed=25, records=200, zip=True, keep_folder=False)
    out = kv(cli("pipeline", "run", "--input", str(e.zip_path), "--out", "data", check=True).stdout)
    runs_json = cli.cwd / "data/state/runs.json"
    doc = json.loads(runs_json.read_text())
    entry = doc["runs"][out["run_id"]]
    blob = e.zip_path.read_bytes()
    entry["input_fingerprint"]["sha256"] = hashlib.sha256(
        b"export.zip\0%d\0%s\n" % (len(blob), hashlib.sha256(blob).hexdigest().encode())).hexdigest()
    for key in ("owner_person_id", "delta_base_run_id", "export_date"):
        entry.pop(key)  # as the old tool wrote entries
    runs_json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    before = runs_json.read_bytes()
    again = cli("pipeline", "run", "--input", str(e.zip_path), "--out", "data", check=True)
    assert again.stdout.splitlines() == ["no changes detected", f"run_id={out['run_id']}"]
    assert runs_json.read_bytes() == before


@pytest.mark.slow
def test_prune_keeps_doctor_clean_and_the_warehouse_whole(cli, family, tmp_path):
    from healthdelta.synth import generate_export

    a, a_next, _ = family
    a_3 = generate_export(tmp_path / "a-3", base=a_next, new_records=30, zip=True)
    r = [run_all(cli, x) for x in (a, a_next)]
    data = cli.cwd / "data"

    def du():
        return sum(p.stat().st_size for p in data.rglob("*") if p.is_file())

    con = duckdb.connect(str(data / "warehouse.duckdb"), read_only=True)
    rows_before = con.execute("SELECT count(*) FROM observations").fetchone()
    con.close()
    before = snapshot(data)
    dry = json.loads(cli("run", "prune", "--out", "data", "--keep", "1", "--dry-run", "--json", check=True).stdout)
    assert dry["pruned_runs"] == [r[0]["run_id"]] and dry["freed_bytes"] > 0
    assert snapshot(data) == before
    size_before = du()
    done = json.loads(cli("run", "prune", "--out", "data", "--keep", "1", "--json", check=True).stdout)
    assert done["pruned_runs"] == [r[0]["run_id"]]
    assert size_before - du() >= done["freed_bytes"] > 0
    assert not (cli.cwd / r[0]["staging_dir"] / "source").exists()
    assert (cli.cwd / r[0]["ndjson_dir"] / "delta.json").is_file()

    doctor = cli("doctor", "--out", "data")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    con = duckdb.connect(str(data / "warehouse.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM observations").fetchone() == rows_before
    con.close()
    listed = cli("run", "list", "--state", "data/state", check=True).stdout
    assert "(pruned)" in listed
    shown = json.loads(cli("run", "show", r[0]["run_id"][:8], "--state", "data/state", "--json", check=True).stdout)
    assert shown["pruned"]["at"]
    # Pruning again changes nothing; the next export still diffs against the kept run.
    registry_bytes = (data / "state/runs.json").read_bytes()
    again = json.loads(cli("run", "prune", "--out", "data", "--keep", "1", "--json", check=True).stdout)
    assert again["pruned"] == 0 and (data / "state/runs.json").read_bytes() == registry_bytes
    r3 = run_all(cli, a_3)
    assert r3["delta_base_run_id"] == r[1]["run_id"]
    assert delta(cli.cwd / r3["ndjson_dir"])["removed"] == 0
    # A pruned run's staged export is gone: exporting it says so in one line.
    gone = cli("export", "ndjson", "--input", r[0]["staging_dir"], "--out", "again")
    assert "pruned" in assert_one_error_line(gone)


def test_prune_usage_errors(cli):
    assert_one_error_line(cli("run", "prune", "--out", "data", "--keep", "0"), code=2)
    assert_one_error_line(cli("run", "prune", "--out", "data"), code=2)


def test_unknown_since_leaves_no_trace_in_a_new_out(cli, mini_export):
    proc = cli("run", "all", "--input", str(mini_export), "--out", "fresh/data", "--since", "abcd1234")
    assert_one_error_line(proc)
    assert not (cli.cwd / "fresh" / "data").exists()


def test_json_outputs_parse_and_paths_are_usable_as_printed(cli, mini_export):
    created = json.loads(cli("run", "all", "--input", str(mini_export), "--out", "out/data", "--json",
                             check=True).stdout)
    assert created["status"] == "created"
    for key in ("staging_dir", "ndjson_dir", "run_report", "reports_dir", "warehouse", "report"):
        assert created[key].startswith("out/data/") and (cli.cwd / created[key]).exists(), key
    noop = json.loads(cli("run", "all", "--input", str(mini_export), "--out", "out/data", "--json",
                          check=True).stdout)
    assert noop["status"] == "no_changes" and noop["run_id"] == created["run_id"]
    assert (cli.cwd / noop["report"]).is_file()
    piped = json.loads(cli("pipeline", "run", "--input", str(mini_export), "--out", "out/data", "--json",
                           check=True).stdout)
    assert piped == {"status": "no_changes", "run_id": created["run_id"]}
    shown = json.loads(cli("run", "show", created["run_id"], "--state", "out/data/state", "--json",
                           check=True).stdout)
    assert shown["run_id"] == created["run_id"] and shown["is_last"] is True and shown["delta_base_run_id"] is None


# ------------------------------------------------------------------ the pure rules


def _entry(run_id, owner, base=None, created="2026-01-01T00:00:00Z", date=None):
    return {"run_id": run_id, "owner_person_id": owner, "delta_base_run_id": base, "created_at": created,
            "export_date": date}


def _owner(e):
    return e.get("owner_person_id")


def test_latest_of_owner_follows_the_chain_not_the_clock():
    # Registered within one second: the chain (b was diffed against a) decides, not the id order.
    runs = [_entry("f" * 64, "p_a"), _entry("0" * 64, "p_a", base="f" * 64), _entry("1" * 64, "p_b")]
    assert lineage.latest_of_owner(runs, "p_a", _owner)["run_id"] == "0" * 64
    assert lineage.latest_of_owner(runs, "p_c", _owner) is None
    assert lineage.delta_base(runs, "p_b", _owner, explicit=runs[0])["run_id"] == "1" * 64  # other person's
    assert lineage.delta_base(runs, "p_a", _owner, explicit=runs[0])["run_id"] == "f" * 64  # same person's


def test_is_older():
    assert lineage.is_older("2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z")
    assert not lineage.is_older("2024-02-01T00:00:00Z", "2024-02-01T00:00:00Z")
    assert not lineage.is_older(None, "2024-02-01T00:00:00Z") and not lineage.is_older("2024-01-01T00:00:00Z", None)


def test_runs_to_keep_spares_every_persons_latest_and_last_run():
    from healthdelta.prune import runs_to_keep
    from healthdelta.registry import Registry

    runs = [_entry("a" * 64, "p_a", created="2026-01-01T00:00:01Z"),
            _entry("b" * 64, "p_b", created="2026-01-01T00:00:02Z"),
            _entry("c" * 64, "p_a", base="a" * 64, created="2026-01-01T00:00:03Z"),
            _entry("d" * 64, "p_a", base="c" * 64, created="2026-01-01T00:00:04Z")]
    reg = Registry(runs={e["run_id"]: e for e in runs})
    assert runs_to_keep(reg, "d" * 64, {}, 1) == {"b" * 64, "d" * 64}
    assert runs_to_keep(reg, "c" * 64, {}, 2) == {"b" * 64, "c" * 64, "d" * 64}
    # Entries from before lineage: owners come from the identity store.
    bare = Registry(runs={k: {**e, "owner_person_id": None} for k, e in reg.runs.items()})
    owners = {"a" * 64: "p_a", "b" * 64: "p_b", "c" * 64: "p_a", "d" * 64: "p_a"}
    assert runs_to_keep(bare, "d" * 64, owners, 1) == {"b" * 64, "d" * 64}

