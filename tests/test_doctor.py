"""`healthdelta doctor`: findings for every kind of damage, `--repair` removes orphans only."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_error_line, write_mini_export

from healthdelta import doctor, pipeline, stagestore
from healthdelta.layout import OutLayout

PERSON_DIR = "Margarethe Okonkwo-Lindqvist 1961-04-07 export"
# Runs the CLI with the doctor command registered whether or not cli/__init__.py imports it yet.
_CLI = "import healthdelta.cli.commands_doctor; from healthdelta.cli import main; main()"


def doctor_cli(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CLI, "doctor", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def lines(proc: subprocess.CompletedProcess) -> list[str]:
    return proc.stdout.splitlines()


def codes(proc: subprocess.CompletedProcess) -> set[tuple[str, str]]:
    """(LEVEL, code) of every finding line."""
    return {tuple(line.split(" ", 2)[:2]) for line in lines(proc) if not line.startswith(("errors=", "removed "))}


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != ".lock"}


@pytest.fixture(scope="session")
def two_run_tree(tmp_path_factory) -> Path:
    """<base>/data: two registered runs of a small export (folder input named after a person)."""
    base = tmp_path_factory.mktemp("doctor")
    inp = base / PERSON_DIR
    write_mini_export(inp, records=20)
    layout = OutLayout.create(base / "data")
    pipeline.run_pipeline(pipeline.PipelineOptions(input=inp, layout=layout))
    (inp / "apple_health_export" / "export_cda.xml").write_text("<ClinicalDocument><x/></ClinicalDocument>\n")
    pipeline.run_pipeline(pipeline.PipelineOptions(input=inp, layout=layout))
    return base / "data"


@pytest.fixture
def tree(two_run_tree, tmp_path) -> Path:
    """A private copy of the two-run tree, cwd-relative as `data`."""
    shutil.copytree(two_run_tree, tmp_path / "data", symlinks=True)
    return tmp_path / "data"


def as_plain_run(tree: Path, run_id: str, dest: Path | None = None) -> Path:
    """A run dir with a plain `source/` (as runs made before the store, and `ingest`, leave
    them): the run's files taken out of the store into `dest` (default: the run dir itself)."""
    run = tree / "staging" / run_id
    dest = dest or run
    with stagestore.plain_run(run) as view:
        shutil.copytree(view / "source", dest / "source")
    if dest != run:
        for name in ("manifest.json", "layout.json"):
            shutil.copy(run / name, dest / name)
    return dest


def blob_of(tree: Path, run_id: str, rel: str) -> Path:
    manifest = json.loads((tree / "staging" / run_id / "manifest.json").read_text())
    sha = next(f["sha256"] for f in manifest["files"] if f["path"] == rel)
    return stagestore.blob_path(tree / "staging" / "store", sha)


def runs_of(tree: Path) -> list[str]:
    doc = json.loads((tree / "state" / "runs.json").read_text())
    return sorted(doc["runs"], key=lambda r: doc["runs"][r]["created_at"] + r)


def test_clean_tree_is_ok_and_output_is_share_safe(tree):
    proc = doctor_cli(tree.parent, "--out", "data")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = lines(proc)
    assert out[-1] == "errors=0"
    assert {"ok"} == {line.split(" ", 1)[0] for line in out[:-1]} - {"SKIP"}
    first, second = runs_of(tree)
    assert f"ok run {first[:12]} (5 staged file(s) verified)" in out
    assert f"ok last_run {second[:12]}" in out
    text = proc.stdout + proc.stderr
    for token in ("Margarethe", "Okonkwo", "1961-04-07", str(tree.parent), first):
        assert token not in text
    # The same through --json, and the library gives the same findings.
    doc = json.loads(doctor_cli(tree.parent, "--out", "data", "--json").stdout)
    assert doc["errors"] == 0
    lib = doctor.run_doctor(OutLayout.create(tree))
    assert [str(f) for f in lib.findings] == out[:-1]


@pytest.mark.parametrize("damage,expected", [
    ("flip_blob_byte", "blob_corrupt"),
    ("truncate_blob", "blob_corrupt"),
    ("delete_blob", "blob_missing"),
    ("flip_byte", "file_hash_mismatch"),
    ("truncate", "file_size_mismatch"),
    ("delete_file", "file_missing"),
    ("extra_file", "unexpected_file"),
    ("delete_layout", "layout_missing"),
    ("delete_staging", "staging_missing"),
    ("damage_manifest", "manifest_damaged"),
    ("other_manifest", "manifest_mismatch"),
    ("delete_ndjson", "artifact_missing"),
    ("delete_delta", "ndjson_incomplete"),
    ("delete_run_report", "artifact_missing"),
    ("absolute_artifact", "artifact_path_invalid"),
    ("fingerprint", "fingerprint_mismatch"),
    ("orphan_parent", "parent_unregistered"),
    ("last_run_unregistered", "last_run_unregistered"),
    ("last_run_damaged", "last_run_damaged"),
    ("last_run_missing", "last_run_missing"),
    ("registry_damaged", "registry_damaged"),
    ("identity_damaged", "identity_damaged"),
    ("identity_secret_damaged", "identity_damaged"),
])
@pytest.mark.slow
def test_damage_is_reported(tree, damage, expected):
    first, second = runs_of(tree)
    run = tree / "staging" / first
    state = tree / "state"
    reg = json.loads((state / "runs.json").read_text())
    if damage in ("flip_byte", "truncate", "delete_file", "extra_file"):
        as_plain_run(tree, first)  # plain-file damage: in a run made before the store
    blob = blob_of(tree, first, "source/export.xml")
    if damage == "flip_blob_byte":
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 1
        blob.write_bytes(bytes(data))
    elif damage == "truncate_blob":
        blob.write_bytes(blob.read_bytes()[:-1])
    elif damage == "delete_blob":
        blob.unlink()
    elif damage == "flip_byte":
        p = run / "source" / "export.xml"
        data = bytearray(p.read_bytes())
        data[100] ^= 1
        p.write_bytes(bytes(data))
    elif damage == "truncate":
        p = run / "source" / "export_cda.xml"
        p.write_bytes(p.read_bytes()[:-1])
    elif damage == "delete_file":
        (run / "source" / "electrocardiograms" / "ecg_2024-02-03.csv").unlink()
    elif damage == "extra_file":
        (run / "source" / "planted.txt").write_text("x")
    elif damage == "delete_layout":
        (run / "layout.json").unlink()
    elif damage == "delete_staging":
        shutil.rmtree(run)
    elif damage == "damage_manifest":
        (run / "manifest.json").write_text("{not json")
    elif damage == "other_manifest":
        shutil.copy(tree / "staging" / second / "manifest.json", run / "manifest.json")
    elif damage == "delete_ndjson":
        shutil.rmtree(tree / "ndjson" / first)
    elif damage == "delete_delta":
        (tree / "ndjson" / first / "delta.json").unlink()
    elif damage == "delete_run_report":
        (run / "run_report.json").unlink()
    elif damage == "absolute_artifact":
        reg["runs"][first]["artifacts"]["ndjson_dir"] = str(tree / "ndjson" / first)
    elif damage == "fingerprint":
        reg["runs"][first]["input_fingerprint"]["total_bytes"] += 1
    elif damage == "orphan_parent":
        reg["runs"][second]["parent_run_id"] = "e" * 64
    elif damage == "last_run_unregistered":
        (state / "LAST_RUN").write_text("f" * 64 + "\n")
    elif damage == "last_run_damaged":
        (state / "LAST_RUN").write_text("not a run id\n")
    elif damage == "last_run_missing":
        (state / "LAST_RUN").unlink()
    elif damage == "registry_damaged":
        (state / "runs.json").write_text('{"runs": [')
    elif damage == "identity_damaged":
        (state / "identity" / "owners.json").write_text("{")
    elif damage == "identity_secret_damaged":
        (state / "identity" / "secret.key").write_text("short\n")
    if damage in ("absolute_artifact", "fingerprint", "orphan_parent"):
        (state / "runs.json").write_text(json.dumps(reg, indent=2, sort_keys=True) + "\n")
    before = snapshot(tree)
    proc = doctor_cli(tree.parent, "--out", "data")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert ("ERROR", expected) in codes(proc), proc.stdout
    assert lines(proc)[-1].startswith("errors=") and lines(proc)[-1] != "errors=0"
    assert str(tree.parent) not in proc.stdout and "Traceback" not in proc.stderr
    # Checking writes nothing; --repair never touches registered data or the damage.
    assert snapshot(tree) == before
    repaired = doctor_cli(tree.parent, "--out", "data", "--repair")
    assert repaired.returncode == 1 and ("ERROR", expected) in codes(repaired)
    assert snapshot(tree) == before


def test_repair_removes_orphans_only(tree):
    first, second = runs_of(tree)
    dead = _dead_pid()
    orphans = [
        tree / "staging" / f".tmp-ingest-{dead}",
        tree / "ndjson" / f".tmp-{second}-{dead}",
        tree / "deid" / f".tmp-{second}-{dead}",
        tree / "reports" / f".tmp-report-{second}-{dead}",
        tree / "ndjson" / ("a" * 64),  # a committed NDJSON dir whose run never got registered
    ]
    for d in orphans:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_bytes(b"x" * 10)
    (tree / "state" / f".tmp-runs.json-{dead}").write_text("{}")
    (tree / "state" / "identity" / f".tmp-secret-{dead}").write_text("0" * 64)
    (tree / f".tmp-warehouse.duckdb-{dead}").write_bytes(b"\0" * 10)
    # An unregistered but complete staged run (what `ingest` leaves for `run register`): kept.
    (tree / "staging" / ("b" * 64)).mkdir()
    as_plain_run(tree, first, tree / "staging" / ("b" * 64))
    manifest = json.loads((tree / "staging" / ("b" * 64) / "manifest.json").read_text())
    manifest["run_id"] = "b" * 64
    (tree / "staging" / ("b" * 64) / "manifest.json").write_text(json.dumps(manifest))
    # A symlinked orphan: the link goes, what it points to stays.
    outside = tree.parent / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (tree / "staging" / f".tmp-link-{dead}").symlink_to(outside, target_is_directory=True)
    # A live process's temporary: reported, never removed.
    live = tree / "staging" / f".tmp-ingest-{os.getpid()}"
    live.mkdir()
    # In the store: a blob a killed run was writing, and one no run lists (a pruned run's).
    blob_dir = blob_of(tree, first, "source/export.xml").parent
    (blob_dir / f".tmp-{'c' * 64}-{dead}").write_bytes(b"x")
    unlisted = blob_dir / f"{blob_dir.name}{'d' * 62}.zst"
    unlisted.write_bytes(b"x")

    registered = {k: v for k, v in snapshot(tree).items()
                  if not any(k.startswith(p) for p in (".tmp-", "state/.tmp-", "state/identity/.tmp-"))
                  and "/.tmp-" not in k and not k.startswith("ndjson/" + "a" * 64)
                  and k != unlisted.relative_to(tree).as_posix()}
    proc = doctor_cli(tree.parent, "--out", "data")
    assert proc.returncode == 1
    found = codes(proc)
    assert ("ERROR", "orphan_tmp") in found and ("ERROR", "unregistered_run_dir") in found
    assert ("WARN", "unregistered_staged_run") in found and ("WARN", "tmp_in_use") in found
    assert ("WARN", "unreferenced_blob") in found
    assert sum(1 for line in lines(proc) if line.startswith("ERROR orphan_tmp")) == 9

    fixed = doctor_cli(tree.parent, "--out", "data", "--repair")
    assert fixed.returncode == 0, fixed.stdout
    assert sum(1 for line in lines(fixed) if line.startswith("removed ")) == 11
    assert not unlisted.exists() and not list(blob_dir.glob(".tmp-*"))
    for d in orphans:
        assert not d.exists()
    assert not (tree / f".tmp-warehouse.duckdb-{dead}").exists()
    assert not (tree / "staging" / f".tmp-link-{dead}").exists()
    assert (outside / "keep.txt").read_text() == "keep"
    assert live.is_dir() and (tree / "staging" / ("b" * 64) / "manifest.json").is_file()
    after = snapshot(tree)
    assert all(after[k] == v for k, v in registered.items())
    assert lines(fixed)[-1] == "errors=0"


def test_unexpected_entries_are_reported_without_their_name(tree):
    (tree / "staging" / PERSON_DIR).mkdir()
    proc = doctor_cli(tree.parent, "--out", "data", "--repair")
    assert proc.returncode == 1
    assert "ERROR unexpected_entry staging/? (not a run directory)" in lines(proc)
    assert "Margarethe" not in proc.stdout and (tree / "staging" / PERSON_DIR).is_dir()


def test_wrong_state_dir_never_makes_runs_orphans(tree, tmp_path):
    """`--state` pointing at an empty state dir: nothing is unregistered, nothing removed."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    before = snapshot(tree)
    proc = doctor_cli(tree.parent, "--out", "data", "--state", str(other), "--repair")
    assert ("ERROR", "unregistered_run_dir") not in codes(proc)
    assert snapshot(tree) == before
    # ...and the state dir moved with --state works like the default one.
    shutil.move(tree / "state", tmp_path / "moved-state")
    ok = doctor_cli(tree.parent, "--out", "data", "--state", str(tmp_path / "moved-state"))
    assert ok.returncode == 0, ok.stdout
    assert str(tmp_path) not in ok.stdout


def test_warehouse_runs_are_compared_with_the_registry(tree):
    duckdb = pytest.importorskip("duckdb")
    first, second = runs_of(tree)
    con = duckdb.connect(str(tree / "warehouse.duckdb"))
    con.execute("CREATE TABLE runs (run_id VARCHAR)")
    con.execute("INSERT INTO runs VALUES (?), (?)", [first, "c" * 64])
    con.close()
    proc = doctor_cli(tree.parent, "--out", "data")
    assert proc.returncode == 1
    assert f"ERROR warehouse_run_unregistered {'c' * 12}" in lines(proc)
    assert any(line.startswith(f"ERROR warehouse_run_missing {second[:12]}") for line in lines(proc))
    con = duckdb.connect(str(tree / "warehouse.duckdb"))
    con.execute("DELETE FROM runs WHERE run_id = ?", ["c" * 64])
    con.execute("INSERT INTO runs VALUES (?)", [second])
    con.close()
    assert doctor_cli(tree.parent, "--out", "data").returncode == 0
    (tree / "warehouse.duckdb").write_bytes(b"not a database")
    proc = doctor_cli(tree.parent, "--out", "data")
    assert proc.returncode == 1 and ("ERROR", "warehouse_unreadable") in codes(proc)


def test_warehouse_without_duckdb_is_reported_not_checked(tree, monkeypatch):
    """The library check alone (the CLI as a whole needs duckdb for other commands)."""
    (tree / "warehouse.duckdb").write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "duckdb", None)  # import duckdb -> ImportError
    result = doctor.check(OutLayout.create(tree))
    assert result.ok
    assert "SKIP warehouse warehouse.duckdb (duckdb is not installed; warehouse not checked)" in map(
        str, result.findings)


def test_busy_state_and_missing_tree_are_one_error_line(tree, tmp_path):
    from healthdelta.fsutil import StateLock

    with StateLock(tree / "state"):
        line = assert_one_error_line(doctor_cli(tree.parent, "--out", "data"))
    assert "another healthdelta command" in line
    line = assert_one_error_line(doctor_cli(tmp_path, "--out", str(tmp_path / PERSON_DIR)))
    assert "no HealthDelta output" in line and "Margarethe" not in line


def test_read_only_tree_is_checked_without_the_lock(tree, monkeypatch):
    """A tree that cannot take the lock (EROFS) is still checked; repairing it is refused."""
    import healthdelta.doctor as mod

    class ReadOnlyLock:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            raise OSError(errno.EROFS, "Read-only file system")

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(mod, "StateLock", ReadOnlyLock)
    assert doctor.run_doctor(OutLayout.create(tree)).ok
    with pytest.raises(OSError):
        doctor.run_doctor(OutLayout.create(tree), repair=True)


def test_finding_lines_never_hold_absolute_paths(tree):
    first, _ = runs_of(tree)
    blob_of(tree, first, "source/export_cda.xml").unlink()
    result = doctor.check(OutLayout.create(tree))
    assert not result.ok
    for f in result.findings:
        assert not str(f).split(" ", 2)[2].startswith("/") and str(tree) not in str(f)
        assert hashlib.sha256(first.encode()).hexdigest() not in str(f)


def _dead_pid() -> int:
    """A pid that is not running (a process that already exited)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
