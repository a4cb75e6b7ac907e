import pytest

from healthdelta import registry
from healthdelta.errors import StateError, UsageError

FP = {"algorithm": "sha256", "sha256": "a" * 64, "file_count": 1, "total_bytes": 3}


def test_register_is_idempotent_and_byte_stable(tmp_path):
    registry.register_run(tmp_path, run_id="1" * 64, parent_run_id=None, fingerprint=FP,
                          artifacts={"staging_dir": "staging/" + "1" * 64}, note="first")
    before = (tmp_path / "runs.json").read_bytes()
    mtime = (tmp_path / "runs.json").stat().st_mtime_ns
    registry.register_run(tmp_path, run_id="1" * 64, parent_run_id=None, fingerprint=FP,
                          artifacts={"staging_dir": "staging/" + "1" * 64})
    assert (tmp_path / "runs.json").read_bytes() == before
    assert (tmp_path / "runs.json").stat().st_mtime_ns == mtime  # not rewritten at all
    assert before.endswith(b"}\n") and b'  "runs": {' in before
    assert (tmp_path / "LAST_RUN").read_text() == "1" * 64 + "\n"


def test_created_at_is_set_once(tmp_path, monkeypatch):
    registry.register_run(tmp_path, run_id="1" * 64, parent_run_id=None, fingerprint=FP, artifacts={})
    first = registry.read_registry(tmp_path).get("1" * 64)["created_at"]
    monkeypatch.setattr(registry, "utc_now", lambda: "2099-01-01T00:00:00Z")
    registry.register_run(tmp_path, run_id="1" * 64, parent_run_id=None, fingerprint=FP, artifacts={}, note="n")
    entry = registry.read_registry(tmp_path).get("1" * 64)
    assert entry["created_at"] == first and entry["notes"] == "n"


def test_conflicting_fingerprint_refused(tmp_path):
    registry.register_run(tmp_path, run_id="1" * 64, parent_run_id=None, fingerprint=FP, artifacts={})
    with pytest.raises(StateError):
        registry.register_run(tmp_path, run_id="1" * 64, parent_run_id=None,
                              fingerprint={**FP, "sha256": "b" * 64}, artifacts={})


def test_resolve_prefix(tmp_path):
    for rid in ("abcd1" + "0" * 59, "abcd2" + "0" * 59):
        registry.register_run(tmp_path, run_id=rid, parent_run_id=None, fingerprint=FP, artifacts={})
    reg = registry.read_registry(tmp_path)
    assert reg.resolve("abcd1")["run_id"].startswith("abcd1")
    with pytest.raises(StateError, match="more than one"):
        reg.resolve("abcd")
    with pytest.raises(StateError, match="no registered run"):
        reg.resolve("ffff")
    with pytest.raises(UsageError):
        reg.resolve("xyz")


def test_damaged_registry_and_last_run(tmp_path):
    (tmp_path / "runs.json").write_text("{not json")
    with pytest.raises(StateError, match="damaged"):
        registry.read_registry(tmp_path)
    (tmp_path / "runs.json").write_text('{"runs": {"x": {"run_id": "y"}}}')
    with pytest.raises(StateError, match="damaged"):
        registry.read_registry(tmp_path)
    (tmp_path / "LAST_RUN").write_text("../../etc\n")
    with pytest.raises(StateError, match="LAST_RUN"):
        registry.read_last_run(tmp_path)


def test_since_resolution(tmp_path):
    assert registry.resolve_parent(registry.read_registry(tmp_path), tmp_path, "last") is None
    with pytest.raises(StateError, match="--since"):
        registry.resolve_parent(registry.read_registry(tmp_path), tmp_path, "a" * 64)
