import pytest

from healthdelta.errors import StateError
from healthdelta.fsutil import StateLock, WorkDir, atomic_write_bytes, json_bytes, remove_orphan_tmp_dirs


def test_atomic_write_skips_identical_bytes(tmp_path):
    p = tmp_path / "a.json"
    assert atomic_write_bytes(p, b"x\n") is True
    assert atomic_write_bytes(p, b"x\n") is False
    assert p.read_bytes() == b"x\n"
    assert [c.name for c in tmp_path.iterdir()] == ["a.json"]


def test_json_bytes_deterministic():
    assert json_bytes({"b": 1, "a": "é"}) == '{\n  "a": "é",\n  "b": 1\n}\n'.encode()


def test_workdir_removed_on_failure_and_commits(tmp_path):
    final = tmp_path / "final"
    with pytest.raises(RuntimeError):
        with WorkDir(tmp_path, "x") as work:
            (work.path / "f").write_text("1")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with WorkDir(tmp_path, "x") as work:
        (work.path / "f").write_text("1")
        work.commit(final)
    assert (final / "f").read_text() == "1"
    assert [c.name for c in tmp_path.iterdir()] == ["final"]


def test_orphans_removed(tmp_path):
    (tmp_path / ".tmp-ingest-999999999").mkdir()
    (tmp_path / "keep").mkdir()
    assert remove_orphan_tmp_dirs(tmp_path) == [".tmp-ingest-999999999"]
    assert [c.name for c in tmp_path.iterdir()] == ["keep"]


def test_lock_is_exclusive(tmp_path):
    with StateLock(tmp_path):
        with pytest.raises(StateError, match="another healthdelta command"):
            with StateLock(tmp_path, timeout=0.2):
                pass
    with StateLock(tmp_path):
        pass


def test_orphan_cleanup_spares_a_live_writer(tmp_path):
    """One policy with `doctor --repair`: a `.tmp-*` whose process still runs is not an orphan."""
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f".tmp-warehouse.duckdb-{live.pid}").write_bytes(b"")
        (tmp_path / ".tmp-ingest-999999999").mkdir()
        assert remove_orphan_tmp_dirs(tmp_path) == [".tmp-ingest-999999999"]
        assert (tmp_path / f".tmp-warehouse.duckdb-{live.pid}").exists()
    finally:
        live.kill()
        live.wait()
    assert remove_orphan_tmp_dirs(tmp_path) == [f".tmp-warehouse.duckdb-{live.pid}"]
