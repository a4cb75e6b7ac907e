"""Share bundles: share-safe members only, leak refusal, determinism, and the verifier."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from healthdelta import deid, export, identity, ingest, pipeline, registry, share, synth
from healthdelta.errors import StateError
from healthdelta.share import LeakError


def _share_run(out: Path, export_root: Path, *, mode: str = "share", local_ndjson: bool = False) -> str:
    """Stage, resolve, de-identify, export NDJSON and register a run the way share mode does."""
    run_id, run_dir = pipeline.ingest_only(export_root, out / "staging")
    state = out / "state"
    identity.resolve_run(state / "identity", run_dir, run_id)
    deid_dir = out / "deid" / run_id
    result = deid.deidentify_run(run_dir, deid_dir, state / "identity")
    source = run_dir if local_ndjson else deid_dir
    export.export_run(source, out / "ndjson", run_id=run_id, parent_run_id=None,
                      person_id=result.share_person_id)
    manifest = ingest.read_manifest(run_dir)
    registry.register_run(state, run_id=run_id, parent_run_id=None, fingerprint=manifest["input_fingerprint"],
                          artifacts={"staging_dir": f"staging/{run_id}", "deid_dir": f"deid/{run_id}",
                                     "ndjson_dir": f"ndjson/{run_id}"}, mode=mode)
    return run_id


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    export_ = synth.generate_export(root / "in", seed=4, records=500, people=2, ambiguous_person=True)
    out = root / "data"
    run_id = _share_run(out, export_.root)
    return export_, out, run_id


def _pii(export_) -> list[str]:
    return [v for p in export_.people for v in p.pii_strings()]


def test_bundle_holds_share_safe_members_only_and_no_pii(shared, tmp_path):
    export_, out, run_id = shared
    dest = tmp_path / "b.tar.gz"
    result = share.build_bundle(out, run_id, dest, out / "state" / "identity")
    assert result.run_id == run_id and dest.is_file()
    members = dict(share.iter_members(dest))
    names = list(members)
    top = f"share-{run_id[:12]}"
    assert names[0] == f"{top}/manifest.json"
    assert f"{top}/ndjson/observations.ndjson" in names and f"{top}/ndjson/delta.json" in names
    assert all(n.startswith(f"{top}/ndjson/") for n in names[1:])
    assert not any("/index/" in n or "/local/" in n or "staging" in n or "identity" in n for n in names)
    for name, data in members.items():
        text = data.decode("utf-8", "replace").casefold()
        for value in _pii(export_):
            assert value.casefold() not in text, f"planted PII in bundle member {name}"
    manifest = json.loads(members[names[0]])
    assert [f["path"] for f in manifest["files"]] == names[1:]
    assert all(f["sha256"] == hashlib.sha256(members[f["path"]]).hexdigest() for f in manifest["files"])
    assert share.verify_bundle(dest) == []


def test_bundle_is_byte_identical_when_rebuilt(shared, tmp_path):
    _, out, run_id = shared
    a = share.build_bundle(out, run_id, tmp_path / "one.tar.gz", out / "state" / "identity")
    b = share.build_bundle(out, run_id[:10], tmp_path / "other-name.tar.gz", out / "state" / "identity")
    assert (tmp_path / "one.tar.gz").read_bytes() == (tmp_path / "other-name.tar.gz").read_bytes()
    assert a.sha256 == b.sha256
    with tarfile.open(tmp_path / "one.tar.gz") as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
    with gzip.open(tmp_path / "one.tar.gz") as gz:
        gz.read(1)
        assert gz.mtime == 0


def test_bundle_refuses_known_identifiers_and_writes_nothing(tmp_path):
    export_ = synth.generate_export(tmp_path / "in", seed=6, records=300, people=2, ambiguous_person=True)
    out = tmp_path / "data"
    run_id = _share_run(out, export_.root, local_ndjson=True)  # NDJSON of the raw staging: full of PII
    dest = tmp_path / "leak.tar.gz"
    with pytest.raises(LeakError) as err:
        share.build_bundle(out, run_id, dest, out / "state" / "identity")
    assert not dest.exists() and not list(tmp_path.glob(".tmp-*"))
    message = str(err.value)
    for value in _pii(export_):
        assert value.casefold() not in message.casefold()
    assert str(tmp_path) not in message


def test_bundle_refuses_a_local_mode_run(tmp_path):
    export_ = synth.generate_export(tmp_path / "in", seed=7, records=200)
    out = tmp_path / "data"
    run_id = _share_run(out, export_.root, mode="local")
    with pytest.raises(StateError):
        share.build_bundle(out, run_id, tmp_path / "x.tar.gz", out / "state" / "identity")
    assert not (tmp_path / "x.tar.gz").exists()


def test_identifier_scan_finds_every_form():
    person = identity.PersonPII(
        "p_1", "Patient 1", ({"given": ["Margarethe"], "family": "Quist"},), ("Margarethe’s Apple Watch",),
        ("1961-04-07",), ("April 7, 1961",), ("K1234567",),
        ({"system": "phone", "value": "+1-503-555-0142"}, {"system": "email", "value": "mq@example.net"}),
        ({"lines": ["12 Alder Creek Rd"], "city": "Cedarhaven"},))
    scan = share.IdentifierScan([person])
    for text in ("x QUIST y", "Quist, Margarethe", "M. Quist", "1961-04-07", "19610407", "04/07/1961",
                 "7 April 1961", "k1234567", "(503) 555-0142", "5035550142", "MQ@example.net", "12 alder creek rd",
                 "&#77;argarethe", '"\\u004dargarethe"'):
        assert scan.find(text), text
    for text in ("Patient 1", "2020-03-02", "Quistx", "97123", "hr 72"):
        assert scan.find(text) is None, text


# --------------------------------------------------------------------------- verify


def _rewrite(src: Path, dst: Path, change) -> None:
    """Copy a bundle member by member through `change(info, data) -> [(info, data)]`."""
    with tarfile.open(src, "r:gz") as tar_in, tarfile.open(dst, "w:gz", format=tarfile.PAX_FORMAT) as tar_out:
        for member in tar_in.getmembers():
            data = tar_in.extractfile(member).read() if member.isreg() else b""
            for info, payload in change(member, data):
                tar_out.addfile(info, io.BytesIO(payload) if info.isreg() else None)


def test_verify_catches_tampering(shared, tmp_path):
    _, out, run_id = shared
    good = tmp_path / "good.tar.gz"
    share.build_bundle(out, run_id, good, out / "state" / "identity")

    def tamper(info, data):
        if info.name.endswith("observations.ndjson"):
            data = data.replace(b'"value":', b'"value": ', 1)
            info.size = len(data)
        return [(info, data)]

    bad = tmp_path / "bad.tar.gz"
    _rewrite(good, bad, tamper)
    problems = share.verify_bundle(bad)
    assert any(p.startswith("ERROR hash_mismatch ") and p.endswith("observations.ndjson") for p in problems)
    assert any(p.startswith("ERROR size_mismatch ") for p in problems)

    def same_size(info, data):
        if info.name.endswith("delta.json"):
            data = data[:-2] + b"X\n"
        return [(info, data)]

    _rewrite(good, bad, same_size)
    assert any(p.startswith("ERROR hash_mismatch ") and "delta.json" in p for p in share.verify_bundle(bad))


def test_verify_catches_hostile_paths_links_and_extras(shared, tmp_path):
    _, out, run_id = shared
    good = tmp_path / "good.tar.gz"
    share.build_bundle(out, run_id, good, out / "state" / "identity")

    def hostile(info, data):
        yield info, data
        if info.name.endswith("manifest.json"):
            evil = tarfile.TarInfo("../evil.txt")
            evil.size = 4
            yield evil, b"evil"
            absolute = tarfile.TarInfo("/etc/evil")
            absolute.size = 1
            yield absolute, b"x"
            link = tarfile.TarInfo(f"share-{run_id[:12]}/link")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            yield link, b""

    bad = tmp_path / "bad.tar.gz"
    _rewrite(good, bad, hostile)
    problems = share.verify_bundle(bad)
    assert "ERROR parent_path ../evil.txt" in problems
    assert "ERROR absolute_path /etc/evil" in problems
    assert any(p.startswith("ERROR link ") for p in problems)
    assert any(p.startswith("ERROR unlisted_member ") for p in problems)

    def drop_member(info, data):
        return [] if info.name.endswith("workouts.ndjson") else [(info, data)]

    _rewrite(good, bad, drop_member)
    assert any(p.startswith("ERROR missing_member ") for p in share.verify_bundle(bad))
    (tmp_path / "junk.tar.gz").write_bytes(b"not a bundle")
    assert share.verify_bundle(tmp_path / "junk.tar.gz")[0].startswith("ERROR unreadable")


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from healthdelta.cli import commands_identity, main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_bundle_and_verify(shared, tmp_path):
    export_, out, run_id = shared
    dest = tmp_path / "cli.tar.gz"
    proc = run_cli("share", "bundle", "--run", run_id[:8], "--out", str(dest), "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"run_id={run_id}" in proc.stdout
    ok = run_cli("share", "verify", "--bundle", str(dest), cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip() == "ok"
    for p in (proc, ok):
        for value in _pii(export_):
            assert value.casefold() not in (p.stdout + p.stderr).casefold()
    bad = tmp_path / "bad.tar.gz"
    _rewrite(dest, bad, lambda info, data: [(info, data.replace(b"Patient", b"Patiens"))])
    failed = run_cli("share", "verify", "--bundle", str(bad), cwd=tmp_path)
    assert failed.returncode == 1
    assert all(line.startswith(("ERROR ", "errors=")) for line in failed.stdout.splitlines())
    refused = run_cli("share", "bundle", "--run", run_id, "--out", str(tmp_path / "x.zip"), "--out-dir", str(out),
                      cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ")


@pytest.mark.slow
def test_share_bundle_after_pipeline_share_mode(tmp_path):
    export_ = synth.generate_export(tmp_path / "in", seed=9, records=300, people=2, ambiguous_person=True)
    data = tmp_path / "data"
    run = run_cli("pipeline", "run", "--input", str(export_.root), "--out", str(data), "--mode", "share",
                  cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    run_id = dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line)["run_id"]
    dest = tmp_path / "b.tar.gz"
    assert run_cli("share", "bundle", "--run", run_id, "--out", str(dest), "--out-dir", str(data),
                   cwd=tmp_path).returncode == 0
    for name, payload in share.iter_members(dest):
        for value in _pii(export_):
            assert value.casefold() not in payload.decode("utf-8", "replace").casefold(), name


@pytest.mark.slow
def test_share_notice_names_the_bundle_command_runnable_as_printed(tmp_path, mini_export):
    """`run all --mode share` ends by saying that only the bundle may leave the machine, with
    the command that makes it; printed for an --out with a space, it runs as printed."""
    from conftest import Cli

    cli = Cli(tmp_path)
    proc = cli("run", "all", "--input", str(mini_export), "--out", "my data", "--mode", "share", check=True)
    notice = [line for line in proc.stderr.splitlines() if line.startswith("notice: nothing under --out")]
    assert len(notice) == 1
    command = notice[0].split("the bundle: ", 1)[1]
    assert "'my data'" in command and str(mini_export) not in proc.stderr + proc.stdout
    made = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "share.tar.gz").is_file()
    assert cli("share", "verify", "--bundle", "share.tar.gz", check=True).stdout.strip() == "ok"
