"""Staged exports in the content-addressed store (issue 12): files that exports repeat are
kept once, past runs stay readable (`export ndjson`, `deid`, `identity build`), `doctor`
verifies the blobs, `run prune` removes the ones no run needs, and runs staged before the
store (a plain `source/`) keep working beside the new ones."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import zstandard

from conftest import assert_one_error_line, kv

from healthdelta import stagestore
from healthdelta.errors import StateError

pytestmark = pytest.mark.slow  # real runs of generated exports through the CLI


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from healthdelta.synth import generate_export

    root = tmp_path_factory.mktemp("store-exports")
    first = generate_export(root / "export-1", seed=21, records=1500, zip=True)
    second = generate_export(root / "export-2", base=first, new_records=100, zip=True)
    return first, second


def manifest_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def blobs_of(out: Path) -> set[str]:
    return {p.name for p in (out / "staging" / "store").glob("*/*.zst")}


def streams(ndjson_run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(ndjson_run.glob("*.ndjson"))}


def make_plain(run_dir: Path, dest: Path | None = None) -> None:
    """A run as made before the store: its files back in a plain `source/` (of `dest`)."""
    with stagestore.plain_run(run_dir) as view:
        shutil.copytree(view / "source", (dest or run_dir) / "source")


def test_two_exports_share_unchanged_files_and_past_runs_stay_readable(cli, exports):
    first, second = exports
    one = kv(cli("pipeline", "run", "--input", str(first.zip_path), "--out", "data", check=True).stdout)
    run1 = cli.cwd / one["staging_dir"]
    at_the_time = kv(cli("export", "ndjson", "--input", one["staging_dir"], "--out", "then", check=True).stdout)
    two = kv(cli("pipeline", "run", "--input", str(second.zip_path), "--out", "data", check=True).stdout)
    run2 = cli.cwd / two["staging_dir"]

    # Neither run keeps a plain copy; each listed file is one blob, shared ones stored once.
    assert not (run1 / "source").exists() and not (run2 / "source").exists()
    files1 = {(f["path"], f["sha256"]) for f in manifest_of(run1)["files"]}
    files2 = {(f["path"], f["sha256"]) for f in manifest_of(run2)["files"]}
    shared = files1 & files2
    assert any(p.endswith(".csv") for p, _ in shared) and any(p.endswith(".json") for p, _ in shared)
    assert blobs_of(cli.cwd / "data") == {f"{sha}.zst" for _, sha in files1 | files2}
    assert not list((cli.cwd / "data").rglob(".tmp-*"))

    # The same export again is still a no-op, lineage unchanged.
    again = cli("pipeline", "run", "--input", str(second.zip_path), "--out", "data", check=True)
    assert again.stdout.splitlines()[0] == "no changes detected"
    runs = json.loads((cli.cwd / "data" / "state" / "runs.json").read_text())["runs"]
    assert runs[two["run_id"]]["delta_base_run_id"] == one["run_id"]

    # A past run exports the same streams as when it was made, read from the store.
    later = kv(cli("export", "ndjson", "--input", one["staging_dir"], "--out", "later", check=True).stdout)
    assert later["rows"] == at_the_time["rows"]
    assert streams(cli.cwd / "later" / one["run_id"]) == streams(cli.cwd / "then" / one["run_id"])
    # ...and de-identification and identity build read it too; the plain views are gone after.
    deid = kv(cli("deid", "--input", one["staging_dir"], "--out", "shared", check=True).stdout)
    assert int(deid["files"]) > 0 and (cli.cwd / deid["deid_dir"] / "source" / "export.xml").is_file()
    built = cli("identity", "build", "--out", "data", check=True).stdout
    assert f"run_id={one['run_id']}" in built and f"run_id={two['run_id']}" in built
    assert not list((cli.cwd / "data").rglob(".tmp-*"))
    doctor = cli("doctor", "--out", "data")
    assert doctor.returncode == 0, doctor.stdout
    assert f"ok run {one['run_id'][:12]} ({len(files1)} staged file(s) verified)" in doctor.stdout

    # Pruning run 1 removes the blobs only it listed, never one run 2 lists.
    pruned = json.loads(cli("run", "prune", "--out", "data", "--keep", "1", "--json", check=True).stdout)
    assert pruned["pruned_runs"] == [one["run_id"]]
    assert blobs_of(cli.cwd / "data") == {f"{sha}.zst" for _, sha in files2}
    assert cli("doctor", "--out", "data").returncode == 0
    gone = cli("export", "ndjson", "--input", one["staging_dir"], "--out", "after-prune")
    assert "pruned" in assert_one_error_line(gone)


def test_runs_made_before_the_store_keep_working_beside_new_ones(cli, exports):
    first, second = exports
    one = kv(cli("run", "all", "--input", str(first.zip_path), "--out", "data", check=True).stdout)
    run1 = cli.cwd / one["staging_dir"]
    make_plain(run1)
    for blob in (cli.cwd / "data" / "staging" / "store").glob("*/*.zst"):
        blob.unlink()  # as if the store never existed
    then = kv(cli("export", "ndjson", "--input", one["staging_dir"], "--out", "then", check=True).stdout)
    assert cli("doctor", "--out", "data").returncode == 0

    two = kv(cli("run", "all", "--input", str(second.zip_path), "--out", "data", check=True).stdout)
    assert two["delta_base_run_id"] == one["run_id"]
    assert (run1 / "source").is_dir()  # an old run is never moved into the store
    assert blobs_of(cli.cwd / "data") == {f"{f['sha256']}.zst" for f in manifest_of(cli.cwd / two["staging_dir"])["files"]}
    again = kv(cli("export", "ndjson", "--input", one["staging_dir"], "--out", "again", check=True).stdout)
    assert again["rows"] == then["rows"]
    assert streams(cli.cwd / "again" / one["run_id"]) == streams(cli.cwd / "then" / one["run_id"])
    doctor = cli("doctor", "--out", "data")
    assert doctor.returncode == 0 and "unreferenced_blob" not in doctor.stdout, doctor.stdout

    cli("run", "prune", "--out", "data", "--keep", "1", check=True)
    assert not (run1 / "source").exists()
    assert cli("doctor", "--out", "data").returncode == 0


def test_store_step_skips_present_blobs_and_refuses_a_changed_file(tmp_path, mini_export):
    from healthdelta import pipeline

    run_id, run_dir = pipeline.ingest_only(mini_export, tmp_path / "staging")
    store = stagestore.store_of(tmp_path / "staging")
    copy = tmp_path / "staging" / ("b" * 64)
    shutil.copytree(run_dir, copy)
    stagestore.store_run(run_dir, store)
    stamps = {p: p.stat().st_mtime_ns for p in store.glob("*/*.zst")}
    assert stagestore.store_run(copy, store) == 0  # every blob already there: nothing written
    assert {p: p.stat().st_mtime_ns for p in store.glob("*/*.zst")} == stamps
    assert stagestore.store_run(copy, store) == 0  # stored already: a check only

    # A blob is named by what the staged file was; a file changed since is never stored.
    other = tmp_path / "other" / "staging"
    shutil.copytree(tmp_path / "staging" / run_id, other / run_id)
    make_plain(run_dir, other / run_id)
    (other / run_id / "source" / "export.xml").write_bytes(b"changed")
    with pytest.raises(StateError):
        stagestore.store_run(other / run_id, stagestore.store_of(other))
    assert (other / run_id / "source").is_dir() and not list(other.rglob(".tmp-*"))


def test_blob_check_catches_truncation_and_wrong_content(tmp_path):
    store = tmp_path / "store"
    data = os.urandom(100_000)
    sha = hashlib.sha256(data).hexdigest()
    blob = stagestore.blob_path(store, sha)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    assert stagestore.verify_blob(store, len(data), sha) is None
    blob.write_bytes(blob.read_bytes()[:-2])
    assert stagestore.verify_blob(store, len(data), sha) == "corrupt"
    blob.write_bytes(zstandard.ZstdCompressor().compress(data[:-1] + b"x"))
    assert stagestore.verify_blob(store, len(data), sha) == "corrupt"
    blob.unlink()
    assert stagestore.verify_blob(store, len(data), sha) == "missing"


def test_a_killed_store_step_leaves_plain_files_and_the_rerun_finishes(cli, exports):
    """SIGKILL mid-blob and after the last blob (before `source/` goes): nothing registered,
    the work copy or complete blobs left, and a rerun ends as an uninterrupted run does."""
    first, _ = exports
    ref = kv(cli("pipeline", "run", "--input", str(first.zip_path), "--out", "ref", check=True).stdout)
    total = sum(f["size"] for f in manifest_of(cli.cwd / ref["staging_dir"])["files"])
    for units in (total // 2, total):
        out = f"data-{units}"
        proc = cli("pipeline", "run", "--input", str(first.zip_path), "--out", out,
                   env={"HEALTHDELTA_TEST_FAULT": f"storing:{units}:KILL"})
        assert proc.returncode == -9, proc.stderr
        assert not (cli.cwd / out / "state" / "runs.json").exists()
        work = [p for p in (cli.cwd / out / "staging").iterdir() if p.name.startswith(".tmp-ingest-")]
        assert len(work) == 1 and (work[0] / "source").is_dir()
        rerun = kv(cli("pipeline", "run", "--input", str(first.zip_path), "--out", out, check=True).stdout)
        assert rerun["run_id"] == ref["run_id"]
        assert not list((cli.cwd / out).rglob(".tmp-*"))
        assert blobs_of(cli.cwd / out) == blobs_of(cli.cwd / "ref")
        for blob in (cli.cwd / "ref" / "staging" / "store").glob("*/*.zst"):
            assert filecmp.cmp(blob, cli.cwd / out / blob.relative_to(cli.cwd / "ref"), shallow=False)
        assert cli("doctor", "--out", out).returncode == 0


def test_share_mode_keeps_its_deidentified_copy_in_the_store(cli, exports):
    """Share mode's de-identified copy is as large as the export: it goes to the store too,
    its blobs count as referenced (prune and doctor keep them), and they hold what the
    de-identified files held."""
    first, second = exports
    one = kv(cli("run", "all", "--input", str(first.zip_path), "--out", "data", "--mode", "share", check=True).stdout)
    two = kv(cli("run", "all", "--input", str(second.zip_path), "--out", "data", "--mode", "share",
                 check=True).stdout)
    out = cli.cwd / "data"
    deid1, deid2 = cli.cwd / one["deid_dir"], cli.cwd / two["deid_dir"]
    assert not (deid1 / "source").exists() and not (deid2 / "source").exists()
    store = stagestore.store_of(out / "staging")
    for deid_dir in (deid1, deid2):
        for f in manifest_of(deid_dir)["files"]:
            data = zstandard.ZstdDecompressor().stream_reader(open(stagestore.blob_path(store, f["sha256"]), "rb")).read()
            assert len(data) == f["size"] and hashlib.sha256(data).hexdigest() == f["sha256"]
    doctor = cli("doctor", "--out", "data")
    assert doctor.returncode == 0 and "unreferenced_blob" not in doctor.stdout, doctor.stdout
    cli("run", "prune", "--out", "data", "--keep", "1", check=True)
    kept = {f"{f['sha256']}.zst" for d in (out / "staging" / two["run_id"], deid2) for f in manifest_of(d)["files"]}
    assert blobs_of(out) == kept
    doctor = cli("doctor", "--out", "data")
    assert doctor.returncode == 0 and "unreferenced_blob" not in doctor.stdout, doctor.stdout
