"""Stream files stored zstd-compressed (issue 12): the writer, DuckDB reading them natively,
`export ndjson` giving the plain canonical bytes, and state dirs holding runs of both forms."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import duckdb
import pytest

from conftest import Cli, decompress_run, kv, read_ndjson, stream_bytes
from healthdelta import export, stagestore, streamfile, warehouse
from healthdelta.errors import StateError
from healthdelta.ndjson import STREAMS

LINES = [b'{"event_time":"2024-01-0%dT00:00:00Z","n":%d}\n' % (i % 9 + 1, i) for i in range(5000)]


def write(path: Path, lines: list[bytes]) -> Path:
    with streamfile.StreamWriter(path) as out:
        out.writelines(lines)
    return path


def test_compressed_stream_reads_back_plain_and_is_deterministic(tmp_path):
    (tmp_path / "a").mkdir()
    a = write(tmp_path / "a" / "observations.ndjson.zst", LINES)
    b = write(tmp_path / "observations.ndjson.zst", LINES)
    assert a.read_bytes() == b.read_bytes()  # same rows, same bytes: no timestamps in the frame
    assert a.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    assert len(a.read_bytes()) < len(b"".join(LINES)) // 5
    assert streamfile.read_bytes(a) == b"".join(LINES)
    with streamfile.open_read(a) as fh:
        assert list(fh) == LINES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "observations.ndjson.zst"]  # no temporaries


def test_empty_stream_is_an_empty_file_in_both_forms(tmp_path):
    for name in ("routes.ndjson.zst", "routes.ndjson"):
        path = write(tmp_path / name, [])
        assert path.stat().st_size == 0 and streamfile.read_bytes(path) == b""


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with streamfile.StreamWriter(tmp_path / "ecg.ndjson.zst") as out:
            out.write(LINES[0])
            raise RuntimeError("disk gone")
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_compressed_stream_is_a_state_error(tmp_path):
    path = write(tmp_path / "observations.ndjson.zst", LINES)
    path.write_bytes(path.read_bytes()[:-40] + b"\0" * 40)
    with pytest.raises(StateError, match="damaged"):
        streamfile.read_bytes(path)


def test_find_prefers_the_compressed_form_and_knows_both(tmp_path):
    assert streamfile.find(tmp_path, "ecg") is None
    write(tmp_path / "ecg.ndjson", LINES[:1])
    assert streamfile.find(tmp_path, "ecg").name == "ecg.ndjson"
    write(tmp_path / "ecg.ndjson.zst", LINES[:1])
    assert streamfile.find(tmp_path, "ecg").name == "ecg.ndjson.zst"
    assert [streamfile.stream_name(p) for p in streamfile.stream_files(tmp_path)] == ["ecg", "ecg"]


def test_duckdb_reads_zst_streams_natively(tmp_path):
    rows = [json.dumps({"record_key": f"{i:064x}", "value": i}, separators=(",", ":")).encode() + b"\n"
            for i in range(1000)]
    path = write(tmp_path / "observations.ndjson.zst", rows)
    empty = write(tmp_path / "ecg.ndjson.zst", [])
    con = duckdb.connect()
    spec = "columns = {'record_key': 'VARCHAR', 'value': 'BIGINT'}"
    assert con.execute(f"SELECT count(*), sum(value) FROM read_json(?, format = 'newline_delimited', {spec})",
                       [str(path)]).fetchone() == (1000, sum(range(1000)))
    assert con.execute(f"SELECT count(*) FROM read_json(?, format = 'newline_delimited', {spec})",
                       [str(empty)]).fetchone() == (0,)


# --------------------------------------------------------------------------- whole runs


def stored(ndjson_dir: Path) -> list[str]:
    return sorted(p.relative_to(ndjson_dir).as_posix() for sub in ("", "added", "removed")
                  for p in streamfile.stream_files(ndjson_dir / sub))


def test_plain_writer_bytes_equal_the_decompressed_stored_streams(tmp_path, synth_pair):
    """The compressed form holds exactly the plain canonical bytes (the pre-compression
    format), and both forms are deterministic."""
    from healthdelta import pipeline
    from healthdelta.layout import OutLayout

    first, second = synth_pair
    layout = OutLayout.create(tmp_path / "data")
    a = pipeline.run_pipeline(pipeline.PipelineOptions(input=first.zip_path, layout=layout))
    b = pipeline.run_pipeline(pipeline.PipelineOptions(input=second.zip_path, layout=layout))
    staged = layout.staging_dir(b.run_id)
    kw = dict(run_id=b.run_id, parent_run_id=a.run_id, person_id="p-1", workers=1)
    outs = {}
    with stagestore.plain_run(staged) as plain_staged:  # the run's export, from the store
        for name, compressed in (("plain", False), ("zst1", True), ("zst2", True)):
            outs[name] = tmp_path / name
            shutil.copytree(layout.ndjson / a.run_id, outs[name] / a.run_id)  # the delta base
            export.export_run(plain_staged, outs[name], compressed=compressed, **kw)
    plain, zst1, zst2 = (outs[n] / b.run_id for n in ("plain", "zst1", "zst2"))
    assert stored(plain) == sorted(f"{sub}{s}.ndjson" for sub in ("", "added/", "removed/") for s in STREAMS)
    assert stored(zst1) == [f"{name}.zst" for name in stored(plain)]
    for name in stored(plain):
        assert streamfile.read_bytes(zst1 / f"{name}.zst") == (plain / name).read_bytes(), name
        assert (zst1 / f"{name}.zst").read_bytes() == (zst2 / f"{name}.zst").read_bytes(), name
    assert (plain / "added" / "observations.ndjson").stat().st_size > 0
    for stream in STREAMS:  # the key index is stored like its stream
        index = streamfile.read_bytes(zst1 / "index" / f"{stream}.keys.zst")
        assert index == (plain / "index" / f"{stream}.keys").read_bytes(), stream
        assert len(index.splitlines()) == len(streamfile.read_bytes(zst1 / f"{stream}.ndjson.zst").splitlines())


@pytest.mark.slow
def test_an_old_plain_run_then_a_new_run_in_one_state_dir(tmp_path, synth_pair):
    """A state dir written before streams were compressed (plain `.ndjson`), then a new run:
    the delta, the warehouse, doctor, validate, export, prune and duckdb build all work."""
    first, second = synth_pair
    cli = Cli(tmp_path)
    a = kv(cli("run", "all", "--input", str(first.zip_path), "--out", "data", check=True).stdout)
    old = tmp_path / a["ndjson_dir"]
    decompress_run(old)
    assert all(not name.endswith(".zst") for name in stored(old))
    assert sorted(p.name for p in (old / "index").iterdir()) == sorted(f"{s}.keys" for s in STREAMS)
    b = kv(cli("run", "all", "--input", str(second.zip_path), "--out", "data", check=True).stdout)
    new = tmp_path / b["ndjson_dir"]
    assert all(name.endswith(".ndjson.zst") for name in stored(new))
    delta = json.loads((new / "delta.json").read_text())
    assert delta["parent_run_id"] == a["run_id"] and delta["removed"] == 0
    assert delta["streams"]["observations"]["added"] > 0
    old_keys = {r["record_key"] for r in read_ndjson(old / "observations.ndjson")}
    added = read_ndjson(new / "added" / "observations.ndjson")
    assert {r["record_key"] for r in added} == {r["record_key"] for r in read_ndjson(new / "observations.ndjson")} \
        - old_keys
    assert cli("doctor", "--out", "data", check=True).returncode == 0
    for run_dir in (old, new):
        assert cli("export", "validate", "--input", str(run_dir), check=True).stdout.strip() == "ok"
    # `export ndjson` of a stored run: the plain canonical files, byte for byte.
    out = kv(cli("export", "ndjson", "--input", str(new), "--out", "exported", check=True).stdout)
    copy = tmp_path / out["ndjson_dir"]
    assert stored(copy) == [name.removesuffix(".zst") for name in stored(new)]
    for name in stored(copy):
        assert (copy / name).read_bytes() == stream_bytes(new / name)
    assert cli("export", "validate", "--input", str(copy), check=True).stdout.strip() == "ok"
    # The warehouse built again from both forms holds what `run all` loaded.
    db = tmp_path / "rebuilt.duckdb"
    cli("duckdb", "build", "--input", str(tmp_path / "data" / "ndjson"), "--db", str(db), check=True)
    counts = warehouse.connect(db, read_only=True).execute("SELECT count(*) FROM observations").fetchone()
    live = warehouse.connect(tmp_path / "data" / "warehouse.duckdb", read_only=True)
    assert counts == live.execute("SELECT count(*) FROM observations").fetchone()
    # Prune removes the old run's plain streams as it would compressed ones.
    cli("run", "prune", "--keep", "1", "--out", "data", check=True)
    assert [n for n in stored(old) if "/" not in n] == []
    assert cli("doctor", "--out", "data", check=True).returncode == 0
    assert not [p for p in (tmp_path / "data").rglob(".tmp-*")]
    assert os.listdir(old / "added")
